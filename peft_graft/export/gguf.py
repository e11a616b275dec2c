"""Write a PEFT LoRA adapter folder as a llama.cpp LoRA adapter: the GGUF file that llama.cpp's
``convert_lora_to_gguf.py`` makes and ``llama-cli --lora`` (``llama_adapter_lora_init``) loads.

What llama.cpp expects (``src/llama-adapter.cpp`` checks each point when it loads the file):

* metadata ``general.type = "adapter"``, ``general.architecture`` = the base model's llama.cpp architecture (an adapter
  for another architecture is refused), ``adapter.type = "lora"`` and ``adapter.lora.alpha`` (float32);
* for each adapted base tensor ``T`` (its GGUF name, e.g. ``blk.0.attn_q.weight``) two tensors: ``T.lora_a`` = PEFT's
  ``lora_A`` (r × in) and ``T.lora_b`` = ``lora_B`` (out × r). GGUF lists dimensions innermost first, so ggml sees
  ne = [in, r] and [r, out]. Token embeddings are the exception: llama.cpp gathers rows of ``lora_a`` by token id, so
  ``token_embd.weight.lora_a`` is ``lora_embedding_A`` transposed (vocab × r) and ``.lora_b`` is ``lora_embedding_B``;
* at run time llama.cpp adds ``(alpha / r) · B (A x)``, with r read from each ``lora_b`` (``alpha == 0`` means 1).

Two things the file must get right beyond copying tensors:

* **q/k row order.** ``convert_hf_to_gguf.py`` reorders the rows of ``q_proj`` / ``k_proj`` of Llama and Mistral
  models, head by head, from Hugging Face's rotate-half RoPE layout (rotating pairs (i, i + d/2)) to ggml's interleaved
  one (pairs (2i, 2i + 1)). A LoRA's B·A lives in the same output space as the weight, so ``lora_b``'s rows get the
  same reordering while ``lora_a`` stays as it is, as ``convert_lora_to_gguf.py`` does. Qwen2 keeps the NeoX layout.
* **Per-module scale.** The format has one alpha and always divides it by each tensor's rank. PEFT's ``use_rslora``
  (alpha / √r) and ``alpha_pattern`` give scales it cannot express (``convert_lora_to_gguf.py`` ignores both and writes
  another adapter). Here the ratio of PEFT's scale to llama.cpp's is folded into ``lora_b``; for a plain config the
  ratio is exactly 1 and ``lora_b`` is written unchanged.

The GGUF writer and the tensor-name table (HF module -> llama.cpp tensor) are the ``gguf`` package's
(``pip install gguf``, not a dependency of peft-graft); it is imported, with safetensors, peft and transformers, only
when `lora_to_gguf` runs. Embedding and lm_head copies that PEFT saves beside a LoRA (``*.base_layer.weight``) are
skipped, as the llama.cpp converter skips them: the base GGUF has its own.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AdapterFileError, ExportError


if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Hugging Face architecture -> (its gguf.MODEL_ARCH member, whether convert_hf_to_gguf.py reorders the q/k rows), as
# that script registers them (LlamaModel has undo_permute = True; Qwen2Model changes no tensor).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
}
OUTTYPES = ("f32", "f16", "bf16")  # convert_lora_to_gguf.py's --outtype choices that keep every value (no q8_0)

_PREFIX = "base_model.model."  # what PeftModel puts before module names in adapter_model.safetensors
_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
_B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B")


@dataclass
class _Pair:
    """One adapted module: its GGUF tensor name and the two arrays written for it, as llama.cpp wants them."""

    name: str
    lora_a: np.ndarray
    lora_b: np.ndarray


def lora_to_gguf(
    lora_dir: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    base_config: PretrainedConfig | str | os.PathLike[str] | None = None,
    outtype: str = "f32",
) -> Path:
    """Write the PEFT LoRA adapter in ``lora_dir`` as a llama.cpp LoRA adapter file ``out_file``; return its path.

    Args:
        lora_dir: a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (what ``save_pretrained``
            writes).
        out_file: the ``.gguf`` file to write. It is written next to its final name and renamed into place, so a
            failed export leaves no partial file.
        base_config: the base model's config (a ``PretrainedConfig`` or a local model folder); it gives the
            architecture and the head counts the q/k reordering needs. Defaults to the adapter's
            ``base_model_name_or_path`` when that is a local folder (nothing is downloaded).
        outtype: ``"f32"`` (exact), ``"f16"`` or ``"bf16"`` for the lora_a/lora_b tensors.

    Raises:
        ExportError: the adapter or its base cannot be written in this format (another architecture, DoRA, trained
            biases, ``modules_to_save``, a tied ``lm_head``...), nothing says what the base is, or ``gguf`` is missing.
        AdapterFileError: ``lora_dir`` lacks its config or weights.
    """
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype={outtype!r} is not one of {OUTTYPES}.")
    lora_dir, out_file = Path(lora_dir), Path(out_file)
    if out_file.is_dir():
        raise ExportError(f"out_file {out_file} is a folder; pass the path of the .gguf file to write.")
    gguf = _import_gguf()

    config, tensors = _read_adapter(lora_dir)
    _refuse_unsupported(config, lora_dir)
    hparams = _base_hparams(config, base_config, lora_dir)
    arch_name, reorder_qk = _architecture(hparams)
    arch = gguf.MODEL_ARCH[arch_name]
    alpha = float(config["lora_alpha"])
    names = gguf.get_tensor_name_map(arch, hparams["num_hidden_layers"])
    pairs = list(_pairs(config, tensors, hparams, names, reorder_qk, lora_dir))
    if not pairs:
        raise ExportError(f"{lora_dir / 'adapter_model.safetensors'} holds no lora_A/lora_B tensors.")

    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(lora_dir.resolve().name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if config.get("alora_invocation_tokens"):  # activated LoRA: llama.cpp applies it after these tokens (uint32 only)
        tokens = [int(t) for t in config["alora_invocation_tokens"]]
        types = gguf.GGUFValueType
        writer.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, tokens, types.ARRAY, types.UINT32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for pair in pairs:
        for suffix, array in ((".lora_a", pair.lora_a), (".lora_b", pair.lora_b)):
            writer.add_tensor(pair.name + suffix, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".tmp-{secrets.token_hex(8)}-{out_file.name}")  # opened by the writer: umask applies
    try:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_file


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise ExportError("Writing llama.cpp adapters needs the 'gguf' package: pip install gguf") from exc
    return gguf


def _read_adapter(lora_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``adapter_config.json`` as a dict and the safetensors weights as float32 torch tensors."""
    from safetensors.torch import load_file

    config_file, weights_file = lora_dir / "adapter_config.json", lora_dir / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise AdapterFileError(f"{f} does not exist; lora_dir must be a folder written by save_pretrained.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return config, {k: v.float() for k, v in load_file(weights_file, device="cpu").items()}


def _refuse_unsupported(config: dict[str, Any], lora_dir: Path) -> None:
    """Refuse every adapter feature that a pair of lora_a/lora_b tensors cannot carry."""
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{lora_dir} holds a {config.get('peft_type')} adapter; only LoRA adapters can be exported.")
    found = [
        what
        for what, present in (
            ("DoRA (use_dora)", config.get("use_dora")),
            (f"trained base biases (bias={config.get('bias')!r})", config.get("bias", "none") != "none"),
            ("a bias on lora_B (lora_bias)", config.get("lora_bias")),
            ("fully trained modules (modules_to_save)", config.get("modules_to_save")),
            ("trained token rows (trainable_token_indices)", config.get("trainable_token_indices")),
            ("LoRA on parameters (target_parameters)", config.get("target_parameters")),
            ("duplicated layers (layer_replication)", config.get("layer_replication")),
            ("QALoRA (use_qalora)", config.get("use_qalora")),
            ("block-diagonal LoRA (use_bdlora)", config.get("use_bdlora")),
            ("Arrow routing (arrow_config)", config.get("arrow_config")),
        )
        if present
    ]
    if found:
        raise ExportError(
            f"{lora_dir} uses {', '.join(found)}, which a llama.cpp LoRA adapter (lora_a/lora_b pairs only) cannot "
            "hold. Merge the adapter into the base (merge_and_unload) and convert the merged model instead."
        )


def _base_hparams(
    config: dict[str, Any], base_config: PretrainedConfig | str | os.PathLike[str] | None, lora_dir: Path
) -> dict[str, Any]:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(base_config, PretrainedConfig):
        return base_config.to_dict()
    source = base_config if base_config is not None else config.get("base_model_name_or_path")
    if not source or not (Path(source) / "config.json").is_file():
        raise ExportError(
            f"The base model config of {lora_dir} is not a local folder (base_model_name_or_path={source!r}). Pass "
            "base_config= (the base model's PretrainedConfig or a folder with its config.json)."
        )
    return AutoConfig.from_pretrained(source, local_files_only=True).to_dict()


def _architecture(hparams: dict[str, Any]) -> tuple[str, bool]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # A config built in code has no `architectures`; its model type names the causal-LM class.
    names = hparams.get("architectures") or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hparams.get("model_type"))]
    if names[0] not in ARCHITECTURES:
        raise ExportError(
            f"Base architecture {names[0] or hparams.get('model_type')!r} is not supported for llama.cpp LoRA export; "
            f"supported: {sorted(ARCHITECTURES)}."
        )
    return ARCHITECTURES[names[0]]


def _pairs(
    config: dict[str, Any],
    tensors: dict[str, Any],
    hparams: dict[str, Any],
    names: Any,
    reorder_qk: bool,
    lora_dir: Path,
) -> Iterator[_Pair]:
    """Each adapted module as llama.cpp wants it: GGUF name, reordered q/k rows, PEFT's scale folded into lora_b."""
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.endswith(".base_layer.weight"):  # PEFT's copy of a targeted embedding or lm_head
            continue
        for half, suffixes in (("A", _A_SUFFIXES), ("B", _B_SUFFIXES)):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is not None and key.startswith(_PREFIX):
                halves.setdefault(key[len(_PREFIX) : -len(suffix)], {})[half] = (tensor, "embedding" in suffix)
                break
        else:
            raise ExportError(
                f"{lora_dir / 'adapter_model.safetensors'} holds {key!r}, which is neither a lora_A nor a lora_B "
                "tensor; llama.cpp LoRA adapters hold nothing else."
            )

    n_head = hparams["num_attention_heads"]
    n_kv_head = hparams.get("num_key_value_heads") or n_head
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{lora_dir}: module {module!r} has lora_{''.join(ab)} but not its partner.")
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"{lora_dir}: {module!r} has no tensor in llama.cpp's {hparams['model_type']} models.")
        if name == "output.weight" and hparams.get("tie_word_embeddings"):
            raise ExportError(
                f"{lora_dir} adapts lm_head, which this base ties to the token embeddings: its GGUF has no output "
                "tensor for llama.cpp to apply the adapter to."
            )
        (a, is_embedding), (b, _) = ab["A"], ab["B"]
        b = b * _scale_ratio(config, module, rank=a.shape[0])
        if reorder_qk and name.endswith((".attn_q.weight", ".attn_k.weight")):
            b = _interleave_rope_rows(b, n_head if name.endswith(".attn_q.weight") else n_kv_head, module)
        yield _Pair(name, (a.T if is_embedding else a).contiguous().numpy(), b.contiguous().numpy())


def _scale_ratio(config: dict[str, Any], module: str, *, rank: int) -> float:
    """PEFT's scale for ``module`` over the one llama.cpp will apply (alpha / rank, or 1 when alpha is 0)."""
    from peft.utils.other import get_pattern_key

    alpha, pattern = float(config["lora_alpha"]), config.get("alpha_pattern") or {}
    module_alpha = pattern.get(get_pattern_key(pattern.keys(), module), alpha)
    peft_scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    alpha_f32 = float(np.float32(alpha))  # what llama.cpp reads back from the file
    llama_scale = alpha_f32 / rank if alpha_f32 else 1.0
    return peft_scale / llama_scale  # exactly 1.0 when they agree, and b * 1.0 is b bit for bit


def _interleave_rope_rows(b: Any, n_head: int, module: str) -> Any:
    """Reorder the output rows of each head as convert_hf_to_gguf.py does for Llama q/k weights: within a head of
    size d, row j < d/2 goes to 2j and row d/2 + j to 2j + 1."""
    rows = b.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"{module} has {rows} output rows, not a whole number of RoPE heads ({n_head}).")
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)

"""Fuzz the loading of saved graft adapters: corrupt them in every way we know and check that none loads silently.

Each case copies a pristine adapter (saved by `PeftModel.save_pretrained`, so with its ``graft_manifest.json``),
applies one seeded mutation, then loads it with `PeftModel.from_pretrained` onto a fresh tiny Llama and runs
`peft_graft.artifacts.verify_adapter` on it, given a fresh base too (``peft-graft verify DIR --base MODEL``), as
some damage only the base reveals. Outcomes:

* ``refused``: the load raised a peft_graft typed error (`PeftGraftError`);
* ``identical``: it loaded and the logits are bit-identical to the pristine adapter's (the mutation changed nothing
  that is computed, e.g. a removed manifest);
* ``silent``: it loaded and the logits differ, with no error: what must never happen to an adapter with a manifest;
* ``foreign``: any other exception, at load or at the first forward.

Targets (PASS/MISS): 0 silent loads of adapters with a manifest, every refusal typed, ``verify`` refuses exactly
what loading refuses, and the base model bit-identical after every failed load. Adapters without a manifest (as
saved before 0.2) are fuzzed too with the file mutations, and reported apart: without a checksum, a flipped bit in
a weight cannot be told from a trained value, so silent loads there are expected and measured, not a target.

    .venv/bin/python benchmarks/adapter_fuzz.py            # full run (≥ 2,000 cases), writes benchmarks/results/adapter_fuzz/
    .venv/bin/python benchmarks/adapter_fuzz.py --per-kind 1 --out /tmp/fuzz   # a quick run
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_graft
from peft_graft.artifacts import verify_adapter
from peft_graft.errors import PeftGraftError
from peft_graft.manifest import MANIFEST_NAME
from peft_graft.tuners.graft import GraftLayer


RESULTS = Path(__file__).parent / "results" / "adapter_fuzz"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# A tiny Llama (the sizes of tests/tiny_models.py, narrower): fast enough for thousands of loads.
LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
INPUT_IDS = torch.arange(3, 19).reshape(2, 8)
VARIANTS = [(projection, phi) for projection in ("svd", "orthogonal") for phi in ("dense", "diagonal")]


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


# ------------------------------------------------------------------ safetensors at the byte level


def _read_raw(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data start
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# ------------------------------------------------------------------ mutations: (rng, folder) -> what was done


def flip_data_byte(rng: random.Random, folder: Path) -> str:
    path = folder / WEIGHTS
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    pos = rng.randrange(8 + length, len(raw))
    raw[pos] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(raw))
    return f"byte {pos} of {len(raw)}"


def flip_header_byte(rng: random.Random, folder: Path) -> str:
    path = folder / WEIGHTS
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    pos = rng.randrange(8, 8 + length)
    old = raw[pos]
    raw[pos] = rng.choice([c for c in b"0123456789abcdefFIU_.,:\"{} " if c != old])
    path.write_bytes(bytes(raw))
    return f"header byte {pos}: {chr(old)!r}->{chr(raw[pos])!r}"


def change_dtype_tag(rng: random.Random, folder: Path) -> str:
    header, data = _read_raw(folder / WEIGHTS)
    key = rng.choice(_tensor_keys(header))
    old = header[key]["dtype"]
    header[key]["dtype"] = rng.choice([d for d in ("F32", "F16", "BF16", "F64", "I32", "U32", "I64", "U64") if d != old])
    _write_raw(folder / WEIGHTS, header, data)
    return f"{key}: {old}->{header[key]['dtype']}"


def swap_offsets(rng: random.Random, folder: Path) -> str:
    header, data = _read_raw(folder / WEIGHTS)
    groups = collections.defaultdict(list)
    for key in _tensor_keys(header):
        groups[(header[key]["dtype"], tuple(header[key]["shape"]))].append(key)
    a, b = rng.sample(rng.choice([g for g in groups.values() if len(g) > 1]), 2)
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    _write_raw(folder / WEIGHTS, header, data)
    return f"{a} <-> {b}"


def truncate(rng: random.Random, folder: Path) -> str:
    path = folder / WEIGHTS
    raw = path.read_bytes()
    size = rng.randrange(0, len(raw))
    path.write_bytes(raw[:size])
    return f"{size} of {len(raw)} bytes"


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], str]) -> str:
    tensors = load_file(folder / WEIGHTS)
    detail = edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return detail


def rename_key(rng: random.Random, folder: Path) -> str:
    def edit(tensors: dict[str, torch.Tensor]) -> str:
        key = rng.choice(sorted(tensors))
        renames = [key.replace("layers.0.", "layers.1.").replace("layers.1.", "layers.0.", 1),
                   key.replace("q_proj", "k_proj"), key.replace("graft_phi", "graft_phy"),
                   key.replace("graft_proj", "graft_phi"), key + "_", key.replace("base_model.model.", "")]
        new = rng.choice([r for r in renames if r != key])
        tensors[new] = tensors.pop(key)
        return f"{key} -> {new}"

    return _edit_tensors(folder, edit)


def remove_key(rng: random.Random, folder: Path) -> str:
    def edit(tensors: dict[str, torch.Tensor]) -> str:
        key = rng.choice(sorted(tensors))
        del tensors[key]
        return key

    return _edit_tensors(folder, edit)


def remove_module(rng: random.Random, folder: Path) -> str:
    def edit(tensors: dict[str, torch.Tensor]) -> str:
        module = rng.choice(sorted({k.partition(".graft_")[0] for k in tensors}))
        for key in [k for k in tensors if k.startswith(module + ".graft_")]:
            del tensors[key]
        return module

    return _edit_tensors(folder, edit)


def non_finite(rng: random.Random, folder: Path) -> str:
    def edit(tensors: dict[str, torch.Tensor]) -> str:
        key = rng.choice(sorted(k for k, t in tensors.items() if t.is_floating_point()))
        value = rng.choice([float("nan"), float("inf"), float("-inf")])
        tensors[key].view(-1)[rng.randrange(tensors[key].numel())] = value
        return f"{key} <- {value}"

    return _edit_tensors(folder, edit)


def reencode(rng: random.Random, folder: Path) -> str:
    def edit(tensors: dict[str, torch.Tensor]) -> str:
        key = rng.choice(sorted(tensors))
        choices = (torch.float16, torch.bfloat16, torch.int32, torch.float64)
        if not tensors[key].is_floating_point():
            choices = (torch.int32, torch.float32, torch.uint8)
        dtype = rng.choice(choices)
        tensors[key] = tensors[key].to(dtype)
        return f"{key} -> {dtype}"

    return _edit_tensors(folder, edit)


# Config edits: each field with values that differ from the saved one (and some a damaged file could hold).
CONFIG_EDITS: dict[str, list] = {
    "r": [2, 8, 0, -1, "4", 4.5],
    "phi": ["dense", "diagonal", "triangular", "lowrank", "nope"],
    "projection": ["svd", "orthogonal", "trainable", "gradient"],
    "mode": ["additive", "output", "both"],
    "scaling": [None, 1.0, 0.5, "big"],
    "seed": [0, 1, 12345],
    "target_modules": [["q_proj"], ["q_proj", "v_proj", "k_proj"], ["o_proj"], "all-linear"],
    "rank_pattern": [{"q_proj": 2}, {"v_proj": 8}],
    "sparse_residual": [2, -3],
    "init_weights": [True, "lstsq"],
    "phi_rank": [1, 3],
    "bias": ["all", "none"],
    "layers_to_transform": [[0], [1]],
    "save_projection": [True, False, None],
    "peft_type": ["LORA", "graft"],
    "modules_to_save": [["lm_head"]],
}


def edit_config(rng: random.Random, folder: Path) -> str:
    config = json.loads((folder / CONFIG).read_text())
    field = rng.choice(sorted(CONFIG_EDITS))
    value = rng.choice([v for v in CONFIG_EDITS[field] if v != config.get(field)])
    config[field] = value
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return f"{field} = {value!r}"


def remove_manifest(rng: random.Random, folder: Path) -> str:
    (folder / MANIFEST_NAME).unlink()
    return MANIFEST_NAME


def edit_manifest(rng: random.Random, folder: Path) -> str:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    how = rng.choice(["hash", "graft_id", "drop_file", "extra_file", "garbage", "graft_id_and_hash"])
    name = rng.choice(sorted(manifest["files"]))
    if how in ("hash", "graft_id_and_hash"):
        manifest["files"][name] = hashlib.sha256(os.urandom(8)).hexdigest()
    if how in ("graft_id", "graft_id_and_hash"):
        manifest["graft_id"] = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    if how == "drop_file":
        del manifest["files"][name]
    if how == "extra_file":
        manifest["files"]["README.md"] = "0" * 64
    path.write_text("{not json" if how == "garbage" else json.dumps(manifest))
    return f"{how} ({name})"


FILE_MUTATIONS: dict[str, Callable[[random.Random, Path], str]] = {
    "data byte flip": flip_data_byte,
    "header byte flip": flip_header_byte,
    "dtype tag changed": change_dtype_tag,
    "swapped offsets": swap_offsets,
    "truncated": truncate,
    "renamed key": rename_key,
    "removed key": remove_key,
    "removed module": remove_module,
    "NaN/Inf value": non_finite,
    "re-encoded dtype": reencode,
    "config value": edit_config,
}
MANIFEST_MUTATIONS: dict[str, Callable[[random.Random, Path], str]] = {
    "manifest removed": remove_manifest,
    "manifest edited": edit_manifest,
}


# ------------------------------------------------------------------ one case


@dataclass
class Case:
    variant: str
    manifest: bool
    kind: str
    detail: str
    outcome: str  # refused / identical / silent / foreign
    error: str  # class of the load error, "" if it loaded
    verify: str  # "ok" or the class of verify's error
    base_intact: bool | None  # after a failed load; None if it loaded


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _intact(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return (
        state.keys() == reference.keys()
        and all(torch.equal(state[k], reference[k]) for k in state)
        and not any(isinstance(m, GraftLayer) for m in model.modules())
        and "peft_config" not in model.__dict__
        and all(type(m).__module__.startswith(("transformers.", "torch.")) for m in model.modules())
    )


def run_case(folder: Path, reference_logits: torch.Tensor, base_state: dict[str, torch.Tensor]) -> tuple[str, str, str, bool | None]:
    """(outcome, load error class, verify result, base intact after a failed load) of the adapter in ``folder``."""
    base = tiny_llama()
    error, intact = "", None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(base, str(folder))
            with torch.no_grad():
                logits = model(input_ids=INPUT_IDS).logits
        outcome = "identical" if torch.equal(logits, reference_logits) else "silent"
    except Exception as err:  # noqa: BLE001 (the point is to classify every exception)
        error = type(err).__name__
        outcome = "refused" if isinstance(err, PeftGraftError) else "foreign"
        intact = _intact(base, base_state)
    try:
        verify_adapter(folder, base=tiny_llama())
        verify = "ok"
    except Exception as err:  # noqa: BLE001 (classified like the load)
        verify = type(err).__name__ if isinstance(err, PeftGraftError) else f"foreign:{type(err).__name__}"
    return outcome, error, verify, intact


def save_pristine(projection: str, phi: str, folder: Path) -> torch.Tensor:
    """Save a trained-looking adapter of this variant into ``folder``; return its logits on `INPUT_IDS`."""
    config = peft_graft.GraftConfig(r=4, projection=projection, phi=phi, target_modules=["q_proj", "v_proj"],
                                    init_weights=False, seed=0)
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(str(folder))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(folder))
    with torch.no_grad():
        logits = loaded(input_ids=INPUT_IDS).logits
    assert torch.equal(logits, model(input_ids=INPUT_IDS).logits.detach()), "the pristine adapter does not round-trip"
    return logits


def fuzz(per_kind: int, seed: int = 0, variants: list[tuple[str, str]] = VARIANTS) -> list[Case]:
    """``per_kind`` cases per mutation kind, variant and manifest state; mutation kinds x variants x seeds."""
    cases = []
    base_state = _state(tiny_llama())
    with tempfile.TemporaryDirectory() as tmp:
        for projection, phi in variants:
            variant = f"{projection}/{phi}"
            pristine = Path(tmp) / variant.replace("/", "_")
            reference = save_pristine(projection, phi, pristine)
            plans = [(True, k, f) for k, f in (FILE_MUTATIONS | MANIFEST_MUTATIONS).items()]
            plans += [(False, k, f) for k, f in FILE_MUTATIONS.items()]
            for with_manifest, kind, mutate in plans:
                for i in range(per_kind):
                    rng = random.Random(f"{seed}/{variant}/{with_manifest}/{kind}/{i}")
                    folder = Path(tmp) / "case"
                    shutil.rmtree(folder, ignore_errors=True)
                    shutil.copytree(pristine, folder)
                    if not with_manifest:
                        (folder / MANIFEST_NAME).unlink()
                    detail = mutate(rng, folder)
                    cases.append(Case(variant, with_manifest, kind, detail, *run_case(folder, reference, base_state)))
    return cases


# ------------------------------------------------------------------ report


OUTCOMES = ("refused", "identical", "silent", "foreign")


def targets(cases: list[Case]) -> dict[str, tuple[bool, str]]:
    """Each target: (met, the numbers behind it)."""
    manifested = [c for c in cases if c.manifest]
    silent = [c for c in manifested if c.outcome == "silent"]
    failed = [c for c in cases if c.outcome in ("refused", "foreign")]
    foreign = [c for c in cases if c.outcome == "foreign" or c.verify.startswith("foreign:")]
    disagree = [c for c in cases if (c.verify == "ok") != (c.outcome in ("identical", "silent"))]
    disagree_manifested = [c for c in disagree if c.manifest]
    broken = [c for c in failed if not c.base_intact]
    return {
        "0 silent loads (adapters with a manifest)": (not silent, f"{len(silent)} of {len(manifested)}"),
        "100% of refusals are peft_graft typed errors (load and verify)": (
            not foreign, f"{len(foreign)} foreign of {len(failed)} failed loads"),
        "verify agrees with loading (adapters with a manifest)": (
            not disagree_manifested, f"{len(disagree_manifested)} disagreements of {len(manifested)}"),
        "verify agrees with loading (all cases, incl. no manifest)": (
            not disagree, f"{len(disagree)} disagreements of {len(cases)}"),
        "base model bit-identical after every failed load": (not broken, f"{len(broken)} of {len(failed)} not"),
    }


def report(cases: list[Case], seconds: float) -> str:
    lines = [f"# Adapter fuzz: {len(cases)} mutated graft adapters ({seconds:.0f} s)", ""]
    for with_manifest, title in ((True, "with graft_manifest.json"), (False, "without a manifest (pre-0.2 adapters)")):
        subset = [c for c in cases if c.manifest == with_manifest]
        lines += [f"## {title}: {len(subset)} cases", "", "| mutation | " + " | ".join(OUTCOMES) + " | verify disagrees |",
                  "|---|" + "---|" * (len(OUTCOMES) + 1)]
        for kind in dict.fromkeys(c.kind for c in subset):
            of_kind = [c for c in subset if c.kind == kind]
            counts = collections.Counter(c.outcome for c in of_kind)
            disagree = sum((c.verify == "ok") != (c.outcome in ("identical", "silent")) for c in of_kind)
            lines.append(f"| {kind} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + f" | {disagree} |")
        total = collections.Counter(c.outcome for c in subset)
        lines += ["| **all** | " + " | ".join(f"**{total[o]}**" for o in OUTCOMES) + " | |", ""]
    errors = collections.Counter(c.error for c in cases if c.error)
    lines += ["Load errors: " + ", ".join(f"{name} {n}" for name, n in errors.most_common()), "", "## Targets", ""]
    lines += [f"- {'PASS' if met else 'MISS'}: {name} ({numbers})" for name, (met, numbers) in targets(cases).items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=40, help="cases per mutation kind, variant and manifest state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cases = fuzz(args.per_kind, args.seed)
    text = report(cases, time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text)
    (args.out / "cases.jsonl").write_text("".join(json.dumps(copy.copy(c.__dict__)) + "\n" for c in cases))
    print(text)
    return 0 if all(met for name, (met, _) in targets(cases).items() if "incl. no manifest" not in name) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Time to graft: `get_peft_model` wall time of graft adapters against LoRA and PiSSA, and adapter load time.

Methods, all at r = 16 on the seven attention and MLP projections of every layer:

* LoRA (PEFT's default init) and PiSSA with PEFT's fast SVD (``init_lora_weights="pissa_niter_4"``);
* graft ``svd`` with the default randomized solver, with the solver at PiSSA's amount of work (niter=4,
  oversample=0), and exact (``projection_niter=None``: a full SVD per module; SmolLM2 only, as a full SVD of one
  8192×2048 module takes minutes);
* graft ``orthogonal`` (seeded random projections) and graft ``gradient`` including `calibrate()` on a few batches
  of real text (gensim's news corpus through SmolLM2's tokenizer; ids folded into the vocabulary of the shaped
  models, whose truncated vocabulary is irrelevant to the timing).

Models: SmolLM2-135M (real weights, full depth); Llama-3.2-1B- and Qwen2.5-7B-shaped models built from their public
configs with random weights, depth truncated to 2 layers and 1 layer (per-layer cost and the full-depth
extrapolation are reported). Every method gets a fresh copy of the base. Load time: ``PeftModel.from_pretrained`` of
a saved graft svd adapter vs a saved LoRA adapter. One torch thread, as the figures of issue 16. Target: the svd graft
with the default solver initialises no slower than PiSSA's fast init on the same model in the same run (PASS/MISS).
Writes benchmarks/results/graft_init.{json,md}.

    nice -n 19 python benchmarks/graft_init.py [--subjects smollm2,llama-1b,qwen-7b]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

import peft_graft
from peft_graft import GraftConfig
from peft_graft.testing.assets import load_corpus, load_smollm2, tokenize_blocks
from peft_graft.tuners.graft.projections import product_dtype


RESULTS = Path(__file__).resolve().parent / "results"
R = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 1024  # of the shaped models: the embedding and head play no part in grafting
CALIBRATION_TOKENS = 128
DEFAULT_SVD, PISSA = "graft svd (default solver)", "PiSSA (pissa_niter_4)"


@dataclass
class Subject:
    name: str
    build: Callable[[], PreTrainedModel]
    layers: int  # built
    full_depth: int
    batches: int  # calibration batches of one 128-token sequence
    exact: bool  # run the exact full SVD (minutes per module on the 7B shapes: not run there)


def llama_1b(layers: int) -> PreTrainedModel:
    """Llama-3.2-1B's shapes (hidden 2048, MLP 8192, 32 heads, 8 KV heads)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def qwen_7b(layers: int) -> PreTrainedModel:
    """Qwen2.5-7B's shapes (hidden 3584, MLP 18944, 28 heads, 4 KV heads, q/k/v biases)."""
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def methods(batches: list[dict]) -> dict[str, tuple[PeftConfig, list[dict] | None]]:
    """name -> (config, calibration batches or None)."""
    graft = dict(r=R, target_modules=TARGETS)
    return {
        "LoRA": (LoraConfig(r=R, target_modules=TARGETS), None),
        PISSA: (LoraConfig(r=R, target_modules=TARGETS, init_lora_weights="pissa_niter_4"), None),
        DEFAULT_SVD: (GraftConfig(projection="svd", **graft), None),
        "graft svd (niter=4, oversample=0)": (
            GraftConfig(projection="svd", projection_niter=4, projection_oversample=0, **graft),
            None,
        ),
        "graft svd (exact)": (GraftConfig(projection="svd", projection_niter=None, **graft), None),
        "graft orthogonal": (GraftConfig(projection="orthogonal", **graft), None),
        "graft gradient + calibrate": (GraftConfig(projection="gradient", **graft), batches),
    }


def seconds(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def time_init(base: PreTrainedModel, config: PeftConfig, batches: list[dict] | None) -> dict:
    """get_peft_model (and calibrate) on a fresh copy of ``base``; cheap inits get the median of three runs."""
    runs = []
    while len(runs) < (3 if runs and runs[0]["total_s"] < 1 else 1):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        peft = get_peft_model(model, copy.deepcopy(config))
        init = time.perf_counter() - start
        calibrate = seconds(peft_graft.calibrate, peft, batches, progress=False) if batches else 0.0
        runs.append(dict(init_s=init, calibrate_s=calibrate, total_s=init + calibrate))
        del peft, model
    return sorted(runs, key=lambda run: run["total_s"])[len(runs) // 2]


def time_load(base: PreTrainedModel, config: PeftConfig) -> float:
    """PeftModel.from_pretrained of a saved adapter (median of three), the base copy made outside the timing."""
    with tempfile.TemporaryDirectory() as folder:
        get_peft_model(copy.deepcopy(base), copy.deepcopy(config)).save_pretrained(folder)
        return statistics.median(seconds(PeftModel.from_pretrained, copy.deepcopy(base), folder) for _ in range(3))


def calibration_batches(texts: list[str], tokenizer, vocab: int, n: int) -> list[dict]:
    blocks = tokenize_blocks(texts, tokenizer, CALIBRATION_TOKENS, max_blocks=n) % vocab
    return [{"input_ids": b, "labels": b} for b in blocks.split(1)]


def run_subject(subject: Subject, texts: list[str], tokenizer) -> dict:
    base = subject.build()
    batches = calibration_batches(texts, tokenizer, base.config.vocab_size, subject.batches)
    rows = {}
    for name, (config, calibration) in methods(batches).items():
        if name == "graft svd (exact)" and not subject.exact:
            continue
        rows[name] = time_init(base, config, calibration)
        print(f"{subject.name:>30} | {name:<36} {rows[name]['total_s']:8.2f} s", flush=True)
    loads = {name: time_load(base, methods(batches)[name][0]) for name in ("LoRA", DEFAULT_SVD)}
    scale = subject.full_depth / subject.layers
    for row in rows.values():
        row.update(per_layer_s=row["total_s"] / subject.layers, full_depth_s=row["total_s"] * scale)
        row.update(
            vs_lora=row["total_s"] / rows["LoRA"]["total_s"],
            vs_pissa=row["total_s"] / rows[PISSA]["total_s"],
        )
    return dict(
        model=subject.name,
        layers=subject.layers,
        full_depth=subject.full_depth,
        calibration_batches=subject.batches,
        init=rows,
        load_s=loads,
        target_met=rows[DEFAULT_SVD]["total_s"] <= rows[PISSA]["total_s"],
    )


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Time to graft: get_peft_model wall time, graft vs LoRA and PiSSA",
        "",
        f"{meta['machine']}. Command: `{meta['command']}`; total {meta['seconds']:.0f} s.",
        "",
        (
            f"r = {R} on {', '.join(TARGETS)} of every layer. Shaped models: random weights, vocabulary {VOCAB}, depth "
            "truncated (per-layer cost × full depth = extrapolation). `gradient + calibrate` includes calibrate() on "
            f"one-sequence batches of {CALIBRATION_TOKENS} tokens of real text. Ratios against LoRA and PiSSA of the "
            f"same run. The default solver multiplied the fp32 weights in {meta['products']} here "
            "(`projections.product_dtype`: bf16 where the CPU has bf16 units, else fp32)."
        ),
        "",
        "Target: svd graft (default solver) total ≤ PiSSA's on the same model: "
        + ", ".join(f"{r['model']} {'PASS' if r['target_met'] else 'MISS'}" for r in results)
        + ".",
    ]
    for result in results:
        lines += [
            "",
            (
                f"## {result['model']} ({result['layers']} of {result['full_depth']} layers built; "
                f"{result['calibration_batches']} calibration batches)"
            ),
            "",
            "| method | get_peft_model s | calibrate s | total s | per layer s | full depth s | × LoRA | × PiSSA |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, row in result["init"].items():
            lines.append(
                f"| {name} | {row['init_s']:.3f} | {row['calibrate_s']:.2f} | {row['total_s']:.3f} | "
                f"{row['per_layer_s']:.3f} | {row['full_depth_s']:.1f} | {row['vs_lora']:.1f}× | {row['vs_pissa']:.2f}× |"
            )
        loads, svd = result["load_s"], result["init"][DEFAULT_SVD]
        lines += [
            "",
            f"svd graft (default solver) vs PiSSA: {svd['vs_pissa']:.2f}× — {'PASS' if result['target_met'] else 'MISS'}.",
            "",
            (
                f"Load (`PeftModel.from_pretrained`, median of 3): LoRA {loads['LoRA']:.3f} s, graft svd "
                f"{loads[DEFAULT_SVD]:.3f} s ({loads[DEFAULT_SVD] / loads['LoRA']:.2f}× LoRA; no SVD runs on load)."
            ),
        ]
    return "\n".join(lines) + "\n"


SUBJECTS = {
    "smollm2": lambda: Subject(
        "SmolLM2-135M (real weights)", lambda: load_smollm2()[0], layers=30, full_depth=30, batches=4, exact=True
    ),
    "llama-1b": lambda: Subject(
        "Llama-3.2-1B-shaped", lambda: llama_1b(2), layers=2, full_depth=16, batches=2, exact=False
    ),
    "qwen-7b": lambda: Subject(
        "Qwen2.5-7B-shaped", lambda: qwen_7b(1), layers=1, full_depth=28, batches=2, exact=False
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", default=",".join(SUBJECTS), help=f"comma-separated, of {', '.join(SUBJECTS)}")
    names = parser.parse_args().subjects.split(",")
    torch.set_num_threads(1)
    tokenizer = load_smollm2()[1]
    texts = load_corpus("news")["train"]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results = [run_subject(SUBJECTS[name](), texts, tokenizer) for name in names]
    command = "nice -n 19 python benchmarks/graft_init.py" + (
        "" if names == list(SUBJECTS) else f" --subjects {','.join(names)}"
    )
    load_after = os.getloadavg()[0]
    shared = " (the machine was shared with other jobs: compare within a run)" if max(load_before, load_after) > 1.5 else ""
    meta = dict(
        machine=f"torch {torch.__version__}, torch threads: 1, {os.cpu_count()} CPUs, {platform.machine()}, "
        f"load average {load_before:.1f} at the start and {load_after:.1f} at the end{shared}",
        command=command,
        products=str(product_dtype(torch.empty(0))).removeprefix("torch."),
        seconds=time.perf_counter() - start,
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "graft_init.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    text = markdown(results, meta)
    (RESULTS / "graft_init.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""SEWL costs on SmolLM2-135M (real weights, real news text): one update vs one forward of the same chunk (last-4-layer
setting), user switch time, and int8 snapshot bytes with the logit error they cause. Ratios are against baselines
measured in the same run. Usage: python benchmarks/sewl_costs.py [--out benchmarks/results/sewl_costs.md]"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_graft import GraftConfig
from peft_graft.sewl import SEWL, SEWLConfig, SEWLUsers
from peft_graft.sewl.snapshot import STATE_FILE
from peft_graft.testing.assets import load_corpus, smollm2_path


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/sewl_costs.md")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, GraftConfig(r=16, target_modules=targets))  # seeded orthogonal projections
    text = " ".join(load_corpus("news")["test"][:3])
    chunk = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    sewl = SEWL(model, SEWLConfig(rule="fisher", lr=1e-2, last_k=4, max_step_fraction=None, outlier_z=None))

    with torch.no_grad():
        forward = timed(lambda: model(input_ids=chunk), args.repeats)
    update = timed(lambda: sewl.step(chunk), args.repeats)

    users = SEWLUsers(sewl)
    users.switch("a")
    sewl.step(chunk)
    users.switch("b")
    switch = timed(lambda: (users.switch("a"), users.switch("b")), 20) / 2

    users.switch("a")
    with torch.no_grad():
        exact = model(input_ids=chunk).logits
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kwargs in (("fp32", {}), ("int8", {"quantize": "int8"})):
            sewl.save(Path(tmp) / label, **kwargs)
            size = (Path(tmp) / label / STATE_FILE).stat().st_size
            restored = SEWL.load(model, Path(tmp) / label)
            with torch.no_grad():
                error = (model(input_ids=chunk).logits - exact).abs().max().item()
            rows.append((label, size, error))
            restored.set_state(sewl.state)

    lines = [
        (
            "# SEWL costs (SmolLM2-135M, 256-token news chunk, r=16 orthogonal grafts on all 7 projections of all 30 "
            "layers, SEWL on the last 4 layers, rule=fisher; CPU, shared 2-core machine: other jobs ran, so absolute "
            "times are noisy)"
        ),
        "",
        "| measure | value | ratio |",
        "|---|---|---|",
        f"| forward of the chunk (no grad) | {forward * 1e3:.1f} ms | 1.00 |",
        (
            f"| one SEWL update (score + backward to layer 26 + rule + rails) | {update * 1e3:.1f} ms | "
            f"{update / forward:.2f}× forward ({'PASS' if update / forward <= 1.5 else 'MISS'} ≤ 1.5×) |"
        ),
        (
            f"| user switch (swap r×r states of {len(sewl.layers)} grafts) | {switch * 1e3:.2f} ms | "
            f"{switch / forward:.4f}× forward |"
        ),
    ]
    for label, size, error in rows:
        lines.append(f"| snapshot state file, {label} | {size:,} bytes | max abs logit error {error:.2e} |")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""SEWL costs on SmolLM2-135M (real weights, real news text): one update vs one forward of the same chunk (last-4-layer
setting, every merge rule), user switch time, and int8 snapshot bytes with the logit error they cause. Update and
forward are timed alternately in the same run and compared round by round (see `sewl_common`).

    .venv/bin/python benchmarks/sewl_costs.py [--threads 1] [--rounds 5] [--out benchmarks/results/sewl_costs.md]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from sewl_common import PairedTiming, grafted_smollm2, no_grad_forward, paired_timing

from peft_graft.sewl import SEWL, SEWLConfig, SEWLUsers
from peft_graft.sewl.config import RULES
from peft_graft.sewl.snapshot import STATE_FILE
from peft_graft.testing.assets import load_corpus


TARGET = 1.5  # one update ≤ 1.5× a forward of the same chunk


def update_cost(model: torch.nn.Module, chunk: torch.Tensor, rule: str, rounds: int) -> tuple[SEWL, PairedTiming]:
    """Time ``rule``'s update against a forward, then put Φ back where it started (the next rule starts there too)."""
    sewl = SEWL(model, SEWLConfig(rule=rule, lr=1e-2, last_k=4, max_step_fraction=None, outlier_z=None))
    start = sewl.state.clone()
    timing = paired_timing(no_grad_forward(model, chunk), lambda: sewl.step(chunk), rounds)
    sewl.set_state(start)
    return sewl, timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/sewl_costs.md")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, model = grafted_smollm2()
    text = " ".join(load_corpus("news")["test"][:3])
    chunk = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    forward = no_grad_forward(model, chunk)

    lines = [
        (
            "# SEWL costs (SmolLM2-135M, 256-token news chunk, r=16 orthogonal grafts on all 7 projections of all 30 "
            f"layers, SEWL on the last 4 layers; CPU {platform.processor() or platform.machine()}, "
            f"{args.threads} thread(s), shared 2-core machine)"
        ),
        "",
        (
            f"Update and forward alternate for {args.rounds} rounds; times are medians, the ratio is the median of the "
            "per-round ratios (other jobs ran on the machine: absolute times are noisy, ratios much less)."
        ),
        "",
        "| measure | value | ratio |",
        "|---|---|---|",
    ]
    for rule in args.rules:
        sewl, timing = update_cost(model, chunk, rule, args.rounds)
        if len(lines) == 6:
            lines.append(f"| forward of the chunk (no grad) | {timing.baseline_s * 1e3:.0f} ms | 1.00 |")
        verdict = "PASS" if timing.ratio <= TARGET else "MISS"
        lines.append(
            f"| one update, rule={rule} (score + backward to layer 26 + rule + rails) | "
            f"{timing.candidate_s * 1e3:.0f} ms | {timing.ratio:.2f}× forward ({verdict} ≤ {TARGET}×) |"
        )
        print(lines[-1], flush=True)

    users = SEWLUsers(sewl)
    users.switch("a")
    sewl.step(chunk)
    users.switch("b")
    switch = paired_timing(forward, lambda: (users.switch("a"), users.switch("b")), 3)
    lines.append(
        f"| user switch (swap r×r states of {len(sewl.layers)} grafts) | {switch.candidate_s / 2 * 1e3:.2f} ms | "
        f"{switch.ratio / 2:.4f}× forward |"
    )

    users.switch("a")
    with torch.no_grad():
        exact = model(input_ids=chunk).logits
    with tempfile.TemporaryDirectory() as tmp:
        for label, kwargs in (("fp32", {}), ("int8", {"quantize": "int8"})):
            sewl.save(Path(tmp) / label, **kwargs)
            size = (Path(tmp) / label / STATE_FILE).stat().st_size
            restored = SEWL.load(model, Path(tmp) / label)
            with torch.no_grad():
                error = (model(input_ids=chunk).logits - exact).abs().max().item()
            lines.append(
                f"| snapshot state file, {label} (rule={sewl.config.rule}) | {size:,} bytes | "
                f"max abs logit error {error:.2e} |"
            )
            restored.set_state(sewl.state)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

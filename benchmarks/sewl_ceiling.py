"""How much can any update rule add on top of 256 tokens of context? All-weights dynamic evaluation as the reference.

Issue 12's C256 target asks SEWL to lower stream perplexity ≥ 5% on top of context with ≤ +0.01 nats forgetting.
Whether that is a matter of SEWL's rules or of the streams is a question for the strongest updater there is: SGD on
every weight of the model (dynamic evaluation, Krause et al.), which has ~10⁴ times SEWL's trainable state and costs
several forwards per chunk. This script reads the long held-out streams of `sewl_long.py` (same sources, seeds,
chunks and context, so its rows compare with that run's) in the C256 setting with

- context only (the reference), and
- all weights, SGD, its lr tuned on the 16-chunk dev streams over a half-decade grid that ends where SGD diverges,

and prints them beside the C256 SEWL rows of the committed `results/sewl_long.json` (read, not rerun: their
perplexities and forgetting are deterministic given the seeds; cost ratios compare within each run only).

    .venv/bin/python benchmarks/sewl_ceiling.py            # 2 sources × 3 seeds × 32 chunks, ~26 min on 1 core
    .venv/bin/python benchmarks/sewl_ceiling.py --quick    # smoke run (tests/sewl/test_long_benchmark.py)

Writes results/sewl_ceiling.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from sewl_long import FULL, QUICK
from sewl_stream import (
    RESULTS,
    Sizes,
    Tally,
    batches,
    general_text,
    gradient_arm,
    load_base,
    make_stream,
    read,
    score_arm,
    summarise,
)
from transformers import AutoTokenizer

from peft_graft.testing.assets import smollm2_path


SGD = "all weights, SGD"
GRID = {FULL: (3e-3, 1e-2, 3e-2), QUICK: (1e-3, 1e-2)}


def mean_loss(runs: list[tuple[list[float], float, list[float]]]) -> float:
    return statistics.mean(loss for losses, _, _ in runs for loss in losses)


def run(sizes: Sizes) -> dict:
    torch.set_num_threads(1)
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    general = general_text(tokenizer, sizes)
    dev = [
        batches(make_stream(tokenizer, s, "validation", 0, sizes, sizes.dev_chunks), sizes, True)
        for s in sizes.sources
    ]
    model = load_base()
    arms = {
        "context only": score_arm("context only", model),
        SGD: gradient_arm(SGD, "sgd", model, list(model.parameters())),
    }
    tuning = {}
    for lr in GRID[sizes]:
        arms[SGD].set_lr(lr)
        tuning[lr] = mean_loss([read(arms[SGD], chunks) for chunks in dev])  # NaN where SGD diverged
        print(f"dev lr {lr:g}: {tuning[lr]:.4f} ({time.perf_counter() - began:.0f} s)", flush=True)
    chosen = min((lr for lr in tuning if math.isfinite(tuning[lr])), key=tuning.get)
    arms[SGD].set_lr(chosen)
    tally = Tally()
    for seed in range(sizes.seeds):
        for source in sizes.sources:
            chunks = batches(make_stream(tokenizer, source, "test", seed, sizes, sizes.chunks), sizes, True)
            for name, arm in arms.items():
                losses, seconds, final = read(arm, chunks, after=general)
                tally.nll["C256", name].append(statistics.mean(losses))
                tally.seconds["C256", name].append(seconds)
                tally.forgetting["C256", name].append(statistics.mean(final))
            print(f"seed {seed} {source} done ({time.perf_counter() - began:.0f} s)", flush=True)
    return {
        "sizes": sizes.__dict__,
        "tuning": {f"{lr:g}": nll if math.isfinite(nll) else None for lr, nll in tuning.items()},  # None: diverged
        "lr": chosen,
        "results": summarise(tally),
        "seconds": time.perf_counter() - began,
    }


def sewl_rows(path: Path) -> list[dict]:
    """The C256 rows of a sewl_long report (its context-only reference and its SEWL arms), with their lr."""
    report = json.loads(path.read_text(encoding="utf-8"))
    return [
        {**row, "lr": report["lrs"].get(key)}
        for key, row in report["results"].items()
        if row["setting"] == "C256" and (row["arm"].startswith("SEWL") or row["arm"] == "context only")
    ]


def write(report: dict, sewl: list[dict], out: Path) -> None:
    res = report["results"]
    context, sgd = res["C256|context only"], res[f"C256|{SGD}"]
    tried = ", ".join(f"{lr} → {'diverged' if nll is None else f'{nll:.4f}'}" for lr, nll in report["tuning"].items())
    lines = [
        f"# What updating adds on top of {report['sizes']['context']} tokens of context (SmolLM2-135M, CPU, 1 thread)",
        "",
        (
            f"The held-out long streams of sewl_long.py: {report['sizes']['chunks']} chunks of "
            f"{report['sizes']['chunk']} tokens, context {report['sizes']['context']} tokens, sources "
            f"{', '.join(report['sizes']['sources'])}, {report['sizes']['seeds']} seed(s). All-weights SGD's lr tuned "
            f"on the {report['sizes']['dev_chunks']}-chunk dev streams (tried: {tried}). SEWL rows: "
            f"the committed results/sewl_long.json, same streams, not rerun, Δ against that run's own context-only row. Wall time {report['seconds'] / 60:.1f} min."
        ),
        "",
        "| arm | lr | stream ppl | Δ vs context only | update cost (× forward, this run) | forgetting (Δ nats) |",
        "|---|---|---|---|---|---|",
        f"| context only |  | {context['ppl']:.2f} | +0.0% | 1.00 | +0.0000 |",
        (
            f"| {SGD} | {report['lr']:g} | {sgd['ppl']:.2f} | {sgd['ppl'] / context['ppl'] - 1:+.1%} | "
            f"{sgd['cost_vs_forward']:.2f} | {sgd['forgetting']:+.4f} |"
        ),
    ]
    long_context = next(row for row in sewl if row["arm"] == "context only")
    lines += [
        f"| {row['arm']} (sewl_long run) | {'' if row['lr'] is None else format(row['lr'], 'g')} | {row['ppl']:.2f} | "
        f"{row['ppl'] / long_context['ppl'] - 1:+.1%} | — | {row['forgetting']:+.4f} |"
        for row in sorted(sewl, key=lambda row: row["nll"])
        if row is not long_context
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sewl_ceiling.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "sewl_ceiling.json").write_text(json.dumps({**report, "sewl_long_rows": sewl}, indent=2) + "\n", "utf-8")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (1 seed, news, 3 short chunks)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--long", type=Path, default=RESULTS / "sewl_long.json", help="the sewl_long report to cite")
    args = parser.parse_args()
    write(run(QUICK if args.quick else FULL), sewl_rows(args.long), args.out)


if __name__ == "__main__":
    main()

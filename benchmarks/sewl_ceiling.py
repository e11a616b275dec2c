"""How much can updating add on top of 256 tokens of context? All-weights dynamic evaluation, and SEWL beside it.

Issue 12's C256 target asks SEWL to lower stream perplexity ≥ 5% on top of context with ≤ +0.01 nats forgetting.
Whether a miss is a matter of SEWL or of the streams is a question for the strongest updater there is: SGD on every
weight of the model (dynamic evaluation, Krause et al.), with ~10⁴ times SEWL's trainable state and several forwards'
cost per chunk. This script reads the long held-out streams of `sewl_long.py` (same sources, seeds, chunks and
context, so its rows compare with that run's) in the C256 setting with

- context only (the reference, timed in every run),
- ``--arms sgd``: all weights, SGD, lr tuned on the 16-chunk dev streams over a half-decade grid that ends where SGD
  diverges;
- ``--arms sewl``: SEWL kfac on r=32 gradient-calibrated grafts of layers 10-29 (sewl_long's calibrated arm, each
  chunk's step held to 0.1 of the spectral rail), lr tuned on the same dev streams; its row is judged against the
  C256 target;

and prints them beside the C256 SEWL rows of the committed `results/sewl_long.json` (read, not rerun: perplexities
and forgetting are deterministic given the seeds; cost ratios compare within each run only).

    .venv/bin/python benchmarks/sewl_ceiling.py --arms sgd    # ~29 min on 1 core  → results/sewl_ceiling_sgd.*
    .venv/bin/python benchmarks/sewl_ceiling.py --arms sewl   # ~20 min            → results/sewl_ceiling_sewl.*
    .venv/bin/python benchmarks/sewl_ceiling.py --quick       # both arms, smoke run (tests/sewl/test_long_benchmark.py)

Both arms in one run write results/sewl_ceiling.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from sewl_long import CAL_UPPER, CALIBRATED, CALIBRATION_BLOCKS, FULL, QUICK, calibrated, calibration_batches
from sewl_stream import (
    RESULTS,
    Arm,
    Sizes,
    Tally,
    batches,
    c256_target,
    general_text,
    gradient_arm,
    load_base,
    make_stream,
    read,
    score_arm,
    sewl_arm,
    summarise,
)
from transformers import AutoTokenizer

from peft_graft.testing.assets import smollm2_path


SGD = "all weights, SGD"
UPDATERS = {"sgd": SGD, "sewl": CAL_UPPER}  # --arms keys
# lrs tried on the dev streams, per arm (SGD's grid ends where it diverges)
GRID = {
    FULL: {SGD: (3e-3, 1e-2, 3e-2), CAL_UPPER: (1e-4, 2e-4, 5e-4)},
    QUICK: {SGD: (1e-3, 1e-2), CAL_UPPER: (1e-4, 1e-3)},
}


def mean_loss(runs: list[tuple[list[float], float, list[float]]]) -> float:
    return statistics.mean(loss for losses, _, _ in runs for loss in losses)


def updater(name: str, seed: int, base: torch.nn.Module, data: list[dict]) -> Arm:
    """All-weights SGD on ``base``, or SEWL kfac on a gradient-calibrated r=32 graft of layers 10-29 (its own copy
    of the base, projections seeded by ``seed``), each chunk's step held to 0.1 of the spectral rail."""
    if name == SGD:
        return gradient_arm(SGD, "sgd", base, list(base.parameters()))
    return sewl_arm(name, calibrated(CALIBRATED[name], seed, data), "kfac", last_k=None, max_step_fraction=0.1)


def tune_lr(arm: Arm, grid: tuple[float, ...], dev: list[list[dict]]) -> dict[float, float]:
    """Mean dev NLL of each lr (NaN where the arm diverged)."""
    tried = {}
    for lr in grid:
        arm.set_lr(lr)
        tried[lr] = mean_loss([read(arm, chunks) for chunks in dev])
    return tried


def run(sizes: Sizes, names: list[str]) -> dict:
    torch.set_num_threads(1)
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    general = general_text(tokenizer, sizes)
    dev = [
        batches(make_stream(tokenizer, s, "validation", 0, sizes, sizes.dev_chunks), sizes, True)
        for s in sizes.sources
    ]
    data = calibration_batches(tokenizer, CALIBRATION_BLOCKS[sizes])
    base = load_base()
    tuning: dict[str, dict[float, float]] = {}
    chosen: dict[str, float] = {}
    tally = Tally()
    for seed in range(sizes.seeds):
        arms = {"context only": score_arm("context only", base)}
        for name in names:
            arms[name] = updater(name, seed, base, data)
            if seed == 0:
                tuning[name] = tune_lr(arms[name], GRID[sizes][name], dev)
                chosen[name] = min(
                    (lr for lr, nll in tuning[name].items() if math.isfinite(nll)), key=tuning[name].get
                )
                print(f"{name}: dev {tuning[name]} ({time.perf_counter() - began:.0f} s)", flush=True)
            arms[name].set_lr(chosen[name])
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
        "tuning": {  # None: diverged
            name: {f"{lr:g}": nll if math.isfinite(nll) else None for lr, nll in tried.items()}
            for name, tried in tuning.items()
        },
        "lrs": chosen,
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
    res, sizes = report["results"], report["sizes"]
    context = res["C256|context only"]
    tried = "; ".join(
        f"{name}: " + ", ".join(f"{lr} → {'diverged' if nll is None else f'{nll:.4f}'}" for lr, nll in grid.items())
        for name, grid in report["tuning"].items()
    )
    lines = [
        f"# What updating adds on top of {sizes['context']} tokens of context (SmolLM2-135M, CPU, 1 thread)",
        "",
        (
            f"The held-out long streams of sewl_long.py: {sizes['chunks']} chunks of {sizes['chunk']} tokens, context "
            f"{sizes['context']} tokens, sources {', '.join(sizes['sources'])}, {sizes['seeds']} seed(s). Learning "
            f"rates tuned on the {sizes['dev_chunks']}-chunk dev streams (tried: {tried}). Rows marked sewl_long run: "
            "the committed results/sewl_long.json, same streams, not rerun, Δ against that run's own context-only row. "
            f"Wall time {report['seconds'] / 60:.1f} min."
        ),
        "",
        "| arm | lr | stream ppl | Δ vs context only | update cost (× forward, this run) | forgetting (Δ nats) |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in sorted(res.items(), key=lambda kv: kv[1]["nll"]):
        lr = report["lrs"].get(row["arm"])
        lines.append(
            f"| {row['arm']} | {'' if lr is None else format(lr, 'g')} | {row['ppl']:.2f} | "
            f"{row['ppl'] / context['ppl'] - 1:+.1%} | {row['cost_vs_forward']:.2f} | {row['forgetting']:+.4f} |"
        )
    long_context = next(row for row in sewl if row["arm"] == "context only")
    lines += [
        f"| {row['arm']} (sewl_long run) | {'' if row['lr'] is None else format(row['lr'], 'g')} | {row['ppl']:.2f} | "
        f"{row['ppl'] / long_context['ppl'] - 1:+.1%} | — | {row['forgetting']:+.4f} |"
        for row in sorted(sewl, key=lambda row: row["nll"])
        if row is not long_context
    ]
    if CAL_UPPER in report["lrs"]:
        text, ok = c256_target(context, res[f"C256|{CAL_UPPER}"])
        lines += ["", "| target | result |", "|---|---|", f"| {text} | {'PASS' if ok else 'MISS'} |"]
    out.mkdir(parents=True, exist_ok=True)
    stem = "sewl_ceiling" if len(report["lrs"]) == len(UPDATERS) else "sewl_ceiling_" + "_".join(report["arms"])
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps({**report, "sewl_long_rows": sewl}, indent=2) + "\n", "utf-8")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (1 seed, news, 3 short chunks)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--long", type=Path, default=RESULTS / "sewl_long.json", help="the sewl_long report to cite")
    parser.add_argument("--arms", default="sgd,sewl", help="which updaters: sgd, sewl or both (the default)")
    args = parser.parse_args()
    keys = args.arms.split(",")
    if not keys or set(keys) - set(UPDATERS):
        parser.error(f"--arms takes a comma-separated subset of {', '.join(UPDATERS)}")
    report = run(QUICK if args.quick else FULL, [UPDATERS[key] for key in keys])
    write({**report, "arms": keys}, sewl_rows(args.long), args.out)


if __name__ == "__main__":
    main()

"""SEWL on long streams: does what Φ learns pay off once the stream is much longer than the context window?

`sewl_stream.py` reads 4 chunks per stream, so with 256 tokens of context nearly everything SEWL has read is still in
the window. Here each held-out stream is ``--chunks`` chunks of 128 tokens (32: 4,096 scored tokens, 16× the
context), read by the arms that matter for the two quality targets, with the learning rates the dev split chose in
the committed `sewl_stream` run (``results/sewl_stream.json``: tuned on dev streams, never on these):

- C0 (chunk alone): static, all-weights SGD, SEWL kfac on the last 4 layers and on all layers;
- C256 (previous 256 tokens in context): context only, SEWL kfac on the last 4 layers.

kfac is the rule that did best in both settings of the full run. Each chunk is scored before the update on it;
forgetting is the Δ NLL on the same general text as `sewl_stream.py`. The plot shows, along the stream, each arm's
running NLL difference to its setting's reference: whether the gain grows with what has been read.

    .venv/bin/python benchmarks/sewl_long.py            # 2 sources × 3 seeds × 32 chunks, ~25 min on 1 core
    .venv/bin/python benchmarks/sewl_long.py --quick    # < 60 s smoke run (tests/sewl/test_long_benchmark.py)

Writes results/sewl_long.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from sewl_stream import (
    LAST4,
    REFERENCE,
    RESULTS,
    Sizes,
    Tally,
    batches,
    c0_target,
    c256_target,
    general_text,
    gradient_arm,
    grafted,
    load_base,
    make_stream,
    read,
    score_arm,
    sewl_arm,
    summarise,
)
from transformers import AutoTokenizer

from peft_graft.testing.assets import smollm2_path


# Shakespeare plays and news only: the review sentences of sewl_stream.py make one stream of ~1,000 tokens in all.
FULL = Sizes(128, 256, 32, 0, 3, ("shakespeare", "news"), ("kfac",), ("kfac",), ())
QUICK = Sizes(32, 32, 3, 0, 1, ("news",), ("kfac",), ("kfac",), ())
# The arms and their dev-tuned lr keys in sewl_stream.json; (setting, arm name, lr key).
ARMS = (
    ("C0", "static", None),
    ("C0", "all weights, SGD", "all weights, SGD"),
    ("C0", "SEWL kfac, last 4", "SEWL kfac, last 4"),
    ("C0", "SEWL kfac, all", "SEWL kfac, all"),
    ("C256", "context only", None),
    ("C256", "SEWL kfac, last 4", "SEWL kfac, last 4"),
)


def tuned_lrs(path: Path) -> dict[str, float]:
    """The lr each arm's dev-stream tuning chose in the committed sewl_stream run."""
    tuning = json.loads(path.read_text(encoding="utf-8"))["tuning"]
    return {arm: float(min(tried, key=tried.get)) for arm, tried in tuning.items()}


def run(sizes: Sizes, lrs: dict[str, float]) -> dict:
    torch.set_num_threads(1)
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    general = general_text(tokenizer, sizes)
    tally = Tally()
    curves: dict[str, list[list[float]]] = {}  # "setting|arm" -> per stream, the loss of every chunk
    for seed in range(sizes.seeds):
        last4, every = grafted(LAST4, seed), grafted(None, seed)
        full = load_base()
        arms = {
            "static": score_arm("static", last4),
            "all weights, SGD": gradient_arm("all weights, SGD", "sgd", full, list(full.parameters())),
            "SEWL kfac, last 4": sewl_arm("SEWL kfac, last 4", last4, "kfac"),
            "SEWL kfac, all": sewl_arm("SEWL kfac, all", every, "kfac"),
        }
        for _, name, key in ARMS:
            if key is not None:
                arms[name].set_lr(lrs[key])
        for source in sizes.sources:
            stream = make_stream(tokenizer, source, "test", seed, sizes, sizes.chunks)
            for setting, name, _ in ARMS:
                arm = arms["static" if name == "context only" else name]
                losses, seconds, final = read(arm, batches(stream, sizes, setting == "C256"), after=general)
                tally.nll[setting, name].append(statistics.mean(losses))
                tally.seconds[setting, name].append(seconds)
                tally.forgetting[setting, name].append(statistics.mean(final))
                curves.setdefault(f"{setting}|{name}", []).append(losses)
            print(f"seed {seed} {source}: {stream.title} done ({time.perf_counter() - began:.0f} s)", flush=True)
        del last4, every, full, arms
    return {
        "sizes": sizes.__dict__,
        "lrs": {name: lrs[key] for _, name, key in ARMS if key is not None},
        "results": summarise(tally),
        "curves": curves,
        "seconds": time.perf_counter() - began,
    }


def judged(report: dict) -> list[tuple[str, bool]]:
    """issue 12's two quality targets on these long streams, judged as sewl_stream.py judges them."""
    res = report["results"]
    context = res["C256|context only"]
    return [
        c256_target(context, res["C256|SEWL kfac, last 4"]),
        *(
            c0_target(res["C0|static"], context, res["C0|all weights, SGD"], res[f"C0|{name}"])
            for name in ("SEWL kfac, last 4", "SEWL kfac, all")
        ),
    ]


def halves(report: dict, key: str) -> tuple[float, float]:
    """Mean NLL difference to the setting's reference over the first and the second half of the streams."""
    setting = key.split("|")[0]
    reference = report["curves"][f"{setting}|{REFERENCE[setting]}"]
    diffs = [[a - b for a, b in zip(arm, ref)] for arm, ref in zip(report["curves"][key], reference)]
    half = len(diffs[0]) // 2
    return (
        statistics.mean(d for stream in diffs for d in stream[:half]),
        statistics.mean(d for stream in diffs for d in stream[half:]),
    )


def plot(report: dict, path: Path) -> None:
    """Running mean (over chunks read so far, averaged over streams) of each arm's NLL minus its reference's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunk = report["sizes"]["chunk"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, streams in report["curves"].items():
        setting, arm = key.split("|")
        if arm == REFERENCE[setting]:
            continue
        reference = report["curves"][f"{setting}|{REFERENCE[setting]}"]
        per_chunk = torch.tensor(streams) - torch.tensor(reference)
        running = per_chunk.mean(0).cumsum(0) / torch.arange(1, per_chunk.shape[1] + 1)
        ax.plot(torch.arange(1, len(running) + 1) * chunk, running, label=key.replace("|", ": "))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("tokens read")
    ax.set_ylabel("running Δ NLL vs reference (nats/token)")
    ax.set_title("SEWL on long streams (C0 vs static, C256 vs context only)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, out: Path) -> None:
    sizes = report["sizes"]
    lines = [
        "# SEWL on long streams (SmolLM2-135M, CPU, 1 thread)",
        "",
        (
            f"{sizes['chunks']} chunks of {sizes['chunk']} tokens per held-out stream ({sizes['chunks'] * sizes['chunk']:,}"
            f" scored tokens), C256 context {sizes['context']} tokens, sources {', '.join(sizes['sources'])}, "
            f"{sizes['seeds']} seed(s); learning rates as tuned on the dev streams of the committed sewl_stream run; "
            f"default rails. Wall time {report['seconds'] / 60:.1f} min."
        ),
        "",
        (
            "| setting | arm | lr | stream ppl | Δ vs reference | Δ NLL first half | Δ NLL second half | update cost (× "
            "forward) | forgetting (Δ nats) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    res = report["results"]
    for key, r in sorted(res.items(), key=lambda kv: (kv[1]["setting"], kv[1]["nll"])):
        reference = res[f"{r['setting']}|{REFERENCE[r['setting']]}"]
        first, second = halves(report, key)
        lr = report["lrs"].get(r["arm"])
        lines.append(
            f"| {r['setting']} | {r['arm']} | {'' if lr is None else f'{lr:.2g}'} | {r['ppl']:.2f} | "
            f"{r['ppl'] / reference['ppl'] - 1:+.1%} | {first:+.4f} | {second:+.4f} | {r['cost_vs_forward']:.2f} | "
            f"{r['forgetting']:+.4f} |"
        )
    lines += ["", "| target | result |", "|---|---|"]
    lines += [f"| {text} | {'PASS' if ok else 'MISS'} |" for text, ok in report["targets"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sewl_long.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "sewl_long.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, out / "sewl_long.png")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a < 60 s smoke run (1 seed, news, 3 short chunks)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tuning", type=Path, default=RESULTS / "sewl_stream.json", help="where the tuned lrs are")
    args = parser.parse_args()
    report = run(QUICK if args.quick else FULL, tuned_lrs(args.tuning))
    report["targets"] = judged(report)
    write(report, args.out)


if __name__ == "__main__":
    main()

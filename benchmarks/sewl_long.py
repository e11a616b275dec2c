"""SEWL on long streams: does what Φ learns pay off once the stream is much longer than the context window?

`sewl_stream.py` reads 4 chunks per stream, so with 256 tokens of context nearly everything SEWL has read is still in
the window. Here each held-out stream is ``--chunks`` chunks of 128 tokens (32: 4,096 scored tokens, 16× the
context), read by the arms that matter for the two quality targets, with the learning rates the dev split chose in
the committed `sewl_stream` run (``results/sewl_stream.json``: tuned on dev streams, never on these):

- C0 (chunk alone): static, all-weights SGD, SEWL kfac on the last 4 layers and on all layers;
- C256 (previous 256 tokens in context): context only, SEWL kfac on the last 4 layers.

kfac is the rule that did best in both settings of the full run. Those arms adapt r=16 grafts with seeded orthogonal
projections. The "calibrated" arms adapt r=32 grafts whose projections come from the loss gradient of general text
(`peft_graft.calibrate` on 8 × 128 tokens of news and Shakespeare that no stream, dev stream or forgetting text uses;
done once per base, every user shares them), with each chunk's step held to 0.1 of the spectral rail
(``max_step_fraction``): on all layers (C0), on layers 10-29 (C0: the backward pass stops at layer 10, a third less
update cost) and on the last 8 (C0 and C256), lr tuned here per setting on 16-chunk dev streams. A first look on the dev streams chose that family: with gradient projections the default step limit (1.0)
overshoots, and r=32 beat r=16. Each chunk is scored before the update on it;
forgetting is the Δ NLL on the same general text as `sewl_stream.py`. The plot shows, along the stream, each arm's
running NLL difference to its setting's reference: whether the gain grows with what has been read.

    .venv/bin/python benchmarks/sewl_long.py            # 2 sources × 3 seeds × 32 chunks, ~40 min on 1 core
    .venv/bin/python benchmarks/sewl_long.py --quick    # ~80 s smoke run (tests/sewl/test_long_benchmark.py)

Writes results/sewl_long.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import get_peft_model
from sewl_common import ALL_PROJECTIONS
from sewl_stream import (
    LAST4,
    REFERENCE,
    RESULTS,
    Sizes,
    Tally,
    batches,
    c0_target,
    c256_target,
    centred,
    general_text,
    gradient_arm,
    grafted,
    load_base,
    make_stream,
    read,
    score_arm,
    sewl_arm,
    summarise,
    tune,
)
from transformers import AutoTokenizer

from peft_graft import GraftConfig, calibrate
from peft_graft.testing.assets import load_corpus, smollm2_path, tokenize_blocks
from peft_graft.testing.assets.corpora import load_documents


# Shakespeare plays and news only: the review sentences of sewl_stream.py make one stream of ~1,000 tokens in all.
# grid: lr multipliers of the calibrated arms (× sewl_stream's kfac centre 0.1) tried on the dev streams.
FULL = Sizes(128, 256, 32, 16, 3, ("shakespeare", "news"), ("kfac",), ("kfac",), (0.01, 0.03))
QUICK = Sizes(32, 32, 3, 2, 1, ("news",), ("kfac",), ("kfac",), (0.03,))
CALIBRATION_BLOCKS = {FULL: 8, QUICK: 2}
CAL_LAST8, CAL_ALL = "SEWL kfac, calibrated r=32, last 8", "SEWL kfac, calibrated r=32, all"
CAL_UPPER = "SEWL kfac, calibrated r=32, layers 10-29"
LAST8 = list(range(22, 30))  # SmolLM2's last 8 of 30 layers
# The calibrated arms' graft layers (None: all). Grafting only the upper two thirds stops the backward pass at layer 10.
CALIBRATED = {CAL_LAST8: LAST8, CAL_ALL: None, CAL_UPPER: list(range(10, 30))}
DEV = "dev"  # lr tuned here, per setting
# (setting, arm name, where its lr comes from: its key in sewl_stream.json's tuning, DEV, or None for no lr).
ARMS = (
    ("C0", "static", None),
    ("C0", "all weights, SGD", "all weights, SGD"),
    ("C0", "SEWL kfac, last 4", "SEWL kfac, last 4"),
    ("C0", "SEWL kfac, all", "SEWL kfac, all"),
    ("C0", CAL_LAST8, DEV),
    ("C0", CAL_ALL, DEV),
    ("C0", CAL_UPPER, DEV),
    ("C256", "context only", None),
    ("C256", "SEWL kfac, last 4", "SEWL kfac, last 4"),
    ("C256", CAL_LAST8, DEV),
)


def tuned_lrs(path: Path) -> dict[str, float]:
    """The lr each arm's dev-stream tuning chose in the committed sewl_stream run."""
    tuning = json.loads(path.read_text(encoding="utf-8"))["tuning"]
    return {arm: float(min(tried, key=tried.get)) for arm, tried in tuning.items()}


def calibration_batches(tokenizer, blocks: int) -> list[dict]:
    """One-sequence batches of 128 tokens, half news, half Shakespeare, from train documents that neither the
    forgetting text (news train articles 0-1, the Sonnets) nor any stream (test) or dev stream (validation) uses."""
    plays = [d.text for d in load_documents("shakespeare")["train"] if d.title != "Sonnets"]
    texts = (load_corpus("news")["train"][2:60], [plays[0][len(plays[0]) // 10 :]])
    ids = torch.cat([tokenize_blocks(t, tokenizer, 128, max_blocks=blocks // 2) for t in texts])
    return [{"input_ids": row[None], "labels": row[None]} for row in ids]


def calibrated(layers: list[int] | None, seed: int, data: list[dict]) -> torch.nn.Module:
    model = get_peft_model(
        load_base(),
        GraftConfig(
            r=32, target_modules=ALL_PROJECTIONS, layers_to_transform=layers, projection="gradient", seed=seed
        ),
    )
    calibrate(model, data, progress=False)
    return model.eval()


def run(sizes: Sizes, lrs: dict[str, float]) -> dict:
    """``lrs``: sewl_stream's dev-tuned lr per arm key; the calibrated arms' lrs are tuned here (seed 0's models)."""
    torch.set_num_threads(1)
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    general = general_text(tokenizer, sizes)
    data = calibration_batches(tokenizer, CALIBRATION_BLOCKS[sizes])
    dev = [make_stream(tokenizer, s, "validation", 0, sizes, sizes.dev_chunks) for s in sizes.sources]
    tally = Tally()
    tuning: dict[str, dict[float, float]] = {}
    chosen: dict[str, float] = {}  # "setting|arm" -> lr
    curves: dict[str, list[list[float]]] = {}  # "setting|arm" -> per stream, the loss of every chunk
    for seed in range(sizes.seeds):
        last4, every = grafted(LAST4, seed), grafted(None, seed)
        cal = {name: calibrated(layers, seed, data) for name, layers in CALIBRATED.items()}
        full = load_base()
        shared = {
            "static": score_arm("static", last4),
            "all weights, SGD": gradient_arm("all weights, SGD", "sgd", full, list(full.parameters())),
            "SEWL kfac, last 4": sewl_arm("SEWL kfac, last 4", last4, "kfac"),
            "SEWL kfac, all": sewl_arm("SEWL kfac, all", every, "kfac"),
        }
        for name in ("all weights, SGD", "SEWL kfac, last 4", "SEWL kfac, all"):
            shared[name].set_lr(lrs[name])
            chosen[f"C0|{name}"] = lrs[name]
        chosen["C256|SEWL kfac, last 4"] = lrs["SEWL kfac, last 4"]
        arms = {}
        for setting, name, source in ARMS:
            key = f"{setting}|{name}"
            if source != DEV:
                arms[key] = shared["static" if name == "context only" else name]
                continue
            arms[key] = sewl_arm(name, cal[name], "kfac", last_k=None, max_step_fraction=0.1)
            if seed == 0:
                tuning[key] = tune(
                    arms[key], [batches(d, sizes, setting == "C256") for d in dev], centred(arms[key], sizes.grid)
                )
                chosen[key] = arms[key].lr
            arms[key].set_lr(chosen[key])
        for source in sizes.sources:
            stream = make_stream(tokenizer, source, "test", seed, sizes, sizes.chunks)
            for setting, name, _ in ARMS:
                arm = arms[f"{setting}|{name}"]
                losses, seconds, final = read(arm, batches(stream, sizes, setting == "C256"), after=general)
                tally.nll[setting, name].append(statistics.mean(losses))
                tally.seconds[setting, name].append(seconds)
                tally.forgetting[setting, name].append(statistics.mean(final))
                curves.setdefault(f"{setting}|{name}", []).append(losses)
            print(f"seed {seed} {source}: {stream.title} done ({time.perf_counter() - began:.0f} s)", flush=True)
        del last4, every, cal, full, shared, arms
    return {
        "sizes": sizes.__dict__,
        "lrs": chosen,
        "tuning": tuning,
        "results": summarise(tally),
        "curves": curves,
        "seconds": time.perf_counter() - began,
    }


def judged(report: dict) -> list[tuple[str, bool]]:
    """issue 12's two quality targets on these long streams, judged as sewl_stream.py judges them."""
    res = report["results"]
    context = res["C256|context only"]
    c256 = min(
        (r for r in res.values() if r["setting"] == "C256" and r["arm"].startswith("SEWL")), key=lambda r: r["nll"]
    )
    return [
        c256_target(context, c256),
        *(
            c0_target(res["C0|static"], context, res["C0|all weights, SGD"], r)
            for r in res.values()
            if r["setting"] == "C0" and r["arm"].startswith("SEWL")
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


def tried(report: dict) -> str:
    """The dev-stream tuning of the calibrated arms, as 'arm: lr → dev NLL, ...'."""
    return "; ".join(
        f"{key.replace('|', ' ')}: " + ", ".join(f"{float(lr):.2g} → {nll:.4f}" for lr, nll in grid.items())
        for key, grid in report["tuning"].items()
    )


def write(report: dict, out: Path) -> None:
    sizes = report["sizes"]
    lines = [
        "# SEWL on long streams (SmolLM2-135M, CPU, 1 thread)",
        "",
        (
            f"{sizes['chunks']} chunks of {sizes['chunk']} tokens per held-out stream ({sizes['chunks'] * sizes['chunk']:,}"
            f" scored tokens), C256 context {sizes['context']} tokens, sources {', '.join(sizes['sources'])}, "
            f"{sizes['seeds']} seed(s); learning rates as tuned on the dev streams of the committed sewl_stream run; "
            "default rails. Calibrated arms: r=32 gradient projections (calibrate() on disjoint news + Shakespeare "
            f"text), max_step_fraction 0.1, lr tuned here on {sizes['dev_chunks']}-chunk dev streams per setting "
            f"(tried: {tried(report)}). Wall time {report['seconds'] / 60:.1f} min."
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
        lr = report["lrs"].get(key)
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
    parser.add_argument("--quick", action="store_true", help="a ~80 s smoke run (1 seed, news, 3 short chunks)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tuning", type=Path, default=RESULTS / "sewl_stream.json", help="where the tuned lrs are")
    args = parser.parse_args()
    report = run(QUICK if args.quick else FULL, tuned_lrs(args.tuning))
    report["targets"] = judged(report)
    write(report, args.out)


if __name__ == "__main__":
    main()

"""Rendering of the learning-rate sensitivity report (`benchmarks/lr_sensitivity.py`): target judgement, markdown,
README snippet and plot, all pure functions of the stored results summarised into a report dict."""

from __future__ import annotations

import json
from pathlib import Path


REFERENCE, CANDIDATE = "lora_r8", "graft_default"  # method names: the baseline and the graft judged against it


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def judge(rows: dict) -> list[dict]:
    """The target's four conditions, each PASS / MISS (N/A while a needed run is missing), and all of them."""
    ref, cand = rows[REFERENCE], rows[CANDIDATE]
    lr = ref["best_lr"]
    ready = ref["complete"] and cand["complete"] and lr is not None
    at_ref = cand["gains"][lr]["mean"] if ready else None
    for row in rows.values():
        row["gain_at_reference_lr"] = row["gains"][lr]["mean"] if ready and lr in row["gains"] else None
        row["share_of_own_best"] = _ratio(row["gain_at_reference_lr"], row["best_gain"])
        row["share_of_reference"] = _ratio(row["gain_at_reference_lr"], ref["best_gain"])
    own, of_ref = _ratio(at_ref, cand["best_gain"]), _ratio(at_ref, ref["best_gain"])
    bytes_ready = cand["adapter_model_bytes"] is not None and ref["adapter_model_bytes"] is not None
    flat_ready = cand["flatness"] is not None and ref["flatness"] is not None
    lines = [
        dict(id="own_best", value=own, threshold=0.9, ok=ready and own is not None and own >= 0.9,
             ready=ready, text=f"default graft at LoRA r=8's best lr ({lr}) reaches {_pct(own)} of its own best gain "
                               f"({_num(cand['best_gain'])} at lr {cand['best_lr']}); target >= 90%"),
        dict(id="vs_lora", value=of_ref, threshold=0.5, ok=ready and of_ref is not None and of_ref >= 0.5,
             ready=ready, text=f"default graft at LoRA r=8's best lr reaches {_pct(of_ref)} of LoRA r=8's gain there "
                               f"({_num(ref['best_gain'])}); target >= 50%"),
        dict(id="flatness", value=cand["flatness"], threshold=ref["flatness"], ready=flat_ready,
             ok=flat_ready and cand["flatness"] >= ref["flatness"],
             text=f"flatness (share of the lr grid with >= 50% of the method's best gain): default graft "
                  f"{_num(cand['flatness'], 2)}, LoRA r=8 {_num(ref['flatness'], 2)}; target default >= LoRA"),
        dict(id="bytes", value=cand["adapter_model_bytes"], threshold=ref["adapter_model_bytes"], ready=bytes_ready,
             ok=bytes_ready and cand["adapter_model_bytes"] < ref["adapter_model_bytes"],
             text=f"adapter_model.safetensors: default graft {_bytes(cand['adapter_model_bytes'])}, LoRA r=8 "
                  f"{_bytes(ref['adapter_model_bytes'])}; target default < LoRA"),
    ]
    all_ready = all(t["ready"] for t in lines)
    lines.append(dict(id="all", value=None, threshold=None, ready=all_ready, ok=all(t["ok"] for t in lines),
                      text="learning-rate-robust default graft: all of the above"))
    for t in lines:
        t["status"] = ("PASS" if t.pop("ok") else "MISS") if t.pop("ready") else "N/A"
    return lines


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _bytes(x: int | None) -> str:
    return "n/a" if x is None else f"{x:,} B"


def gain_table(report: dict, spread: bool) -> list[str]:
    """Mean gain per lr per method (best lr in bold); ``spread`` adds +- half the seed range."""
    lrs = [f"{lr:g}" for lr in report["protocol"]["lrs"]]
    lines = ["| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for row in report["methods"].values():
        cells = []
        for lr in lrs:
            cell = row["gains"].get(lr)
            if cell is None:
                text = "–"
            elif cell["mean"] is None:
                text = f"diverged ({cell['diverged']}/{len(cell['gains'])})"
            else:
                text = f"{cell['mean']:.4f}"
                if spread and len(cell["gains"]) > 1:
                    text += f" ±{(cell['max'] - cell['min']) / 2:.4f}"
                if lr == row["best_lr"]:
                    text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return lines


def protocol_text(protocol: dict) -> str:
    layers = protocol["layers"]
    where = f"layers {layers[0]}–{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    data = "news text" if protocol["data"] == "news" else protocol["data"]
    return (f"{protocol['model']}, {data}; q_proj and v_proj of {where}; "
            f"{protocol['steps']} AdamW steps (weight decay 0, constant lr, no clipping) of {protocol['batch']}×"
            f"{protocol['seq_len']}-token blocks; a seed picks {protocol['steps'] * protocol['batch']} training "
            f"blocks of a pool of {protocol['pool_blocks']} and their order, and is the adapter config's seed; gain = "
            f"base − adapted validation loss (nats/token) on {protocol['val_blocks']} fixed blocks of "
            f"{protocol['seq_len']} tokens; seeds {', '.join(map(str, protocol['seeds']))}.")


def markdown(report: dict) -> str:
    p = report["protocol"]
    ref_lr = report["methods"][REFERENCE]["best_lr"]
    lines = [
        "# Learning-rate sensitivity: default graft vs LoRA r=8", "",
        (f"Generated by `python benchmarks/lr_sensitivity.py{' --quick' if p['quick'] else ''}` from the run files "
         "next to it; do not edit."), "",
        protocol_text(p) + " Base validation loss "
        + (" / ".join(f"{x:.4f}" for x in report["base_val_losses"]) or "n/a") + ".", "",
        "## Gain (nats/token) per learning rate: mean over seeds ± half their range, best lr in bold", "",
        *gain_table(report, spread=True), "",
        "## Per method", "",
        (f"| method | trainable params | adapter_model.safetensors | best lr | best gain | gain at lr {ref_lr} "
         "(LoRA r=8's best) | share of own best | share of LoRA r=8's best | flatness |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["methods"].values():
        lines.append(
            f"| {row['label']} | {row['trainable_params'] if row['trainable_params'] is not None else 'n/a'} | "
            f"{_bytes(row['adapter_model_bytes'])} | {row['best_lr']} | {_num(row['best_gain'])} | "
            f"{_num(row['gain_at_reference_lr'])} | {_pct(row['share_of_own_best'])} | "
            f"{_pct(row['share_of_reference'])} | {_num(row['flatness'], 2)} |")
    lines += ["", f"Adapter configs (every field, as run with seed {p['seeds'][0]}):", ""]
    lines += [f"- {row['label']}: `{json.dumps(row['adapter_config'], sort_keys=True)}`"
              for row in report["methods"].values()]
    lines += ["", "## Target", "", *(f"- **{t['status']}** {t['text']}" for t in report["targets"]), ""]
    if report["missing"]:
        lines += ["## Missing or stale runs", "", *(f"- {m}" for m in report["missing"]), ""]
    lines += ["![gain vs learning rate](lr_sensitivity.png)", ""]
    return "\n".join(lines)


def readme_snippet(report: dict) -> str:
    """A short section for the project README (the full report stays in benchmarks/results/lr_sensitivity/)."""
    return "\n".join([
        "### Learning-rate sensitivity of the default graft", "",
        "Does the learning rate you would give LoRA also suit `GraftConfig()`? "
        + protocol_text(report["protocol"]) + " Mean gain (nats/token), best lr of each method in bold:", "",
        *gain_table(report, spread=False), "",
        *(f"- **{t['status']}** {t['text']}" for t in report["targets"]), "",
        ("Reproduce with `python benchmarks/lr_sensitivity.py` (about 20 minutes on 1 CPU thread); report and plot: "
         "[benchmarks/results/lr_sensitivity/](benchmarks/results/lr_sensitivity/report.md)."), "",
    ])


def plot(report: dict, path: Path) -> None:
    """Gain vs lr (log x) per method, the seed range shaded; points far below zero (diverged runs) are drawn on the
    lower edge so that they do not flatten the interesting part of the plot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    finite = [c["max"] for r in report["methods"].values() for c in r["gains"].values() if c["max"] is not None]
    top = max(max(finite, default=0.0), 1e-3) * 1.15
    floor = -0.35 * top
    for row in report["methods"].values():
        cells = [(float(lr), c) for lr, c in row["gains"].items()]
        if not cells:
            continue
        x = [lr for lr, _ in cells]
        low = [floor if c["min"] is None or c["diverged"] else max(c["min"], floor) for _, c in cells]
        high = [floor if c["max"] is None else max(c["max"], floor) for _, c in cells]
        mean = [floor if c["mean"] is None else max(c["mean"], floor) for _, c in cells]
        line, = ax.plot(x, mean, marker="o", label=row["label"])
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        clipped = [(lr, floor) for (lr, c), m in zip(cells, mean) if m == floor]
        if clipped:
            ax.plot(*zip(*clipped), linestyle="none", marker="v", markersize=9, color=line.get_color())
    ref_lr = report["methods"][REFERENCE]["best_lr"]
    if ref_lr is not None:
        ax.axvline(float(ref_lr), color="grey", linestyle="--", linewidth=1, label=f"LoRA r=8's best lr ({ref_lr})")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set(xscale="log", ylim=(floor * 1.05, top), xlabel="learning rate (AdamW, constant)",
           ylabel="validation gain (nats/token)",
           title=f"mean and range over seeds {', '.join(map(str, report['protocol']['seeds']))} "
                 f"(▼: below {floor:.3f}, off the axis)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)

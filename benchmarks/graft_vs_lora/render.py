"""How a report (report.build_report) reads: the markdown table, the README block, the plot, the machine summary.

Everything here formats the report dict and nothing else, so the README block is a pure function of the stored
results (tests/benchmarks/test_graft_vs_lora_readme.py holds the README to it).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path


BEGIN, END = "<!-- graft_vs_lora:begin -->", "<!-- graft_vs_lora:end -->"
COLUMNS = [  # (row key, header) of the full table; {reference} is the protocol reference's label
    ("method", "method"), ("base", "base"), ("r", "r"), ("trainable_params", "trainable params"),
    ("params_ratio", "params / {reference}"), ("adapter_bytes", "adapter bytes"), ("bytes_ratio", "bytes / {reference}"),
    ("lr", "lr"), ("gain_mean", "test gain nats (95% CI)"), ("step_ms", "step ms"), ("step_ratio_to_ref", "step / ref"),
    ("init_s", "init s"), ("compute_ratio_to_ref", "compute / ref"), ("peak_tensor_mib", "peak tensor MiB"),
    ("peak_rss_mib", "peak RSS MiB"), ("train_rss_increase_mib", "train +RSS MiB"),
    ("latency_unmerged_over_base", "unmerged lat / base"), ("latency_unmerged_over_ref", "unmerged lat / ref"),
    ("latency_merged_over_base", "merged lat / base"),
]
README_COLUMNS = [
    ("label", "method"), ("r", "r"), ("trainable_params", "trainable params"), ("adapter_bytes", "adapter bytes"),
    ("lr", "lr"), ("gain_mean", "test gain (nats, 95% CI)"), ("step_ratio_to_ref", "step / ref"),
    ("compute_ratio_to_ref", "compute / ref"), ("latency_unmerged_over_ref", "unmerged lat / ref"),
    ("peak_tensor_mib", "peak tensor MiB"),
]
ENVIRONMENT = {  # environment key -> how its value reads
    "cpu": "{}", "cores": "{} cores", "torch": "torch {}", "torch_threads": "{} threads",
    "transformers": "transformers {}", "peft": "peft {}", "bitsandbytes": "bitsandbytes {}", "python": "Python {}",
}
RESULT_KINDS = {"run": "training runs", "probe": "probes", "base": "base evaluations"}
COLORS = {"GRAFT": "tab:green", "LORA": "tab:blue", "VERA": "tab:purple"}  # by peft_type


def environments(records: list[dict]) -> list[dict]:
    """The distinct machines / version sets among ``records``, each with how many results of each kind it made."""
    counts = Counter((tuple(r["environment"].get(k) for k in ENVIRONMENT), r["spec"]["kind"]) for r in records)
    groups: dict[tuple, dict] = {}
    for (env, kind), n in counts.items():
        groups.setdefault(env, dict(zip(ENVIRONMENT, env, strict=True), results={}))["results"][kind] = n
    return [groups[env] for env in sorted(groups, key=lambda env: tuple(map(str, env)))]


def describe_environments(envs: list[dict]) -> str:
    """Shared fields once, then what differs, with the results each version set produced."""
    shared = [k for k in ENVIRONMENT if len({e[k] for e in envs}) == 1]

    def produced(env: dict) -> str:
        return ", ".join(f"{env['results'][k]} {RESULT_KINDS[k]}" for k in RESULT_KINDS if k in env["results"])

    text = ", ".join(ENVIRONMENT[k].format(envs[0][k]) for k in shared) if envs else "no results"
    if len(envs) == 1:
        return f"{text} ({produced(envs[0])})"
    return text + "".join(
        f"; {', '.join(ENVIRONMENT[k].format(e[k]) for k in ENVIRONMENT if k not in shared)} for {produced(e)}"
        for e in envs)


def fmt(key: str, row: dict, gain_digits: int = 4) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    if key == "gain_mean":
        return f"{v:+.{gain_digits}f} ± {row['gain_ci95']:.{gain_digits}f}"
    if key == "lr":
        return f"{v:g}" + ("*" if row["lr_at_grid_edge"] else "")
    if key in ("trainable_params", "adapter_bytes"):
        return f"{v:,}"
    if key in ("params_ratio", "bytes_ratio"):
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:.0f}" if key.endswith(("_ms", "_mib")) else f"{v:.2f}"
    return str(v)


def table(rows: list[dict], columns: list[tuple[str, str]], reference: str, gain_digits: int) -> list[str]:
    lines = ["| " + " | ".join(h.format(reference=reference) for _, h in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(k, row, gain_digits) for k, _ in columns) + " |" for row in rows]


def _timing_refs(report: dict) -> str:
    labels = report["labels"]
    return ", ".join(f"{labels[b['timing_reference']]} for {name} rows" for name, b in report["protocol"]["bases"].items())


def _base_losses(report: dict) -> str:
    return ", ".join(f"{base} {losses['test']:.4f}" for base, losses in report["base_losses"].items())


def _verdicts(report: dict) -> list[str]:
    return [f"- **{t['status']}** {t['target']}: {t['detail']}" for t in report["targets"]]


def _calibrating_steps(row: dict) -> str:
    """How a method calibrated by its first training steps got its projections, and what those steps cost."""
    n, extra = row["calibration_steps"], row["calibration_extra_s"]
    if n == 1:
        return (f"its first training step (peft_graft.calibrating_step: no extra passes); that step took {extra:.2f} s "
                "longer than the median step (weight-gradient products and the projection solver)")
    return (f"its first {n} training steps (peft_graft.CalibratingSteps: no extra passes; each step after the first "
            f"re-projects from the summed gradient); they took {extra:.2f} s longer than {n} median steps "
            "(weight-gradient products and the projection solver)")


def notes(report: dict) -> list[str]:
    p, rows = report["protocol"], report["rows"]
    memory_method = rows[0]["memory_method"] if rows else "n/a"
    calibrated = [
        (f"{r['method']}: projections from the loss gradient of {r['calibration_batches']} training batches "
         "(peft_graft.calibrate) before training, i.e. that many extra forward/backward passes."
         if r["peft_type"] == "GRAFT" else
         f"{r['method']}: EVA's incremental SVD of the layer inputs over up to {r['calibration_batches']} training "
         "batches (forward passes only; PEFT's initialize_lora_eva_weights) before training.")
        for r in rows if r["calibration_batches"]
    ] + [
        f"{r['method']}: projections from the loss gradient of {_calibrating_steps(r)}; counted in compute / ref, "
        "and in peak tensor MiB."
        for r in rows if r.get("calibration_steps")
    ]
    return [
        ("Peak tensor memory (judged): the model's tensors plus the peak of live allocations recorded by torch's "
         "profiler over 3 training steps, the CPU counterpart of torch.cuda.max_memory_allocated."),
        (f"Peak RSS (for reference): {memory_method}, after returning freed heap to the OS (malloc_trim); "
         f"'train +RSS' is that peak minus the RSS just before training (probe mode: {p['probe_mode']})."),
        ("step / ref and unmerged lat / ref: timed alternately with the reference adapter in the same process; ref = "
         f"{_timing_refs(report)}. Latency: eval-mode forward of one sequence ({p['seq_len']} tokens), median of "
         f"{p['probe_repeats']}; merged = after merge_and_unload()."),
        ("init s: get_peft_model plus any data-driven init (calibration, EVA), timed in the probe; compute / ref: "
         f"(init + {p['steps']} × the median step) over the same for the reference, both measured in the probe."),
        *calibrated,
        ("Adapter bytes: size of adapter_model.safetensors from save_pretrained (VeRA with save_projection=False, "
         "seeded-orthogonal grafts store only Φ)."),
        (f"Each method's lr grid is extended by one step past an edge optimum, up to {p['lr_extensions']} times; lr "
         "marked * is still at the edge of its grid (the optimum may lie outside it)."),
    ]


def markdown(report: dict) -> str:
    p = report["protocol"]
    title = "# Grafts vs LoRA / QLoRA / VeRA" + (" (--quick smoke run, numbers meaningless)" if p["quick"] else "")
    setup = (f"Model: {p['model']}. Data: {p['data']}. {p['steps']} steps × batch {p['batch_size']} × {p['seq_len']} "
             "tokens, AdamW (wd 0, constant lr, clip 1.0); lr tuned per method on validation with seed "
             f"{p['tuning_seed']}; test gains over {p['seeds']} fresh seeds, mean ± 95% t-interval.")
    bases = f"Base test loss: {_base_losses(report)} nats/token; gains are over the method's own base (positive = better)."
    lines = [
        title, "", setup, bases, "", f"Measured on: {describe_environments(report['environments'])}.", "",
        *table(report["rows"], COLUMNS, report["labels"][p["reference"]], gain_digits=4), "", *_verdicts(report), "",
        *(f"- {note}" for note in notes(report)),
    ]
    if report["missing"]:
        lines += ["", "Incomplete (missing or stale result files):", *(f"- {m}" for m in report["missing"])]
    return "\n".join([*lines, "", "![gain vs parameters](gain_vs_params.png)"]) + "\n"


def readme_block(report: dict) -> str:
    """The README's results, between BEGIN and END (exclusive): generated, never edited by hand."""
    p = report["protocol"]
    measured = (f"Measured on: {describe_environments(report['environments'])}. Base test loss: "
                f"{_base_losses(report)} nats/token.")
    legend = ("`*` lr still at the edge of its extended grid. Gains are over the method's own base; step and latency "
              f"ratios against ref = {_timing_refs(report)}.")
    lines = [
        "<!-- written by `python -m benchmarks.graft_vs_lora.report --update-readme` from the result files -->",
        measured, "", *table(report["rows"], README_COLUMNS, report["labels"][p["reference"]], gain_digits=3), "",
        legend, "", "Targets, as `report.py` judges them:", *_verdicts(report),
    ]
    return "\n".join(lines) + "\n"


def _label_points(ax, points: list[tuple[str, float, float]], size: float = 7.0) -> None:
    """Name each point beside it, moving labels down just enough that none overlaps another (methods with nearly
    equal parameter counts and gains sit on top of each other), with a leader line when a label had to move."""
    ax.autoscale_view()
    to_points = 72.0 / ax.figure.dpi  # display pixels -> typographic points
    placed: list[tuple[float, float, float]] = []  # (x, y, width) of labels already placed, in points
    for name, x, y in sorted(points, key=lambda p: -p[2]):
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        lx, ly, width = px + 4, py + 2, 0.6 * size * len(name)
        while any(abs(ly - oy) < size * 1.5 and lx < ox + ow and ox < lx + width for ox, oy, ow in placed):
            ly -= size * 1.5
        placed.append((lx, ly, width))
        moved = ly != py + 2
        ax.annotate(name, (x, y), xytext=(lx - px, ly - py), textcoords="offset points", fontsize=size,
                    va="bottom", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if moved else None)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases, rows = report["protocol"]["bases"], report["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        color, hollow = COLORS.get(row["peft_type"], "tab:gray"), bases[row["base"]]["load_in_4bit"]
        ci = row["gain_ci95"] if math.isfinite(row["gain_ci95"]) else 0.0
        ax.errorbar(row["trainable_params"], row["gain_mean"], yerr=ci, fmt="s" if hollow else "o", color=color,
                    mfc="white" if hollow else color, capsize=3)
    ax.set_xscale("log")
    _label_points(ax, [(row["method"], row["trainable_params"], row["gain_mean"]) for row in rows])
    ax.axhline(0, color="grey", lw=0.5)
    reference = report["protocol"]["reference"]
    if ref := next((row for row in rows if row["method"] == reference), None):
        label = report["labels"][reference]
        ax.axhline(ref["gain_mean"], color=COLORS.get(ref["peft_type"]), ls="--", lw=0.8, label=f"{label} gain")
        for fraction in report["budgets"]:
            ax.axvline(ref["trainable_params"] * fraction, color="grey", ls=":", lw=0.8,
                       label=f"{fraction:g} × {label}'s params")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test loss gain over base (nats/token, 95% CI)")
    ax.set_title("Grafts (green) vs LoRA (blue) / VeRA (purple); hollow squares: 4-bit base")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)

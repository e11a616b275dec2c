"""Grafts vs LoRA, QLoRA and VeRA on a real model and real text: loss gain, parameters, bytes, speed, memory.

    python benchmarks/graft_vs_lora.py            # full run: SmolLM2-135M, news corpus (~50-60 min on 2 free cores)
    python benchmarks/graft_vs_lora.py --quick --output-dir /tmp/gvl   # same code path, tiny model (< 1 minute)

Writes benchmarks/results/graft_vs_lora.{json,md,png} (or --output-dir) and prints the table.

Protocol (identical for every method):
- Model: SmolLM2-135M-Instruct from `peft_graft.testing.assets.smollm2_path()` (fp32; the 4-bit rows load the same fp32
  folder with a bitsandbytes NF4 config, compute dtype fp32). Text: `load_corpus("news")` with its fixed, disjoint
  train / validation / test splits (by article, hashed), packed into blocks of --seq-len tokens.
- Training: same target modules (q_proj, v_proj unless the method says otherwise), steps, batch, sequence length;
  AdamW (weight decay 0), constant learning rate, gradient-norm clip 1.0.
- Learning rate: each method picks the best of its own small grid by validation loss after a run with seed 0; the
  test split is never used for that choice. While the best lr sits at the edge of the grid, the grid is extended
  one step in that direction (--lr-extensions times at most); an lr still at the edge is marked with '*'.
- Reported: test loss gain over the method's own base (fp32 or NF4) in nats/token, from --seeds fresh runs (seeds
  1..N, none of them the tuning run) at the chosen lr: mean and 95% Student-t interval over seeds. A seed draws
  which training blocks are used and in which order, and every random init: torch's global generator (LoRA's A),
  VeRA's projection_prng_key, GraftConfig(seed=...) (orthogonal/trainable projections). SVD-projection grafts start
  from Φ = 0 deterministically, so for them the seed changes the data only. The same seed gives every method the
  same data order, so gains are compared pairwise across seeds.
- Gradient-calibrated grafts (projection="gradient") place A/B on the top singular vectors of the loss gradient of
  each target weight, summed over 4, 16 or 32 training batches drawn by the seed (`peft_graft.calibrate`, before
  training): that many extra forward/backward passes that the other methods do not spend.
- Speed / memory / bytes / latency: per adapter, a fresh process (see graft_vs_lora_lib.probe): peak tensor memory
  over 3 training steps (model tensors + peak live allocations from torch's profiler; this is what the memory target
  is judged on) and peak RSS (Linux VmHWM reset before training, for reference), adapter_model.safetensors size,
  median step time with steps alternated against the reference adapter (LoRA r=8, or QLoRA r=8 for 4-bit rows),
  eval-mode forward latency of one sequence, alternated with the plain base and the reference, unmerged and after
  merge_and_unload().
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm


sys.path.insert(0, str(Path(__file__).resolve().parent))
import graft_vs_lora_lib as lib


RESULTS = Path(__file__).resolve().parent / "results"
PROBE_VERSION = 2  # bump when the probe measures something new, so --resume re-runs the probes
COLUMNS = [  # (JSON key, table header)
    ("method", "method"), ("base", "base"), ("r", "r"), ("trainable_params", "trainable params"),
    ("params_over_lora", "params / LoRA-r8"), ("adapter_bytes", "adapter bytes"),
    ("bytes_over_lora", "bytes / LoRA-r8"), ("lr", "lr"), ("gain_mean", "test gain nats (95% CI)"),
    ("step_ms", "step ms"), ("step_ratio_to_ref", "step / ref"), ("peak_tensor_mib", "peak tensor MiB"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("train_rss_increase_mib", "train +RSS MiB"), ("latency_unmerged_over_base", "unmerged lat / base"),
    ("latency_unmerged_over_ref", "unmerged lat / ref"), ("latency_merged_over_base", "merged lat / base"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random Llama, synthetic tokens, a subset of methods")
    p.add_argument("--output-dir", type=Path, default=RESULTS)
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; quick 3)")
    p.add_argument("--batch-size", type=int, default=None, help="blocks per step (default 8; quick 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 64; quick 32)")
    p.add_argument("--seeds", type=int, default=None, help="final seeds per method (default 3; quick 2)")
    p.add_argument("--lrs", type=int, default=None, help="lr grid size per method, max 3 (default 3; quick 2)")
    p.add_argument("--lr-extensions", type=int, default=None,
                   help="extra lrs tried one grid step beyond the best while it sits at the grid's edge (default 2; "
                        "quick 1)")
    p.add_argument("--methods", default=None, help="comma-separated subset of: " + ",".join(lib.METHOD_BY_NAME))
    p.add_argument("--targets", default="q_proj,v_proj", help="target modules of every method but graft_spread_all")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; quick: 1); use 1 if other jobs share the CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per probe (default 7; quick 2)")
    p.add_argument("--probe-mode", choices=("subprocess", "in-process"), default=None,
                   help="fresh process per adapter (default) or in this process (quick's default; memory unisolated)")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs and probes from OUTPUT_DIR/graft_vs_lora.runs.jsonl (kept after a run, "
                        "so a finished benchmark can be extended)")
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: run one probe, write --probe-out
    p.add_argument("--probe-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = dict(steps=(3, 30), batch_size=(4, 8), seq_len=(32, 64), seeds=(2, 3), lrs=(2, 3), lr_extensions=(1, 2),
                    repeats=(2, 7),
                    probe_mode=("in-process", "subprocess"), threads=(1, None))
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    names = args.methods.split(",") if args.methods else (lib.QUICK_METHODS if args.quick else lib.METHOD_BY_NAME)
    args.method_list = [lib.METHOD_BY_NAME[n] for n in names]
    args.target_list = args.targets.split(",")
    return args


@contextlib.contextmanager
def quiet():
    """No warnings, no loading bars, one-off torch thread count; all restored afterwards (main() is importable)."""
    import transformers

    tlog, threads = transformers.utils.logging, torch.get_num_threads()
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()
        torch.set_num_threads(threads)


def load_data(args, model_dir: Path) -> dict[str, torch.Tensor]:
    if args.quick:
        from transformers import AutoConfig

        return lib.synthetic_data(AutoConfig.from_pretrained(model_dir).vocab_size, args.seq_len)
    return lib.real_data(model_dir, args.seq_len)


def lr_grid(args, method: lib.Method) -> tuple[float, ...]:
    """The largest --lrs values of the method's grid (all of it by default)."""
    return method.lrs[-args.lrs:] if args.lrs < len(method.lrs) else method.lrs


# ---------------------------------------------------------------------------------------------------- probes


class RunCache:
    """Finished runs and probes, one JSON line each, so an interrupted or finished benchmark can --resume."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path, self.runs = path, {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                run = json.loads(line)
                self.runs[run["key"]] = run
        elif path.exists():
            path.unlink()

    def get(self, key: str):
        return self.runs.get(key)

    def put(self, run: dict) -> None:
        self.runs[run["key"]] = run
        with self.path.open("a") as f:
            f.write(json.dumps(run) + "\n")


def run_probe(args, method: lib.Method, model_dir: Path, data, cache: RunCache) -> dict:
    key = (f"probe{PROBE_VERSION}|{method.name}|{args.batch_size}|{args.seq_len}|{args.targets}|{args.repeats}|"
           f"{args.threads}|{args.probe_mode}")
    if (done := cache.get(key)) is None:
        done = dict(key=key, probe=_probe(args, method, model_dir, data))
        cache.put(done)
    return done["probe"]


def _probe(args, method: lib.Method, model_dir: Path, data) -> dict:
    if args.probe_mode == "in-process":
        return lib.probe(method, model_dir, data, args.target_list, args.batch_size, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", method.name, "--probe-out", str(out),
               "--model-dir", str(model_dir), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--repeats", str(args.repeats), "--targets", args.targets]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"probe {method.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------- training runs


def training_run(args, method, lr, seed, split, model_dir, data, cache: RunCache, bar) -> dict:
    key = f"{method.name}|{lr:g}|{seed}|{split}|{args.steps}|{args.batch_size}|{args.seq_len}|{args.targets}"
    if (done := cache.get(key)) is not None:
        bar.update(args.steps)
        return done
    bar.set_postfix_str(f"{method.name} lr={lr:g} seed={seed}")
    model, r = lib.build(method, model_dir, seed, args.target_list, data["train"], args.batch_size)
    stats = lib.train(model, data["train"], args.steps, args.batch_size, lr, seed, on_step=lambda: bar.update(1))
    loss = lib.mean_loss(model, data[split])
    run = dict(key=key, method=method.name, lr=lr, seed=seed, split=split, loss=loss, r=r,
               trainable_params=sum(p.numel() for p in lib.trainable(model)), **stats)
    cache.put(run)
    return run


def best_lr(runs: list[dict]) -> tuple[float, bool]:
    """Lowest validation loss (diverged runs count as infinitely bad); whether it sits at the grid's edge."""
    ranked = sorted(runs, key=lambda r: r["loss"] if math.isfinite(r["loss"]) else math.inf)
    lrs = sorted(r["lr"] for r in runs)
    return ranked[0]["lr"], len(lrs) > 1 and ranked[0]["lr"] in (lrs[0], lrs[-1])


def next_lr(runs: list[dict]) -> float | None:
    """One grid step (the outermost ratio, one significant digit) past the best lr while it is at the grid's edge."""
    lr, edge = best_lr(runs)
    if not edge:
        return None
    lrs = sorted(r["lr"] for r in runs)
    step = lrs[-1] / lrs[-2] if lr == lrs[-1] else lrs[0] / lrs[1]
    return float(f"{lr * step:.1g}")


def sweep(args, method, model_dir, data, cache: RunCache, bar) -> list[dict]:
    """Validation runs (seed 0) over the method's grid, extended while the best lr sits at an edge."""
    runs = [training_run(args, method, lr, 0, "validation", model_dir, data, cache, bar)
            for lr in lr_grid(args, method)]
    for _ in range(args.lr_extensions):
        if (lr := next_lr(runs)) is None:
            break
        bar.total += args.steps
        bar.refresh()
        runs.append(training_run(args, method, lr, 0, "validation", model_dir, data, cache, bar))
    return runs


# ---------------------------------------------------------------------------------------------------- report


def build_rows(args, base_losses, probes, sweeps, finals) -> list[dict]:
    lora = probes.get("lora_r8")
    rows = []
    for method in args.method_list:
        if method.kind == "base":
            continue
        precision = "nf4" if method.quant else "fp32"
        lr, edge = best_lr(sweeps[method.name])
        losses = [r["loss"] for r in finals[method.name]]
        gains = [base_losses[precision]["test"] - loss for loss in losses]
        mean, ci = lib.t_interval(gains)
        pr = probes[method.name]
        rows.append(dict(
            method=method.name, label=method.label, base=precision, r=pr["r"], trainable_params=pr["trainable_params"],
            params_over_lora=pr["trainable_params"] / lora["trainable_params"] if lora else None,
            bytes_over_lora=pr["adapter_bytes"] / lora["adapter_bytes"] if lora else None,
            lr=lr, lr_at_grid_edge=edge, seeds=[r["seed"] for r in finals[method.name]],
            sweep_validation_loss={f"{r['lr']:g}": r["loss"] for r in sweeps[method.name]},
            test_losses=losses, test_gains=gains, gain_mean=mean, gain_ci95=ci,
            **{k: v for k, v in pr.items() if k not in ("method", "r", "trainable_params")},
        ))
    return rows


def paired_diff(a: dict, b: dict) -> tuple[float, float]:
    return lib.t_interval([x - y for x, y in zip(a["test_gains"], b["test_gains"], strict=True)])


def evaluate_targets(rows: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in rows}
    lora, out = by.get("lora_r8"), []

    def add(name, ok, detail):
        out.append(dict(target=name, status="N/A" if ok is None else "PASS" if ok else "MISS", detail=detail))

    grafts = [r for r in rows if r["method"].startswith("graft") and r["base"] == "fp32"]
    small = [r for r in grafts if lora and r["trainable_params"] <= lora["trainable_params"] / 10]
    head = max(small or grafts, key=lambda r: r["gain_mean"]) if grafts else None
    if lora and small:
        d, ci = paired_diff(head, lora)
        add("a graft reaches >= LoRA r=8's test gain with <= 1/10 of its trainable params", head["gain_mean"] >=
            lora["gain_mean"], f"best such graft {head['method']} ({head['trainable_params']:,} params, "
            f"{head['params_over_lora']:.3f}x): gain {head['gain_mean']:.4f} ± {head['gain_ci95']:.4f} vs LoRA r=8 "
            f"{lora['gain_mean']:.4f} ± {lora['gain_ci95']:.4f}; paired difference {d:+.4f} ± {ci:.4f} nats")
    else:
        add("a graft reaches >= LoRA r=8's test gain with <= 1/10 of its trainable params", None, "needs lora_r8 "
            "and a graft with <= 1/10 of its params")
    orth = [r for r in grafts if "orth" in r["method"]]
    if lora and orth:
        best = min(orth, key=lambda r: r["adapter_bytes"])
        add("seeded-orthogonal graft artifact <= 1/50 of LoRA r=8's bytes", best["bytes_over_lora"] <= 1 / 50,
            "; ".join(f"{r['method']}: {r['adapter_bytes']:,} B = 1/{1 / r['bytes_over_lora']:.0f} (tensors alone "
                      f"{r['adapter_tensor_bytes']:,} B, the rest is the safetensors header)" for r in orth)
            + f"; LoRA r=8: {lora['adapter_bytes']:,} B")
    else:
        add("seeded-orthogonal graft artifact <= 1/50 of LoRA r=8's bytes", None, "needs lora_r8 and graft_orth_*")
    # speed is compared at LoRA's own target modules: the best small graft there (any graft if none is small)
    same = [r for r in grafts if "targets" not in lib.METHOD_BY_NAME[r["method"]].options]
    fast = max([r for r in same if r in small] or same, key=lambda r: r["gain_mean"]) if same else None
    if fast and lora:
        others = ", ".join(f"{r['method']} {r['step_ratio_to_ref']:.2f}x" for r in grafts)
        lats = ", ".join(f"{r['method']} {r['latency_unmerged_over_ref']:.2f}x" for r in grafts)
        add(f"training step time <= 1.05x LoRA r=8 at its targets ({fast['method']})",
            fast["step_ratio_to_ref"] <= 1.05,
            f"{fast['step_ms']:.0f} ms = {fast['step_ratio_to_ref']:.3f}x; all fp32 grafts: {others}")
        add(f"unmerged latency <= 1.05x LoRA r=8 at its targets ({fast['method']})",
            fast["latency_unmerged_over_ref"] <= 1.05,
            f"{fast['latency_unmerged_over_ref']:.3f}x LoRA r=8, {fast['latency_unmerged_over_base']:.3f}x base; "
            f"all fp32 grafts vs LoRA r=8: {lats}")
        add(f"merged latency = base, within 5% ({fast['method']})", fast["latency_merged_over_base"] <= 1.05,
            f"{fast['latency_merged_over_base']:.3f}x base after merge_and_unload(); max |Δlogit| merged vs "
            f"unmerged {fast['merged_max_abs_dlogit']:.1e}")
    else:
        for name in ("training step time <= 1.05x LoRA r=8 at its targets",
                     "unmerged latency <= 1.05x LoRA r=8 at its targets", "merged latency = base"):
            add(name, None, "needs lora_r8 and an fp32 graft")
    g4, q4 = by.get("graft_svd_r16_4bit"), by.get("qlora_r8")
    if g4 and q4:
        add("graft on the 4-bit base uses <= QLoRA's peak memory", g4["peak_tensor_mib"] <= q4["peak_tensor_mib"],
            f"peak tensor memory {g4['peak_tensor_mib']:.1f} MiB vs {q4['peak_tensor_mib']:.1f} MiB; peak RSS "
            f"{g4['peak_rss_mib']:.0f} vs {q4['peak_rss_mib']:.0f} MiB (training increase "
            f"{g4['train_rss_increase_mib']:.0f} vs {q4['train_rss_increase_mib']:.0f} MiB)")
    else:
        add("graft on the 4-bit base uses <= QLoRA's peak memory", None, "needs graft_svd_r16_4bit and qlora_r8")
    return out


def fmt(key: str, row: dict) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    if key == "gain_mean":
        return f"{v:+.4f} ± {row['gain_ci95']:.4f}"
    if key == "lr":
        return f"{v:g}" + ("*" if row["lr_at_grid_edge"] else "")
    if key in ("trainable_params", "adapter_bytes"):
        return f"{v:,}"
    if key in ("params_over_lora", "bytes_over_lora"):
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:.0f}" if key.endswith(("_ms", "_mib")) else f"{v:.2f}"
    return str(v)


def render_markdown(report: dict) -> str:
    cfg, m, bl = report["config"], report["machine"], report["base_losses"]
    lines = [
        "# Grafts vs LoRA / QLoRA / VeRA" + (" (--quick smoke run, numbers meaningless)" if cfg["quick"] else ""), "",
        f"Model: {cfg['model']}. Data: {cfg['data']}. {cfg['steps']} steps × batch {cfg['batch_size']} × "
        f"{cfg['seq_len']} tokens, AdamW (wd 0, constant lr, clip 1.0), targets {cfg['targets']}; lr tuned per method "
        f"on validation with seed 0; test gains over {cfg['seeds']} fresh seeds, mean ± 95% t-interval.",
        f"Base test loss: fp32 {bl['fp32']['test']:.4f}" + (f", NF4 {bl['nf4']['test']:.4f}" if "nf4" in bl else "")
        + " nats/token; gains are over the method's own base (positive = better).", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), transformers "
        f"{m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}; load average "
        f"{m['load_average_1min']:.1f} at start, {m['load_average_1min_end']:.1f} at the end; total runtime "
        f"{report['runtime_s'] / 60:.1f} min.", "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(fmt(k, row) for k, _ in COLUMNS) + " |" for row in report["rows"]]
    lines += [""] + [f"- **{t['status']}** {t['target']}: {t['detail']}" for t in report["targets"]]
    lines += ["", *[f"- {note}" for note in report["notes"]], "", "![gain vs parameters](graft_vs_lora.png)"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        family = "graft" if row["method"].startswith("graft") else row["method"].split("_")[0]
        color = {"graft": "tab:green", "lora": "tab:blue", "qlora": "tab:blue", "vera": "tab:purple"}[family]
        ci = row["gain_ci95"] if math.isfinite(row["gain_ci95"]) else 0.0
        ax.errorbar(row["trainable_params"], row["gain_mean"], yerr=ci, fmt="s" if row["base"] == "nf4" else "o",
                    color=color, mfc="white" if row["base"] == "nf4" else color, capsize=3)
        ax.annotate(row["method"], (row["trainable_params"], row["gain_mean"]), fontsize=7,
                    xytext=(4, -9 if row["base"] == "nf4" else 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.5)
    lora = next((row for row in rows if row["method"] == "lora_r8"), None)
    if lora:
        ax.axhline(lora["gain_mean"], color="tab:blue", ls="--", lw=0.8, label="LoRA r=8 gain")
        ax.axvline(lora["trainable_params"] / 10, color="grey", ls=":", lw=0.8, label="1/10 of LoRA r=8's params")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test loss gain over base (nats/token, 95% CI)")
    ax.set_title("Grafts (green) vs LoRA (blue) / VeRA (purple); hollow squares: NF4 base")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict | None:
    """Run the benchmark (or, with the internal --probe, one probe); returns the report written to disk."""
    args = parse_args(argv)
    with quiet():
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args)


def _run(args) -> dict | None:
    if args.probe:  # child process of run_probe
        data = load_data(args, args.model_dir)
        result = lib.probe(lib.METHOD_BY_NAME[args.probe], args.model_dir, data, args.target_list,
                           args.batch_size, args.repeats)
        args.probe_out.write_text(json.dumps(result))
        return None
    started = time.time()
    machine = lib.machine_info()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None and args.quick:
            model_dir = Path(tmp) / "tiny-llama"
            lib.make_tiny_llama(model_dir)
        elif model_dir is None:
            from peft_graft.testing.assets import smollm2_path

            model_dir = smollm2_path()
        data = load_data(args, model_dir)
        methods = [m for m in args.method_list if m.kind != "base"]
        base_losses = {}
        for precision in ("fp32", "nf4") if any(m.quant for m in methods) else ("fp32",):
            base = lib.load_base(model_dir, precision == "nf4")
            base_losses[precision] = {s: lib.mean_loss(base, data[s]) for s in ("validation", "test")}
            del base
        cache = RunCache(args.output_dir / "graft_vs_lora.runs.jsonl", args.resume)
        reused = len(cache.runs)
        probes = {m.name: run_probe(args, m, model_dir, data, cache)
                  for m in tqdm(methods, desc="speed/memory probes")}
        seeds = list(range(1, args.seeds + 1))
        total = sum(len(lr_grid(args, m)) + len(seeds) for m in methods) * args.steps
        sweeps, finals = {}, {}
        with tqdm(total=total, desc="training steps", unit="step") as bar:
            for m in methods:
                sweeps[m.name] = sweep(args, m, model_dir, data, cache, bar)
                lr, _ = best_lr(sweeps[m.name])
                finals[m.name] = [training_run(args, m, lr, s, "test", model_dir, data, cache, bar) for s in seeds]

    rows = build_rows(args, base_losses, probes, sweeps, finals)
    memory_method = next(iter(probes.values()))["memory_method"] if probes else "n/a"
    report = dict(
        config=dict(
            quick=args.quick, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seeds=args.seeds,
            tuning_seed=0, final_seeds=seeds, targets=args.target_list,
            lr_grids={m.name: sorted(r["lr"] for r in sweeps[m.name]) for m in methods},
            lr_extensions=args.lr_extensions,
            optimizer="AdamW(weight_decay=0), constant lr, grad-norm clip 1.0", probe_repeats=args.repeats,
            probe_mode=args.probe_mode,
            model="tiny random Llama (quick)" if args.quick else "SmolLM2-135M-Instruct fp32",
            data="synthetic Zipf tokens (quick)" if args.quick else "news corpus, fixed disjoint splits by article",
            blocks={s: len(t) for s, t in data.items()},
        ),
        machine=machine, base_losses=base_losses, rows=rows, targets=evaluate_targets(rows),
        notes=[
            "Peak tensor memory (judged): the model's tensors plus the peak of live allocations recorded by torch's "
            "profiler over 3 training steps, the CPU counterpart of torch.cuda.max_memory_allocated.",
            f"Peak RSS (for reference): {memory_method}, after returning freed heap to the OS (malloc_trim); "
            f"'train +RSS' is that peak minus the RSS just before training (probe mode: {args.probe_mode}).",
            "step / ref and unmerged lat / ref: timed alternately with the reference adapter in the same process; "
            "ref = LoRA r=8 for fp32 rows, QLoRA r=8 for NF4 rows. Latency: eval-mode forward of one sequence "
            f"({args.seq_len} tokens), median of {args.repeats}; merged = after merge_and_unload().",
            *(f"{m.name}: projections from the loss gradient of {m.options['calibration_batches']} training "
              "batches (peft_graft.calibrate) before training, i.e. that many extra forward/backward passes."
              for m in methods if m.options.get("projection") == "gradient"),
            "Adapter bytes: size of adapter_model.safetensors from save_pretrained (VeRA with save_projection=False, "
            "seeded-orthogonal grafts store only Φ).",
            f"Each method's lr grid is extended by one step past an edge optimum, up to {args.lr_extensions} "
            "times; lr marked * is still at the edge of its grid (the optimum may lie outside it).",
            f"{reused} runs/probes reused from an earlier invocation (--resume); runtime counts this one only.",
        ],
        runtime_s=time.time() - started,
    )
    report["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    out = args.output_dir
    (out / "graft_vs_lora.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (out / "graft_vs_lora.md").write_text(markdown)
    plot(rows, out / "graft_vs_lora.png")
    print(markdown)
    return report


if __name__ == "__main__":
    main()

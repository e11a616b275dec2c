"""Report the stored results: the table (markdown + JSON), the targets' PASS/MISS, the plot, the README's numbers.

    python -m benchmarks.graft_vs_lora.report                    # writes report.{md,json} + gain_vs_params.png
    python -m benchmarks.graft_vs_lora.report --update-readme    # ... and the README block between the markers
    python -m benchmarks.graft_vs_lora.report --quick            # a quick run's results (default temp dir)

Nothing is trained here. The report walks each method's protocol over the stored files exactly as the runner does
(sweep on validation, extension past an edge optimum, final seeds at the chosen lr), using only files whose spec hash
matches the current experiment and protocol; a method with a missing or stale file is listed as incomplete.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from . import render, store
from .experiments import Experiment, load_experiments
from .protocol import Protocol, best_lr, sweep, t_interval
from .targets import judge, load_targets


README = store.REPO / "README.md"


class Missing(Exception):
    """A result file the protocol needs is absent or stale."""


class Collector:
    """Reads the stored results the protocol selects, remembering every record it used."""

    def __init__(self, protocol: Protocol, root: Path) -> None:
        self.protocol, self.root, self.used = protocol, root, []

    def need(self, path: Path, spec: dict) -> dict:
        if (record := store.load(path, spec)) is None:
            raise Missing(f"{path.relative_to(self.root)} ({'stale' if path.exists() else 'absent'})")
        self.used.append(record)
        return record["result"]

    def row(self, exp: Experiment, ref: Experiment, base_test_loss: float) -> dict:
        p = self.protocol
        probe = self.need(store.probe_path(self.root, exp.name), store.probe_spec(exp, ref, p))

        def run(seed: int, lr: float) -> dict:
            return self.need(store.run_path(self.root, exp.name, seed, lr), store.run_spec(exp, p, seed, lr))

        losses = sweep(p.initial_grid(exp.lr_grid), p.lr_extensions, lambda lr: run(p.tuning_seed, lr)["loss"])
        lr, edge = best_lr(losses)
        test_losses = [run(seed, lr)["loss"] for seed in p.final_seeds]
        gains = [base_test_loss - loss for loss in test_losses]
        mean, ci = t_interval(gains)
        return dict(
            method=exp.name, label=exp.label, peft_type=exp.adapter_config["peft_type"], base=exp.base,
            calibration_batches=exp.calibration_batches, calibration_steps=exp.calibration_steps,
            r=probe["r"], trainable_params=probe["trainable_params"],
            lr=lr, lr_at_grid_edge=edge, seeds=p.final_seeds,
            sweep_validation_loss={f"{k:g}": v for k, v in sorted(losses.items())}, test_losses=test_losses,
            test_gains=gains, gain_mean=mean, gain_ci95=ci,
            **{k: v for k, v in probe.items() if k not in ("method", "r", "trainable_params")},
        )


def build_report(protocol: Protocol, root: Path) -> dict:
    """Everything the outputs show, from the stored results under ``root`` alone."""
    targets, methods = load_targets(), protocol.methods
    referenced = {t[k] for t in targets for k in ("reference", "subject") if k in t}
    referenced |= {protocol.reference} | {b["timing_reference"] for b in protocol.bases.values()}
    experiments = load_experiments([*methods, *sorted(referenced - set(methods))])
    collector, missing = Collector(protocol, root), []
    base_losses, rows = {}, {}
    for base in dict.fromkeys(experiments[m].base for m in methods):
        try:
            base_losses[base] = collector.need(store.base_path(root, base), store.base_spec(base, protocol))
        except Missing as e:
            missing.append(str(e))
    for name in methods:
        exp = experiments[name]
        if exp.base not in base_losses:
            continue
        ref = experiments[protocol.bases[exp.base]["timing_reference"]]
        try:
            rows[name] = collector.row(exp, ref, base_losses[exp.base]["test"])
        except Missing as e:
            missing.append(f"{name}: {e}")
    if (ref_row := rows.get(protocol.reference)) is not None:
        for row in rows.values():
            row["params_ratio"] = row["trainable_params"] / ref_row["trainable_params"]
            row["bytes_ratio"] = row["adapter_bytes"] / ref_row["adapter_bytes"]
    return dict(
        protocol=asdict(protocol), environments=render.environments(collector.used), base_losses=base_losses,
        rows=list(rows.values()), targets=judge(targets, rows, experiments), missing=missing,
        labels={name: exp.label for name, exp in experiments.items()},
        budgets=sorted({t["max_params_ratio"] for t in targets if "max_params_ratio" in t}),
    )


def readme_with_block(readme: str, block: str) -> str:
    """``readme`` with the text between the graft_vs_lora markers replaced by ``block``."""
    head, begin, rest = readme.partition(render.BEGIN + "\n")
    _, end, tail = rest.partition(render.END)
    if not begin or not end:
        raise SystemExit(f"README.md lacks the {render.BEGIN} / {render.END} markers")
    return head + begin + block + end + tail


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="report a quick run (tiny model)")
    p.add_argument("--results-dir", type=Path, help=f"default {store.RESULTS_DIR} (quick: {store.QUICK_RESULTS_DIR})")
    p.add_argument("--update-readme", action="store_true", help="rewrite README.md's generated results block")
    args = p.parse_args(argv)
    if args.update_readme and args.quick:
        p.error("--update-readme publishes the full protocol's results, not a quick run's")
    root = store.results_root(args.results_dir, args.quick)
    report = build_report(Protocol.load(args.quick), root)
    store.write_json(root / "report.json", report)
    markdown = render.markdown(report)
    (root / "report.md").write_text(markdown)
    render.plot(report, root / "gain_vs_params.png")
    if args.update_readme:
        README.write_text(readme_with_block(README.read_text(), render.readme_block(report)))
    print(markdown)
    return report


if __name__ == "__main__":
    main()

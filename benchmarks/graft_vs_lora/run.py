"""Train and measure experiments; every finished run is written at once as its own result file (see store.py).

    python -m benchmarks.graft_vs_lora.run lora_r8 --seed 1 --lr 0.003   # one run (seed 0 scores validation)
    python -m benchmarks.graft_vs_lora.run lora_r8 [--resume]            # the method's whole protocol
    python -m benchmarks.graft_vs_lora.run --all [--resume]              # every method of protocol.json (~2 h)
    python -m benchmarks.graft_vs_lora.run --all --quick                 # tiny model, < 1 minute, in a temp dir

A method's protocol: the loss of its base (fp32 or nf4) on validation and test, its probe, the lr sweep on
validation with the tuning seed (extended past an edge optimum), then the final seeds on test at the chosen lr. With
--resume a result whose file exists with the same spec hash is reused instead of re-run. Then run report.py.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import store
from .experiments import Experiment, load_experiments
from .modeling import (
    build,
    calibration,
    config_changes,
    load_base,
    load_data,
    make_tiny_llama,
    mean_loss,
    session,
    train,
    trainable,
)
from .probe import run_probe
from .protocol import Protocol, best_lr, sweep


@dataclass
class Runner:
    """Runs what is asked, writing one file per result; with ``resume``, reuses stored results that still match."""

    protocol: Protocol
    root: Path
    model_dir: Path
    data: dict[str, torch.Tensor]
    resume: bool
    written: list[Path] = field(default_factory=list)
    reused: list[Path] = field(default_factory=list)

    def _stored(self, path: Path, spec: dict) -> dict | None:
        """The stored result to use instead of running: with --resume any that matches; always one written by this
        invocation (a base evaluation shared by several methods)."""
        if path in self.written or path in self.reused:
            return store.load(path, spec)
        record = store.load(path, spec) if self.resume else None
        if record is not None:
            self.reused.append(path)
        return record

    def _save(self, path: Path, spec: dict, result: dict, started: float, changes: dict | None = None) -> dict:
        record = store.save(path, spec, result, started, changes)
        self.written.append(path)
        return record

    def base_losses(self, base: str) -> dict[str, float]:
        path, spec = store.base_path(self.root, base), store.base_spec(base, self.protocol)
        if (record := self._stored(path, spec)) is None:
            started = time.time()
            model = load_base(self.model_dir, self.protocol.bases[base]["load_in_4bit"])
            losses = {split: mean_loss(model, self.data[split]) for split in ("validation", "test")}
            record = self._save(path, spec, losses, started)
            print(f"base {base}: test loss {losses['test']:.4f}", flush=True)
        return record["result"]

    def probe(self, exp: Experiment) -> dict:
        ref = Experiment.load(self.protocol.bases[exp.base]["timing_reference"])
        path, spec = store.probe_path(self.root, exp.name), store.probe_spec(exp, ref, self.protocol)
        if (record := self._stored(path, spec)) is None:
            started = time.time()
            record = self._save(path, spec, run_probe(exp, ref, self.protocol, self.model_dir, self.data), started)
            print(f"{exp.name} probe: step {record['result']['step_ms']:.0f} ms ({record['wall_s']:.0f} s)",
                  flush=True)
        return record["result"]

    def run(self, exp: Experiment, seed: int, lr: float) -> dict:
        """One training run; its loss is on validation for the tuning seed, on test otherwise."""
        path, spec = store.run_path(self.root, exp.name, seed, lr), store.run_spec(exp, self.protocol, seed, lr)
        if (record := self._stored(path, spec)) is None:
            started, p = time.time(), self.protocol
            model, config, _ = build(exp, p, self.model_dir, seed, self.data["train"])
            stats = train(model, self.data["train"], p.steps, p.batch_size, lr, seed, calibration(model, exp))
            result = dict(loss=mean_loss(model, self.data[p.split(seed)]), r=getattr(config, "r", None),
                          trainable_params=sum(t.numel() for t in trainable(model)), **stats)
            record = self._save(path, spec, result, started, config_changes(exp.adapter_config, config))
            print(f"{exp.name} seed {seed} lr {lr:g}: {p.split(seed)} loss {result['loss']:.4f} "
                  f"({record['wall_s']:.0f} s)", flush=True)
        return record["result"]

    def whole_protocol(self, exp: Experiment) -> None:
        """Base losses, probe, lr sweep on validation (tuning seed), then the final seeds on test at the best lr."""
        p = self.protocol
        self.base_losses(exp.base)
        self.probe(exp)
        losses = sweep(p.initial_grid(exp.lr_grid), p.lr_extensions, lambda lr: self.run(exp, p.tuning_seed, lr)["loss"])
        lr, _ = best_lr(losses)
        for seed in p.final_seeds:
            self.run(exp, seed, lr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("methods", nargs="*", help="experiment folder names under benchmarks/graft_vs_lora/experiments/")
    p.add_argument("--all", action="store_true", help="every method listed in protocol.json (quick: its quick list)")
    p.add_argument("--seed", type=int, help="with --lr: only this run of each named method")
    p.add_argument("--lr", type=float, help="with --seed: only this run of each named method")
    p.add_argument("--quick", action="store_true", help="tiny random Llama and synthetic tokens (a smoke run)")
    p.add_argument("--results-dir", type=Path, help=f"default {store.RESULTS_DIR} (quick: {store.QUICK_RESULTS_DIR})")
    p.add_argument("--resume", action="store_true", help="reuse stored results with the same spec hash")
    args = p.parse_args(argv)
    if bool(args.methods) == args.all:
        p.error("name methods or pass --all")
    if (args.seed is None) != (args.lr is None):
        p.error("--seed and --lr go together")
    args.results_dir = store.results_root(args.results_dir, args.quick)
    return args


def main(argv: list[str] | None = None) -> Runner:
    """Run what the command line asks; returns the runner (which files it wrote and which it reused)."""
    args = parse_args(argv)
    protocol = Protocol.load(args.quick)
    experiments = load_experiments(protocol.methods if args.all else args.methods)
    with session(protocol), tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            model_dir = Path(tmp) / "tiny-llama"
            make_tiny_llama(model_dir)
        else:
            from peft_graft.testing.assets import smollm2_path

            model_dir = smollm2_path()
        runner = Runner(protocol, args.results_dir, model_dir, load_data(protocol, model_dir), args.resume)
        for exp in experiments.values():
            if args.seed is None:
                runner.whole_protocol(exp)
            else:
                runner.run(exp, args.seed, args.lr)
    print(f"{len(runner.written)} results written, {len(runner.reused)} reused, under {args.results_dir}")
    return runner


if __name__ == "__main__":
    main()

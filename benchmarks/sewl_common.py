"""Shared pieces of the SEWL benchmarks: the grafted SmolLM2 they run on and the paired timing of update vs forward.

Why paired: the benchmarks run on a 2-core machine shared with other jobs, where load changes by the second. Timing
all forwards, then all updates, compares two different machines; alternating them and taking the median of the
per-round ratios compares like with like. Thread count is fixed by the caller (one thread by default: with other
jobs on the cores, two threads spin-wait on each other and times jump several-fold).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_graft import GraftConfig
from peft_graft.testing.assets import smollm2_path


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def grafted_smollm2(r: int = 16, targets: list[str] | None = None):
    """(tokenizer, SmolLM2-135M with a graft adapter: rank ``r``, seeded orthogonal projections, every layer)."""
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    model = get_peft_model(base, GraftConfig(r=r, target_modules=targets or ALL_PROJECTIONS))
    return tokenizer, model


@dataclass(frozen=True)
class PairedTiming:
    """Seconds of each round of a baseline and a candidate run back to back."""

    baseline: list[float]
    candidate: list[float]

    @property
    def ratio(self) -> float:
        """Median over rounds of candidate / baseline."""
        return statistics.median(c / b for b, c in zip(self.baseline, self.candidate))

    @property
    def baseline_s(self) -> float:
        return statistics.median(self.baseline)

    @property
    def candidate_s(self) -> float:
        return statistics.median(self.candidate)


def paired_timing(baseline: Callable[[], object], candidate: Callable[[], object], rounds: int) -> PairedTiming:
    """Warm both up once, then alternate them ``rounds`` times."""
    baseline()
    candidate()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((baseline, times[0]), (candidate, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return PairedTiming(*times)


def no_grad_forward(model: torch.nn.Module, chunk: torch.Tensor) -> Callable[[], object]:
    """The baseline every update is compared with: one plain forward of the same chunk."""

    def run() -> object:
        with torch.no_grad():
            return model(input_ids=chunk)

    return run


def adapter_off_forward(model: torch.nn.Module, chunk: torch.Tensor) -> Callable[[], object]:
    """The same no-grad forward with a PEFT model's adapters switched off: the base's own computation on the same
    weights in the same memory, so a comparison with the adapter on measures the adapter and nothing else."""

    def run() -> object:
        with torch.no_grad(), model.disable_adapter():
            return model(input_ids=chunk)

    return run

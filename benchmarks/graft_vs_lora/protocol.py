"""What every method shares (protocol.json) and the rules that pick its runs: the lr search and the seed roles.

The runner and the report both walk the lr search through `sweep`, the runner training what is missing and the report
only reading, so the report can never select other runs than the runner made.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path


PROTOCOL_FILE = Path(__file__).resolve().parent / "protocol.json"
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t, 97.5%, df 1..10


@dataclass(frozen=True)
class Protocol:
    """protocol.json, with its "quick" section laid over it in quick mode (tiny model, synthetic tokens)."""

    quick: bool
    model: str
    data: str
    steps: int
    batch_size: int
    seq_len: int
    tuning_seed: int
    seeds: int
    lr_grid_size: int | None  # use only the largest lr_grid_size values of each method's grid (None: all)
    lr_extensions: int
    threads: int | None  # torch threads (None: torch's default)
    probe_repeats: int
    probe_mode: str  # "subprocess" (a fresh process per probe) or "in-process"
    reference: str  # the method whose trainable params and bytes every row is compared with
    bases: dict[str, dict]  # base precision -> {"load_in_4bit": bool, "timing_reference": method}
    methods: tuple[str, ...]

    @classmethod
    def load(cls, quick: bool = False, path: Path = PROTOCOL_FILE) -> Protocol:
        settings = json.loads(path.read_text())
        overrides = settings.pop("quick")
        if quick:
            settings |= overrides
        return cls(quick=quick, **{**settings, "methods": tuple(settings["methods"])})

    @property
    def final_seeds(self) -> list[int]:
        """The reported seeds: the `seeds` seeds after the tuning seed, so none of them chose the lr."""
        return list(range(self.tuning_seed + 1, self.tuning_seed + 1 + self.seeds))

    def split(self, seed: int) -> str:
        """The tuning seed is scored on validation (to pick the lr), every other seed on test."""
        return "validation" if seed == self.tuning_seed else "test"

    def initial_grid(self, lr_grid: tuple[float, ...]) -> tuple[float, ...]:
        if self.lr_grid_size is None or self.lr_grid_size >= len(lr_grid):
            return lr_grid
        return lr_grid[-self.lr_grid_size :]

    def setup(self) -> dict:
        """The settings a training run's result depends on, besides the method, seed and lr."""
        return dict(model=self.model, data=self.data, steps=self.steps, batch_size=self.batch_size,
                    seq_len=self.seq_len)


def best_lr(losses: Mapping[float, float]) -> tuple[float, bool]:
    """Lowest validation loss (a diverged run counts as infinitely bad); whether it sits at the grid's edge."""
    best = min(losses, key=lambda lr: losses[lr] if math.isfinite(losses[lr]) else math.inf)
    lrs = sorted(losses)
    return best, len(lrs) > 1 and best in (lrs[0], lrs[-1])


def next_lr(losses: Mapping[float, float]) -> float | None:
    """One grid step (the outermost ratio, one significant digit) past the best lr while it is at the grid's edge."""
    lr, edge = best_lr(losses)
    if not edge:
        return None
    lrs = sorted(losses)
    step = lrs[-1] / lrs[-2] if lr == lrs[-1] else lrs[0] / lrs[1]
    return float(f"{lr * step:.1g}")


def sweep(grid: tuple[float, ...], extensions: int, validation_loss: Callable[[float], float]) -> dict[float, float]:
    """Validation loss per lr over ``grid``, extended one step at a time while the best lr sits at an edge."""
    losses = {lr: validation_loss(lr) for lr in grid}
    for _ in range(extensions):
        if (lr := next_lr(losses)) is None:
            break
        losses[lr] = validation_loss(lr)
    return losses


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval over seeds); the half-width is NaN for a single value."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan")
    return mean, T_975[min(n - 1, len(T_975)) - 1] * statistics.stdev(values) / n**0.5

"""Statistical gates on the composed model: gain on the new domain, retention of the old one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bootstrap import Interval, paired_bootstrap_ci
from .context import GateContext
from .core import Decision, Gate, GateResult


@dataclass(kw_only=True)
class _BootstrapGate(Gate):
    """Shared settings of the gates that judge a paired bootstrap interval (keyword-only)."""

    confidence: float = 0.95
    n_resamples: int = 2000
    seed: int = 0

    def interval(self, deltas: torch.Tensor) -> Interval:
        return paired_bootstrap_ci(deltas, self.confidence, self.n_resamples, self.seed)


@dataclass
class MinimumGain(_BootstrapGate):
    """The candidate must lower acceptance loss by more than ``min_gain`` nats/token.

    ACCEPT when the whole confidence interval of the gain clears ``min_gain``, REJECT when the whole interval is
    below it, DEFER when the interval straddles it (more data or steps may settle it).
    """

    min_gain: float = 0.0
    name: str = "minimum_gain"

    def evaluate(self, ctx: GateContext) -> GateResult:
        ci = self.interval(ctx.deltas("acceptance"))
        evidence = {"gain": ci.to_dict(), "min_gain": self.min_gain}
        metrics = {"gain": ci.mean, "gain_ci_low": ci.low, "gain_ci_high": ci.high}
        text = f"gain {ci.mean:+.4f} nats [{ci.low:+.4f}, {ci.high:+.4f}] vs required {self.min_gain:+.4f}"
        if ci.low > self.min_gain:
            return GateResult(self.name, Decision.ACCEPT, text, evidence, metrics)
        if ci.high < self.min_gain:
            return GateResult(self.name, Decision.REJECT, text, evidence, metrics)
        return GateResult(self.name, Decision.DEFER, text + " (inconclusive)", evidence, metrics)


@dataclass
class Retention(_BootstrapGate):
    """The candidate may raise old-domain loss by at most ``max_regression`` nats/token.

    REJECT as soon as the mean regression exceeds the limit (protecting old tasks comes first), ACCEPT when the
    interval's upper end is within it, DEFER otherwise.
    """

    max_regression: float = 0.01
    name: str = "retention"

    def evaluate(self, ctx: GateContext) -> GateResult:
        if ctx.data.retention is None:
            return GateResult(self.name, Decision.REJECT, "no retention data given; cannot check old domains")
        ci = self.interval(-ctx.deltas("retention"))
        evidence = {"regression": ci.to_dict(), "max_regression": self.max_regression}
        metrics = {"regression": ci.mean, "regression_ci_low": ci.low, "regression_ci_high": ci.high}
        text = f"old-domain regression {ci.mean:+.4f} nats [{ci.low:+.4f}, {ci.high:+.4f}] vs allowed {self.max_regression:+.4f}"
        if ci.mean > self.max_regression:
            return GateResult(self.name, Decision.REJECT, text, evidence, metrics)
        if ci.high <= self.max_regression:
            return GateResult(self.name, Decision.ACCEPT, text, evidence, metrics)
        return GateResult(self.name, Decision.DEFER, text + " (inconclusive)", evidence, metrics)

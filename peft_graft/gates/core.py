"""Gate protocol and how individual verdicts combine into one decision."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..errors import GraftConfigError
from ..status import GraftStatus
from .context import GateContext


# A gate's verdict is the status it asks for: Decision.ACCEPT is GraftStatus.ACCEPTED (DEFER: inconclusive, retry with
# more steps or data, never drop silently).
Decision = GraftStatus


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict. ``evidence`` is everything it saw and was set to (thresholds included, for the audit
    trail); ``metrics`` only the numbers it measured on the model, which is what gets logged and published."""

    gate: str
    verdict: Decision
    message: str
    evidence: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "gate": self.gate,
            "verdict": self.verdict.value,
            "message": self.message,
            "evidence": self.evidence,
            "metrics": self.metrics,
        }


class Gate(ABC):
    """One explicit criterion. ``evaluate`` returns ACCEPT (passed), REJECT (failed) or DEFER (inconclusive)."""

    name: str = "gate"

    @abstractmethod
    def evaluate(self, ctx: GateContext) -> GateResult: ...


@dataclass(frozen=True)
class GateReport:
    candidate: str
    decision: Decision
    results: tuple[GateResult, ...]

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """What the gates measured, by gate (no thresholds): the numbers to log and publish."""
        return {r.gate: r.metrics for r in self.results if r.metrics}

    @property
    def reasons(self) -> list[str]:
        return [f"{r.gate}: {r.message}" for r in self.results if r.verdict is not Decision.ACCEPT]

    def to_dict(self) -> dict:
        return {
            "candidate": self.candidate,
            "decision": self.decision.value,
            "results": [r.to_dict() for r in self.results],
        }


class GateSet:
    """All gates must pass to accept; any failure rejects; otherwise any inconclusive gate defers.

    Every gate runs even after a failure, so the report carries the full evidence.
    """

    def __init__(self, gates: list[Gate]) -> None:
        if not gates:
            raise GraftConfigError("A GateSet needs at least one gate; pass e.g. [MinimumGain(), FiniteWeights()].")
        self.gates = list(gates)

    def decide(self, ctx: GateContext) -> GateReport:
        results = tuple(gate.evaluate(ctx) for gate in self.gates)
        verdicts = {r.verdict for r in results}
        if Decision.REJECT in verdicts:
            decision = Decision.REJECT
        elif Decision.DEFER in verdicts:
            decision = Decision.DEFER
        else:
            decision = Decision.ACCEPT
        return GateReport(ctx.candidate, decision, results)

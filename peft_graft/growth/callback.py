"""`GraftGateCallback`: gates a candidate graft while and after `transformers.Trainer` trains it.

During training (on each evaluation) the gates run as a dry run whose verdict is logged. At the end of training the
decision is final for that attempt: accepted and rejected grafts are registered with their evidence, deferred ones
are registered as such and retried by `train_until_decided` with more steps, up to ``max_deferrals``; after that the
candidate is rejected with that reason. Only an accepted graft can be pushed to the Hub, and only after it is in the
registry as accepted.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..gates import Decision, GateContext, GateReport, GateSet, GrowthData
from ..registry import GraftRegistry, GraftStatus, base_model_fingerprint, dataset_fingerprint
from .publish import HubTarget, push_accepted


def save_adapter(model: Any, adapter: str, folder: Path) -> Path:
    """Save one adapter and return the folder holding its files (PEFT nests non-default adapters by name)."""
    model.save_pretrained(folder, selected_adapters=[adapter])
    return folder if adapter == "default" else folder / adapter


class GraftGateCallback(TrainerCallback):
    """Run ``gates`` on the composed model for adapter ``candidate`` and record the outcome.

    Args:
        gates: the criteria (see `peft_graft.gates`).
        data: explicit data roles; acceptance/retention are checked to be held out.
        candidate: adapter being trained; ``accepted``: adapters already in the model it is composed with.
        registry: where decisions are recorded (optional; without it the callback only decides).
        hub: where accepted grafts are pushed (optional; requires ``registry``).
        parents: registry ids of the grafts this candidate builds on.
        max_deferrals: how many inconclusive attempts are retried before the candidate is rejected.
    """

    def __init__(
        self,
        gates: GateSet,
        data: GrowthData,
        candidate: str,
        accepted: Sequence[str] = (),
        registry: GraftRegistry | None = None,
        hub: HubTarget | None = None,
        parents: Sequence[str] = (),
        max_deferrals: int = 2,
    ) -> None:
        if hub is not None and registry is None:
            raise ValueError("pushing to the Hub requires a registry: only registered, accepted grafts are pushed")
        self.gates, self.data, self.candidate = gates, data, candidate
        self.accepted, self.parents = list(accepted), list(parents)
        self.registry, self.hub, self.max_deferrals = registry, hub, max_deferrals
        self.reports: list[GateReport] = []
        self.decision: Decision | None = None
        self.graft_ids: list[str] = []  # one per attempt, in order
        self.pushed_commit: str | None = None

    def _context(self, model: Any) -> GateContext:
        return GateContext(model, candidate=self.candidate, data=self.data, accepted=self.accepted)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                    metrics: dict | None = None, **kwargs: Any) -> None:
        report = self.gates.decide(self._context(model))
        if metrics is not None:
            metrics["gate_dry_run"] = report.decision.value

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                     **kwargs: Any) -> None:
        self.decide(model, seeds=[args.seed], steps=state.global_step)

    def decide(self, model: Any, seeds: Sequence[int] = (), steps: int = 0) -> GateReport:
        """Final decision for the current attempt: gate, record, and push if accepted."""
        report = self.gates.decide(self._context(model))
        decision, reason = report.decision, "; ".join(report.reasons) or "all gates passed"
        if decision is Decision.DEFER and len([r for r in self.reports if r.decision is Decision.DEFER]) >= self.max_deferrals:
            decision, reason = Decision.REJECT, f"still inconclusive after {self.max_deferrals} retries: {reason}"
        self.reports.append(report)
        self.decision = decision
        if self.registry is not None:
            self._record(model, report, decision, reason, seeds, steps)
        if decision is Decision.ACCEPT and self.hub is not None:
            self.pushed_commit = push_accepted(self.registry, self.graft_ids[-1], self.hub)
        return report

    def _record(self, model: Any, report: GateReport, decision: Decision, reason: str, seeds: Sequence[int],
                steps: int) -> None:
        config = model.peft_config[self.candidate].to_dict()
        config["adapter_name"] = self.candidate
        base = model.get_base_model()
        metrics = {r.gate: r.evidence for r in report.results}
        evidence = {"report": report.to_dict(), "reason": reason, "steps": steps, "previous_attempts": self.graft_ids}
        with tempfile.TemporaryDirectory() as tmp:
            record = self.registry.register(
                save_adapter(model, self.candidate, Path(tmp)),
                base_fingerprint=base_model_fingerprint(base),
                targets=sorted(config["target_modules"]) if config.get("target_modules") else [],
                config=config,
                metrics=metrics,
                dataset_fingerprints={role: dataset_fingerprint(getattr(self.data, role))
                                      for role in ("train", "acceptance", "retention", "early_stopping", "ranking")
                                      if getattr(self.data, role) is not None},
                seeds=list(seeds),
                status=decision,
                parents=self.parents,
                evidence=evidence,
            )
        if decision is not Decision.DEFER:
            for earlier in self.graft_ids:  # deferred attempts end with the final decision, never silently
                self.registry.set_status(earlier, GraftStatus.REJECTED, f"superseded by attempt {record.graft_id}")
        self.graft_ids.append(record.graft_id)


def train_until_decided(trainer: Trainer, callback: GraftGateCallback, extra_steps: int) -> GateReport:
    """Train, and while the gates defer, train ``extra_steps`` more and decide again (bounded by max_deferrals)."""
    trainer.train()
    while callback.decision is Decision.DEFER:
        trainer.args.max_steps = trainer.state.global_step + extra_steps
        trainer.train()
    return callback.reports[-1]

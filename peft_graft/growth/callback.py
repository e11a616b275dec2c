"""`GraftGateCallback`: gates a candidate graft while and after `transformers.Trainer` trains it.

During training (on each evaluation) the gates run as a dry run whose verdict is logged. At the end of training the
decision is final for that attempt: accepted and rejected grafts are registered with their evidence, deferred ones
are registered as such and retried by `train_until_decided` with more steps, up to ``max_deferrals``; after that the
candidate is rejected with that reason. Only an accepted graft can be pushed to the Hub, and only after it is in the
registry as accepted.

What users watch: every gate evaluation (dry run or final) goes to ``trainer.log`` as ``gate/<name>`` verdicts and
numbers, so it shows in ``trainer.state.log_history`` and in TensorBoard / W&B / MLflow through transformers'
integrations; decisions, registrations and pushes also go to the ``peft_graft`` logger (silent by default).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..gates import Decision, GateContext, GateReport, GateSet, GrowthData
from ..gates.context import MeasuredLosses
from ..registry import GraftRegistry, GraftStatus, base_model_fingerprint, dataset_fingerprint
from .publish import HubTarget, push_accepted


logger = logging.getLogger(__name__)


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
        self.steps_trained = 0  # optimizer steps over every attempt (Trainer's global_step restarts per train())
        self._trainer: Trainer | None = None  # set by `attach`, so decisions reach trainer.log

    def attach(self, trainer: Trainer) -> None:
        """Log gate evaluations through ``trainer.log``, which reaches the reporting integrations too (done by
        `train_until_decided`; call it when you drive the Trainer yourself). A callback has no handle on its
        Trainer, so without this, entries go to ``trainer.state.log_history`` and the ``peft_graft`` logger only."""
        self._trainer = trainer

    def _log(self, entry: dict[str, float | str], state: TrainerState | None) -> None:
        if self._trainer is not None:
            self._trainer.log(entry)
        elif state is not None:
            state.log_history.append({**entry, "step": state.global_step})

    def _context(
        self, model: Any, measured: dict[tuple[str, str | None], MeasuredLosses] | None = None
    ) -> GateContext:
        return GateContext(
            model, candidate=self.candidate, data=self.data, accepted=self.accepted, measured=dict(measured or {})
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.steps_trained += 1

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model=None,
        metrics: dict | None = None,
        **kwargs: Any,
    ) -> None:
        report = self.gates.decide(self._context(model))
        logger.info("Gates (dry run) on %r at step %d: %s", self.candidate, self.steps_trained, report.decision.value)
        self._log(gate_log_entry(report, prefix="gate_dry_run/"), state)  # Trainer logged its metrics already

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs: Any
    ) -> None:
        self.decide(model, seeds=[args.seed], steps=self.steps_trained, state=state)

    def decide(
        self,
        model: Any,
        seeds: Sequence[int] = (),
        steps: int = 0,
        state: TrainerState | None = None,
        measured: dict[tuple[str, str | None], MeasuredLosses] | None = None,
    ) -> GateReport:
        """Final decision for the current attempt: gate, record, and push if accepted. ``measured``: per-example
        losses another process computes for this attempt (see `GateContext`)."""
        report = self.gates.decide(self._context(model, measured))
        decision, reason = report.decision, "; ".join(report.reasons) or "all gates passed"
        if (
            decision is Decision.DEFER
            and len([r for r in self.reports if r.decision is Decision.DEFER]) >= self.max_deferrals
        ):
            decision, reason = Decision.REJECT, f"still inconclusive after {self.max_deferrals} retries: {reason}"
        self.reports.append(report)
        self.decision = decision
        logger.info("Gate decision on %r after %d steps: %s (%s)", self.candidate, steps, decision.value, reason)
        self._log({**gate_log_entry(report, prefix="gate/"), "gate/decision": decision.value}, state)
        if self.registry is not None:
            self._record(model, report, decision, reason, seeds, steps)
        if decision is Decision.ACCEPT and self.hub is not None:
            self.pushed_commit = push_accepted(self.registry, self.graft_ids[-1], self.hub)
            logger.info(
                "Pushed graft %s to %s (commit %s)", self.graft_ids[-1][:12], self.hub.repo_id, self.pushed_commit
            )
        return report

    def _record(
        self, model: Any, report: GateReport, decision: Decision, reason: str, seeds: Sequence[int], steps: int
    ) -> None:
        base = model.get_base_model()
        peft_config = model.peft_config[self.candidate]
        if not peft_config.base_model_name_or_path:  # adapters added with add_adapter carry no base model name
            peft_config.base_model_name_or_path = getattr(base, "name_or_path", None) or None
        config = peft_config.to_dict()
        config["adapter_name"] = self.candidate
        evidence = {"report": report.to_dict(), "reason": reason, "steps": steps, "previous_attempts": self.graft_ids}
        with tempfile.TemporaryDirectory() as tmp:
            record = self.registry.register(
                save_adapter(model, self.candidate, Path(tmp)),
                base_fingerprint=base_model_fingerprint(base),
                targets=sorted(config["target_modules"]) if config.get("target_modules") else [],
                config=config,
                metrics=report.metrics,
                dataset_fingerprints={
                    role: dataset_fingerprint(getattr(self.data, role))
                    for role in ("train", "acceptance", "retention", "early_stopping", "ranking")
                    if getattr(self.data, role) is not None
                },
                seeds=list(seeds),
                status=decision,
                parents=self.parents,
                evidence=evidence,
            )
        if decision is not Decision.DEFER:
            for earlier in self.graft_ids:  # deferred attempts end with the final decision, never silently
                self.registry.set_status(earlier, GraftStatus.REJECTED, f"superseded by attempt {record.graft_id}")
        self.graft_ids.append(record.graft_id)
        logger.info("Registered graft %s (%s) in %s", record.graft_id[:12], decision.value, self.registry.root)


def gate_log_entry(report: GateReport, prefix: str) -> dict[str, float | str]:
    """A flat, loggable view of a gate report: the decision, each gate's verdict and what it measured."""
    entry: dict[str, float | str] = {f"{prefix}decision": report.decision.value}
    for result in report.results:
        entry[f"{prefix}{result.gate}"] = result.verdict.value
        entry.update({f"{prefix}{result.gate}.{name}": value for name, value in result.metrics.items()})
    return entry


def train_until_decided(trainer: Trainer, callback: GraftGateCallback, extra_steps: int) -> GateReport:
    """Train, and while the gates defer, train ``extra_steps`` more and decide again (bounded by max_deferrals).

    A retry continues the same run: the optimizer keeps its state, the learning-rate schedule goes on from where the
    last attempt stopped (as for a run planned with the larger step count from the start, which is also what
    resuming a Trainer checkpoint with a larger ``max_steps`` does), and each attempt adds exactly ``extra_steps``
    optimizer steps. The caller's ``TrainingArguments`` are left unchanged.
    """
    callback.attach(trainer)
    args = trainer.args
    trainer.train()
    try:
        while callback.decision is Decision.DEFER:
            done = callback.steps_trained
            trainer.args = copy.copy(args)  # not dataclasses.replace: __post_init__ would reset accelerate's state
            trainer.args.max_steps = extra_steps
            trainer.lr_scheduler = None
            schedule = trainer.create_scheduler(num_training_steps=done + extra_steps, optimizer=trainer.optimizer)
            for _ in range(done):
                schedule.step()
            trainer._created_lr_scheduler = False  # Trainer rebuilds schedules it made itself on each train()
            trainer.train()
    finally:
        trainer.args = args
    return callback.reports[-1]

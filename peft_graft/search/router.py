"""The budgeted router: propose candidate grafts from a sensitivity map, probe them briefly, gate the best.

1. `propose`: module sets (the top-k modules by a sensitivity score) × r × Φ family × projection × lr, each with
   its exact trainable count; candidates over the budget left are dropped, the rest ranked by sensitivity.
2. `Router.probe`: each of the first ``max_probes`` trains a few steps on the ``train`` role and is scored on the
   ``ranking`` role (loss without − loss with it, on the composed model). A candidate whose loss turns NaN/Inf is
   recorded as such and skipped.
3. `Router.route`: re-ranked by that gain, the best train on to ``train_steps`` and go through the gates on the
   ``acceptance`` role (which `GrowthData` has checked shares no example with ``ranking`` or ``train``), one at a
   time, until one is accepted; deferred ones train ``extra_steps`` more and are judged again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ..errors import BudgetExhaustedError, NonFiniteLossError, SearchConfigError
from ..gates import Decision, GateSet, GrowthData, Retention
from ..gates.context import MeasuredLosses
from ..growth import GraftGateCallback
from ..registry import GraftRegistry
from ..tuners.graft import GraftConfig
from ..tuners.graft.config import PROJECTIONS
from ..tuners.graft.model import GraftModel
from ..tuners.graft.phi import PHI_FAMILIES
from .execution import Baseline, LocalExecution, StageExecution
from .sensitivity import SensitivityMap, check_score
from .training import mean_loss, train_adapter


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpace:
    """What the router may propose. Every combination of a module set, ``ranks``, ``phis``, ``projections`` and
    ``lrs`` is a candidate; module sets are the top-k modules by ``score`` for k in ``set_sizes``.

    ``graft_kwargs`` are further `GraftConfig` fields every candidate shares (``scaling``, ``mode``, ``seed``...).
    ``max_probes`` bounds how many candidates train at all: the cost of a stage is about ``max_probes`` ×
    ``probe_steps`` training steps.
    """

    ranks: tuple[int, ...] = (4, 8)
    phis: tuple[str, ...] = ("dense",)
    projections: tuple[str, ...] = ("svd",)
    lrs: tuple[float, ...] = (1e-2,)
    set_sizes: tuple[int, ...] = (1, 4)
    score: str = "projected"
    max_probes: int = 6
    target_modules: list[str] | str | None = None  # None: every linear map but the output head
    graft_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_score(self.score)
        for name, values in (
            ("ranks", self.ranks),
            ("set_sizes", self.set_sizes),
            ("lrs", self.lrs),
            ("phis", self.phis),
            ("projections", self.projections),
        ):
            if not values:
                raise SearchConfigError(f"SearchSpace.{name} is empty: give at least one value.")
        if any(not isinstance(r, int) or r < 1 for r in (*self.ranks, *self.set_sizes)):
            raise SearchConfigError(f"ranks and set_sizes must be integers >= 1, got {self.ranks}, {self.set_sizes}.")
        if any(not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0) for lr in self.lrs):
            raise SearchConfigError(f"Learning rates must be finite and > 0, got {self.lrs}.")
        unknown = [p for p in self.phis if p not in PHI_FAMILIES] + [
            p for p in self.projections if p not in PROJECTIONS
        ]
        if unknown:
            raise SearchConfigError(
                f"Unknown Φ families or projections {unknown}: Φ one of {tuple(PHI_FAMILIES)}, "
                f"projection one of {PROJECTIONS}."
            )
        if self.max_probes < 1:
            raise SearchConfigError(f"max_probes must be >= 1, got {self.max_probes}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    """One graft the router may train: where it goes and its recipe, with its trainable count and prior score."""

    modules: tuple[str, ...]
    r: int
    phi: str
    projection: str
    lr: float
    params: int
    sensitivity: float  # the sum of the modules' sensitivity scores
    graft_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)

    def config(self) -> GraftConfig:
        return GraftConfig(
            r=self.r, phi=self.phi, projection=self.projection, target_modules=list(self.modules), **self.graft_kwargs
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "graft_kwargs"}


def candidate_params(config: GraftConfig, shapes: Sequence[tuple[int, int]]) -> int | None:
    """Trainable numbers ``config`` adds on modules of these (in, out) shapes, counted as the tuner counts them;
    None when ``config.r`` does not fit one of them."""
    total = 0
    for in_f, out_f in shapes:
        d = in_f if config.mode == "additive" else out_f
        if config.r > min(out_f, d):
            return None
        total += GraftModel._module_trainable_params(config, config.r, out_f, d)
    return total


def propose(smap: SensitivityMap, space: SearchSpace, budget_left: int) -> list[Candidate]:
    """Every candidate of ``space`` within ``budget_left`` trainable numbers, highest sensitivity first.

    Raises `BudgetExhaustedError` when the budget is empty or fits none of them.
    """
    if budget_left <= 0:
        raise BudgetExhaustedError(
            f"The parameter budget is spent ({budget_left:,} left): nothing more can grow. "
            "Raise the budget to search further.",
            budget_left=budget_left,
        )
    ranked = smap.ranked(space.score)
    candidates, smallest = [], None
    for k in sorted(set(space.set_sizes)):
        chosen = ranked[:k]
        if len(chosen) < k:
            break
        shapes = [(m.in_features, m.out_features) for m in chosen]
        score = sum(m.score(space.score) for m in chosen)
        for r in space.ranks:
            for phi in space.phis:
                for projection in space.projections:
                    config = GraftConfig(r=r, phi=phi, projection=projection, **space.graft_kwargs)
                    params = candidate_params(config, shapes)
                    if params is None:
                        continue
                    smallest = params if smallest is None else min(smallest, params)
                    if params > budget_left:
                        continue
                    candidates += [
                        Candidate(
                            tuple(m.name for m in chosen), r, phi, projection, lr, params, score, space.graft_kwargs
                        )
                        for lr in space.lrs
                    ]
    if not candidates:
        raise BudgetExhaustedError(
            f"No candidate fits the {budget_left:,} trainable numbers left (the smallest needs "
            f"{smallest if smallest is not None else 'a rank no module can hold'}). Raise the budget, or add "
            "smaller ranks, cheaper Φ families (diagonal) or smaller set sizes to the search space.",
            budget_left=budget_left,
        )
    return sorted(candidates, key=lambda c: (-c.sensitivity, c.params))


@dataclass
class ProbeResult:
    """What a short probe of one candidate gave. ``status``: ``ok`` or ``non_finite`` (skipped, not fatal)."""

    adapter: str
    candidate: Candidate
    status: str
    gain: float | None = None  # ranking loss without − with the candidate, nats/token
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "candidate": self.candidate.to_dict(),
            "status": self.status,
            "gain": self.gain,
            "message": self.message,
        }


@dataclass
class GateOutcome:
    """One candidate sent through the gates, and what they decided."""

    adapter: str
    candidate: Candidate
    decision: Decision
    graft_ids: list[str]  # one per attempt (deferrals add attempts); empty without a registry
    reasons: list[str]
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "candidate": self.candidate.to_dict(),
            "decision": self.decision.value,
            "graft_ids": self.graft_ids,
            "reasons": self.reasons,
            "steps": self.steps,
        }


@dataclass
class RouteResult:
    model: nn.Module  # the model with the accepted candidate added (a PeftModel then), else as it came in
    probes: list[ProbeResult]
    gated: list[GateOutcome]

    @property
    def accepted(self) -> GateOutcome | None:
        return next((g for g in self.gated if g.decision is Decision.ACCEPT), None)


def ranked(probes: Sequence[ProbeResult]) -> list[ProbeResult]:
    """The finite probes, best ranking gain first (ties in candidate order): the order the gates take them in."""
    return sorted((p for p in probes if p.status == "ok"), key=lambda p: -p.gain)


def _add_adapter(model: nn.Module, name: str, config: GraftConfig) -> PeftModel:
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        return model
    return get_peft_model(model, config, adapter_name=name)


def _remove_adapter(model: PeftModel, name: str) -> nn.Module:
    """Delete adapter ``name``; a PeftModel left without adapters cannot run, so the last one unwraps the model."""
    if list(model.peft_config) == [name]:
        return model.unload()
    model.delete_adapter(name)
    return model


@dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    """How candidates are probed, trained and gated; `SearchConfig` extends it, so a search hands itself to `Router`.

    ``probe_steps`` optimizer steps rank a candidate, ``train_steps`` train the ones that go to the gates (up to
    ``extra_steps`` more while a gate defers, at most ``max_deferrals`` times); the best ``gate_top`` probes are gated.
    """

    probe_steps: int = 8
    train_steps: int = 24
    extra_steps: int = 8
    gate_top: int = 2
    max_deferrals: int = 2
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.probe_steps <= self.train_steps:
            raise SearchConfigError(
                f"Need 1 <= probe_steps <= train_steps, got {self.probe_steps}, {self.train_steps}."
            )


@dataclass
class Router:
    """Probes and gates candidates on explicit data roles (``data.ranking`` is required: it ranks, the acceptance
    set only judges). ``execution`` decides where probes run (`LocalExecution`: here, one after the other;
    `distributed.Coordinator`: sharded over the processes of a launch)."""

    gates: GateSet
    data: GrowthData
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    execution: StageExecution = field(default_factory=LocalExecution)

    def __post_init__(self) -> None:
        if self.data.ranking is None:
            raise SearchConfigError(
                "The router ranks probes on GrowthData.ranking, and none was given. Hold out ranking examples "
                "disjoint from the acceptance set (GrowthData checks it), e.g. a slice of your validation split."
            )

    def probe(
        self,
        model: nn.Module,
        candidates: Sequence[Candidate],
        accepted: Sequence[str],
        name_prefix: str,
        before: float | None = None,
    ) -> tuple[PeftModel, list[ProbeResult], dict[str, torch.optim.Optimizer]]:
        """Train each candidate ``probe_steps`` steps and score it on the ranking role against ``before`` (the
        ranking loss of ``accepted`` alone; measured here if not given); NaN candidates are deleted and recorded.
        Returns the model (a PeftModel while adapters remain), the results and the optimizers of the surviving
        adapters."""
        results, optimizers = [], {}
        if before is None:
            before = self.ranking_loss(model, accepted)
        for i, candidate in enumerate(candidates):
            model, result, optimizer = self.probe_one(model, f"{name_prefix}_c{i}", candidate, accepted, before)
            results.append(result)
            if optimizer is not None:
                optimizers[result.adapter] = optimizer
        return model, results, optimizers

    def _measured(
        self, model: PeftModel, candidate: str, accepted: Sequence[str]
    ) -> dict[tuple[str, str | None], MeasuredLosses]:
        """Gate losses the execution has measured elsewhere: the retention role's, when a gate will read them."""
        if self.data.retention is None or not any(isinstance(g, Retention) for g in self.gates.gates):
            return {}
        return self.execution.retention_losses(model, candidate, accepted)

    def ranking_loss(self, model: nn.Module, accepted: Sequence[str]) -> float:
        """The ranking-role loss of the ``accepted`` composition: what probe gains are measured against."""
        return mean_loss(model, self.data.ranking, accepted, self.settings.batch_size)

    def probe_one(
        self, model: nn.Module, name: str, candidate: Candidate, accepted: Sequence[str], before: float
    ) -> tuple[nn.Module, ProbeResult, torch.optim.Optimizer | None]:
        """Add ``candidate`` as adapter ``name``, train it ``probe_steps`` steps and score it against ``before`` (the
        ranking loss of ``accepted`` alone). A NaN candidate is deleted again (no optimizer comes back)."""
        model = _add_adapter(model, name, candidate.config())
        try:
            optimizer = train_adapter(
                model,
                name,
                self.data.train,
                steps=self.settings.probe_steps,
                lr=candidate.lr,
                accepted=accepted,
                batch_size=self.settings.batch_size,
                seed=self.settings.seed,
            )
            after = mean_loss(model, self.data.ranking, [*accepted, name], self.settings.batch_size)
            if not math.isfinite(after):
                raise NonFiniteLossError(f"ranking loss is {after}")
        except NonFiniteLossError as err:
            logger.info("Probe %s skipped: %s", name, err)
            return _remove_adapter(model, name), ProbeResult(name, candidate, "non_finite", message=str(err)), None
        logger.info("Probe %s: ranking gain %+.4f (%s)", name, before - after, candidate.to_dict())
        return model, ProbeResult(name, candidate, "ok", gain=before - after), optimizer

    def route(
        self,
        model: nn.Module,
        candidates: Sequence[Candidate],
        accepted: Sequence[str] = (),
        parents: Sequence[str] = (),
        registry: GraftRegistry | None = None,
        name_prefix: str = "candidate",
        max_probes: int | None = None,
        baseline: Baseline | None = None,
    ) -> RouteResult:
        """Probe the first ``max_probes`` candidates, then gate the best by ranking gain until one is accepted.

        Every adapter but the accepted one is deleted again; the accepted one stays in ``model`` (composed, not
        merged). With ``registry`` each gated candidate is recorded (`GraftGateCallback`) with ``parents``.
        ``baseline``: the losses of ``accepted`` alone where the caller has them (the ranking loss is measured here
        otherwise).
        """
        baseline = baseline or Baseline(self.ranking_loss(model, accepted))
        model, probes, optimizers = self.execution.probe(
            self, model, list(candidates)[:max_probes], accepted, name_prefix, baseline
        )
        finite = ranked(probes)
        gated: list[GateOutcome] = []
        for probe in finite[: self.settings.gate_top]:
            outcome = self._gate(model, probe, optimizers[probe.adapter], accepted, parents, registry)
            gated.append(outcome)
            if outcome.decision is Decision.ACCEPT:
                break
        keep = next((g.adapter for g in gated if g.decision is Decision.ACCEPT), None)
        for probe in finite:  # an execution may hold only the probes the gates could see
            if probe.adapter != keep and probe.adapter in getattr(model, "peft_config", {}):
                model = _remove_adapter(model, probe.adapter)
        return RouteResult(model, probes, gated)

    def _gate(
        self,
        model: PeftModel,
        probe: ProbeResult,
        optimizer: torch.optim.Optimizer,
        accepted: Sequence[str],
        parents: Sequence[str],
        registry: GraftRegistry | None,
    ) -> GateOutcome:
        name, candidate = probe.adapter, probe.candidate
        train = dict(lr=candidate.lr, accepted=accepted, batch_size=self.settings.batch_size, optimizer=optimizer)
        callback = GraftGateCallback(
            self.gates,
            self.data,
            candidate=name,
            accepted=accepted,
            registry=registry,
            parents=parents,
            max_deferrals=self.settings.max_deferrals,
        )
        steps = self.settings.probe_steps
        try:
            train_adapter(
                model,
                name,
                self.data.train,
                steps=self.settings.train_steps - steps,
                seed=self.settings.seed + 1,
                **train,
            )
            steps = self.settings.train_steps
            callback.decide(
                model, seeds=[self.settings.seed], steps=steps, measured=self._measured(model, name, accepted)
            )
            while callback.decision is Decision.DEFER:
                train_adapter(
                    model,
                    name,
                    self.data.train,
                    steps=self.settings.extra_steps,
                    seed=self.settings.seed + steps,
                    **train,
                )
                steps += self.settings.extra_steps
                measured = self._measured(model, name, accepted)
                callback.decide(model, seeds=[self.settings.seed], steps=steps, measured=measured)
        except NonFiniteLossError as err:  # while training on after a deferral: end those attempts, never leave them
            if registry is not None:
                for graft_id in callback.graft_ids:
                    registry.set_status(graft_id, Decision.REJECT, f"training on after deferral failed: {err}")
            return GateOutcome(name, candidate, Decision.REJECT, callback.graft_ids, [f"training: {err}"], steps)
        report = callback.reports[-1]
        logger.info("Gated %s after %d steps: %s", name, steps, callback.decision.value)
        return GateOutcome(name, candidate, callback.decision, callback.graft_ids, report.reasons, steps)

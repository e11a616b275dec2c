"""Staged growth: measure, route, gate, compose; again on the grown model, until nothing passes or the budget is spent.

Each stage's accepted graft joins the composed base of the next stage as an active adapter (composed, never merged),
and is registered with ``parents`` = every graft it was built on, so rolling back a stage (`rollback_stage`) gives
back exactly the previous stage's model. Every stage also trains a LoRA control at the same budget on the same
modules (`control.lora_control`), and the report puts both gains side by side.

The registry is the record of progress: adapters are named ``<prefix><stage>_c<i>``, and a search started on a
registry that already holds stage k of this prefix composes the accepted grafts and continues with stage k + 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn

from ..errors import BudgetExhaustedError, SearchConfigError
from ..gates import Decision, GateSet, GrowthData
from ..growth import compose, rollback
from ..registry import GraftRegistry, GraftStatus, base_model_fingerprint
from ..tuners.graft import GraftConfig
from .execution import Baseline, ControlRequest, LocalExecution, StageExecution
from .router import ProbeSettings, Router, RouteResult, SearchSpace, propose
from .sensitivity import SensitivityMap, sensitivity_map
from .training import adapter_size, mean_loss


logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SearchConfig(ProbeSettings):
    """A whole staged search. ``budget``: trainable numbers all accepted grafts may use together.

    ``max_stages`` counts stages over resumed runs too (a registry holding stage 2 and ``max_stages=3`` runs one
    more). ``sensitivity_blocks`` train blocks are the sensitivity sample. ``control_lrs``: learning rates the LoRA
    control tries (the best on the ranking role is reported, so the control is tuned as the grafts are).
    """

    budget: int
    space: SearchSpace = field(default_factory=SearchSpace)
    max_stages: int = 3
    sensitivity_blocks: int = 32
    control_lrs: tuple[float, ...] = (1e-3, 1e-2)
    name_prefix: str = "stage"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.budget, bool) or not isinstance(self.budget, int):
            raise SearchConfigError(f"budget must be an integer number of trainable parameters, got {self.budget!r}.")
        if self.budget <= 0:
            raise BudgetExhaustedError(
                f"The parameter budget is {self.budget}: give a positive number of trainable "
                "parameters the grafts may use.",
                budget_left=self.budget,
            )
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", self.name_prefix):
            raise SearchConfigError(f"name_prefix must be letters and digits, got {self.name_prefix!r}.")
        if self.max_stages < 1 or not self.control_lrs:
            raise SearchConfigError("max_stages must be >= 1 and control_lrs must hold at least one learning rate.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "space": self.space.to_dict()}

    def stage_of(self, adapter_name: str) -> int | None:
        """The stage an adapter of this search belongs to (None: not one of this search's adapters)."""
        match = re.fullmatch(rf"{self.name_prefix}(\d+)_c\d+", adapter_name)
        return int(match.group(1)) if match else None


@dataclass
class SearchReport:
    """Stage by stage: what was probed, gated and accepted, graft vs LoRA control gain, and why the search stopped."""

    config: dict[str, Any]
    stages: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""
    base_loss: float | None = None  # acceptance loss of the composition the (first run of the) search started from

    @property
    def accepted_ids(self) -> list[str]:
        return [s["graft_id"] for s in self.stages if s["decision"] == Decision.ACCEPT.value]

    @property
    def spent(self) -> int:
        return sum(s["params"] for s in self.stages if s["decision"] == Decision.ACCEPT.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "base_loss": self.base_loss,
            "stop_reason": self.stop_reason,
            "spent": self.spent,
            "accepted": self.accepted_ids,
            "stages": self.stages,
        }

    def markdown(self) -> str:
        lines = [
            (
                "| stage | decision | graft modules | r | Φ | graft params | graft gain | LoRA r × modules | LoRA params |"
                " LoRA gain | LoRA retention Δ | acceptance loss |"
            ),
            "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in self.stages:
            c, control = s.get("candidate") or {}, s.get("control") or {}
            lines.append(
                f"| {s['stage']} | {s['decision']} | {len(c.get('modules', []))}: {_short(c.get('modules', []))} | "
                f"{c.get('r', '')} | {c.get('phi', '')} | {s['params']:,} | {_num(s['gain'])} | {_lora_shape(control)} |"
                f" {control.get('params', 0):,} | {_num(control.get('gain'))} | {_num(control.get('regression'))} |"
                f" {_num(s.get('loss_after'))} |"
            )
        lines += [
            "",
            (
                f"Budget {self.config['budget']:,} trainable numbers, {self.spent:,} spent by accepted grafts. "
                f"Stopped: {self.stop_reason}. Gains are acceptance-loss reductions (nats/token) over the composition "
                "each stage started from; the LoRA control trains on the same modules (the best-scored of them where "
                "r=1 on all would exceed the graft's budget), data and steps; its retention Δ is its old-domain loss "
                "change (positive = forgetting), which the gates limit for grafts."
            ),
        ]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | os.PathLike, plot: bool = True) -> Path:
        """Write ``search_report.json`` and ``search_report.md`` (and ``growth_curve.png`` with ``plot``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "search_report.json").write_text(json.dumps(self.to_dict(), indent=2, default=str), encoding="utf-8")
        (out / "search_report.md").write_text(self.markdown(), encoding="utf-8")
        if plot:
            from .plots import growth_curve

            growth_curve(self.stages, out / "growth_curve.png")
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> SearchReport | None:
        path = Path(out_dir) / "search_report.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["config"], data["stages"], data["stop_reason"], data.get("base_loss"))


def _short(modules: list[str]) -> str:
    names = [m.replace("model.layers.", "L").replace("transformer.h.", "L") for m in modules]
    return ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")


def _lora_shape(control: dict[str, Any]) -> str:
    return f"{control['r']} × {control['modules']}" if control else ""


def _num(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.4f}"


def _resume(
    base: nn.Module, registry: GraftRegistry | None, config: SearchConfig, progress: bool
) -> tuple[nn.Module, list[str], list[str], int]:
    """The composed model, its accepted adapter names and graft ids, and the last stage the registry holds."""
    if registry is None:
        return base, [], [], 0
    records = registry.list()
    stages = [s for r in records if (s := config.stage_of(r.config.get("adapter_name", ""))) is not None]
    fingerprint = base_model_fingerprint(base)
    ours = [r for r in records if r.status is GraftStatus.ACCEPTED and r.base_fingerprint == fingerprint]
    if not ours:
        return base, [], [], max(stages, default=0)
    model = compose(base, registry, progress=progress)
    ours.sort(key=lambda r: r.created_at)
    return model, [r.config["adapter_name"] for r in ours], [r.graft_id for r in ours], max(stages, default=0)


def staged_search(
    base: nn.Module,
    data: GrowthData,
    gates: GateSet,
    config: SearchConfig,
    registry: GraftRegistry | None = None,
    out_dir: str | os.PathLike | None = None,
    plot: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, SearchReport]:
    """Grow ``base`` (a transformers causal LM) stage by stage; return the composed model and the report.

    ``data`` needs ``train``, ``ranking`` and ``acceptance`` (and ``retention`` if a gate asks for it). With
    ``registry``, every gated candidate is recorded and a registry that already holds stages of this search
    continues after them (the accepted grafts are composed onto ``base`` first). With ``out_dir`` the report (JSON,
    markdown, growth curve) is written there after every stage, so an interrupted search leaves a current report.
    Raises `BudgetExhaustedError` if the budget cannot pay for any candidate of the first stage run.
    """
    return run_stages(base, data, gates, config, registry, out_dir, plot, progress, LocalExecution())


def run_stages(
    base: nn.Module,
    data: GrowthData,
    gates: GateSet,
    config: SearchConfig,
    registry: GraftRegistry | None,
    out_dir: str | os.PathLike | None,
    plot: bool,
    progress: bool,
    execution: StageExecution,
) -> tuple[nn.Module, SearchReport]:
    """`staged_search` with its probes, controls and composition changes handed to ``execution``."""
    router = Router(gates, data, config, execution)
    model, accepted, parents, last_stage = _resume(base, registry, config, progress)
    execution.publish(model, accepted, accepted)
    previous = SearchReport.load(out_dir) if out_dir is not None and last_stage else None
    report = SearchReport(config.to_dict(), previous.stages if previous else [])
    report.base_loss = previous.base_loss if previous else None
    loss: float | None = None  # acceptance loss of the composition each stage starts from, carried stage to stage
    spent = sum(adapter_size(model, a) for a in accepted)
    report.stop_reason = f"max_stages={config.max_stages} reached"
    for stage in range(last_stage + 1, config.max_stages + 1):
        roles = ("ranking",) if loss is not None else ("ranking", "acceptance")
        measured = execution.losses(model, accepted, data, roles, config.batch_size)  # maybe elsewhere, meanwhile:
        try:
            smap = _sensitivity(model, data, config, progress)
            candidates = propose(smap, config.space, config.budget - spent)
        except BudgetExhaustedError as err:
            if stage == last_stage + 1 and not accepted:
                raise
            report.stop_reason = f"budget spent at stage {stage}: {err}"
            break
        losses = measured()
        loss = losses.get("acceptance", loss)
        report.base_loss = loss if report.base_loss is None else report.base_loss
        prefix = f"{config.name_prefix}{stage}"
        baseline = Baseline(losses["ranking"], loss)
        result = router.route(
            model, candidates, accepted, parents, registry, prefix, config.space.max_probes, baseline
        )
        model = result.model
        entry = _stage_entry(stage, result, baseline.acceptance)
        if result.accepted is not None:  # measured first: a control on another rank trains meanwhile
            name = result.accepted.adapter
            entry["params"] = adapter_size(model, name)
            execution.publish(model, [name], [*accepted, name])
            entry["loss_after"] = _loss(model, data, [*accepted, name], config)
            entry["gain"] = baseline.acceptance - entry["loss_after"]
        chosen = result.accepted or (result.gated[0] if result.gated else None)
        if chosen is not None:
            modules = chosen.candidate.modules
            shapes = [(smap.by_name()[m].in_features, smap.by_name()[m].out_features) for m in modules]
            request = ControlRequest(
                modules,
                tuple(shapes),
                chosen.candidate.params,
                chosen.steps,
                config.control_lrs,
                config.batch_size,
                config.seed,
                baseline.ranking,
                baseline.acceptance,
            )
            entry["control"] = execution.control(model, accepted, request, data).to_dict()
        if result.accepted is not None:
            accepted, parents = [*accepted, name], [*parents, *result.accepted.graft_ids[-1:]]
            loss = entry["loss_after"]
            spent += entry["params"]
        report.stages.append(entry)
        logger.info("Stage %d: %s", stage, entry["decision"])
        if out_dir is not None:
            report.save(out_dir, plot=plot)
        if result.accepted is None:
            report.stop_reason = f"nothing passed the gates at stage {stage}"
            break
    if isinstance(model, PeftModel) and accepted:
        model.base_model.set_adapter(accepted)
    if out_dir is not None:
        report.save(out_dir, plot=plot)
    return model, report


def _loss(model: nn.Module, data: GrowthData, accepted: list[str], config: SearchConfig) -> float:
    return mean_loss(model, data.acceptance, accepted, config.batch_size)


def _sensitivity(model: nn.Module, data: GrowthData, config: SearchConfig, progress: bool) -> SensitivityMap:
    space = config.space
    projections = GraftConfig(r=max(space.ranks), projection=space.projections[0], **space.graft_kwargs)
    return sensitivity_map(
        model, data.train[: config.sensitivity_blocks], projections, space.target_modules, config.batch_size, progress
    )


def _stage_entry(stage: int, result: RouteResult, loss_before: float) -> dict[str, Any]:
    accepted = result.accepted
    chosen = accepted or (result.gated[0] if result.gated else None)
    return {
        "stage": stage,
        "decision": accepted.decision.value if accepted else (chosen.decision.value if chosen else "NONE_GATED"),
        "graft_id": accepted.graft_ids[-1] if accepted and accepted.graft_ids else None,
        "adapter": chosen.adapter if chosen else None,
        "candidate": chosen.candidate.to_dict() if chosen else None,
        "params": chosen.candidate.params if chosen else 0,
        "gain": None,
        "loss_before": loss_before,
        "loss_after": None,
        "probes": [p.to_dict() for p in result.probes],
        "gated": [g.to_dict() for g in result.gated],
    }


def rollback_stage(
    registry: GraftRegistry,
    stage: int,
    config: SearchConfig,
    model: nn.Module | None = None,
    reason: str = "stage rolled back",
) -> list[str]:
    """Roll back every accepted graft of ``stage`` and of the stages built on it (latest first); return their ids.

    With ``model`` (the composed PeftModel) the adapters are removed from it too, and it computes exactly what the
    previous stage's composition computed.
    """
    records = [
        r
        for r in registry.list(status=GraftStatus.ACCEPTED)
        if (s := config.stage_of(r.config.get("adapter_name", ""))) is not None and s >= stage
    ]
    if not records:
        raise SearchConfigError(
            f"No accepted graft of stage {stage} or later (prefix {config.name_prefix!r}) in "
            f"{registry.root}; `peft-graft list` shows the registry."
        )
    records.sort(key=lambda r: r.created_at, reverse=True)
    for record in records:
        rollback(
            registry,
            record.graft_id,
            model,
            reason=f"{reason} (stage {config.stage_of(record.config['adapter_name'])})",
        )
    return [r.graft_id for r in records]

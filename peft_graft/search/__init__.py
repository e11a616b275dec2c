"""Graft search: where to graft (sensitivity maps), what to graft (a budgeted router of short probes) and growth in
stages through the gates, each stage against a LoRA control at the same parameter budget.

smap = sensitivity_map(model, blocks)                       # per module: grad norm, Fisher, activation, projected
heat_map(smap, "heat.png")                                  # layer × module kind (matplotlib: the bench extra)
model, report = staged_search(base, data, gates, SearchConfig(budget=20_000), registry, out_dir="runs/search")
rollback_stage(registry, 2, config, model)                  # back to exactly what stage 1 composed
"""

from ..errors import (
    BudgetExhaustedError,
    EmptySearchDataError,
    NonFiniteLossError,
    NoTargetModulesError,
    PlotDependencyError,
    SearchConfigError,
    SearchError,
)
from .control import ControlResult, lora_control, lora_rank_for
from .plots import growth_curve, heat_map
from .router import Candidate, GateOutcome, ProbeResult, ProbeSettings, Router, RouteResult, SearchSpace, propose
from .sensitivity import SCORES, ModuleSensitivity, SensitivityMap, sensitivity_map
from .stages import SearchConfig, SearchReport, rollback_stage, staged_search
from .training import adapter_size, mean_loss, train_adapter


__all__ = [
    "SCORES",
    "BudgetExhaustedError",
    "Candidate",
    "ControlResult",
    "EmptySearchDataError",
    "GateOutcome",
    "ModuleSensitivity",
    "NoTargetModulesError",
    "NonFiniteLossError",
    "PlotDependencyError",
    "ProbeResult",
    "ProbeSettings",
    "RouteResult",
    "Router",
    "SearchConfig",
    "SearchConfigError",
    "SearchError",
    "SearchReport",
    "SearchSpace",
    "SensitivityMap",
    "adapter_size",
    "growth_curve",
    "heat_map",
    "lora_control",
    "lora_rank_for",
    "mean_loss",
    "propose",
    "rollback_stage",
    "sensitivity_map",
    "staged_search",
    "train_adapter",
]

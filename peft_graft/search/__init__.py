"""Graft search: where to graft (sensitivity maps), what to graft (a budgeted router of short probes) and growth in
stages through the gates, each stage against a LoRA control at the same parameter budget.

smap = sensitivity_map(model, blocks)                       # per module: grad norm, Fisher, activation, projected
heat_map(smap, "heat.png")                                  # layer × module kind (matplotlib: the bench extra)
model, report = staged_search(base, data, gates, SearchConfig(budget=20_000), registry, out_dir="runs/search")
rollback_stage(registry, 2, config, model)                  # back to exactly what stage 1 composed

On N processes: ``accelerate launch --multi_gpu --num_processes N -m peft_graft.search CONFIG.yaml`` (or torchrun);
in code, every process calls `distributed_search` (see `peft_graft.search.distributed`).
"""

from ..errors import (
    BudgetExhaustedError,
    CoordinatorLostError,
    DistributedSearchError,
    EmptySearchDataError,
    NonFiniteLossError,
    NoTargetModulesError,
    PlotDependencyError,
    SearchAbortedError,
    SearchConfigError,
    SearchError,
)
from .channel import DistributedSettings, launch_store
from .control import ControlResult, lora_control, lora_shape_for
from .distributed import distributed_search
from .execution import ControlRequest, LocalExecution, StageExecution
from .plots import growth_curve, heat_map
from .router import Candidate, GateOutcome, ProbeResult, ProbeSettings, Router, RouteResult, SearchSpace, propose
from .sensitivity import SCORES, ModuleSensitivity, SensitivityMap, sensitivity_map
from .stages import SearchConfig, SearchReport, rollback_stage, staged_search
from .training import adapter_size, mean_loss, train_adapter


__all__ = [
    "SCORES",
    "BudgetExhaustedError",
    "Candidate",
    "ControlRequest",
    "ControlResult",
    "CoordinatorLostError",
    "DistributedSearchError",
    "DistributedSettings",
    "EmptySearchDataError",
    "GateOutcome",
    "LocalExecution",
    "ModuleSensitivity",
    "NoTargetModulesError",
    "NonFiniteLossError",
    "PlotDependencyError",
    "ProbeResult",
    "ProbeSettings",
    "RouteResult",
    "Router",
    "SearchAbortedError",
    "SearchConfig",
    "SearchConfigError",
    "SearchError",
    "SearchReport",
    "SearchSpace",
    "SensitivityMap",
    "StageExecution",
    "adapter_size",
    "distributed_search",
    "growth_curve",
    "heat_map",
    "launch_store",
    "lora_control",
    "lora_shape_for",
    "mean_loss",
    "propose",
    "rollback_stage",
    "sensitivity_map",
    "staged_search",
    "train_adapter",
]

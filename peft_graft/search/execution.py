"""Where the work of a stage runs: the strategy `staged_search` and `Router` hand their probes, LoRA controls and
composition changes to.

The stage loop (`stages.run_stages`) and the router decide *what* is done; an execution decides *where*.
`LocalExecution` runs everything in this process, one piece after the other (what `staged_search` always did);
`distributed.Coordinator` spreads probes and controls over the processes of an ``accelerate launch``/``torchrun``
launch. Both must give the same results, so every piece is a deterministic function of what it is handed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..gates import GrowthData
from ..gates.context import MeasuredLosses
from .control import ControlResult, lora_control
from .training import role_losses


if TYPE_CHECKING:
    from .router import Candidate, ProbeResult, Router


@dataclass(frozen=True)
class Baseline:
    """Losses of the composition a stage starts from, measured once: probes are ranked against ``ranking``, the
    stage's gain and its LoRA control are judged against ``acceptance``."""

    ranking: float
    acceptance: float | None = None


@dataclass(frozen=True)
class ControlRequest:
    """A stage's LoRA control, complete: any process holding the same composition computes the same result."""

    modules: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (in, out) of each module
    params: int  # the graft's trainable numbers, which the LoRA matches
    steps: int
    lrs: tuple[float, ...]
    batch_size: int
    seed: int
    # The composition's ranking and acceptance losses, which the stage measured already (None: the control does).
    ranking_loss: float | None = None
    acceptance_loss: float | None = None

    def run(self, model: nn.Module, accepted: Sequence[str], data: GrowthData) -> ControlResult:
        known = self.ranking_loss is not None and self.acceptance_loss is not None
        return lora_control(
            model,
            accepted,
            self.modules,
            self.shapes,
            self.params,
            data,
            steps=self.steps,
            lrs=self.lrs,
            batch_size=self.batch_size,
            seed=self.seed,
            baseline={"ranking": self.ranking_loss, "acceptance": self.acceptance_loss} if known else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlRequest:
        """The inverse of `to_dict` after a JSON round trip (lists back to tuples, so requests compare equal)."""
        return cls(
            **{
                **data,
                "modules": tuple(data["modules"]),
                "shapes": tuple(tuple(s) for s in data["shapes"]),
                "lrs": tuple(data["lrs"]),
            }
        )


class StageExecution(Protocol):
    """The pieces of a stage an execution may place elsewhere."""

    def probe(
        self,
        router: Router,
        model: nn.Module,
        candidates: Sequence[Candidate],
        accepted: Sequence[str],
        name_prefix: str,
        baseline: Baseline,
    ) -> tuple[nn.Module, list[ProbeResult], dict[str, torch.optim.Optimizer]]:
        """What `Router.probe` returns, for every candidate: the model holding the surviving probe adapters (trained
        ``probe_steps`` steps; at least the best ``gate_top`` by `router.ranked`, the ones the gates may take), the
        results in candidate order, and each held survivor's optimizer (to train on). Probe gains are against
        ``baseline.ranking``."""

    def losses(
        self, model: nn.Module, accepted: Sequence[str], data: GrowthData, roles: Sequence[str], batch_size: int
    ) -> Callable[[], dict[str, float]]:
        """The mean losses of the ``accepted`` composition on ``roles`` (`training.role_losses`), measured where
        this execution places them; calling the result gives them. A stage asks before its sensitivity map and
        reads them after it, so another process can measure them meanwhile."""

    def control(
        self, model: nn.Module, accepted: Sequence[str], request: ControlRequest, data: GrowthData
    ) -> ControlResult:
        """The LoRA control ``request`` describes, over the ``accepted`` composition of ``model``."""

    def retention_losses(
        self, model: nn.Module, candidate: str, accepted: Sequence[str]
    ) -> dict[tuple[str, str | None], MeasuredLosses]:
        """The retention-role losses of gating ``candidate`` over ``accepted`` that another process will measure,
        as `GateContext.measured` takes them (empty: the gates measure them here)."""

    def publish(self, model: nn.Module, adapters: Sequence[str], accepted: Sequence[str]) -> None:
        """``adapters`` of ``model`` joined the composition (now ``accepted``): every process must compose them."""


@dataclass
class LocalExecution:
    """Everything in this process, in order."""

    def probe(
        self,
        router: Router,
        model: nn.Module,
        candidates: Sequence[Candidate],
        accepted: Sequence[str],
        name_prefix: str,
        baseline: Baseline,
    ) -> tuple[nn.Module, list[ProbeResult], dict[str, torch.optim.Optimizer]]:
        return router.probe(model, candidates, accepted, name_prefix, before=baseline.ranking)

    def losses(
        self, model: nn.Module, accepted: Sequence[str], data: GrowthData, roles: Sequence[str], batch_size: int
    ) -> Callable[[], dict[str, float]]:
        measured = role_losses(model, data, roles, accepted, batch_size)
        return lambda: measured

    def control(
        self, model: nn.Module, accepted: Sequence[str], request: ControlRequest, data: GrowthData
    ) -> ControlResult:
        return request.run(model, accepted, data)

    def retention_losses(
        self, model: nn.Module, candidate: str, accepted: Sequence[str]
    ) -> dict[tuple[str, str | None], MeasuredLosses]:
        return {}

    def publish(self, model: nn.Module, adapters: Sequence[str], accepted: Sequence[str]) -> None:
        """Nothing to do: this process is the only one."""

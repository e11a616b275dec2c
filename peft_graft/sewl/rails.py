"""Safety rails of a SEWL: what bounds, rejects, ages and records every update.

* Spectral clip: ‖ΔW‖₂ = s‖AΦB‖₂ ≤ τ after every update. With orthonormal A and B (checked once, at start) that is
  s‖Φ‖₂, an r×r norm; otherwise A = Qa Ra, Bᵀ = Qb Rb give ‖AΦB‖₂ = ‖Ra Φ Rbᵀ‖₂ exactly, still r×r. The clip caps the
  singular values (the nearest point of the ball), not a uniform shrink that would also lose the small directions.
* Step limit: one chunk's own step ‖s·A ΔΦ B‖₂ is shortened (same direction) to a fraction of τ, so no single
  chunk (a poisoned one, or a rule whose first steps are preconditioned by one chunk's statistics) can spend the
  whole budget at once.
* Non-finite losses or updates and loss outliers (z-score against accepted chunks) are rejected: the state is not
  touched at all.
* Ageing in tokens: Φ ← Φ₀ + e^{−n/τ}(Φ − Φ₀) for a chunk of n tokens.
* The canary (scored by the engine every N updates) and the update log.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass

import torch

from ..tuners.graft import GraftLayer
from ..tuners.graft.projections import spectral_norm
from .config import SEWLConfig


logger = logging.getLogger("peft_graft.sewl")

_ORTHONORMAL_TOL = 1e-4


@dataclass
class SpectralBound:
    """‖s·AΦB‖₂ of one graft through r×r factors; ``left``/``right`` are None when A/B are orthonormal."""

    scaling: float
    tau: float | None
    left: torch.Tensor | None  # Ra: A = Qa Ra
    right: torch.Tensor | None  # Rb: Bᵀ = Qb Rb

    @classmethod
    def for_layer(cls, layer: GraftLayer, adapter: str, config: SEWLConfig) -> SpectralBound:
        proj = layer.graft_proj[adapter]
        A, B = proj.A.detach().float(), proj.B.detach().float()
        left = None if _orthonormal_columns(A) else torch.linalg.qr(A)[1]
        right = None if _orthonormal_columns(B.T) else torch.linalg.qr(B.T)[1]
        tau = config.spectral_clip
        if tau is not None and config.spectral_clip_relative and layer.graft_mode[adapter] == "additive":
            tau = tau * spectral_norm(layer.get_base_weight().detach())
        return cls(layer.graft_scaling[adapter], tau, left, right)

    def _core(self, phi: torch.Tensor) -> torch.Tensor:
        core = phi if self.left is None else self.left @ phi
        return core if self.right is None else core @ self.right.T

    def norm(self, phi: torch.Tensor) -> float:
        """‖s·AΦB‖₂ (for a step ΔΦ too: the map is linear)."""
        return abs(self.scaling) * torch.linalg.matrix_norm(self._core(phi), ord=2).item()

    def clip(self, phi: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Φ with the singular values of s·AΦB capped at τ, and whether anything was capped."""
        if self.tau is None or self.norm(phi) <= self.tau:
            return phi, False
        U, S, Vh = torch.linalg.svd(self._core(phi))
        capped = (U * S.clamp_max(self.tau / abs(self.scaling))) @ Vh
        try:
            if self.left is not None:
                capped = torch.linalg.solve(self.left, capped)
            if self.right is not None:
                capped = torch.linalg.solve(self.right, capped.T).T
        except RuntimeError:  # rank-deficient projections: shrink Φ uniformly instead
            return phi * (self.tau / self.norm(phi)), True
        return capped, True


def _orthonormal_columns(matrix: torch.Tensor) -> bool:
    gram = matrix.T @ matrix
    return bool((gram - torch.eye(gram.shape[0], device=gram.device)).abs().max() <= _ORTHONORMAL_TOL)


def age(phi: torch.Tensor, anchor: torch.Tensor, tokens: int, age_tokens: float | None) -> torch.Tensor:
    """Φ₀ + e^{−n/τ}(Φ − Φ₀): what was learnt fades with the amount of text read since."""
    if age_tokens is None:
        return phi
    return anchor + math.exp(-tokens / age_tokens) * (phi - anchor)


@dataclass
class LossStats:
    """Running mean and variance (Welford) of the losses of accepted chunks, for the outlier rail."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def z_score(self, loss: float) -> float:
        std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0
        return (loss - self.mean) / max(std, 1e-6)

    def add(self, loss: float) -> LossStats:
        count = self.count + 1
        delta = loss - self.mean
        mean = self.mean + delta / count
        return LossStats(count, mean, self.m2 + delta * (loss - mean))

    def is_outlier(self, loss: float, config: SEWLConfig) -> tuple[bool, float]:
        if config.outlier_z is None or self.count < config.outlier_warmup:
            return False, 0.0
        z = self.z_score(loss)
        return abs(z) > config.outlier_z, z


@dataclass(frozen=True)
class UpdateRecord:
    """One chunk's fate. Norms are maxima over the selected grafts: ``grad_norm`` ‖g‖_F, ``step_norm`` ‖s·A ΔΦ B‖₂
    of the rule's proposed update (before the step limit), ``delta_norm`` ‖ΔW‖₂ after it; ``clipped`` and
    ``limited`` count the grafts the spectral clip and the step limit acted on."""

    index: int
    tokens: int
    loss: float
    decision: str  # "applied", "skipped" or "rolled_back"
    reason: str
    grad_norm: float = float("nan")
    step_norm: float = float("nan")
    delta_norm: float = float("nan")
    clipped: int = 0
    limited: int = 0


class UpdateLog:
    """The last ``size`` records in memory; each one also goes to the ``peft_graft.sewl`` logger (silent unless
    the application configures logging)."""

    def __init__(self, size: int) -> None:
        self.records: deque[UpdateRecord] = deque(maxlen=size)

    def add(self, record: UpdateRecord) -> UpdateRecord:
        self.records.append(record)
        level = logging.INFO if record.decision == "applied" else logging.WARNING
        logger.log(
            level,
            "SEWL update %d: %s%s",
            record.index,
            record.decision,
            f" ({record.reason})" if record.reason else "",
            extra={"sewl": asdict(record)},
        )
        return record

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

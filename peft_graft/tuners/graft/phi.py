"""The Φ families: structured r×r operators acting in graft space.

Each family holds its trainable numbers as direct parameters (no sub-modules), so PEFT's state-dict key mapping
``<layer>.graft_phi.<adapter>.<param>`` → ``<layer>.graft_phi.<param>`` applies unchanged.

A graft on a stack of expert matrices (`parameter.ParamWrapper`) has one Φ per expert: built with ``experts=E``,
every parameter gets a leading axis of E and ``matrix()`` is the E×r×r stack.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Phi(nn.Module):
    """Base class: ``forward(h)`` applies Φ to the last dim of ``h``; ``matrix()`` materialises the r×r Φ."""

    # Std of random entries; factored families use larger factors so their product is not vanishingly small.
    init_std = 0.1

    def __init__(self, r: int, experts: int | None = None) -> None:
        super().__init__()
        self.r = r
        self.lead: tuple[int, ...] = () if experts is None else (experts,)

    def matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.matrix())

    @torch.no_grad()
    def reset(self, identity: bool, scaling: float = 1.0) -> None:
        """Identity graft (ΔW = 0) when ``identity``, else a random non-zero Φ.

        A random Φ comes from torch's global generator, as LoRA's random init does, so ``torch.manual_seed`` (or
        transformers' ``set_seed``) decides it; it is saved with the adapter, unlike seeded projections, which are
        regenerated. It is divided by ``scaling``, so the random ΔW = s·AΦB is as large as at s = 1 when s =
        ``scaling``: it is there to make a test's graft visible, not to depend on the scaling rule.
        """
        for p in self.parameters():
            p.copy_(torch.randn(p.shape) * self.init_std)
        if identity:
            self._zero_for_identity()
        else:
            self._scale(1.0 / scaling)

    def _zero_for_identity(self) -> None:
        for p in self.parameters():
            p.zero_()

    def _scale(self, factor: float) -> None:
        """Multiply the matrix Φ by ``factor``."""
        for p in self.parameters():
            p.mul_(factor)

    @torch.no_grad()
    def fit(self, target: torch.Tensor) -> None:
        """Set Φ to the member of the family closest to ``target`` (r×r) in Frobenius norm."""
        raise NotImplementedError


class DensePhi(Phi):
    def __init__(self, r: int, experts: int | None = None) -> None:
        super().__init__(r, experts)
        self.weight = nn.Parameter(torch.zeros(*self.lead, r, r))

    def matrix(self) -> torch.Tensor:
        return self.weight

    @torch.no_grad()
    def fit(self, target: torch.Tensor) -> None:
        self.weight.copy_(target)


class DiagonalPhi(Phi):
    """Scales each graft direction independently (SVFT "plain" with SVD projections)."""

    # One entry per direction, where a dense Φ has r: a larger random init keeps a test's random graft as visible
    # (PEFT's decoder tests check that generation changes).
    init_std = 0.5

    def __init__(self, r: int, experts: int | None = None) -> None:
        super().__init__(r, experts)
        self.weight = nn.Parameter(torch.zeros(*self.lead, r))

    def matrix(self) -> torch.Tensor:
        return torch.diag_embed(self.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight

    @torch.no_grad()
    def fit(self, target: torch.Tensor) -> None:
        self.weight.copy_(torch.diagonal(target, dim1=-2, dim2=-1))


class PackedPhi(Phi):
    """Φ restricted to a fixed sparsity pattern; only the pattern's entries are stored and trained."""

    def __init__(self, r: int, rows: torch.Tensor, cols: torch.Tensor, experts: int | None = None) -> None:
        super().__init__(r, experts)
        self.weight = nn.Parameter(torch.zeros(*self.lead, rows.numel()))
        # The pattern is derived from the config, so it is not saved.
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def matrix(self) -> torch.Tensor:
        flat = self.weight.new_zeros(*self.lead, self.r * self.r)
        return flat.index_copy(-1, self.rows * self.r + self.cols, self.weight).unflatten(-1, (self.r, self.r))

    @torch.no_grad()
    def fit(self, target: torch.Tensor) -> None:
        self.weight.copy_(target[..., self.rows, self.cols])


class TriangularPhi(PackedPhi):
    def __init__(self, r: int, experts: int | None = None) -> None:
        rows, cols = torch.triu_indices(r, r)
        super().__init__(r, rows, cols, experts)


class BandedPhi(PackedPhi):
    def __init__(self, r: int, bandwidth: int, experts: int | None = None) -> None:
        rows, cols = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
        keep = (rows - cols).abs() <= bandwidth
        super().__init__(r, rows[keep], cols[keep], experts)


class LowRankPhi(Phi):
    """Φ = P Qᵀ with inner rank k; P starts at zero so the graft starts as the identity."""

    init_std = 0.5

    def __init__(self, r: int, rank: int, experts: int | None = None) -> None:
        super().__init__(r, experts)
        self.P = nn.Parameter(torch.zeros(*self.lead, r, rank))
        self.Q = nn.Parameter(torch.zeros(*self.lead, r, rank))

    def matrix(self) -> torch.Tensor:
        return self.P @ self.Q.mT

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(h, self.Q.T), self.P)

    def _zero_for_identity(self) -> None:
        self.P.zero_()

    def _scale(self, factor: float) -> None:
        self.P.mul_(factor)  # Φ is linear in P (for the Hadamard family too)

    @torch.no_grad()
    def fit(self, target: torch.Tensor) -> None:
        # An inner rank k above r (phi_rank > a module's rank_pattern r) fits exactly; the extra columns stay zero.
        k = min(self.P.shape[-1], self.r)
        U, S, Vh = torch.linalg.svd(target.float())
        root = S[..., None, :k].sqrt()
        self.P.zero_()
        self.Q.zero_()
        self.P[..., :k] = U[..., :k] * root
        self.Q[..., :k] = Vh[..., :k, :].mT * root


class HadamardPhi(LowRankPhi):
    """Φ = (P Qᵀ) ⊙ (R Sᵀ): 4·r·k numbers for rank up to k² (the LoHa construction)."""

    init_std = 0.7

    def __init__(self, r: int, rank: int, experts: int | None = None) -> None:
        super().__init__(r, rank, experts)
        self.R = nn.Parameter(torch.zeros(*self.lead, r, rank))
        self.S = nn.Parameter(torch.zeros(*self.lead, r, rank))

    def matrix(self) -> torch.Tensor:
        return super().matrix() * (self.R @ self.S.mT)

    forward = Phi.forward  # the Hadamard product needs the r×r matrix

    @torch.no_grad()
    def fit(self, target: torch.Tensor) -> None:
        # With R Sᵀ = all-ones, Φ reduces to the best rank-k P Qᵀ.
        super().fit(target)
        self.R.zero_()
        self.S.zero_()
        self.R[..., 0] = 1.0
        self.S[..., 0] = 1.0


# The one table of Φ families: `GraftConfig.phi` names a key; each entry builds the family from
# (r, rank, bandwidth, experts).
PHI_FAMILIES: dict[str, Callable[[int, int, int, int | None], Phi]] = {
    "dense": lambda r, rank, bandwidth, experts: DensePhi(r, experts),
    "diagonal": lambda r, rank, bandwidth, experts: DiagonalPhi(r, experts),
    "triangular": lambda r, rank, bandwidth, experts: TriangularPhi(r, experts),
    "banded": lambda r, rank, bandwidth, experts: BandedPhi(r, bandwidth, experts),
    "lowrank": lambda r, rank, bandwidth, experts: LowRankPhi(r, rank, experts),
    "hadamard": lambda r, rank, bandwidth, experts: HadamardPhi(r, rank, experts),
}


def build_phi(family: str, r: int, rank: int, bandwidth: int, experts: int | None = None) -> Phi:
    """Instantiate the Φ family named in `GraftConfig.phi` (the config has checked the name); ``experts=E``: one
    per expert of a stack, in one module."""
    return PHI_FAMILIES[family](r, rank, bandwidth, experts)


def phi_num_params(family: str, r: int, rank: int, bandwidth: int) -> int:
    """Trainable numbers of one Φ (r² floats at most: building one to count is cheaper than a second table)."""
    return sum(p.numel() for p in build_phi(family, r, rank, bandwidth).parameters())

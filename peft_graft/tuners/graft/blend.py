"""Blending graft adapters: `GraftModel.add_weighted_adapter` adds an adapter whose ΔW is Σ wᵢ ΔWᵢ.

Every graft's ΔW is linear in its core ``s·AΦB`` (additive: ΔW = s·AΦB; output mode: ΔW = s·AΦB·W, with the same W
for every adapter), so a blend is a new core ``Σ wᵢ sᵢ AᵢΦᵢBᵢ`` written in a form a graft layer can hold:

* ``"linear"``: adapters that share A and B on a module (same projection kind, seed and base; the tensors are
  compared) blend in Φ space, ``Σ wᵢ sᵢ AΦᵢB = s·A (Σ wᵢ sᵢ/s Φᵢ) B``. Exact; the blend keeps their projections (and
  stores them when the sources' kinds or seeds differ, e.g. on disjoint targets, where regenerating one seed would
  not reproduce them) and their Φ family if it is closed under sums (dense, diagonal, triangular, banded), else gets
  a dense Φ.
* ``"cat"``: ``[A₁ … Aₙ] · blockdiag(wᵢ sᵢ/s Φᵢ) · [B₁; …; Bₙ]``. Exact for any projections; r = Σ rᵢ, which must fit
  the module (``min(out, d)``).
* ``"svd"``: the top ``svd_rank`` singular triplets of that concatenated core, A = U, Φ = diag(σ)/s, B = Vᵀ. Exact
  when ``svd_rank`` reaches the rank of the sum, else off by exactly the discarded singular values (Eckart–Young).

``cat`` and ``svd`` produce arbitrary A and B, so their blend stores them (``projection="trainable"``). Sparse
residuals are sums of individual entries: every type carries them exactly (entries concatenated, values times wᵢ);
``svd`` truncates only the low-rank part. PEFT LoRA's other types (TIES, DARE, magnitude pruning) drop or rescale
entries, so their result is no weighted sum of the adapters and they are not offered.

Everything is read and checked before the model is touched: a refused blend leaves it exactly as it was.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from numbers import Real

import torch
from peft.tuners.tuners_utils import BaseTuner

from ...errors import BlendError, NonFiniteWeightsError
from .config import GraftConfig
from .layer import GraftLayer
from .parameter import ParamWrapper
from .rollback import ModelSnapshot


COMBINATION_TYPES = ("linear", "cat", "svd")
# Φ families whose weighted sums stay in the family (one fixed sparsity pattern): a linear blend keeps them.
SUM_CLOSED_PHI = ("dense", "diagonal", "triangular", "banded")
# PEFT LoRA's combination types that prune or resample entries instead of summing.
PRUNING_TYPES = (
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)


@dataclass
class Source:
    """One adapter's graft on one module, as it enters the blend: weight · (s·AΦB + sparse)."""

    adapter: str
    weight: float
    scaling: float
    A: torch.Tensor  # out×r, float64 (with a leading experts axis on an expert stack, as phi and B)
    phi: torch.Tensor  # r×r
    B: torch.Tensor  # r×d
    sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # values, rows, cols

    @property
    def core_phi(self) -> torch.Tensor:
        """w·s·Φ: this source's share of the blend's s·Φ."""
        return self.weight * self.scaling * self.phi


@dataclass
class ModulePlan:
    """What the blend's graft on one module will hold: ΔW core = A · core · B (core = the blend's s·Φ)."""

    layer: GraftLayer
    A: torch.Tensor
    core: torch.Tensor
    B: torch.Tensor
    sparse: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def r(self) -> int:
        return self.core.shape[-1]


def add_weighted_adapter(
    tuner: BaseTuner,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "linear",
    svd_rank: int | None = None,
) -> None:
    """Add ``adapter_name`` to ``tuner`` (a `GraftModel`) with ΔW = Σ wᵢ ΔWᵢ over ``adapters`` (see the module
    docstring for the combination types). Raises `BlendError` (or `CalibrationRequiredError` /
    `NonFiniteWeightsError` for an unusable source) before anything is created."""
    configs = _check_arguments(tuner, adapters, weights, adapter_name, combination_type, svd_rank)
    plans = {}
    for module_name, layer in tuner.model.named_modules():
        if isinstance(layer, GraftLayer) and any(a in layer.graft_phi for a in adapters):
            sources = [
                _read_source(layer, module_name, a, float(w))
                for a, w in zip(adapters, weights)
                if a in layer.graft_phi
            ]
            # a parameter graft by its parameter's name, which target_parameters takes
            name = layer.module_name if isinstance(layer, ParamWrapper) else module_name
            plans[name] = _plan_module(layer, name, sources, combination_type, svd_rank)
    config = _blend_config(configs, plans, combination_type)
    _create(tuner, adapter_name, config, plans)


# ------------------------------------------------------------------ checks


def _check_arguments(
    tuner: BaseTuner,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
    svd_rank: int | None,
) -> list[GraftConfig]:
    """The sources' configs, once everything that does not need the layers is checked."""
    if combination_type not in COMBINATION_TYPES:
        why = (
            " prunes or rescales entries, so its result is not a weighted sum of the adapters"
            if combination_type in PRUNING_TYPES
            else " is unknown"
        )
        raise BlendError(
            f"combination_type={combination_type!r}{why}. Graft adapters blend with 'linear' (exact, adapters sharing "
            "their projections), 'cat' (exact, any adapters, r = Σ rᵢ) or 'svd' (top svd_rank directions of the sum)."
        )
    if isinstance(adapters, str) or not adapters:
        raise BlendError(f"adapters must be a non-empty list of adapter names, got {adapters!r}.")
    if isinstance(weights, str) or len(weights) != len(adapters):
        raise BlendError(f"Give one weight per adapter: {len(adapters)} adapters, weights={weights!r}.")
    for adapter, weight in zip(adapters, weights):
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
            raise BlendError(f"The weight of {adapter!r} must be a finite number, got {weight!r}.")
    graft_adapters = [name for name, c in tuner.peft_config.items() if isinstance(c, GraftConfig)]
    unknown = [a for a in adapters if a not in graft_adapters]
    if unknown:
        raise BlendError(f"No graft adapter named {unknown[0]!r}; this model has {graft_adapters}.")
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name in tuner.peft_config:
        raise BlendError(
            f"The blend needs a new adapter name; {adapter_name!r} is taken or not a name (adapters: "
            f"{list(tuner.peft_config)}). Pick another, or delete_adapter({adapter_name!r}) first."
        )
    if svd_rank is not None and (
        combination_type != "svd" or isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1
    ):
        raise BlendError(f"svd_rank must be an integer >= 1 with combination_type='svd', got {svd_rank!r}.")
    configs = [tuner.peft_config[a] for a in adapters]
    modes = {a: c.mode for a, c in zip(adapters, configs)}
    if len(set(modes.values())) > 1:
        raise BlendError(
            f"The adapters mix graft modes {modes}: an additive ΔW = s·AΦB and an output-mode ΔW = s·AΦB·W have "
            "different projections B (in- vs out-features wide) and no common graft. Blend adapters of one mode."
        )
    for field, what in (("modules_to_save", "whole modules"), ("trainable_token_indices", "embedding rows")):
        for adapter, config in zip(adapters, configs):
            if getattr(config, field):
                raise BlendError(
                    f"{adapter!r} also trains {what} ({field}={getattr(config, field)}), which are no graft and have "
                    f"no ΔW = s·AΦB to blend. Blend adapters without {field}."
                )
    return configs


def _read_source(layer: GraftLayer, module_name: str, adapter: str, weight: float) -> Source:
    if adapter in layer.merged_adapters:
        raise BlendError(
            f"{adapter!r} is merged into the base weights of {module_name!r}: its ΔW is already in W. Call "
            "unmerge_adapter() first."
        )
    layer._check_ready(adapter)  # uncalibrated data-driven parts are placeholders
    proj, phi = layer.graft_proj[adapter], layer.graft_phi[adapter]
    A, Phi, B = (t.detach().double() for t in (proj.A, phi.matrix(), proj.B))
    sparse = None
    if adapter in layer.graft_sparse:
        residual = layer.graft_sparse[adapter]
        sparse = (weight * residual.values.detach().double(), residual.rows, residual.cols)
    if not all(torch.isfinite(t).all() for t in (A, Phi, B) + (() if sparse is None else sparse[:1])):
        raise NonFiniteWeightsError(
            f"Graft adapter {adapter!r} holds NaN/Inf on {module_name!r}; a blend would too. Retrain or reload it."
        )
    return Source(adapter, weight, layer.graft_scaling[adapter], A, Phi, B, sparse)


# ------------------------------------------------------------------ the blend of one module


def _plan_module(
    layer: GraftLayer, module_name: str, sources: list[Source], combination_type: str, svd_rank: int | None
) -> ModulePlan:
    sparse = [s.sparse for s in sources if s.sparse is not None]
    if combination_type == "linear":
        first = sources[0]
        for other in sources[1:]:
            if not (torch.equal(other.A, first.A) and torch.equal(other.B, first.B)):
                raise BlendError(
                    f"combination_type='linear' sums Φ, which is exact only for adapters that share A and B, but "
                    f"{first.adapter!r} and {other.adapter!r} have different projections on {module_name!r} (other "
                    "projection kind, seed, r or base). Use combination_type='cat' (exact, r = Σ rᵢ) or 'svd' (top "
                    "svd_rank directions of the sum, exact when svd_rank reaches its rank)."
                )
        return ModulePlan(layer, first.A, sum(s.core_phi for s in sources), first.B, sparse)

    # [A₁ … Aₙ] · blockdiag(wᵢ sᵢ Φᵢ) · [B₁; …; Bₙ] = Σ wᵢ sᵢ AᵢΦᵢBᵢ (per expert on an expert stack)
    A = torch.cat([s.A for s in sources], dim=-1)  # out×R
    core = _block_diagonal([s.core_phi for s in sources])  # R×R
    B = torch.cat([s.B for s in sources], dim=-2)  # R×d
    limit = min(A.shape[-2], B.shape[-1])
    if combination_type == "cat":
        if core.shape[-1] > limit:
            raise BlendError(
                f"combination_type='cat' needs r = {core.shape[-1]} on {module_name!r}, but its graft space holds at "
                f"most {limit}. Use combination_type='svd' (exact with svd_rank >= the rank of the sum, at most "
                f"{limit} here)."
            )
        return ModulePlan(layer, A, core, B, sparse)

    # svd: only the R×R middle needs an SVD. A = Qa Ra, Bᵀ = Qb Rb  ⇒  A·core·B = Qa (Ra core Rbᵀ) Qbᵀ.
    Qa, Ra = torch.linalg.qr(A)
    Qb, Rb = torch.linalg.qr(B.mT)
    U, S, Vh = torch.linalg.svd(Ra @ core @ Rb.mT)
    k = min(svd_rank or max(s.phi.shape[-1] for s in sources), S.shape[-1])
    return ModulePlan(layer, Qa @ U[..., :k], torch.diag_embed(S[..., :k]), Vh[..., :k, :] @ Qb.mT, sparse)


def _block_diagonal(blocks: list[torch.Tensor]) -> torch.Tensor:
    """``torch.block_diag`` of the last two axes, batched over any leading ones (one block diagonal per expert)."""
    size = sum(block.shape[-1] for block in blocks)
    out = blocks[0].new_zeros(*blocks[0].shape[:-2], size, size)
    start = 0
    for block in blocks:
        end = start + block.shape[-1]
        out[..., start:end, start:end] = block
        start = end
    return out


# ------------------------------------------------------------------ the new adapter


def _blend_config(configs: list[GraftConfig], plans: dict[str, ModulePlan], combination_type: str) -> GraftConfig:
    """The first source's config, retargeted to exactly the blended modules with their ranks and representation."""
    first = configs[0]
    ranks = {name: plan.r for name, plan in plans.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    if combination_type == "linear":
        families = {(c.phi, c.phi_bandwidth if c.phi == "banded" else None) for c in configs}
        phi = first.phi if len(families) == 1 and first.phi in SUM_CLOSED_PHI else "dense"
        # Seeded projections are regenerated on load from (seed, module): only right if every source made its own so.
        regenerable = len({(c.projection, c.seed) for c in configs}) == 1
        representation = {
            "projection": first.projection,
            "save_projection": first.save_projection if regenerable else True,
        }
    else:
        phi = "dense" if combination_type == "cat" else "diagonal"
        representation = {"projection": "trainable", "save_projection": None}  # arbitrary A and B, stored
    return replace(
        first,
        r=r,
        rank_pattern={name: rank for name, rank in sorted(ranks.items()) if rank != r},
        target_modules={name for name, plan in plans.items() if not isinstance(plan.layer, ParamWrapper)},
        target_parameters=[name for name, plan in plans.items() if isinstance(plan.layer, ParamWrapper)] or None,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        phi=phi,
        scaling=first.scaling or None,  # s = 0 could hold no blend: take the scaling rule then
        init_weights=True,
        sparse_residual=sum(c.sparse_residual for c in configs),
        max_trainable_params=None,
        bias="none",  # trained biases live in the base model, shared by every adapter
        modules_to_save=None,
        **representation,
    )


@torch.no_grad()
def _fill(layer: GraftLayer, adapter_name: str, plan: ModulePlan) -> None:
    phi, proj = layer.graft_phi[adapter_name], layer.graft_proj[adapter_name]
    phi.fit((plan.core / layer.graft_scaling[adapter_name]).to(proj.A.device))
    proj.assign(plan.A.to(proj.A.dtype), plan.B.to(proj.B.dtype))
    if plan.sparse:
        sparse = layer.graft_sparse[adapter_name]
        values, rows, cols = (torch.cat(parts) for parts in zip(*plan.sparse))
        pad = sparse.values.numel() - values.numel()  # modules that only some sparse sources graft: zero entries
        sparse.values.copy_(torch.cat([values, values.new_zeros(pad)]))
        sparse.rows.copy_(torch.cat([rows, rows.new_zeros(pad)]))
        sparse.cols.copy_(torch.cat([cols, cols.new_zeros(pad)]))
    layer.graft_pending[adapter_name] = ()  # complete: nothing left to calibrate


def _create(tuner: BaseTuner, adapter_name: str, config: GraftConfig, plans: dict[str, ModulePlan]) -> None:
    """Inject the blend as PEFT adds any adapter, then fill it; a failure on the way removes every trace of it."""
    snapshot = ModelSnapshot.take(tuner)
    tuner.peft_config[adapter_name] = config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
        tuner._cast_adapter_dtype(adapter_name)  # as PeftModel.add_adapter does
        for plan in plans.values():
            _fill(plan.layer, adapter_name, plan)
    except BaseException:
        snapshot.restore(adapter_name)
        raise

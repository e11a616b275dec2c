"""The update signal in graft space: g = ∂L/∂Φ (r×r) of each selected graft, from hooks on its Φ module.

A graft computes y = W u + s·A Φ h with h = B u, i.e. z = Φ h then s·A z. With v_t = ∂L/∂z_t (r values per token,
equal to s·Aᵀ ∂L/∂y_t):

    g = Σ_t v_t h_tᵀ = s · Aᵀ (∂L/∂y)ᵀ u Bᵀ

so a forward hook on the Φ module (which sees h and z) and a gradient hook on z give g without ever forming an
out×in matrix, for every Φ family (all compute z = Φ h). The same per-token v_t and h_t give the statistics of the
Fisher and K-FAC rules.

Autograd only starts at the selected grafts: while a `GraftSignal` is active every parameter of the model is frozen
and each selected z becomes a leaf that requires grad, so layers below the lowest selected graft build no graph.
Each forward call's h is paired with the gradient of *its own* z (a closure), so a block re-run by gradient
checkpointing never counts twice: only the z that takes part in the backward pass receives a gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerSignal:
    """What one backward pass tells one graft. Statistics are means over the chunk's valid positions, with v scaled
    to the gradient of the *summed* loss (per-token gradients), as an empirical Fisher needs."""

    grad: torch.Tensor  # r×r, ∂L/∂Φ of the mean per-token loss
    fisher: torch.Tensor  # r×r, mean_t (N v_t)² (h_t²)ᵀ: the diagonal empirical Fisher of Φ
    input_factor: torch.Tensor  # r×r, mean_t h_t h_tᵀ
    grad_factor: torch.Tensor  # r×r, mean_t (N v_t)(N v_t)ᵀ
    positions: int


@dataclass
class _Accumulator:
    r: int
    device: torch.device
    grad: torch.Tensor = field(init=False)
    fisher: torch.Tensor = field(init=False)
    input_factor: torch.Tensor = field(init=False)
    grad_factor: torch.Tensor = field(init=False)
    positions: int = 0

    def __post_init__(self) -> None:
        for name in ("grad", "fisher", "input_factor", "grad_factor"):
            setattr(self, name, torch.zeros(self.r, self.r, device=self.device))


class GraftSignal:
    """Collects g (and the per-token statistics) of the Φ modules in ``sites`` over one forward/backward pass.

    Use as ``with GraftSignal(sites, model, mask, n_predicted) as signal: loss.backward()``, then `signal.result()`.
    ``mask`` (batch×seq, bool) marks real tokens; ``n_predicted`` is N, the number of tokens the mean loss averages.
    """

    def __init__(self, sites: dict[str, nn.Module], model: nn.Module, mask: torch.Tensor | None) -> None:
        self.sites = sites
        self.model = model
        self.mask = None if mask is None else mask.reshape(-1).bool()
        self.n_predicted = 1
        self._acc = {name: _Accumulator(phi.r, next(phi.parameters()).device) for name, phi in sites.items()}

    @contextmanager
    def capture(self) -> Iterator[GraftSignal]:
        """Freeze every parameter and hook the selected Φ modules; restore both on exit, whatever happens."""
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        handles = [phi.register_forward_hook(self._forward_hook(name)) for name, phi in self.sites.items()]
        try:
            with torch.enable_grad():
                yield self
        finally:
            for handle in handles:
                handle.remove()
            for p in frozen:
                p.requires_grad_(True)

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            h = args[0].detach()
            z = output
            if not z.requires_grad:  # nothing below needs a gradient: autograd starts here
                z = z.detach().requires_grad_(True)
            z.register_hook(lambda grad: self._accumulate(name, h, grad))
            return z if z is not output else None

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, h: torch.Tensor, grad: torch.Tensor) -> None:
        if grad is None:  # autograd found no use of this z (e.g. a bitsandbytes kernel that skips it): adds nothing
            return
        acc = self._acc[name]
        v = grad.reshape(-1, acc.r).float()  # [positions, r]
        h = h.reshape(-1, acc.r).float()
        if self.mask is not None and self.mask.numel() == v.shape[0]:
            keep = self.mask.to(v.device)
            v, h = v[keep], h[keep]
        acc.grad += v.T @ h
        per_token = v * self.n_predicted  # gradients of the summed loss, one per position
        acc.fisher += (per_token**2).T @ h**2
        acc.input_factor += h.T @ h
        acc.grad_factor += per_token.T @ per_token
        acc.positions += v.shape[0]

    def result(self) -> dict[str, LayerSignal]:
        """Per-site signal; a site whose Φ saw no gradient gets zeros (it was not on the loss's path)."""
        out = {}
        for name, acc in self._acc.items():
            n = max(acc.positions, 1)
            out[name] = LayerSignal(acc.grad, acc.fisher / n, acc.input_factor / n, acc.grad_factor / n, acc.positions)
        return out

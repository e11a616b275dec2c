"""The merge rules: how one chunk's signal g = ∂L/∂Φ is folded into the persistent state of one graft.

Every rule is a pure function of (Φ, anchor Φ₀, signal, statistics) returning a new Φ and new statistics; nothing is
modified in place, so a rejected update leaves the live state bit-identical and a rollback is a reference swap.
The statistics of a rule are a dict of r×r tensors (saved in snapshots; blended and quantized like Φ).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import SEWLConfig
from .signal import LayerSignal


Stats = dict[str, torch.Tensor]
RuleFn = Callable[[torch.Tensor, torch.Tensor, LayerSignal, Stats, SEWLConfig], tuple[torch.Tensor, Stats]]


def ema(phi: torch.Tensor, anchor: torch.Tensor, signal: LayerSignal, stats: Stats, config: SEWLConfig):
    """Φ ← Φ₀ + β(Φ − Φ₀) − η g: decay toward the anchor and the gradient step, each with its own knob."""
    return anchor + config.decay * (phi - anchor) - config.lr * signal.grad, stats


def lowrank(phi: torch.Tensor, anchor: torch.Tensor, signal: LayerSignal, stats: Stats, config: SEWLConfig):
    """Step, then keep the best rank-k approximation of Φ − Φ₀ (Eckart–Young: the top k singular triplets)."""
    U, S, Vh = torch.linalg.svd(phi - anchor - config.lr * signal.grad)
    k = config.rank
    return anchor + (U[:, :k] * S[:k]) @ Vh[:k], stats


def _running_fisher(signal: LayerSignal, stats: Stats, config: SEWLConfig) -> torch.Tensor:
    """Online diagonal Fisher F ← γF + F_new (F_new from per-token gradients, see `LayerSignal.fisher`)."""
    return config.fisher_decay * stats["fisher"] + signal.fisher


def trust_region(phi: torch.Tensor, anchor: torch.Tensor, signal: LayerSignal, stats: Stats, config: SEWLConfig):
    """Step, then project Φ − Φ₀ onto {‖Δ‖ ≤ ρ}. In the Fisher metric ‖Δ‖ = sqrt(Σ F Δ²), a ball of that metric, whose
    nearest point (in the same metric) is again the radial scaling."""
    delta = phi - config.lr * signal.grad - anchor
    if config.trust_metric == "fisher":
        fisher = _running_fisher(signal, stats, config)
        stats = {"fisher": fisher}
        norm = (fisher * delta**2).sum().sqrt()
    else:
        norm = torch.linalg.matrix_norm(delta)
    if norm > config.trust_radius:
        delta = delta * (config.trust_radius / norm)
    return anchor + delta, stats


def fisher(phi: torch.Tensor, anchor: torch.Tensor, signal: LayerSignal, stats: Stats, config: SEWLConfig):
    """Online EWC: minimise L + λ/2 Σ F (Φ − Φ*)². The pull is taken implicitly (a proximal step),

        Φ ← (Φ − η g + ηλ F ⊙ Φ*) / (1 + ηλ F),

    which never overshoots Φ* however large ηλF gets (the explicit step would oscillate once ηλF > 2)."""
    F = _running_fisher(signal, stats, config)
    pull = config.lr * config.ewc_lambda * F
    consolidated = stats["consolidated"]
    return (phi - config.lr * signal.grad + pull * consolidated) / (1 + pull), {
        "fisher": F,
        "consolidated": consolidated,
    }


def _damped_inverse_eigen(factor: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors and 1/(λ + δ) of a symmetric PSD factor, δ = damping · mean eigenvalue (scale-free)."""
    values, vectors = torch.linalg.eigh(factor)
    values = values.clamp_min(0)
    delta = damping * values.mean().clamp_min(torch.finfo(values.dtype).tiny)
    return vectors, 1.0 / (values + delta)


def kfac(phi: torch.Tensor, anchor: torch.Tensor, signal: LayerSignal, stats: Stats, config: SEWLConfig):
    """Natural-gradient step Φ ← Φ − η G⁻¹ g H⁻¹ with damped r×r Kronecker factors G (projected output gradients) and
    H (projected inputs), running averages bias-corrected for their zero start (as Adam's moments)."""
    gamma = config.kfac_decay
    steps = stats["steps"] + 1
    G = gamma * stats["grad_factor"] + (1 - gamma) * signal.grad_factor
    H = gamma * stats["input_factor"] + (1 - gamma) * signal.input_factor
    correction = 1 - gamma ** steps.item()
    Qg, inv_g = _damped_inverse_eigen(G / correction, config.kfac_damping)
    Qh, inv_h = _damped_inverse_eigen(H / correction, config.kfac_damping)
    natural = Qg @ ((Qg.T @ signal.grad @ Qh) * inv_g[:, None] * inv_h[None, :]) @ Qh.T
    return phi - config.lr * natural, {"grad_factor": G, "input_factor": H, "steps": steps}


RULES: dict[str, RuleFn] = {
    "ema": ema,
    "lowrank": lowrank,
    "trust_region": trust_region,
    "fisher": fisher,
    "kfac": kfac,
}


def initial_stats(config: SEWLConfig, anchor: torch.Tensor) -> Stats:
    """A rule's statistics before any update: zero Fisher / factors, Φ* = the anchor."""
    zeros = torch.zeros_like(anchor)
    if config.rule == "fisher":
        return {"fisher": zeros, "consolidated": anchor.clone()}
    if config.rule == "trust_region" and config.trust_metric == "fisher":
        return {"fisher": zeros}
    if config.rule == "kfac":
        return {"grad_factor": zeros, "input_factor": zeros.clone(), "steps": torch.zeros((), dtype=torch.int64)}
    return {}


def merge_sessions(
    phi_a: torch.Tensor, fisher_a: torch.Tensor, phi_b: torch.Tensor, fisher_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two EWC sessions of one graft as one: Φ = (F₁Φ₁ + F₂Φ₂)/(F₁ + F₂) entrywise, F = F₁ + F₂. Where neither
    session has any Fisher mass the two Φ are averaged (each knows equally little)."""
    total = fisher_a + fisher_b
    weighted = (fisher_a * phi_a + fisher_b * phi_b) / total.where(total > 0, torch.ones_like(total))
    return torch.where(total > 0, weighted, (phi_a + phi_b) / 2), total

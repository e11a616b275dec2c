"""Naive O(T²·D) DRM attention, straight from the definition. Used only as the reference the fast
`DRMAttention.forward` is tested and benchmarked against; the model never calls it."""

import math

import torch

from .modeling_drm import DRMAttention


def naive_drm_attention(
    attn: DRMAttention,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output of `attn` on a whole sequence (no cache), materialising every δ = q̂_i - k̂_j: (B, T, d) -> (B, T, d).

    key_mask (B, T) marks real tokens; query rows that see no real key come out as NaN.
    """
    q, k, v, mass = attn.project(hidden_states, position_embeddings)  # (B, H, T, m), ..., (B, H, T, hd)
    length = q.shape[2]
    visible = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()  # (T, S)
    visible = visible[None, None] if key_mask is None else visible[None, None] & key_mask[:, None, None, :].bool()

    delta = q[:, :, :, None, :] - k[:, :, None, :, :]  # (B, H, T, S, m)
    metric = torch.eye(attn.dim, dtype=q.dtype, device=q.device).expand(*q.shape[:-1], attn.dim, attn.dim)
    factor = attn.metric(q)
    if factor is not None:
        metric = metric + factor @ factor.transpose(-1, -2)  # (B, H, T, m, m)
    dist = torch.einsum("bhtsm,bhtmn,bhtsn->bhts", delta, metric, delta)  # (B, H, T, S)

    if attn.gamma is not None:
        anchor = (dist * visible).sum(-1) / visible.sum(-1)  # mean over visible keys only
        scale = attn.gamma.exp()[:, None] / anchor.clamp_min(attn.config.gamma_eps)
    else:
        scale = torch.full_like(dist[..., 0], 0.5 / math.sqrt(attn.dim))
    energy = dist
    if mass is not None:
        weights = mass[:, :, None, :] * visible  # (B, H, T, S)
        centre = (weights @ k) / weights.sum(-1, keepdim=True).clamp_min(1e-6)  # (B, H, T, m)
        pull = (k[:, :, None, :, :] - centre[:, :, :, None, :]).pow(2).sum(-1)  # (B, H, T, S)
        energy = energy + attn.gravity_strength() * pull

    logits = (-scale[..., None] * energy).masked_fill(~visible, float("-inf"))
    return attn.output(torch.softmax(logits, dim=-1) @ v, hidden_states)

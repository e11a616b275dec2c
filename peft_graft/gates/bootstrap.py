"""Paired bootstrap confidence intervals for per-example differences (optionally over several seeds)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    confidence: float
    n_examples: int
    n_seeds: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def paired_bootstrap_ci(
    deltas: torch.Tensor, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> Interval:
    """Percentile CI of the mean of ``deltas`` ([N] or [seeds, N], paired by example).

    Each resample draws examples with replacement (the same examples for every seed, keeping the pairing) and seeds
    with replacement, so the interval reflects both data and training-run variability.
    """
    if deltas.dim() == 1:
        deltas = deltas[None]
    deltas = deltas.double()
    n_seeds, n = deltas.shape
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 paired examples, got {n}")
    g = torch.Generator().manual_seed(seed)
    examples = torch.randint(0, n, (n_resamples, n), generator=g)
    seeds = torch.randint(0, n_seeds, (n_resamples, n_seeds), generator=g)
    # means[b] = mean over resampled seeds and examples
    per_seed = deltas[:, examples].mean(-1)  # [seeds, B]
    means = per_seed.T.gather(1, seeds).mean(-1)  # [B]
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=means.dtype)).tolist()
    return Interval(deltas.mean().item(), low, high, confidence, n, n_seeds)

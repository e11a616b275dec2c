"""Does a sensitivity score predict anything? Spearman rank correlation of each score with realised graft gains.

The router should rank by the score that best predicts what a graft actually buys; this measures it instead of
assuming it (`benchmarks/search_sensitivity.py` runs it on SmolLM2 and real text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import SearchConfigError
from .sensitivity import SCORES, SensitivityMap


def _ranks(values: Sequence[float]) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank (so tied scores do not invent an order)."""
    x = torch.tensor(values, dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in torch.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ of two equally long sequences (Pearson correlation of their ranks); NaN if either is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise SearchConfigError(f"Spearman needs two sequences of the same length >= 2, got {len(x)} and {len(y)}.")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.norm() * ry.norm()).item()
    return (rx @ ry).item() / denominator if denominator > 0 else float("nan")


def score_correlations(smap: SensitivityMap, gains: Mapping[str, float]) -> dict[str, float]:
    """Spearman's ρ between each score of ``smap`` and the realised ``gains`` (module name -> gain)."""
    missing = sorted(set(gains) - set(smap.by_name()))
    if missing:
        raise SearchConfigError(f"Gains were given for modules the map does not hold: {missing[:3]}.")
    names = list(gains)
    by_name = smap.by_name()
    return {score: spearman([by_name[n].score(score) for n in names], [gains[n] for n in names]) for score in SCORES}

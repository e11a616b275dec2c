"""The evolving state of a SEWL: per selected graft Φ, its anchor Φ₀ and the merge rule's statistics (all r×r), plus
counters. Everything a snapshot stores, a user switch swaps and a rollback restores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .rails import LossStats


@dataclass
class SiteState:
    phi: torch.Tensor  # r×r, fp32: the Φ written into the graft
    anchor: torch.Tensor  # r×r: Φ₀, what decay, ageing, trust regions and the clip's reference point refer to
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def clone(self) -> SiteState:
        return SiteState(self.phi.clone(), self.anchor.clone(), {k: v.clone() for k, v in self.stats.items()})


@dataclass
class SEWLState:
    """``projections``: each site's projection fingerprint (the graft's signature), so states from other
    projections are recognised before they are blended or restored."""

    sites: dict[str, SiteState]
    projections: dict[str, int]
    updates: int = 0
    tokens: int = 0
    loss_stats: LossStats = field(default_factory=LossStats)

    def clone(self) -> SEWLState:
        return dataclasses.replace(
            self, sites={name: site.clone() for name, site in self.sites.items()}, projections=dict(self.projections)
        )

    def numel(self) -> int:
        """Numbers held (Φ, anchors, statistics): what a user's state costs."""
        return sum(t.numel() for s in self.sites.values() for t in (s.phi, s.anchor, *s.stats.values()))

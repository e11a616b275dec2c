"""Many users over one base: one SEWL state per user (r×r tensors per selected graft), swapped in on demand.

Base weights and projections are shared by every user; only Φ, its anchor and the rule's statistics differ, so a
switch copies a few r×r tensors into the grafts. Personas blend as weighted sums of Φ: with shared projections,
Σ wᵢ·s·AΦᵢB = s·A(Σ wᵢΦᵢ)B, so the blend is exactly the weighted sum of the users' ΔW. Saved states also load as
plain graft adapters, so PEFT's ``add_weighted_adapter(..., combination_type="linear")`` gives the same blend in a
model (see the tests); states over different projections are refused with `SEWLBlendError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from numbers import Real

from ..errors import SEWLBlendError, SEWLUnknownUserError
from .engine import SEWL
from .snapshot import read_snapshot
from .state import SEWLState, SiteState


class SEWLUsers:
    """Per-user states of one `SEWL`. The SEWL's state when this is created is what a new user starts from."""

    def __init__(self, sewl: SEWL) -> None:
        self.sewl = sewl
        self.fresh = sewl.state.clone()
        self._states: dict[str, SEWLState] = {}
        self.current: str | None = None

    @property
    def users(self) -> list[str]:
        return sorted(set(self._states) | ({self.current} if self.current is not None else set()))

    def state(self, user: str) -> SEWLState:
        """A copy of ``user``'s state (the live one for the current user)."""
        if user == self.current:
            return self.sewl.state.clone()
        if user not in self._states:
            raise SEWLUnknownUserError(f"No SEWL state for user {user!r}; known users: {self.users}.")
        return self._states[user].clone()

    def add(self, user: str, state: SEWLState) -> None:
        """Store ``state`` for ``user`` (checked when it is switched to or blended)."""
        if user == self.current:
            self.sewl.set_state(state)
        else:
            self._states[user] = state.clone()

    def add_snapshot(self, user: str, path: str | os.PathLike) -> None:
        """Store the state of the snapshot at ``path`` for ``user``, after verifying it and matching it to this SEWL."""
        self.add(user, read_snapshot(self.sewl, path).state)

    def switch(self, user: str) -> None:
        """Make ``user``'s state live (a new user starts fresh); the previous user's state is kept."""
        if user == self.current:
            return
        outgoing = self.sewl.state
        self.sewl.set_state(self._states.get(user, self.fresh))  # checked first: a foreign state changes nothing
        if self.current is not None:
            self._states[self.current] = outgoing
        self._states.pop(user, None)
        self.current = user

    def remove(self, user: str) -> None:
        if user == self.current:
            raise SEWLUnknownUserError(f"{user!r} is the current user; switch to another one before removing it.")
        if self._states.pop(user, None) is None:
            raise SEWLUnknownUserError(f"No SEWL state for user {user!r}; known users: {self.users}.")

    def blend(self, weights: Mapping[str, float], user: str) -> None:
        """Store for ``user`` the persona Σ wᵢ·state(userᵢ): Φ, anchors and statistics summed with the weights,
        counters reset. Exact in ΔW because the users share projections (checked)."""
        states = {name: self.state(name) for name in weights}  # unknown users raise here; blend_states the rest
        self.add(user, blend_states(states, weights))


def blend_states(states: Mapping[str, SEWLState], weights: Mapping[str, float]) -> SEWLState:
    """Σ wᵢ·stateᵢ over states that share their grafts and projections (`SEWLBlendError` otherwise)."""
    _check_weights(states, weights)
    first_name, first = next(iter(states.items()))
    for name, state in states.items():
        if state.projections != first.projections:
            raise SEWLBlendError(
                f"Users {first_name!r} and {name!r} have states over different grafts or projections, so Σ wᵢΦᵢ is "
                "not the weighted sum of their ΔW. Blend states of one SEWL (same base, GraftConfig and layers), or "
                "load both as adapters and use add_weighted_adapter(..., combination_type='cat')."
            )
    if len({frozenset(s.sites[n].stats) for s in states.values() for n in s.sites}) > 1:
        raise SEWLBlendError("The users' states come from different merge rules; blend states of one rule.")

    sites = {}
    for site in first.sites:
        parts = [(float(weights[name]), state.sites[site]) for name, state in states.items()]
        stats = {
            k: sum(w * part.stats[k] for w, part in parts) if v.is_floating_point() else v.clone()
            for k, v in parts[0][1].stats.items()
        }
        phi = sum(w * part.phi for w, part in parts)
        sites[site] = SiteState(phi, sum(w * part.anchor for w, part in parts), stats)
    return SEWLState(sites, dict(first.projections))


def _check_weights(states: Mapping[str, object], weights: Mapping[str, float]) -> None:
    """One finite weight per state, at least one state: checked before anything is summed."""
    if not states:
        raise SEWLBlendError("A blend needs at least one user and weight.")
    if set(states) != set(weights):
        raise SEWLBlendError(
            f"A blend needs one weight per user: users {sorted(states)}, weights given for {sorted(weights)}."
        )
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w):
            raise SEWLBlendError(f"The weight of user {name!r} must be a finite number, got {w!r}.")

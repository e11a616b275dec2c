"""The one vocabulary of a graft's fate, shared by gates, registry, Hub and CLI.

A gate's verdict is the status it asks for: `GraftStatus.ACCEPT` is another name for `GraftStatus.ACCEPTED` (an enum
alias, the same member), so a gate report, a registry row, a Hub record and ``peft-graft list --status`` all speak
of the same six statuses. Lookups ignore case and take the gate spellings, so ``GraftStatus("accepted")`` and
``GraftStatus("accept")`` are `GraftStatus.ACCEPTED`.

The transition table is the single place that encodes the growth policy's invariants, e.g. a rejected graft never
becomes accepted (it would have to be retrained, which gives new content and therefore a new graft id).
"""

from __future__ import annotations

from enum import Enum

from .errors import InvalidTransitionError


class GraftStatus(str, Enum):
    CANDIDATE = "CANDIDATE"  # trained, not judged yet
    ACCEPTED = "ACCEPTED"  # passed the gates; part of the composed model
    REJECTED = "REJECTED"  # failed a gate; terminal
    DEFERRED = "DEFERRED"  # undecided (e.g. confidence interval too wide); retried later, never dropped
    ROLLED_BACK = "ROLLED_BACK"  # was accepted, later removed from the composition; terminal
    CONSOLIDATED = "CONSOLIDATED"  # merged into a new base model

    # A gate's verdicts (aliases of the statuses they lead to).
    ACCEPT = "ACCEPTED"  # noqa: PIE796 (aliases on purpose)
    REJECT = "REJECTED"  # noqa: PIE796
    DEFER = "DEFERRED"  # noqa: PIE796

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _missing_(cls, value: object) -> GraftStatus | None:
        if isinstance(value, str):
            name = value.strip().upper()
            member = cls.__members__.get(name)
            if member is not None:
                return member
        return None


_S = GraftStatus

# Statuses a graft may be registered with: ROLLED_BACK and CONSOLIDATED only make sense after ACCEPTED.
INITIAL_STATUSES: frozenset[GraftStatus] = frozenset({_S.CANDIDATE, _S.ACCEPTED, _S.REJECTED, _S.DEFERRED})

ALLOWED_TRANSITIONS: dict[GraftStatus, frozenset[GraftStatus]] = {
    _S.CANDIDATE: frozenset({_S.ACCEPTED, _S.REJECTED, _S.DEFERRED}),
    _S.DEFERRED: frozenset({_S.ACCEPTED, _S.REJECTED, _S.DEFERRED}),
    _S.ACCEPTED: frozenset({_S.ROLLED_BACK, _S.CONSOLIDATED}),
    _S.CONSOLIDATED: frozenset({_S.ROLLED_BACK}),  # undoing a consolidation restores the earlier base
    _S.REJECTED: frozenset(),
    _S.ROLLED_BACK: frozenset(),
}


def check_transition(graft_id: str, old: GraftStatus, new: GraftStatus) -> None:
    """Raise `InvalidTransitionError` unless ``old -> new`` is allowed."""
    if new not in ALLOWED_TRANSITIONS[old]:
        allowed = ", ".join(sorted(s.value for s in ALLOWED_TRANSITIONS[old])) or "nothing (terminal status)"
        raise InvalidTransitionError(
            f"Graft {graft_id} is {old.value} and cannot become {new.value}; from {old.value} it may become: "
            f"{allowed}. To try the idea again, train a new graft (new content => new id) and register it."
        )

"""The graft life cycle: every allowed status change works, every other one is refused and leaves no trace."""

from __future__ import annotations

import itertools

import pytest
from gate_evidence import accepting_evidence
from registry_testing import register_kwargs

from peft_graft.registry import ALLOWED_TRANSITIONS, GraftStatus, InvalidTransitionError


S = GraftStatus
# How to bring a fresh graft into each status: (status at registration, changes after it).
_REACH = {
    S.CANDIDATE: (S.CANDIDATE, ()),
    S.ACCEPTED: (S.ACCEPTED, ()),
    S.REJECTED: (S.REJECTED, ()),
    S.DEFERRED: (S.DEFERRED, ()),
    S.ROLLED_BACK: (S.ACCEPTED, (S.ROLLED_BACK,)),
    S.CONSOLIDATED: (S.ACCEPTED, (S.CONSOLIDATED,)),
}


def _evidence_for(status: GraftStatus) -> dict:
    return accepting_evidence() if status is S.ACCEPTED else {"gain": 0.5}


def _graft_in(registry, adapter, status: GraftStatus) -> str:
    initial, changes = _REACH[status]
    graft_id = registry.register(adapter(1), **register_kwargs(status=initial)).graft_id
    for new in changes:
        registry.set_status(graft_id, new, "setup", evidence=_evidence_for(new))
    return graft_id


@pytest.mark.parametrize("old,new", list(itertools.product(S, S)), ids=lambda s: s.value)
def test_transition_table_is_enforced(registry, adapter, old, new):
    graft_id = _graft_in(registry, adapter, old)
    audit_before = registry.audit.head()

    if new in ALLOWED_TRANSITIONS[old]:
        record = registry.set_status(graft_id, new, "because", evidence=_evidence_for(new))
        assert record.status is new and registry.get(graft_id) == record
        assert registry.history(graft_id)[-1].to_status is new
    else:
        with pytest.raises(InvalidTransitionError, match=f"is {old.value} and cannot become {new.value}"):
            registry.set_status(graft_id, new, "because")
        assert registry.get(graft_id).status is old and registry.audit.head() == audit_before
    assert registry.verify() == registry.audit.head()[0]


def test_rejected_graft_never_becomes_accepted(registry, adapter):
    graft_id = registry.register(adapter(1), **register_kwargs()).graft_id
    registry.set_status(graft_id, S.DEFERRED, "CI too wide")
    registry.set_status(graft_id, S.DEFERRED, "still too wide")
    registry.set_status(graft_id, S.REJECTED, "retention gate failed", evidence={"regression": 0.3})

    with pytest.raises(InvalidTransitionError):
        registry.set_status(graft_id, S.ACCEPTED, "try again")
    # Registering the same bytes again cannot resurrect it either.
    assert registry.register(adapter(1), **register_kwargs(status="ACCEPTED")).status is S.REJECTED

    history = registry.history(graft_id)
    assert [(h.from_status, h.to_status) for h in history] == [
        (None, S.CANDIDATE),
        (S.CANDIDATE, S.DEFERRED),
        (S.DEFERRED, S.DEFERRED),
        (S.DEFERRED, S.REJECTED),
    ]
    assert history[-1].reason == "retention gate failed" and history[-1].evidence == {"regression": 0.3}
    assert [r.event for r in registry.audit.records()] == ["graft.registered"] + ["graft.status_changed"] * 3
    assert [h.audit_seq for h in history] == [1, 2, 3, 4]


def test_set_status_needs_a_reason(registry, adapter):
    graft_id = registry.register(adapter(1), **register_kwargs()).graft_id
    with pytest.raises(ValueError, match="reason"):
        registry.set_status(graft_id, S.ACCEPTED, " ")


def test_set_statuses_changes_all_or_none(registry, adapter):
    accepted = [registry.register(adapter(i), **register_kwargs(status="ACCEPTED")).graft_id for i in (1, 2)]
    candidate = registry.register(adapter(3), **register_kwargs()).graft_id
    head = registry.audit.head()
    with pytest.raises(InvalidTransitionError):  # the last one cannot be consolidated: nothing may change
        registry.set_statuses([*accepted, candidate], S.CONSOLIDATED, "merged")
    assert [registry.get(g).status for g in accepted] == [S.ACCEPTED] * 2 and registry.audit.head() == head

    updated = registry.set_statuses(accepted, S.CONSOLIDATED, "merged", evidence={"new_base": "v2"})
    assert [r.status for r in updated] == [registry.get(g).status for g in accepted] == [S.CONSOLIDATED] * 2
    assert registry.audit.head()[0] == head[0] + 2 and registry.verify() == head[0] + 2

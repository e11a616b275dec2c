"""The hash-chained audit trail: edits, reorders, deletions and forks are detected, and so are table edits."""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3

import pytest
from gate_evidence import accepting_evidence
from registry_testing import register_kwargs

from peft_graft.registry import AuditTamperedError, GraftMetadataError, GraftStatus
from peft_graft.registry.audit import record_hash


@pytest.fixture
def audited(registry, adapter):
    """A registry with 5 audit records: two registrations, a status change and two custom events."""
    graft_id = registry.register(adapter(1), **register_kwargs()).graft_id
    registry.audit.append("gate.decision", {"graft_id": graft_id, "decision": "accept", "gain": 0.2})
    registry.set_status(graft_id, GraftStatus.ACCEPTED, "gates passed", evidence=accepting_evidence())
    registry.register(adapter(2), **register_kwargs())
    registry.audit.append("gate.decision", {"decision": "defer"})
    return registry


def test_append_records_and_verify(audited):
    records = audited.audit.records()
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    assert audited.audit.records(event="gate.decision")[1].payload == {"decision": "defer"}
    assert audited.audit.verify() == 5 and audited.verify() == 5
    assert audited.audit.head() == (5, records[-1].hash)


def test_registry_events_are_reserved(registry):
    with pytest.raises(GraftMetadataError, match="reserved"):
        registry.audit.append("graft.status_changed", {})
    with pytest.raises(GraftMetadataError, match="dict"):
        registry.audit.append("note", ["not", "a", "dict"])


_TAMPERING = {
    "edited": (["UPDATE audit SET payload = replace(payload, 'accept', 'reject') WHERE seq = 2"], 2),
    "reordered": (
        [
            "UPDATE audit SET seq = -1 WHERE seq = 2",
            "UPDATE audit SET seq = 2 WHERE seq = 3",
            "UPDATE audit SET seq = 3 WHERE seq = -1",
        ],
        2,
    ),
    "deleted": (["DELETE FROM audit WHERE seq = 3"], 3),
    "deleted_last": (["DELETE FROM audit WHERE seq = 5"], 5),
    "deleted_first": (["DELETE FROM audit WHERE seq = 1"], 1),
    "head_edited": (["UPDATE audit_head SET seq = 4"], 4),
}


@pytest.mark.parametrize("statements,first_bad", _TAMPERING.values(), ids=_TAMPERING.keys())
def test_tampering_is_detected_at_the_first_bad_record(audited, raw_sql, statements, first_bad):
    raw_sql(*statements)
    with pytest.raises(AuditTamperedError, match=f"#{first_bad}") as err:
        audited.audit.verify()
    assert err.value.seq == first_bad
    with pytest.raises(AuditTamperedError):
        audited.verify()


def test_rewritten_chain_is_caught_by_an_anchored_head(audited, raw_sql):
    anchor = audited.audit.head()
    records = audited.audit.records()
    prev = records[0].prev_hash
    statements = []
    for r in records:  # a full rewrite: edit record 2 and recompute every hash after it
        payload = {**r.payload, "decision": "reject"} if r.seq == 2 else r.payload
        digest = record_hash(prev, r.seq, r.event, r.created_at, payload)
        statements.append(
            f"UPDATE audit SET payload = '{json.dumps(payload, sort_keys=True, separators=(',', ':'))}',"
            f" prev_hash = 'x{r.seq}', hash = 'y{r.seq}' WHERE seq = {r.seq}"
        )
        statements.append(f"UPDATE audit SET prev_hash = '{prev}', hash = '{digest}' WHERE seq = {r.seq}")
        prev = digest
    statements.append(f"UPDATE audit_head SET hash = '{prev}'")
    raw_sql(*statements)

    assert audited.audit.verify() == 5  # undetectable from inside the file...
    with pytest.raises(AuditTamperedError, match="rewritten"):
        audited.audit.verify(expected_head=anchor)  # ...but not against a head kept elsewhere


def test_audit_table_is_append_only_and_cannot_fork(audited):
    conn = sqlite3.connect(audited.root / "registry.sqlite", isolation_level=None)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit WHERE seq = 5")
        prev = conn.execute("SELECT prev_hash FROM audit WHERE seq = 5").fetchone()[0]
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # a second record after #4
            conn.execute(
                "INSERT INTO audit VALUES (6, 'fork', '{}', 'now', ?, ?)", (prev, hashlib.sha256(b"fork").hexdigest())
            )
    finally:
        conn.close()


_TABLE_EDITS = {
    "status_flipped": "UPDATE grafts SET status = 'ACCEPTED' WHERE status = 'CANDIDATE'",
    "metrics_edited": "UPDATE grafts SET metrics = '{\"gain\":9.9}'",
    "row_deleted": "DELETE FROM grafts WHERE status = 'CANDIDATE'",
    "history_edited": "UPDATE status_history SET reason = 'forged' WHERE to_status = 'ACCEPTED'",
    "history_deleted": "DELETE FROM status_history WHERE to_status = 'ACCEPTED'",
}


@pytest.mark.parametrize("statement", _TABLE_EDITS.values(), ids=_TABLE_EDITS.keys())
def test_registry_tables_are_checked_against_the_audit_trail(audited, raw_sql, statement):
    raw_sql("PRAGMA foreign_keys = OFF", statement)
    assert audited.audit.verify() == 5  # the chain itself is intact
    with pytest.raises(AuditTamperedError, match="disagree"):
        audited.verify()

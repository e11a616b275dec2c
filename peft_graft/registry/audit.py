"""The audit trail and the consistency checks built on it: an append-only hash chain, and a replay of it that the
registry tables must match.

Record k stores ``hash_k = sha256(hash_{k-1} + canonical_json({seq, event, created_at, payload}))`` next to
``prev_hash = hash_{k-1}`` (the first record chains to 64 zeros). ``audit_head`` holds the latest (seq, hash) and
is updated in the same transaction as the append. `verify_chain` walks the chain, so an edited record (its hash no
longer matches), a reordered pair or an inserted record (prev_hash breaks), a deleted record (seq gap) and deleted
latest records (head mismatch) are all caught. ``prev_hash`` is UNIQUE, so two writers can never fork the chain.

Someone able to rewrite the whole file can recompute every hash; to catch that too, keep `AuditLog.head` somewhere
else (a Hub commit, a signed note) and pass it to ``verify(expected_head=...)`` later.

The chain protects the audit table; `verify_tables` protects the others: replaying the registry's own audit events
(``graft.*``) must reproduce every graft row, the status history and the lineage exactly. So flipping a status from
REJECTED to ACCEPTED with raw SQL is caught even though no audit record was touched.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import asdict
from typing import Any

from ..errors import AuditTamperedError, GraftMetadataError
from ..status import GraftStatus
from .database import (
    Database,
    audit_rows,
    insert_audit,
    select_audit,
    select_audit_head,
    select_grafts,
    select_history,
    select_lineage,
)
from .records import AuditRecord, StatusChange, canonical_json, to_plain, utc_now


GENESIS_HASH = "0" * 64
RESERVED_PREFIX = "graft."  # events the registry itself writes (and replays in verify_tables)
REGISTERED_EVENT = RESERVED_PREFIX + "registered"  # payload: GraftRecord.to_dict()
STATUS_EVENT = RESERVED_PREFIX + "status_changed"  # payload: graft_id, from, to, reason, evidence, at
SIGNED_EVENT = RESERVED_PREFIX + "signature_verified"  # payload: graft_id, signature_sha256, key_sha256


# The chain -----------------------------------------------------------------------------------------------------------


def record_hash(prev_hash: str, seq: int, event: str, created_at: str, payload: Any) -> str:
    body = canonical_json({"seq": seq, "event": event, "created_at": created_at, "payload": payload})
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def append_record(conn: sqlite3.Connection, event: str, payload: dict[str, Any], created_at: str) -> AuditRecord:
    """Append inside the caller's BEGIN IMMEDIATE transaction, so the record commits with the change it describes."""
    if not isinstance(payload, dict):
        raise GraftMetadataError(f"An audit payload must be a dict, not {type(payload).__name__}.")
    payload = to_plain(payload)
    prev_seq, prev_hash = select_audit_head(conn) or (0, GENESIS_HASH)
    seq = prev_seq + 1
    digest = record_hash(prev_hash, seq, event, created_at, payload)
    record = AuditRecord(seq, event, payload, created_at, prev_hash, digest)
    insert_audit(conn, record)
    return record


class AuditLog:
    """The audit trail of one registry (``reg.audit``); gates and callbacks may append their own events."""

    def __init__(self, db: Database):
        self._db = db

    def append(self, event: str, payload: dict[str, Any]) -> AuditRecord:
        """Append one record in its own transaction; event names starting with ``graft.`` are the registry's."""
        if not event or event.startswith(RESERVED_PREFIX):
            raise GraftMetadataError(
                f"Audit event {event!r} is empty or uses the reserved prefix {RESERVED_PREFIX!r}; "
                "choose a name like 'gate.decision'."
            )
        with self._db.transaction(write=True) as conn:
            return append_record(conn, event, payload, utc_now())

    def records(self, event: str | None = None, since_seq: int = 0) -> list[AuditRecord]:
        """Records in chain order (optionally one event type, or only those after ``since_seq``)."""
        with self._db.transaction(write=False) as conn:
            return select_audit(conn, () if event is None else (event,), since_seq)

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the latest record, (0, 64 zeros) when empty: store it elsewhere to anchor the chain."""
        with self._db.transaction(write=False) as conn:
            return select_audit_head(conn) or (0, GENESIS_HASH)

    def verify(self, expected_head: tuple[int, str] | None = None) -> int:
        """Check the whole chain and return its length; raise `AuditTamperedError` naming the first bad record.

        ``expected_head``: a (seq, hash) saved earlier with `head()`; the chain must still contain it.
        """
        with self._db.transaction(write=False) as conn:
            return verify_chain(conn, expected_head)


def _tampered(seq: int | None, what: str) -> AuditTamperedError:
    where = f"audit record #{seq}" if seq is not None else "the audit trail"
    return AuditTamperedError(
        f"Tampering detected at {where}: {what}. Do not trust registry statuses until the database is restored "
        "from a backup (or the Hub copy of the registry metadata) and verifies again.",
        seq=seq,
    )


def verify_chain(conn: sqlite3.Connection, expected_head: tuple[int, str] | None = None) -> int:
    """`AuditLog.verify` on an open connection (so callers can check other tables in the same snapshot)."""
    prev_hash, expected_seq = GENESIS_HASH, 1
    anchored = expected_head is None or expected_head[0] == 0
    for seq, event, payload_text, created_at, stored_prev, stored_hash in audit_rows(conn):
        if seq != expected_seq:
            raise _tampered(expected_seq, f"it is missing (the chain jumps from #{expected_seq - 1} to #{seq})")
        try:
            payload = json.loads(payload_text)
        except (TypeError, ValueError):
            raise _tampered(seq, "its payload is not valid JSON") from None
        if record_hash(stored_prev, seq, event, created_at, payload) != stored_hash:
            raise _tampered(seq, "its contents do not match its hash (the record was edited)")
        if stored_prev != prev_hash:
            raise _tampered(
                seq, f"it does not chain to record #{seq - 1} (records were reordered, replaced or inserted)"
            )
        if expected_head is not None and seq == expected_head[0]:
            if stored_hash != expected_head[1]:
                raise _tampered(seq, "it differs from the head saved earlier (the chain was rewritten)")
            anchored = True
        prev_hash, expected_seq = stored_hash, expected_seq + 1
    count = expected_seq - 1
    head = select_audit_head(conn)
    if head is None and count:
        raise _tampered(None, "the chain head row is missing")
    if head is not None and head != (count, prev_hash):
        raise _tampered(
            count + 1 if head[0] > count else head[0],
            f"the head says the chain ends at #{head[0]}, but it ends at #{count} "
            "(the latest records were deleted or the head was edited)",
        )
    if not anchored:
        raise _tampered(expected_head[0], "the chain is shorter than the head saved earlier (records were deleted)")
    return count


# The tables against the chain ----------------------------------------------------------------------------------------


def _mismatch(seq: int | None, what: str) -> AuditTamperedError:
    return AuditTamperedError(
        f"The registry tables disagree with the audit trail{f' (record #{seq})' if seq else ''}: {what}. "
        "Someone edited registry.sqlite outside peft-graft; restore it from a backup before trusting statuses.",
        seq=seq,
    )


def _replay(conn: sqlite3.Connection) -> tuple[dict[str, dict[str, Any]], list[StatusChange], dict[str, int]]:
    """Graft rows and history as the registry's audit events say they must be."""
    grafts: dict[str, dict[str, Any]] = {}
    history: list[StatusChange] = []
    last_seq: dict[str, int] = {}
    for record in select_audit(conn, (REGISTERED_EVENT, STATUS_EVENT)):
        seq, p = record.seq, record.payload
        gid = p["graft_id"]
        if record.event == REGISTERED_EVENT:
            if gid in grafts:
                raise _mismatch(seq, f"graft {gid} is registered twice")
            grafts[gid] = p
            history.append(
                StatusChange(gid, None, GraftStatus(p["status"]), "registered", p["evidence"], p["created_at"], seq)
            )
        else:
            if gid not in grafts or grafts[gid]["status"] != p["from"]:
                raise _mismatch(seq, f"status change of graft {gid} from {p['from']} does not follow its history")
            grafts[gid].update(status=p["to"], updated_at=p["at"])
            history.append(
                StatusChange(
                    gid, GraftStatus(p["from"]), GraftStatus(p["to"]), p["reason"], p["evidence"], p["at"], seq
                )
            )
        last_seq[gid] = seq
    return grafts, history, last_seq


def verify_tables(conn: sqlite3.Connection, expected_head: tuple[int, str] | None = None) -> int:
    """Verify the chain (anchored at ``expected_head`` if given), then the tables against its replay; return the
    number of audit records."""
    count = verify_chain(conn, expected_head)
    expected, expected_history, last_seq = _replay(conn)
    records = select_grafts(conn)
    for record in records:
        state = expected.pop(record.graft_id, None)
        if state is None:
            raise _mismatch(None, f"graft {record.graft_id} has a row but was never registered through peft-graft")
        actual = record.to_dict()
        for key in sorted(set(actual) | set(state)):
            if canonical_json(actual.get(key)) != canonical_json(state.get(key)):
                raise _mismatch(
                    last_seq[record.graft_id],
                    f"graft {record.graft_id} has {key}="
                    f"{actual.get(key)!r} in its row, but {state.get(key)!r} per the audit trail",
                )
    for gid in expected:
        raise _mismatch(last_seq[gid], f"graft {gid} was registered but its row was deleted")
    history = select_history(conn)
    for i, change in enumerate(history):
        if i >= len(expected_history) or canonical_json(asdict(change)) != canonical_json(asdict(expected_history[i])):
            raise _mismatch(change.audit_seq, f"status history entry {i + 1} (graft {change.graft_id}) was edited")
    if len(history) != len(expected_history):
        raise _mismatch(expected_history[len(history)].audit_seq, "status history entries were deleted")
    if select_lineage(conn) != {(r.graft_id, p) for r in records for p in r.parents}:
        raise _mismatch(None, "the lineage table does not match the grafts' parents")
    return count

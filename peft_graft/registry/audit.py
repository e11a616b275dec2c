"""Append-only, hash-chained audit trail stored in the registry database.

Record k stores ``hash_k = sha256(hash_{k-1} + canonical_json({seq, event, created_at, payload}))`` next to
``prev_hash = hash_{k-1}`` (the first record chains to 64 zeros). ``audit_head`` holds the latest (seq, hash) and
is updated in the same transaction as the append. `verify` walks the chain, so an edited record (its hash no longer
matches), a reordered pair or an inserted record (prev_hash breaks), a deleted record (seq gap) and deleted latest
records (head mismatch) are all caught. ``prev_hash`` is UNIQUE, so two writers can never fork the chain.

Someone able to rewrite the whole file can recompute every hash; to catch that too, keep `head()` somewhere
else (a Hub commit, a signed note) and pass it to ``verify(expected_head=...)`` later.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..errors import AuditTamperedError, GraftMetadataError
from .canonical import canonical_json, to_plain
from .database import Database


GENESIS_HASH = "0" * 64
RESERVED_PREFIX = "graft."  # events the registry itself writes (and replays in GraftRegistry.verify)
REGISTERED_EVENT = RESERVED_PREFIX + "registered"  # payload: GraftRecord.to_dict()
STATUS_EVENT = RESERVED_PREFIX + "status_changed"  # payload: graft_id, from, to, reason, evidence, at


def utc_now() -> str:
    """Timestamp format shared by audit records and graft rows."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    event: str
    payload: dict[str, Any]
    created_at: str
    prev_hash: str
    hash: str


def record_hash(prev_hash: str, seq: int, event: str, created_at: str, payload: Any) -> str:
    body = canonical_json({"seq": seq, "event": event, "created_at": created_at, "payload": payload})
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def append_record(conn: sqlite3.Connection, event: str, payload: dict[str, Any], created_at: str) -> AuditRecord:
    """Append inside the caller's BEGIN IMMEDIATE transaction, so the record commits with the change it describes."""
    if not isinstance(payload, dict):
        raise GraftMetadataError(f"An audit payload must be a dict, not {type(payload).__name__}.")
    payload = to_plain(payload)
    row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    prev_seq, prev_hash = row if row else (0, GENESIS_HASH)
    seq = prev_seq + 1
    digest = record_hash(prev_hash, seq, event, created_at, payload)
    conn.execute(
        "INSERT INTO audit (seq, event, payload, created_at, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?)",
        (seq, event, canonical_json(payload), created_at, prev_hash, digest),
    )
    conn.execute("INSERT OR REPLACE INTO audit_head (id, seq, hash) VALUES (1, ?, ?)", (seq, digest))
    return AuditRecord(seq, event, payload, created_at, prev_hash, digest)


def _tampered(seq: int | None, what: str) -> AuditTamperedError:
    where = f"audit record #{seq}" if seq is not None else "the audit trail"
    return AuditTamperedError(
        f"Tampering detected at {where}: {what}. Do not trust registry statuses until the database is restored "
        "from a backup (or the Hub copy of the registry metadata) and verifies again.",
        seq=seq,
    )


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
        query = "SELECT seq, event, payload, created_at, prev_hash, hash FROM audit WHERE seq > ?"
        args: list[Any] = [since_seq]
        if event is not None:
            query += " AND event = ?"
            args.append(event)
        with self._db.transaction(write=False) as conn:
            rows = conn.execute(query + " ORDER BY seq", args).fetchall()
        return [AuditRecord(s, e, json.loads(p), c, ph, h) for s, e, p, c, ph, h in rows]

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the latest record, (0, 64 zeros) when empty: store it elsewhere to anchor the chain."""
        with self._db.transaction(write=False) as conn:
            row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS_HASH)

    def verify(self, expected_head: tuple[int, str] | None = None) -> int:
        """Check the whole chain and return its length; raise `AuditTamperedError` naming the first bad record.

        ``expected_head``: a (seq, hash) saved earlier with `head()`; the chain must still contain it.
        """
        with self._db.transaction(write=False) as conn:
            return verify_chain(conn, expected_head)


def verify_chain(conn: sqlite3.Connection, expected_head: tuple[int, str] | None = None) -> int:
    """`AuditLog.verify` on an open connection (so callers can check other tables in the same snapshot)."""
    prev_hash, expected_seq = GENESIS_HASH, 1
    anchored = expected_head is None or expected_head[0] == 0
    rows = conn.execute("SELECT seq, event, payload, created_at, prev_hash, hash FROM audit ORDER BY seq")
    for seq, event, payload_text, created_at, stored_prev, stored_hash in rows:
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
    head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    if head is None and count:
        raise _tampered(None, "the chain head row is missing")
    if head is not None and tuple(head) != (count, prev_hash):
        raise _tampered(
            count + 1 if head[0] > count else head[0],
            f"the head says the chain ends at #{head[0]}, but it ends at #{count} "
            "(the latest records were deleted or the head was edited)",
        )
    if not anchored:
        raise _tampered(expected_head[0], "the chain is shorter than the head saved earlier (records were deleted)")
    return count

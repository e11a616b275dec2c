"""Rows <-> records: the SQL for the ``grafts``, ``lineage`` and ``status_history`` tables in one place."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ..status import GraftStatus
from .canonical import canonical_json
from .record import GraftRecord, StatusChange


_GRAFT_COLUMNS = (
    "graft_id",
    "status",
    "base_fingerprint",
    "targets",
    "config",
    "metrics",
    "dataset_fingerprints",
    "seeds",
    "parents",
    "evidence",
    "files",
    "package_version",
    "git_commit",
    "created_at",
    "updated_at",
)
_JSON_COLUMNS = frozenset(
    {"targets", "config", "metrics", "dataset_fingerprints", "seeds", "parents", "evidence", "files"}
)
_SELECT_GRAFTS = f"SELECT {', '.join(_GRAFT_COLUMNS)} FROM grafts"
_SELECT_HISTORY = "SELECT graft_id, from_status, to_status, reason, evidence, at, audit_seq FROM status_history"


def _record(row: tuple[Any, ...]) -> GraftRecord:
    data = dict(zip(_GRAFT_COLUMNS, row, strict=True))
    return GraftRecord.from_dict(
        {c: json.loads(v) if c in _JSON_COLUMNS and v is not None else v for c, v in data.items()}
    )


def insert_graft(conn: sqlite3.Connection, record: GraftRecord) -> None:
    data = record.to_dict()
    values = [
        canonical_json(data[c]) if c in _JSON_COLUMNS and data[c] is not None else data[c] for c in _GRAFT_COLUMNS
    ]
    conn.execute(f"INSERT INTO grafts ({', '.join(_GRAFT_COLUMNS)}) VALUES ({', '.join('?' * len(values))})", values)
    conn.executemany(
        "INSERT INTO lineage (child, parent) VALUES (?, ?)", [(record.graft_id, parent) for parent in record.parents]
    )


def select_graft(conn: sqlite3.Connection, graft_id: str) -> GraftRecord | None:
    row = conn.execute(f"{_SELECT_GRAFTS} WHERE graft_id = ?", (graft_id,)).fetchone()
    return _record(row) if row else None


def select_grafts(
    conn: sqlite3.Connection, status: GraftStatus | None = None, base_fingerprint: str | None = None
) -> list[GraftRecord]:
    """Matching grafts in registration order."""
    where, args = [], []
    if status is not None:
        where.append("status = ?")
        args.append(GraftStatus(status).value)
    if base_fingerprint is not None:
        where.append("base_fingerprint = ?")
        args.append(base_fingerprint)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return [_record(row) for row in conn.execute(f"{_SELECT_GRAFTS}{clause} ORDER BY rowid", args)]


def select_children(conn: sqlite3.Connection, graft_id: str) -> list[str]:
    return [row[0] for row in conn.execute("SELECT child FROM lineage WHERE parent = ? ORDER BY rowid", (graft_id,))]


def update_status(conn: sqlite3.Connection, graft_id: str, status: GraftStatus, at: str) -> None:
    conn.execute("UPDATE grafts SET status = ?, updated_at = ? WHERE graft_id = ?", (status.value, at, graft_id))


def insert_history(conn: sqlite3.Connection, change: StatusChange) -> None:
    conn.execute(
        "INSERT INTO status_history (graft_id, from_status, to_status, reason, evidence, at, audit_seq) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            change.graft_id,
            change.from_status.value if change.from_status else None,
            change.to_status.value,
            change.reason,
            None if change.evidence is None else canonical_json(change.evidence),
            change.at,
            change.audit_seq,
        ),
    )


def select_history(conn: sqlite3.Connection, graft_id: str | None = None) -> list[StatusChange]:
    """Status changes in the order they happened (all grafts when ``graft_id`` is None)."""
    clause, args = (" WHERE graft_id = ?", (graft_id,)) if graft_id is not None else ("", ())
    return [
        StatusChange(
            gid,
            GraftStatus(old) if old else None,
            GraftStatus(new),
            reason,
            None if evidence is None else json.loads(evidence),
            at,
            seq,
        )
        for gid, old, new, reason, evidence, at, seq in conn.execute(f"{_SELECT_HISTORY}{clause} ORDER BY id", args)
    ]

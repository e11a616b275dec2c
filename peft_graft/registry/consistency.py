"""Cross-check of the registry tables against the audit trail (`GraftRegistry.verify`).

The chain protects the audit table; this protects the others: replaying the registry's own audit events must
reproduce every graft row, the status history and the lineage exactly. So flipping a status from REJECTED to
ACCEPTED with raw SQL is caught even though no audit record was touched.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from typing import Any

from ..errors import AuditTamperedError
from ..status import GraftStatus
from .audit import REGISTERED_EVENT, STATUS_EVENT, verify_chain
from .canonical import canonical_json
from .record import StatusChange
from .tables import select_grafts, select_history


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
    rows = conn.execute(
        "SELECT seq, event, payload FROM audit WHERE event IN (?, ?) ORDER BY seq", (REGISTERED_EVENT, STATUS_EVENT)
    )
    for seq, event, payload_text in rows:
        p = json.loads(payload_text)
        gid = p["graft_id"]
        if event == REGISTERED_EVENT:
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


def check_tables(conn: sqlite3.Connection) -> int:
    """Verify the chain, then the tables against it; return the number of audit records."""
    count = verify_chain(conn)
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
    lineage = set(conn.execute("SELECT child, parent FROM lineage").fetchall())
    if lineage != {(r.graft_id, p) for r in records for p in r.parents}:
        raise _mismatch(None, "the lineage table does not match the grafts' parents")
    return count

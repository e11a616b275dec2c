"""What a SEWL snapshot holds, read without a model: for ``peft-graft sewl-inspect`` and for people deciding whether a
saved state is the one they want to resume, merge or blend.

A snapshot folder (``SEWL.save``) is reported as one state; a folder whose sub-folders are snapshots (one per user,
e.g. ``state/alice``, ``state/bob``) as a ``users`` table. Integrity is checked first (sha256 of every file against
the snapshot's manifest); a failed check is reported, not raised, and nothing else of that folder is read.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import SEWLIntegrityError, SEWLSnapshotError
from .snapshot import MANIFEST_FILE, MASTER_FILE, STATE_FILE, read_log, read_meta


def snapshot_report(path: str | os.PathLike, log_entries: int = 5) -> dict[str, Any]:
    """A JSON-ready summary of the snapshot (or per-user snapshots) at ``path``; ``integrity`` is True or the reason
    the folder failed verification. Raises `SEWLSnapshotError` when ``path`` holds no snapshot at all."""
    folder = Path(path)
    if (folder / MANIFEST_FILE).is_file():
        return _one(folder, log_entries)
    users = sorted(p for p in folder.iterdir() if (p / MANIFEST_FILE).is_file()) if folder.is_dir() else []
    if not users:
        raise SEWLSnapshotError(
            f"{folder} is neither a SEWL snapshot nor a folder of per-user snapshots (no {MANIFEST_FILE} in it or in "
            "its sub-folders). Save one with SEWL.save(path)."
        )
    reports = {user.name: _one(user, log_entries) for user in users}
    return {
        "path": str(folder),
        "users": reports,
        "integrity": all(r["integrity"] is True for r in reports.values()),
        "bytes": sum(r["bytes"] for r in reports.values()),
    }


def _one(folder: Path, log_entries: int) -> dict[str, Any]:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    report: dict[str, Any] = {"path": str(folder), "bytes": sum(files.values())}
    try:
        meta, config = read_meta(folder)
        log = read_log(meta, folder)
    except (SEWLIntegrityError, SEWLSnapshotError) as err:
        return report | {"integrity": str(err)}
    count, mean, _ = meta["loss_stats"]
    return report | {
        "integrity": True,
        "rule": config.rule,
        "adapter": meta["adapter"],
        "grafts": len(meta["sites"]),
        "updates": meta["updates"],
        "tokens": meta["tokens"],
        "mean_loss_accepted": mean if count else None,
        "quantize": meta.get("quantize"),
        "state_bytes": files.get(STATE_FILE, 0) + files.get(MASTER_FILE, 0),
        "base_fingerprint": meta["base_fingerprint"],
        "config": config.to_dict(),
        "files": files,
        "decisions": dict(Counter(record.decision for record in log)),
        "last_updates": [asdict(record) for record in log[-log_entries:]] if log_entries > 0 else [],
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """``snapshot_report``'s answer as text: one block per state, its last updates one line each."""
    if "users" in report:
        lines = [f"{report['path']}: {len(report['users'])} user state(s), {report['bytes']:,} bytes"]
        for user, one in report["users"].items():
            lines += ["", f"user {user}", *("  " + line for line in report_lines(one))]
        return lines
    if report["integrity"] is not True:
        return [f"{report['path']}: INTEGRITY FAILED: {report['integrity']}"]
    config = report["config"]
    mean = report["mean_loss_accepted"]
    lines = [
        f"{report['path']}: SEWL snapshot, integrity ok (sha256 of every file)",
        f"rule {report['rule']}, lr {config['lr']}, adapter {report['adapter']!r}, {report['grafts']} evolving grafts",
        f"{report['updates']} updates over {report['tokens']:,} tokens"
        + ("" if mean is None else f", mean loss of accepted chunks {mean:.4f}"),
        f"{report['bytes']:,} bytes ({report['state_bytes']:,} of SEWL state, quantize={report['quantize']})",
        f"kept log: {report['decisions'] or 'empty'}",
    ]
    for record in report["last_updates"]:
        reason = f" ({record['reason']})" if record["reason"] else ""
        lines.append(
            f"  #{record['index']}: {record['decision']}, {record['tokens']} tokens, loss {record['loss']:.4f}{reason}"
        )
    return lines

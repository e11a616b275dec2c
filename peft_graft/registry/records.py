"""What the registry stores and hands out: immutable records, the canonical JSON they are stored as, and the checks
on what callers pass in.

Canonical JSON gives one byte string per value, so hashes of records are reproducible in any process: keys are
sorted, separators fixed, and the few non-JSON types metadata commonly contains (sets from PEFT configs, tuples,
enums, paths, numpy/torch scalars) are converted to plain JSON values first.

Records are snapshots: a status change produces a new record from `GraftRegistry.get`, never mutates an old one.
Sequences are tuples so that frozen really means frozen; dict fields are fresh copies per read.

What `GraftRegistry.register` is given is checked and converted to what it reads back as (``checked_*``: sets become
sorted lists, tuples lists) before any file is copied, so the record `register` returns equals the one `get` returns
later, in this process or any other.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from ..errors import GateEvidenceError, GraftMetadataError
from ..status import INITIAL_STATUSES, GraftStatus


# Canonical JSON ------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Convert one non-JSON value; `json.dumps` calls this only for types it does not know."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=canonical_json)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, PurePath):
        return str(value)
    item = getattr(value, "item", None)  # numpy and torch scalars, 0-d arrays and one-element tensors
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return item()
    raise GraftMetadataError(
        f"{type(value).__name__} value {value!r} cannot be stored as JSON; pass plain dicts, lists, str, int, float, "
        "bool or None (e.g. config.to_dict(), float(metric))."
    )


def canonical_json(value: Any) -> str:
    """Serialise ``value`` deterministically (NaN and infinities are kept: a diverged loss is evidence too)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)
    except (TypeError, ValueError) as err:  # e.g. a dict mixing int and str keys, or a circular reference
        if isinstance(err, GraftMetadataError):
            raise
        raise GraftMetadataError(f"Value cannot be stored as canonical JSON ({err}); use str dict keys.") from err


def to_plain(value: Any) -> Any:
    """``value`` as it will read back from storage (sets become sorted lists, tuples lists...)."""
    return json.loads(canonical_json(value))


def utc_now() -> str:
    """The one timestamp format of the registry (graft rows, status history, audit records, schema migrations)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# Records -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraftRecord:
    graft_id: str  # sha256 of the adapter files (see store.py)
    status: GraftStatus
    base_fingerprint: str  # base_model_fingerprint() of the model the graft was trained on
    targets: tuple[str, ...]  # module names the graft modifies
    config: dict[str, Any]
    metrics: dict[str, Any]
    dataset_fingerprints: dict[str, str]  # role ("train", "acceptance"...) -> dataset_fingerprint()
    seeds: tuple[int, ...]
    parents: tuple[str, ...]  # graft ids this graft was trained on top of
    evidence: dict[str, Any] | None  # gate results etc. at registration; later evidence is in the history
    files: dict[str, str]  # artifact file name -> sha256
    package_version: str
    git_commit: str | None
    created_at: str
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (Hub metadata, the registration's audit payload); `from_dict` inverts it."""
        data = asdict(self)
        data.update(
            status=self.status.value, targets=list(self.targets), seeds=list(self.seeds), parents=list(self.parents)
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraftRecord:
        return cls(
            **{
                **data,
                "status": GraftStatus(data["status"]),
                "targets": tuple(data["targets"]),
                "seeds": tuple(data["seeds"]),
                "parents": tuple(data["parents"]),
            }
        )


@dataclass(frozen=True)
class StatusChange:
    graft_id: str
    from_status: GraftStatus | None  # None for the status given at registration
    to_status: GraftStatus
    reason: str
    evidence: dict[str, Any] | None
    at: str
    audit_seq: int  # the audit record written in the same transaction


@dataclass(frozen=True)
class AuditRecord:
    """One link of the audit chain (see audit.py for how ``hash`` is computed)."""

    seq: int
    event: str
    payload: dict[str, Any]
    created_at: str
    prev_hash: str
    hash: str


# Provenance ----------------------------------------------------------------------------------------------------------


def provenance() -> dict[str, str | None]:
    """Which code produced a graft: the `GraftRecord` fields ``package_version`` and ``git_commit``.

    Looked up when called, not at import, so `peft_graft/__init__.py` may import the registry at any point.
    """
    import peft_graft

    return {"package_version": peft_graft.__version__, "git_commit": _git_commit()}


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """HEAD of the git checkout the package is imported from, or None (installed wheel, no git, any failure).

    The package's own ``__init__.py`` must be tracked by that checkout, so a virtualenv that happens to sit
    inside some other repository does not report that repository's commit. Uncommitted edits are not visible.
    """
    package_dir = Path(__file__).resolve().parent.parent
    try:
        run = functools.partial(
            subprocess.run, cwd=package_dir, capture_output=True, text=True, timeout=10, check=True
        )
        run(["git", "ls-files", "--error-unmatch", "__init__.py"])
        commit = run(["git", "rev-parse", "HEAD"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit if len(commit) in (40, 64) else None


# Checks on what callers pass -----------------------------------------------------------------------------------------


def checked_status(value: GraftStatus | str) -> GraftStatus:
    """``value`` as a status (any case, gate spellings too); `GraftMetadataError` listing the valid ones if not."""
    try:
        return GraftStatus(value)
    except ValueError:
        names = ", ".join(s.value for s in GraftStatus)
        raise GraftMetadataError(f"Unknown graft status {value!r}; use one of {names}.") from None


def checked_object(name: str, value: Any) -> dict[str, Any]:
    """A dict field (config, metrics...) as plain JSON; config objects are accepted through their ``to_dict``."""
    if hasattr(value, "to_dict"):  # a PeftConfig / GraftConfig object
        value = value.to_dict()
    if not isinstance(value, dict):
        raise GraftMetadataError(f"{name} must be a dict, got {type(value).__name__}.")
    return to_plain(value)


def checked_evidence(evidence: Any) -> dict[str, Any] | None:
    """Evidence for a status (gate reports...): optional, a dict otherwise."""
    return None if evidence is None else checked_object("evidence", evidence)


def accepting_report(evidence: dict[str, Any] | None, label: str) -> dict[str, Any]:
    """The gate report that lets ``label`` become ACCEPTED, found in its (checked) ``evidence``.

    ACCEPTED is the one status the gates alone may give: a registry row must not claim it because a caller said so.
    The report is ``evidence`` itself or ``evidence["report"]`` (what `GraftGateCallback` records), in the form of
    `GateReport.to_dict`: decision ACCEPTED and at least one gate result, every one of them ACCEPTED. It is stored in
    the audit chain with the status change, so the decision behind every accepted graft can be read back.
    """
    report = evidence.get("report", evidence) if isinstance(evidence, dict) else None
    results = report.get("results") if isinstance(report, dict) else None
    verdicts = [r.get("verdict") if isinstance(r, dict) else None for r in results] if isinstance(results, list) else []
    decision = report.get("decision") if isinstance(report, dict) else None
    if not verdicts or any(_status_or_none(v) is not GraftStatus.ACCEPTED for v in (decision, *verdicts)):
        raise GateEvidenceError(
            f"{label} cannot become ACCEPTED without a gate report that accepts it: pass "
            "evidence=GateSet(...).decide(ctx) (or {'report': report.to_dict()}) with decision ACCEPTED and every gate "
            "ACCEPTED. GraftGateCallback does this for you; a rejected or deferred graft stays so."
        )
    return report


def _status_or_none(value: Any) -> GraftStatus | None:
    try:
        return GraftStatus(value)
    except (TypeError, ValueError):
        return None


def _checked_sequence(name: str, values: Any, kind: type) -> tuple[Any, ...]:
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, kind) and not isinstance(v, bool) and v != "" for v in values
    ):
        raise GraftMetadataError(f"{name} must be a list of {kind.__name__}, got {values!r}.")
    return tuple(values)


def registration_fields(
    *,
    base_fingerprint: Any,
    targets: Any,
    config: Any,
    metrics: Any,
    dataset_fingerprints: Any,
    seeds: Any,
    status: Any,
    parents: Any,
    evidence: Any,
) -> dict[str, Any]:
    """The `GraftRecord` fields a caller supplies, checked; raises `GraftMetadataError` naming the bad one."""
    status = checked_status(status)
    if status not in INITIAL_STATUSES:
        allowed = ", ".join(sorted(s.value for s in INITIAL_STATUSES))
        raise GraftMetadataError(f"A graft cannot be registered as {status.value}; register it as one of {allowed}.")
    if not isinstance(base_fingerprint, str) or not base_fingerprint:
        raise GraftMetadataError("base_fingerprint must be the string returned by base_model_fingerprint(model).")
    fingerprints = checked_object("dataset_fingerprints", dataset_fingerprints)
    if not all(isinstance(v, str) and v for v in fingerprints.values()):
        raise GraftMetadataError("dataset_fingerprints values must be strings returned by dataset_fingerprint().")
    fields = dict(
        status=status,
        base_fingerprint=base_fingerprint,
        targets=_checked_sequence("targets", targets, str),
        config=checked_object("config", config),
        metrics=checked_object("metrics", metrics),
        dataset_fingerprints=fingerprints,
        seeds=_checked_sequence("seeds", seeds, int),
        parents=_checked_sequence("parents", parents, str),
        evidence=checked_evidence(evidence),
    )
    if len(set(fields["parents"])) != len(fields["parents"]):
        raise GraftMetadataError(f"parents lists a graft twice: {list(fields['parents'])}.")
    return fields

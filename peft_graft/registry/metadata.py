"""Checking and normalising what `GraftRegistry.register` stores, before any file is copied.

Values are converted to what they read back as (canonical JSON: sets become sorted lists, tuples lists), so the
record returned by `register` equals the one `get` returns later, in this process or any other.
"""

from __future__ import annotations

from typing import Any

from ..errors import GraftMetadataError
from ..status import INITIAL_STATUSES, GraftStatus
from .canonical import to_plain


def as_status(value: GraftStatus | str) -> GraftStatus:
    try:
        return GraftStatus(value)
    except ValueError:
        names = ", ".join(s.value for s in GraftStatus)
        raise GraftMetadataError(f"Unknown graft status {value!r}; use one of {names}.") from None


def _sequence(name: str, values: Any, kind: type) -> tuple[Any, ...]:
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, kind) and not isinstance(v, bool) and v != "" for v in values
    ):
        raise GraftMetadataError(f"{name} must be a list of {kind.__name__}, got {values!r}.")
    return tuple(values)


def as_dict(name: str, value: Any, optional: bool = False) -> dict[str, Any] | None:
    if value is None and optional:
        return None
    if hasattr(value, "to_dict"):  # a PeftConfig / GraftConfig object
        value = value.to_dict()
    if not isinstance(value, dict):
        raise GraftMetadataError(f"{name} must be a dict, got {type(value).__name__}.")
    return to_plain(value)


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
    """The `GraftRecord` fields a caller supplies, validated; raises `GraftMetadataError` naming the bad one."""
    status = as_status(status)
    if status not in INITIAL_STATUSES:
        allowed = ", ".join(sorted(s.value for s in INITIAL_STATUSES))
        raise GraftMetadataError(f"A graft cannot be registered as {status.value}; register it as one of {allowed}.")
    if not isinstance(base_fingerprint, str) or not base_fingerprint:
        raise GraftMetadataError("base_fingerprint must be the string returned by base_model_fingerprint(model).")
    fingerprints = as_dict("dataset_fingerprints", dataset_fingerprints)
    if not all(isinstance(v, str) and v for v in fingerprints.values()):
        raise GraftMetadataError("dataset_fingerprints values must be strings returned by dataset_fingerprint().")
    fields = dict(
        status=status,
        base_fingerprint=base_fingerprint,
        targets=_sequence("targets", targets, str),
        config=as_dict("config", config),
        metrics=as_dict("metrics", metrics),
        dataset_fingerprints=fingerprints,
        seeds=_sequence("seeds", seeds, int),
        parents=_sequence("parents", parents, str),
        evidence=as_dict("evidence", evidence, optional=True),
    )
    if len(set(fields["parents"])) != len(fields["parents"]):
        raise GraftMetadataError(f"parents lists a graft twice: {list(fields['parents'])}.")
    return fields

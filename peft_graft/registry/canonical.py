"""Canonical JSON: one byte string per value, so hashes of records are reproducible in any process.

Keys are sorted, separators fixed, and the few non-JSON types metadata commonly contains (sets from PEFT configs,
tuples, enums, paths, numpy/torch scalars) are converted to plain JSON values first.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import PurePath
from typing import Any

from ..errors import GraftMetadataError


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

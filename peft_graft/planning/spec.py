"""``--graft "r=16,targets=all-linear"``: a GraftConfig written on one command-line argument."""

from __future__ import annotations

from typing import Any

from ..errors import GraftConfigError
from ..tuners.graft import GraftConfig


_ALIASES = {"targets": "target_modules"}


def parse_graft_spec(spec: str) -> GraftConfig:
    """``key=value`` pairs separated by commas, any `GraftConfig` field (``targets`` for ``target_modules``; several
    module or parameter names joined by ``+``; ``target_parameters`` is always a list, as the config wants it).
    Numbers, ``true``/``false`` and ``none`` are read as such."""
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise GraftConfigError(f"--graft {spec!r}: {item!r} is not key=value (e.g. r=16,targets=all-linear).")
        key = _ALIASES.get(key.strip(), key.strip())
        values[key] = _value(raw.strip())
        names = values[key]
        if key in ("target_modules", "target_parameters") and isinstance(names, str) and names != "all-linear":
            values[key] = names.split("+")
    try:
        return GraftConfig(**values)
    except TypeError as err:  # an unknown field name
        raise GraftConfigError(f"--graft {spec!r}: {err}; use GraftConfig field names.") from err


def _value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw

"""Typed errors of the graft registry, each saying what went wrong and what to do about it.

They live here rather than in ``peft_graft/errors.py`` so the registry can grow without touching shared files; all
subclass `peft_graft.errors.PeftGraftError` and the built-in exception a caller would otherwise expect.
"""

from __future__ import annotations

from ..errors import PeftGraftError


class RegistryError(PeftGraftError):
    """Base class of every registry, audit and fingerprint error."""


class UnknownGraftError(RegistryError, KeyError):
    """No graft with this id is registered."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class InvalidTransitionError(RegistryError, ValueError):
    """A status change that the graft life cycle forbids (e.g. REJECTED -> ACCEPTED)."""


class GraftMetadataError(RegistryError, ValueError):
    """A value given to `register` cannot be stored (not JSON-serialisable, bad status, self-parent...)."""


class ArtifactIntegrityError(RegistryError, ValueError):
    """A stored artifact file no longer has the bytes it was registered with."""

    def __init__(self, message: str, *, graft_id: str, file: str, expected: str | None, actual: str | None):
        super().__init__(message)
        self.graft_id, self.file, self.expected, self.actual = graft_id, file, expected, actual


class AuditTamperedError(RegistryError, ValueError):
    """The audit chain (or a registry table checked against it) was edited, reordered or truncated."""

    def __init__(self, message: str, *, seq: int | None):
        super().__init__(message)
        self.seq = seq


class RegistryCorruptError(RegistryError, OSError):
    """``registry.sqlite`` is truncated, overwritten or otherwise unreadable."""


class RegistryBusyError(RegistryError, TimeoutError):
    """Another process held the registry's write lock for longer than the timeout."""


class RegistryVersionError(RegistryError, RuntimeError):
    """The registry was written by a newer peft-graft with a schema this version does not know."""


class FingerprintError(RegistryError, ValueError):
    """A model or data set cannot be fingerprinted (unsupported type, weights on the meta device...)."""

"""Errors of the growth workflow."""

from ..errors import PeftGraftError


class NotAcceptedError(PeftGraftError, PermissionError):
    """An operation reserved for accepted grafts (push, consolidation) was asked of another one."""


class DriftError(PeftGraftError, RuntimeError):
    """A consolidated base does not reproduce the unmerged composition within tolerance."""


class BaseMismatchError(PeftGraftError, ValueError):
    """A graft was trained on another base model than the one it is being applied to."""

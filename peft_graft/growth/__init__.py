"""Validation-gated growth: the Trainer callback, publishing, rollback and consolidation."""

from ..errors import BaseMismatchError, DriftError, GraftNotAcceptedError
from .callback import GraftGateCallback, save_adapter, train_until_decided
from .lifecycle import Consolidation, compose, consolidate, rollback
from .publish import HubTarget, push_accepted


__all__ = [
    "BaseMismatchError",
    "Consolidation",
    "DriftError",
    "GraftGateCallback",
    "GraftNotAcceptedError",
    "HubTarget",
    "compose",
    "consolidate",
    "push_accepted",
    "rollback",
    "save_adapter",
    "train_until_decided",
]

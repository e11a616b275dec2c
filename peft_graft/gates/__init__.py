"""Validation gates: explicit, composable decisions on whether a candidate graft may enter the model.

A candidate is always judged on the *composed* model (base + accepted grafts + candidate) against the same model
without it, on an acceptance set that was not used to train, stop or rank it.
"""

from .bootstrap import paired_bootstrap_ci
from .checks import BehaviourCheck, ExactRecomposition, FiniteWeights, ParameterBudget
from .context import GateContext, GrowthData
from .core import Decision, Gate, GateReport, GateResult, GateSet
from .gain import MinimumGain, Retention


__all__ = [
    "BehaviourCheck",
    "Decision",
    "ExactRecomposition",
    "FiniteWeights",
    "Gate",
    "GateContext",
    "GateReport",
    "GateResult",
    "GateSet",
    "GrowthData",
    "MinimumGain",
    "ParameterBudget",
    "Retention",
    "paired_bootstrap_ci",
]

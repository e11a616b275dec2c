"""peft-graft: graft adapters ΔW = s·A Φ B as a PEFT method.

Importing this package registers the GRAFT method with PEFT (in `peft_graft.tuners.graft`), so `get_peft_model`,
`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and transformers' `load_adapter` handle graft adapters like
LoRA ones. This top level is the core (tuner, `calibrate`, errors); the life-cycle packages build on it and are
imported by name: `peft_graft.gates`, `peft_graft.growth`, `peft_graft.registry`, `peft_graft.hub`,
`peft_graft.signing`, `peft_graft.export`. A graft model exports itself as a plain LoRA (`model.to_lora(out)`) and
blends adapters (`model.add_weighted_adapter`).

The import itself is light (the command line starts in a fraction of a second): registering with PEFT imports peft,
torch and transformers, which take seconds, so it happens when it is first needed: at once if peft is already
imported, otherwise right after the program's first ``import peft`` (transformers' `load_adapter` imports it too),
or when a tuner name such as `GraftConfig` is first used, whichever comes first.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import _registration
from ._lazy import lazy_attributes
from .errors import (
    AdapterFileError,
    BlendError,
    CalibrationRequiredError,
    ExportError,
    GraftConfigError,
    GraftRankError,
    NonFiniteCalibrationError,
    NonFiniteWeightsError,
    ParameterBudgetExceededError,
    PeftGraftError,
    ProjectionMismatchError,
    ShapeMismatchError,
    UnsupportedLayerError,
)


if TYPE_CHECKING:
    from .calibration import calibrate
    from .calibration_callback import CalibrateOnFirstSteps
    from .step_calibration import CalibratingSteps, calibrating_step
    from .tuners.graft import GRAFT_PEFT_TYPE, GraftConfig, GraftLayer, GraftModel, register_graft_method


__version__ = "0.2.0"

# Names that need torch/peft, loaded on first use.
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "calibrate": ".calibration",
        "calibrating_step": ".step_calibration",
        "CalibratingSteps": ".step_calibration",
        "CalibrateOnFirstSteps": ".calibration_callback",
        "GRAFT_PEFT_TYPE": ".tuners.graft",
        "GraftConfig": ".tuners.graft",
        "GraftLayer": ".tuners.graft",
        "GraftModel": ".tuners.graft",
        "register_graft_method": ".tuners.graft",
    },
)

_registration.register_when_peft_is_imported()

# A library logs, the application decides what is shown: silent unless the user configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "GRAFT_PEFT_TYPE",
    "AdapterFileError",
    "BlendError",
    "CalibrateOnFirstSteps",
    "CalibratingSteps",
    "CalibrationRequiredError",
    "ExportError",
    "GraftConfig",
    "GraftConfigError",
    "GraftLayer",
    "GraftModel",
    "GraftRankError",
    "NonFiniteCalibrationError",
    "NonFiniteWeightsError",
    "ParameterBudgetExceededError",
    "PeftGraftError",
    "ProjectionMismatchError",
    "ShapeMismatchError",
    "UnsupportedLayerError",
    "calibrate",
    "calibrating_step",
    "register_graft_method",
]

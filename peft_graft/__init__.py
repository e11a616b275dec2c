"""peft-graft: graft adapters ΔW = s·A Φ B as a PEFT method.

Importing this package registers the GRAFT method with PEFT (in `peft_graft.tuners.graft`), so `get_peft_model`,
`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and transformers' `load_adapter` handle graft adapters like
LoRA ones. This top level is the core (tuner, `calibrate`, errors); the life-cycle packages build on it and are
imported by name: `peft_graft.gates`, `peft_graft.growth`, `peft_graft.registry`, `peft_graft.hub`,
`peft_graft.signing`, `peft_graft.export`. A graft model exports itself as a plain LoRA (`model.to_lora(out)`) and
blends adapters (`model.add_weighted_adapter`).
"""

from .calibration import calibrate
from .errors import (
    AdapterFileError,
    BlendError,
    CalibrationRequiredError,
    ExportError,
    GraftConfigError,
    GraftRankError,
    NonFiniteWeightsError,
    ParameterBudgetExceededError,
    PeftGraftError,
    ProjectionMismatchError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from .tuners.graft import GRAFT_PEFT_TYPE, GraftConfig, GraftLayer, GraftModel, register_graft_method


__version__ = "0.2.0"

__all__ = [
    "GRAFT_PEFT_TYPE",
    "AdapterFileError",
    "BlendError",
    "CalibrationRequiredError",
    "ExportError",
    "GraftConfig",
    "GraftConfigError",
    "GraftLayer",
    "GraftModel",
    "GraftRankError",
    "NonFiniteWeightsError",
    "ParameterBudgetExceededError",
    "PeftGraftError",
    "ProjectionMismatchError",
    "ShapeMismatchError",
    "UnsupportedLayerError",
    "calibrate",
    "register_graft_method",
]

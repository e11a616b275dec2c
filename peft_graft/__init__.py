"""peft-graft: graft adapters ΔW = s·A Φ B as a PEFT method.

Importing this package registers the GRAFT method with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModelForCausalLM` and transformers' `load_adapter` handle graft adapters like LoRA ones.
"""

from .registration import GRAFT_PEFT_TYPE, register_graft_method


register_graft_method()

from .calibration import calibrate  # noqa: E402
from .errors import (  # noqa: E402
    AdapterFileError,
    CalibrationRequiredError,
    GraftConfigError,
    GraftRankError,
    NonFiniteWeightsError,
    ParameterBudgetExceededError,
    PeftGraftError,
    ProjectionMismatchError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from .tuners.graft import GraftConfig, GraftLayer, GraftModel  # noqa: E402


__version__ = "0.1.0"

__all__ = [
    "GRAFT_PEFT_TYPE",
    "AdapterFileError",
    "CalibrationRequiredError",
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

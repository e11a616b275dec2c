"""The GRAFT tuner: config, layers and model, laid out like PEFT's own tuners, registered with PEFT on import."""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from . import peft_hooks
from .attention import MultiheadAttention
from .compat import relax_transformers_peft_requirement
from .config import GraftConfig
from .conv import ConvNd
from .embedding import Embedding
from .layer import GraftLayer
from .linear import GraftModule, Linear
from .model import GraftModel
from .parameter import ParamWrapper
from .peft_type import GRAFT_NAME, GRAFT_PEFT_TYPE, GRAFT_PREFIX


def register_graft_method() -> None:
    """Register `GraftConfig` / `GraftModel` with PEFT and install the save/load hooks (idempotent)."""
    peft_hooks.install()
    relax_transformers_peft_requirement()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(GRAFT_PEFT_TYPE) is not GraftModel:
        register_peft_method(name=GRAFT_NAME, config_cls=GraftConfig, model_cls=GraftModel, prefix=GRAFT_PREFIX)


register_graft_method()

__all__ = [
    "GRAFT_PEFT_TYPE",
    "ConvNd",
    "Embedding",
    "GraftConfig",
    "GraftLayer",
    "GraftModel",
    "GraftModule",
    "Linear",
    "MultiheadAttention",
    "ParamWrapper",
    "register_graft_method",
]

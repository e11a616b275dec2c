"""The GRAFT tuner: config, layers and model, laid out like PEFT's own tuners."""

from .config import GraftConfig
from .layer import GraftLayer, Linear
from .model import GraftModel


__all__ = ["GraftConfig", "GraftLayer", "GraftModel", "Linear"]

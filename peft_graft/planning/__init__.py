"""Memory planning: what fine-tuning a model with a graft or LoRA needs, from its config alone."""

from .activations import ActivationEstimate, AdapterSite, decoder_activations
from .estimate import AdapterMemory, MemoryEstimate, estimate_memory, nf4_bytes
from .measure import saved_activation_bytes
from .presets import PRESETS, preset_config
from .report import estimate_lines
from .source import resolve_config
from .spec import parse_graft_spec


__all__ = [
    "PRESETS",
    "ActivationEstimate",
    "AdapterMemory",
    "AdapterSite",
    "MemoryEstimate",
    "decoder_activations",
    "estimate_lines",
    "estimate_memory",
    "nf4_bytes",
    "parse_graft_spec",
    "preset_config",
    "resolve_config",
    "saved_activation_bytes",
]

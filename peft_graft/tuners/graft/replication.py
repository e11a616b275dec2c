"""Layer replication (LoRA's ``layer_replication``): grow a model's depth with copies of its layers that share the
base weights, each copy with grafts of its own.

PEFT's `replicate_layers` rebuilds the layer list in place. Here it is made undoable, so that a config the later
checks refuse leaves the model as it was, and it runs once per model: every adapter on a replicated model describes
the same layer map (an adapter added without one inherits it, so that loading it replicates the base the same way).
"""

from __future__ import annotations

from collections.abc import Callable

from peft.tuners.tuners_utils import replicate_layers
from torch import nn

from ...errors import GraftConfigError
from .config import GraftConfig


LayerMap = list[list[int]]


def apply_layer_replication(
    model: nn.Module, config: GraftConfig, applied: LayerMap | None
) -> Callable[[], None] | None:
    """Replicate ``model``'s layers as ``config`` asks, unless ``applied`` (the map already in place) says it is done;
    afterwards ``config.layer_replication`` is the map in place.

    Returns the function that restores the model as it was, when this call replicated it.
    """
    wanted = config.layer_replication
    if applied is not None:
        if wanted is not None and wanted != applied:
            raise GraftConfigError(
                f"This model's layers are already replicated with layer_replication={applied}; an adapter with "
                f"layer_replication={wanted} would replicate them again. Give every adapter the same map (or none)."
            )
        config.layer_replication = applied
        return None
    if wanted is None:
        return None
    restore = _snapshot(model)
    try:
        replicate_layers(model, [tuple(pair) for pair in wanted])
    except (ValueError, IndexError) as err:
        restore()
        raise GraftConfigError(
            f"layer_replication={wanted} cannot be applied to this model: {err}. Each [start, end) range must lie "
            "within the model's layer list (Llama-, BERT- or Falcon-style models)."
        ) from err
    return restore


def _snapshot(model: nn.Module) -> Callable[[], None]:
    """What `replicate_layers` replaces: every layer list and every config's ``num_hidden_layers``."""
    lists = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.ModuleList)
    ]
    configs = [
        (module.config, module.config.num_hidden_layers)
        for module in model.modules()
        if hasattr(getattr(module, "config", None), "num_hidden_layers")
    ]

    def restore() -> None:
        for parent, name, child in lists:
            setattr(parent, name, child)
        for config, layers in configs:
            config.num_hidden_layers = layers

    return restore


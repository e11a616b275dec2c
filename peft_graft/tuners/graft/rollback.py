"""Exact rollback of a failed graft load: the caller's model is left as it was, module tree and all.

PEFT injects adapter layers into the model *before* it reads the adapter's weights, so a load that fails on the
weights (a shape or projection mismatch, a corrupt file) used to leave graft layers behind in the caller's base
model, sometimes with a trained Φ already in them. `ModelSnapshot` records what a load may change (which module
object sits at each path, the adapters of existing graft layers, which parameters train, train/eval mode, the
``peft_config``, ``model_tags`` and ``_hf_peft_config_loaded`` attributes) and puts all of it back. Only loads that
injected graft layers are rolled back: other PEFT methods are left to PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layer import GraftLayer


_MISSING = object()
_ATTRIBUTES = ("peft_config", "model_tags", "_hf_peft_config_loaded")  # what PEFT and transformers set on the model


@dataclass
class ModelSnapshot:
    """What a PEFT load can change in ``model``, taken before the load."""

    model: nn.Module
    modules: dict[str, nn.Module]
    graft_adapters: dict[int, set[str]]  # id of an existing graft layer -> its adapters
    requires_grad: dict[str, bool]
    training: dict[str, bool]  # path -> train/eval mode (loads without is_trainable switch the model to eval)
    attributes: dict[str, Any]

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        modules = dict(model.named_modules(remove_duplicate=False))
        attributes = {}
        for name in _ATTRIBUTES:
            value = model.__dict__.get(name, _MISSING)
            attributes[name] = value.copy() if isinstance(value, (dict, list)) else value
        return cls(
            model,
            modules,
            {id(m): set(m.graft_phi) for m in modules.values() if isinstance(m, GraftLayer)},
            {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
            {path: m.training for path, m in modules.items()},
            attributes,
        )

    def _gained(self, module: nn.Module, adapter_name: str) -> bool:
        return adapter_name in module.graft_phi and adapter_name not in self.graft_adapters.get(id(module), ())

    def injected_grafts(self, adapter_name: str) -> bool:
        """Whether graft layers carrying ``adapter_name`` (or any new adapter layer: a damaged graft folder whose
        config names another method) appeared since the snapshot."""
        known = set(map(id, self.modules.values()))
        return any(
            isinstance(m, GraftLayer) and self._gained(m, adapter_name)
            or isinstance(m, BaseTunerLayer) and id(m) not in known
            for m in self.model.modules()
        )

    def restore(self, adapter_name: str) -> None:
        """Put every module object back at its path, drop ``adapter_name`` from graft layers that existed before,
        and restore trainability, train/eval mode and the attributes PEFT and transformers set on the model."""
        for path, module in sorted(self.modules.items(), key=lambda item: item[0].count(".")):
            if path:
                parent_path, _, child = path.rpartition(".")
                self.modules[parent_path]._modules[child] = module
        for module in self.modules.values():
            if isinstance(module, GraftLayer) and self._gained(module, adapter_name):
                module.delete_adapter(adapter_name)
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            if name in self.requires_grad:
                parameter.requires_grad_(self.requires_grad[name])
        for path, module in self.modules.items():
            module.training = self.training[path]
        for name, value in self.attributes.items():
            if value is _MISSING:
                self.model.__dict__.pop(name, None)
            else:
                self.model.__dict__[name] = value

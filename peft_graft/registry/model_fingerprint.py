"""Fingerprint of a base model's weights, so a graft is only ever applied to the base it was trained on.

sha256 over the state dict in sorted name order; each tensor contributes ``name, dtype, shape, byte count`` and
its raw bytes (little-endian, as on every platform torch supports). PEFT wrappers are stripped: for a `PeftModel`
(or a model with graft/LoRA layers injected) the fingerprint equals that of the plain base model, as long as the
adapters are NOT merged. A merged adapter changes the base weights and therefore the fingerprint (a warning says
so); unmerging restores the weights only up to float rounding, so fingerprint the base before merging.
Non-persistent buffers (e.g. rotary tables) are not part of a state dict and do not count; tied weights count under
each name.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from ..errors import FingerprintError


_SCHEME = b"peft-graft/base-model-fingerprint/v1\n"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _wrappers(model: torch.nn.Module) -> dict[str, str]:
    """Module name of each PEFT wrapper -> the child that holds the original module."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            found[name] = "base_layer"
            if getattr(module, "merged", False):
                warnings.warn(
                    f"{name} has a merged adapter: the fingerprint describes base + merged adapter, not the original "
                    "base. Unmerge first to fingerprint the base model.",
                    stacklevel=3,
                )
        elif isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save, trainable tokens
            found[name] = "original_module"
    return found


def _base_name(key: str, wrappers: dict[str, str]) -> str | None:
    """State-dict key as in the unwrapped model, or None for adapter state."""
    parts = key.split(".")
    kept = []
    for i, part in enumerate(parts):
        inner = wrappers.get(".".join(parts[:i]))
        if inner is None:
            kept.append(part)
        elif part != inner:
            return None
    return ".".join(kept)


def base_model_fingerprint(model: torch.nn.Module) -> str:
    """Hex sha256 of the base model's weights (see the module docstring for what is and is not included)."""
    model = _unwrap(model)
    wrappers = _wrappers(model)
    state = {}
    for key, tensor in model.state_dict().items():
        name = _base_name(key, wrappers)
        if name is not None:
            state[name] = tensor
    digest = hashlib.sha256(_SCHEME)
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.device.type == "meta":
            raise FingerprintError(
                f"{name} is on the meta device (offloaded or not loaded); load the weights before fingerprinting."
            )
        tensor = tensor.to("cpu").contiguous().reshape(-1)
        try:
            raw = tensor.view(torch.uint8).numpy()
        except (RuntimeError, TypeError) as err:
            raise FingerprintError(f"Cannot read the bytes of {name} ({tensor.dtype}): {err}") from err
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(state[name].shape)}\0{raw.nbytes}\n".encode())
        digest.update(raw.data)
    return digest.hexdigest()

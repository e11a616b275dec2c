"""Grafts on layers whose forward reads a weight directly instead of calling a linear map's forward
(`nn.MultiheadAttention`, transformers' MoE expert stacks, any module named through ``target_parameters``).

There is no output to add a graft's to, so the layer computes the effective weight W + ΔW (differentiable in Φ) and
runs the base layer's own forward with it in the parameter's slot; the original goes back afterwards, whatever
happens. Mixed adapter batches are refused: one weight serves the whole batch (LoRA refuses them on these layers too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from .linear import GraftModule


class SwapsEffectiveWeights(GraftModule):
    """The forward of a graft that swaps W + ΔW into its base layer; subclasses say which weights
    (`_effective_weights`)."""

    # What a mixed adapter batch raises: LoRA's error type for the same layer kind, so callers that catch it still do.
    mixed_batch_error: type[Exception] = TypeError

    def _effective_weights(self, adapters: list[str]) -> AbstractContextManager[None]:
        """Within the block the base layer computes with W + ΔW of ``adapters``."""
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # arguments passed on as given: callers name them (MultiheadAttention's ``query=``, ``key=``, ``value=``)
        if kwargs.pop("adapter_names", None) is not None:
            raise self.mixed_batch_error(
                f"graft.{type(self).__name__} does not support mixed adapter batches (nor does LoRA's)."
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        active = [adapter for adapter in self.active_adapters if adapter in self.graft_phi]
        if self.merged or not active:
            return self.base_layer(*args, **kwargs)
        for adapter in active:
            self._check_ready(adapter)
        with self._effective_weights(active):
            return self.base_layer(*args, **kwargs)


@contextmanager
def replaced(module: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """``module.<name>`` reads ``value`` within the block; the original goes back into the same slot after.

    The original is usually a registered Parameter, but FSDP (``use_orig_params``) puts plain tensor views there
    during its forward, so it is moved by slot rather than re-registered."""
    slots = module._parameters if name in module._parameters else module.__dict__
    original = slots.pop(name)
    module.__dict__[name] = value
    try:
        yield
    finally:
        module.__dict__.pop(name, None)
        slots[name] = original

"""Mixed adapter batches: ``model(input_ids, adapter_names=["alice", "__base__", "bob"])`` runs each row of one batch
through its own graft (or none), as PEFT's LoRA does.

PEFT's `PeftModel.forward`/``generate`` enter the tuner's ``_enable_peft_forward_hooks`` with the call's keyword
arguments and then drop ``adapter_names`` before calling the base model; without this module a graft model would
silently run every row through the active adapter. Here the names are checked once for the whole model (training
mode, unknown adapters: PEFT's errors and messages) and handed to every graft layer and ``modules_to_save`` wrapper
by forward pre-hooks; with beam search each name is repeated for its beams, except in an encoder, which sees the
un-repeated batch. Each graft layer then adds every adapter's ΔW to its own rows only (`GraftLayer.forward`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

from peft.utils import AuxiliaryTrainingWrapper
from torch import nn


BASE = "__base__"  # PEFT's name for "no adapter" in ``adapter_names``


def _inject(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple[tuple, dict]:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _encoder(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder model (transformers 5 returns the model itself when there is none)."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    return None if encoder is model else encoder


def check_adapter_names(model: nn.Module, adapter_names: Sequence[str], layer_type: type) -> None:
    """PEFT's checks of a mixed batch: not while training, and every name (bar ``__base__``) an adapter of ``model``."""
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    known: set[str] = set()
    for module in model.modules():
        if isinstance(module, layer_type):
            known |= set(module.graft_phi)
    unknown = {name for name in adapter_names if name != BASE} - known
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")


@contextmanager
def mixed_batch_hooks(model: nn.Module, layer_type: type, **kwargs: Any) -> Iterator[None]:
    """Within this block, the graft layers (``layer_type``) and ``modules_to_save`` wrappers of ``model`` receive the
    call's ``adapter_names`` (``kwargs`` are the forward/generate keyword arguments; ``num_beams`` is read from
    them). Nothing is done without ``adapter_names``."""
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        yield
        return
    check_adapter_names(model, adapter_names, layer_type)
    num_beams = kwargs.get("num_beams")
    per_row = list(adapter_names)
    if isinstance(num_beams, int) and num_beams > 1:
        per_row = [name for name in adapter_names for _ in range(num_beams)]  # generate repeats each row per beam
    handles = []
    receivers = (layer_type, AuxiliaryTrainingWrapper)
    try:
        for module in model.modules():
            if isinstance(module, receivers):
                hook = partial(_inject, adapter_names=per_row)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        encoder = _encoder(model.model) if per_row != list(adapter_names) and hasattr(model, "model") else None
        for module in encoder.modules() if encoder is not None else ():
            if isinstance(module, receivers):  # registered last, so it runs last: the encoder's rows are not repeated
                hook = partial(_inject, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()

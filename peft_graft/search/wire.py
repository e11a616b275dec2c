"""What the processes of a distributed search send each other, as bytes: a JSON header and safetensors tensors.

Nothing is pickled: a message is ``len(header)`` (8 bytes, little endian), the UTF-8 JSON header, then a safetensors
buffer (absent when there are no tensors). Probe results carry the trained adapter and its AdamW state, so the
coordinator trains a winner on exactly where the worker left it; a composition change carries every tensor of the
new adapters (frozen projections too), so every process ends a stage with bitwise the same model.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Sequence
from typing import Any

import torch
from peft import PeftConfig
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from ..errors import DistributedSearchError
from ..tuners.graft import GraftConfig, GraftLayer
from .training import adapter_parameters


_LENGTH = struct.Struct("<Q")


def encode(header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    text = json.dumps(header, default=_json_default).encode("utf-8")
    body = save_tensors({k: t.detach().contiguous() for k, t in tensors.items()}) if tensors else b""
    return _LENGTH.pack(len(text)) + text + body


def decode(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        (length,) = _LENGTH.unpack_from(data)
        header = json.loads(data[_LENGTH.size : _LENGTH.size + length].decode("utf-8"))
        body = data[_LENGTH.size + length :]
        return header, load_tensors(body) if body else {}
    except (struct.error, ValueError, KeyError, SafetensorError) as err:
        raise DistributedSearchError(
            f"A message between search processes is damaged ({err}); are all processes running the same peft-graft?"
        ) from err


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def adapter_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Every tensor of graft ``adapter`` (trainable Φ and frozen buffers), by its name in ``model``."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: t for name, t in named if f".{adapter}." in f"{name}." and "graft_" in name}


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite graft ``adapter``'s tensors in ``model`` with ``tensors`` (names as `adapter_tensors` gives them).

    The adapter is then complete, as after loading its file: add it under `add_received` so that its projections
    are not computed first only to be overwritten here (`layer.loading_from_file`)."""
    own = adapter_tensors(model, adapter)
    if set(own) != set(tensors):
        raise DistributedSearchError(
            f"Adapter {adapter!r} has tensors {sorted(set(own) ^ set(tensors))[:3]} on one process and not on the "
            "other: the processes built different models. Launch every process with the same model and settings."
        )
    for name, t in own.items():
        t.copy_(tensors[name])
    for layer in model.modules():  # every tensor came: nothing is left to compute, calibrate or load from a file
        if isinstance(layer, GraftLayer) and adapter in layer.graft_pending:
            layer.graft_pending[adapter] = ()


def graft_config_to_dict(config: PeftConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), default=_json_default))


def graft_config_from_dict(data: dict[str, Any]) -> GraftConfig:
    return PeftConfig.from_peft_type(**data)


def optimizer_to_message(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """AdamW's state as (param groups, per-parameter state tensors named ``<param index>.<key>``)."""
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return {"param_groups": state["param_groups"]}, tensors


def optimizer_from_message(
    params: Sequence[nn.Parameter], header: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> torch.optim.AdamW:
    """The AdamW `train_adapter` would hand back after the same steps on ``params`` (see `optimizer_to_message`)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in header["param_groups"]]
    optimizer = torch.optim.AdamW(params, lr=groups[0]["lr"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return optimizer


def probe_state(model: nn.Module, adapter: str, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """A probed adapter and its optimizer as one message body (tensors prefixed ``adapter/`` and ``optimizer/``)."""
    groups, opt_tensors = optimizer_to_message(optimizer)
    tensors = {f"adapter/{k}": v for k, v in adapter_tensors(model, adapter).items()}
    tensors.update({f"optimizer/{k}": v for k, v in opt_tensors.items()})
    return {"optimizer": groups}, tensors


def restore_probe(model: nn.Module, adapter: str, header: dict, tensors: dict) -> torch.optim.AdamW:
    """Load what `probe_state` sent into ``adapter`` (already added to ``model``); return its optimizer."""
    part = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("adapter/")}
    load_adapter_tensors(model, adapter, part)
    opt = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("optimizer/")}
    return optimizer_from_message(adapter_parameters(model, adapter), header["optimizer"], opt)

"""Fingerprints: which base model a graft was trained on and which data it saw, as content hashes.

A graft is only ever applied to the base it was trained on, and a registry record says exactly which examples were
used. Both hashes start with a scheme line (``peft-graft/<kind>-fingerprint/v1``) so a future encoding cannot collide
with today's, and neither depends on the process, machine, cache paths or in-process ids.

Base model: sha256 over the state dict in sorted name order; each tensor contributes ``name, dtype, shape, byte
count`` and its raw bytes (little-endian, as on every platform torch supports). PEFT wrappers are stripped: for a
`PeftModel` (or a model with graft/LoRA layers injected) the fingerprint equals that of the plain base model, as long
as the adapters are NOT merged. A merged adapter changes the base weights and therefore the fingerprint (a warning
says so); unmerging restores the weights only up to float rounding, so fingerprint the base before merging.
Non-persistent buffers (e.g. rotary tables) are not part of a state dict and do not count; tied weights count under
each name.

Data: the hash covers content only (values, column names and types). Supported: `datasets.Dataset` (after any
select/shuffle: the order of rows counts), `DatasetDict` and plain dicts of supported values, torch tensors, numpy
arrays, and (nested) lists of str/int/float/bool/None or of tensors.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from ..errors import FingerprintError
from .records import canonical_json


_MODEL_SCHEME = b"peft-graft/base-model-fingerprint/v1\n"
_DATASET_SCHEME = b"peft-graft/dataset-fingerprint/v1\n"
_DATASET_BATCH_ROWS = 1024  # fixed, so batch boundaries (and hence the byte stream) never depend on the caller


# Base model ----------------------------------------------------------------------------------------------------------


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
    digest = hashlib.sha256(_MODEL_SCHEME)
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


# Data ----------------------------------------------------------------------------------------------------------------


def dataset_fingerprint(data: Any) -> str:
    """Hex sha256 of ``data``'s content; equal content gives equal fingerprints across processes."""
    digest = hashlib.sha256(_DATASET_SCHEME)
    _feed(digest, data)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Append a self-delimiting, typed encoding of ``value`` (tags keep e.g. a tensor and a list apart)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise FingerprintError("A meta tensor has no data to fingerprint.")
        _feed_array(
            digest,
            b"tensor",
            str(value.dtype),
            value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy(),
            tuple(value.shape),
        )
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise FingerprintError("numpy object arrays have no stable bytes; convert to a list or a typed array.")
        _feed_array(
            digest, b"ndarray", value.dtype.str, np.ascontiguousarray(value).reshape(-1).view(np.uint8), value.shape
        )
    elif _is_datasets(value, "Dataset"):
        _feed_dataset(digest, value)
    elif _is_datasets(value, "IterableDataset") or _is_datasets(value, "IterableDatasetDict"):
        raise FingerprintError(
            "A streaming (Iterable) dataset cannot be fingerprinted without consuming it; materialise the part you "
            "use (e.g. Dataset.from_list(list(ds.take(n)))) and fingerprint that."
        )
    elif isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise FingerprintError("Only mappings with str keys can be fingerprinted.")
        digest.update(f"map\0{len(value)}\n".encode())
        for key in sorted(value):
            digest.update(f"{key}\n".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        try:  # fast path: plain JSON values (C encoder)
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_refuse)
            _feed_text(digest, b"json", text)
        except TypeError:  # tensors or datasets inside: encode element by element
            digest.update(f"list\0{len(value)}\n".encode())
            for item in value:
                _feed(digest, item)
    elif value is None or isinstance(value, (str, int, float, bool)):
        _feed_text(digest, b"json", json.dumps(value, ensure_ascii=False))
    elif isinstance(value, np.generic):
        _feed(digest, value.item())
    else:
        raise FingerprintError(
            f"Cannot fingerprint a {type(value).__module__}.{type(value).__name__}; pass a datasets.Dataset, a "
            "tensor, a numpy array, or a list of str/int."
        )


def _feed_text(digest: Any, tag: bytes, text: str) -> None:
    raw = text.encode()
    digest.update(tag + f"\0{len(raw)}\n".encode() + raw)


def _refuse(value: Any) -> Any:
    raise TypeError(type(value).__name__)


def _feed_array(digest: Any, tag: bytes, dtype: str, raw: np.ndarray, shape: tuple[int, ...]) -> None:
    digest.update(tag + f"\0{dtype}\0{tuple(shape)}\0{raw.nbytes}\n".encode())
    digest.update(raw.data)


def _is_datasets(value: Any, class_name: str) -> bool:
    """isinstance check that never imports `datasets` (if it is not imported, ``value`` cannot be one)."""
    module = sys.modules.get("datasets")
    cls = getattr(module, class_name, None) if module is not None else None
    return cls is not None and isinstance(value, cls)


def _feed_dataset(digest: Any, dataset: Any) -> None:
    """Schema, then rows in their current order, column by column in fixed-size Arrow batches."""
    header = {"features": dataset.features.to_dict(), "columns": list(dataset.column_names), "rows": dataset.num_rows}
    _feed_text(digest, b"dataset", canonical_json(header))
    for batch in dataset.with_format("arrow").iter(batch_size=_DATASET_BATCH_ROWS):
        for name in batch.column_names:
            _feed_arrow(digest, batch.column(name).combine_chunks())


def _feed_arrow(digest: Any, column: Any) -> None:
    """One Arrow column: raw numbers for (lists of) numbers without nulls, canonical JSON for everything else."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if _numeric(kind) and column.null_count == 0:
        values = column.to_numpy(zero_copy_only=False)
        _feed_array(digest, b"arrow-values", values.dtype.str, values.view(np.uint8), values.shape)
    elif (
        (pa.types.is_list(kind) or pa.types.is_large_list(kind))
        and _numeric(kind.value_type)
        and column.null_count == 0
        and column.flatten().null_count == 0
    ):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype("<i8")
        values = column.flatten().to_numpy(zero_copy_only=False)
        _feed_array(digest, b"arrow-list-lengths", lengths.dtype.str, lengths.view(np.uint8), lengths.shape)
        _feed_array(digest, b"arrow-list-values", values.dtype.str, values.view(np.uint8), values.shape)
    else:
        _feed_text(
            digest,
            b"arrow-json",
            json.dumps(column.to_pylist(), separators=(",", ":"), ensure_ascii=False, default=_scalar_text),
        )


def _numeric(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _scalar_text(value: Any) -> str:
    """Stable text for the non-JSON scalars Arrow returns (bytes, dates, decimals)."""
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if callable(isoformat) else str(value)

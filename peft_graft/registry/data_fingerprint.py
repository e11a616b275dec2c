"""Fingerprint of training and evaluation data, so a registry record says exactly which examples were used.

The hash covers content only (values, column names and types), never cache-file paths or in-process ids, so it is
the same in every process and on every machine for the same data. Supported: `datasets.Dataset` (after any
select/shuffle: the order of rows counts), `DatasetDict` and plain dicts of supported values, torch tensors,
numpy arrays, and (nested) lists of str/int/float/bool/None or of tensors.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import FingerprintError
from .canonical import canonical_json


_SCHEME = b"peft-graft/dataset-fingerprint/v1\n"
_BATCH_ROWS = 1024  # fixed, so batch boundaries (and hence the byte stream) never depend on the caller


def dataset_fingerprint(data: Any) -> str:
    """Hex sha256 of ``data``'s content; equal content gives equal fingerprints across processes."""
    digest = hashlib.sha256(_SCHEME)
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
    for batch in dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS):
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

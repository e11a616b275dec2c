"""What `SEWL.step` and `SEWL.score` read: token ids, as a tensor or a dict with ``input_ids`` and optional
``attention_mask``/``labels``, checked before the model sees them so a bad batch fails typed and changes nothing."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..calibration import outside_vocabulary
from ..errors import SEWLInputError


Batch = torch.Tensor | Mapping[str, torch.Tensor]


def prepare_batch(
    batch: Batch, vocab_size: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each [batch, tokens] on ``device``; padding (mask 0) is not predicted."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise SEWLInputError(f"A SEWL batch given as a dict needs 'input_ids'; it has {sorted(map(str, batch))}.")
        input_ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    else:
        input_ids, mask, labels = batch, None, None
    input_ids = _in_vocabulary("input_ids", _token_tensor("input_ids", input_ids), vocab_size)
    mask = torch.ones_like(input_ids) if mask is None else _same_shape("attention_mask", _mask(mask), input_ids)
    if labels is None:
        labels = input_ids.masked_fill(mask == 0, -100)
    else:
        labels = _same_shape("labels", _token_tensor("labels", labels), input_ids)
        _in_vocabulary("labels", labels[labels != -100], vocab_size)  # -100: not predicted
    return input_ids.to(device), mask.to(device), labels.to(device)


def _token_tensor(name: str, value: object, what: str = "token ids") -> torch.Tensor:
    """``value`` as a [batch, tokens] integer tensor (a single sequence [tokens] gets a batch axis)."""
    if not isinstance(value, torch.Tensor) or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise SEWLInputError(f"{name} must be an integer tensor of {what}, got {kind}.")
    if value.dim() not in (1, 2):
        raise SEWLInputError(f"{name} must be [tokens] or [batch, tokens], got shape {tuple(value.shape)}.")
    return value if value.dim() == 2 else value.unsqueeze(0)


def _mask(value: object) -> torch.Tensor:
    """An attention mask as [batch, tokens] 0/1 integers: tokenizers give int64, and bool masks (as many pipelines
    build them) mean the same thing; anything else (a float or additive mask, other values) is refused."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        value = value.long()
    mask = _token_tensor("attention_mask", value, what="0/1 integers or booleans")
    if ((mask != 0) & (mask != 1)).any():
        raise SEWLInputError(f"attention_mask must hold only 0 and 1, got values {sorted(mask.unique().tolist())[:8]}.")
    return mask


def _in_vocabulary(name: str, ids: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    problem = outside_vocabulary(ids, vocab_size)
    if problem:
        raise SEWLInputError(f"{name} {problem}.")
    return ids


def _same_shape(name: str, tensor: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    if tensor.shape != input_ids.shape:
        raise SEWLInputError(f"{name} has shape {tuple(tensor.shape)}, input_ids {tuple(input_ids.shape)}.")
    return tensor

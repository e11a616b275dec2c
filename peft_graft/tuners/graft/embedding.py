"""Grafts on embedding tables, read as LoRA reads them: the table (num_embeddings × dim) is the out×in matrix
dim × num_embeddings that maps a one-hot token to its vector."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GraftConfig
from .linear import ForwardsBaseSettings, GraftModule


class Embedding(ForwardsBaseSettings, GraftModule):
    """A graft on `nn.Embedding` (and subclasses that scale their output, such as Gemma's).

    B x of a one-hot x is a column of B, so the forward looks up B's columns by token id; the table's in×out storage
    is what ``fan_in_fan_out`` describes, so merges write ΔW transposed, as for GPT-2's `Conv1D`. An ``embed_scale``
    the base applies to its output applies to the graft's contribution too, so merging stays exact.
    """

    forwarded_attributes = frozenset(
        ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    )

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: GraftConfig, module_name: str, **kwargs: Any
    ) -> None:
        super().__init__(base_layer, adapter_name, config, module_name, fan_in_fan_out=True, **kwargs)

    def _project_input(self, x: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # max_norm is not passed on: F.embedding would renormalise the rows of B.T in place.
        h = F.embedding(x, B.T, padding_idx=self.get_base_layer().padding_idx)
        scale = self._get_embed_scale()
        return h if scale is None else h * scale.to(h.dtype)

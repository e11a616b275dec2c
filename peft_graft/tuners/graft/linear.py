"""Graft layers as modules: merge, unmerge and the forward shared by every kind of base layer, and the linear kind.

`GraftLayer` holds the per-adapter state and the math; the other kinds (`embedding`, `conv`, `attention`) subclass
`GraftModule` with their own reading of the weight and of the input.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ...errors import NonFiniteWeightsError
from .config import GraftConfig
from .layer import GraftLayer


class ForwardsBaseSettings:
    """Mixed into the kinds whose callers read settings off the module they call (Whisper reads ``conv1.stride``):
    the names in ``forwarded_attributes`` are answered by the base layer. Linear grafts need none, so their hot path
    keeps nn.Module's own attribute lookup."""

    forwarded_attributes: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in type(self).forwarded_attributes:
                raise
            return getattr(self.get_base_layer(), name)


class GraftModule(nn.Module, GraftLayer):
    """A graft layer as a module: merge, unmerge and the forward, for every kind of base layer.

    The kinds differ only in how the base weight reads as an out×in matrix and how an input reaches graft space
    (`GraftLayer._out_in`, `_project_input`, `_features_last`): `Linear` here, `embedding.Embedding`, `conv.ConvNd`;
    `attention.MultiheadAttention` also replaces the forward, since its base never calls a linear map's.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: GraftConfig,
        module_name: str,
        fan_in_fan_out: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        GraftLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    # ------------------------------------------------------------------ merge / unmerge / forward

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or named) adapters into the base weight, in order.

        With ``safe_merge`` the merged weight is computed on a copy and checked for NaN/Inf first; the base weight is
        only replaced when it is finite. Quantized (bitsandbytes) bases are dequantized, merged and requantized,
        which is lossy (a warning says so): `GraftModel.merge_and_dequantize` is the exact path.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if self.quantization_backend is not None:
            warnings.warn(
                "Merging graft adapters into quantized weights dequantizes, adds ΔW and requantizes: the merged model "
                "differs from the unmerged one by that rounding (about 0.1 in the logits of a 4-bit tiny Llama). For "
                "an exact merge use `model.merge_and_dequantize()`, which returns a plain model with the grafts "
                "merged into dequantized weights.",
                UserWarning,
                stacklevel=3,
            )
        steps = self._merge_steps(adapter_names)
        if safe_merge:
            self._check_finite(steps)
        if steps:  # one write (one requantization on quantized bases), whatever the number of adapters
            self.set_base_weight(steps[-1][1])
            self.merged_adapters.extend(adapter for adapter, _ in steps)

    def _merge_steps(self, adapter_names: list[str]) -> list[tuple[str, torch.Tensor]]:
        """The base weight (layout and dtype of the stored one) after each adapter is merged in turn; nothing is
        written. Output-mode grafts act on the weight merged so far, so the order is the merge order."""
        base = self.get_base_weight()
        W = self._out_in(base).float()
        steps = []
        for adapter in adapter_names:
            if adapter not in self.graft_phi:
                continue
            self._check_ready(adapter)
            merged = self._base_layout(W + self.delta_out_in(adapter, W)).to(base.dtype).contiguous()
            steps.append((adapter, merged))
            W = self._out_in(merged).float()  # go on from the rounded weight that would be stored
        return steps

    def _check_finite(self, steps: list[tuple[str, torch.Tensor]]) -> None:
        for adapter, merged in steps:
            if not torch.isfinite(merged).all():
                raise NonFiniteWeightsError(
                    # PEFT's wording first (callers match it), then where and what to do
                    f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken: merging it into "
                    f"{self.module_name!r} would write NaN/Inf into the base weights; no base weight was changed. "
                    "Check Φ for NaN/Inf and retrain or reload it."
                )

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise `NonFiniteWeightsError` if merging would write NaN/Inf here; changes nothing. `GraftModel` runs it
        on every layer before a safe merge touches any, so a safe merge is all or nothing."""
        names = self.active_adapters if adapter_names is None else adapter_names
        self._check_finite(self._merge_steps([a for a in names if a not in self.merged_adapters]))

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.graft_phi:
                continue
            base = self.get_base_weight()
            W = self._remove_delta(adapter, self._out_in(base).float())
            self.set_base_weight(self._base_layout(W).to(base.dtype).contiguous())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)  # a mixed batch (`mixed_batch`): one adapter per row
        if adapter_names is not None:
            adapter_names = self._rows_of_mixed_batch(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        if adapter_names is not None:
            return self._mixed_batch_deltas(x, result, adapter_names)
        for adapter in self.active_adapters:
            if adapter not in self.graft_phi:
                continue
            recorder = self.graft_recorders.get(adapter)
            if recorder is not None and not recorder.contributes:  # calibrating: observe, contribute nothing
                result = recorder.observe(x, self._pre_bias(result), result)
                continue
            self._check_ready(adapter)
            if recorder is None:
                result = self._add_graft(adapter, x, result)
            else:  # refining calibrated projections: act as usual and record the gradient at the effective weight
                pre_bias = self._pre_bias(result)
                result = recorder.observe(x, pre_bias, self._add_graft(adapter, x, result))
        return result

    def _rows_of_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> list[str]:
        """The adapter of each row of ``x``, checked as PEFT checks a mixed batch (with its messages).

        One name per sample. A layer that sees the batch's tokens flattened into rows ([B·T, d], as OPT's MLP does)
        gets each sample's name on its T consecutive rows, where PEFT's LoRA refuses the batch.
        """
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        if len(x) == len(adapter_names):
            return adapter_names
        if x.dim() == 2 and adapter_names and len(x) % len(adapter_names) == 0:
            tokens = len(x) // len(adapter_names)
            return [name for name in adapter_names for _ in range(tokens)]
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )

    def _mixed_batch_deltas(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """``result`` (the base output) plus, on each row, the ΔW of the adapter ``adapter_names`` names for it: what
        that row alone gives with only that adapter active (``__base__``, or an adapter this layer lacks: none)."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(row)
        update = result
        for adapter, indices in rows.items():
            if adapter not in self.graft_phi:
                continue
            self._check_ready(adapter)
            index = torch.tensor(indices, device=x.device)
            delta = self._graft_delta(adapter, x.index_select(0, index), result.index_select(0, index))
            update = update.index_add(0, index, delta.to(result.dtype))
        return update

    def __repr__(self) -> str:
        return "graft." + super().__repr__()


class Linear(GraftModule):
    """A graft on `nn.Linear`, transformers' `Conv1D` or a bitsandbytes `Linear4bit` / `Linear8bitLt`."""

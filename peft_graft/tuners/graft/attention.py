"""Grafts on `torch.nn.MultiheadAttention`, which LoRA also wraps.

Its forward multiplies by ``in_proj_weight`` (3E×E, query/key/value stacked) and by ``out_proj.weight`` directly,
never calling a Linear's forward, so the graft swaps the effective weights W + ΔW in (`swap`). ``out_proj`` gets a
graft of its own (a graft `Linear` nested in the attention, as LoRA nests one); both are created, merged, saved and
deleted together.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .config import GraftConfig
from .linear import ForwardsBaseSettings, Linear
from .swap import SwapsEffectiveWeights, replaced


class OutProjection(Linear):
    """The graft on an attention's ``out_proj``: its forward is never called (the attention reads the weight), and it
    merges and unmerges only with its attention, which PEFT's model-wide loops also visit first."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merged by its attention (`MultiheadAttention.merge`)."""

    def unmerge(self) -> None:
        """Unmerged by its attention (`MultiheadAttention.unmerge`)."""


class MultiheadAttention(ForwardsBaseSettings, SwapsEffectiveWeights):
    """A graft on the packed query/key/value projection of `nn.MultiheadAttention` (E → 3E), plus one on its
    ``out_proj``. Query, key and value must share the embedding size (PEFT's condition for LoRA too); mixed adapter
    batches are refused, as LoRA refuses them on this layer."""

    base_weight_name = "in_proj_weight"
    forwarded_attributes = frozenset(
        (
            "embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first", "head_dim",
            "in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "merge_masks",
        )
    )

    @property
    def out_graft(self) -> OutProjection:
        """The graft on the attention's output projection."""
        return self.get_base_layer().out_proj

    def update_layer(self, adapter_name: str, config: GraftConfig, module_name: str) -> None:
        super().update_layer(adapter_name, config, module_name)
        base = self.get_base_layer()
        if isinstance(base.out_proj, OutProjection):
            base.out_proj.update_layer(adapter_name, config, f"{module_name}.base_layer.out_proj")
        else:
            base.out_proj = OutProjection(base.out_proj, adapter_name, config, f"{module_name}.base_layer.out_proj")

    # ------------------------------------------------------------------ merge / unmerge / unload

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if safe_merge:  # both checked before either is written
            self.check_merge(adapter_names)
            self.out_graft.check_merge(adapter_names)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        Linear.merge(self.out_graft, safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        super().unmerge()
        if self.out_graft.merged:
            Linear.unmerge(self.out_graft)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """PEFT's unloading hook for layers with nested adapters: the attention, with a plain ``out_proj`` again."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        base.out_proj = self.out_graft.get_base_layer()
        return base

    @contextmanager
    def _effective_weights(self, adapters: list[str]) -> Iterator[None]:
        """Within the block the attention computes with W + ΔW of ``adapters`` (input and output projections); the
        original tensors, the same objects, are back where they were on exit."""
        base, out = self.get_base_layer(), self.out_graft.get_base_layer()
        in_param, out_param = base.in_proj_weight, out.weight
        in_weight, out_weight = self._out_in(in_param), self.out_graft._out_in(out_param)
        for adapter in adapters:  # in activation order, output-mode grafts acting on the weight so far
            in_weight = in_weight + self.delta_out_in(adapter, in_weight.float()).to(in_param.dtype)
            if adapter in self.out_graft.graft_phi:
                out_weight = out_weight + self.out_graft.delta_out_in(adapter, out_weight.float()).to(out_param.dtype)
        in_weight, out_weight = self._base_layout(in_weight), self.out_graft._base_layout(out_weight)
        with replaced(base, "in_proj_weight", in_weight), replaced(out, "weight", out_weight):
            yield


"""Grafts on bare parameters (`GraftConfig.target_parameters`, as LoRA's field of that name): a 2-D weight a module
uses in its own forward, or a stack of expert matrices (E, out, in) as transformers' MoE layers hold them (Mixtral's
``experts.gate_up_proj`` and ``experts.down_proj``, which the layer reads one expert at a time).

A 2-D parameter is one out×in matrix, grafted as a linear layer's weight is. A stack gets one graft per expert:
ΔW_e = s·A_e Φ_e B_e, with A_e and B_e from that expert's own matrix (svd projections) or from (seed, module, e)
(seeded ones) and a Φ per expert of the configured family, so an expert stack of E matrices trains E·|Φ| numbers.
The graft reads the parameter in its own layout, whichever way round the model multiplies by it: ΔW has the
parameter's shape and merges into it exactly. Additive grafts only (an output-mode graft needs to know the input
side), with projections that need no calibration, as for the other kinds that are not linear layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...errors import UnsupportedLayerError
from .config import GraftConfig
from .projections import derived_seed, orthogonal_projections, svd_projections
from .swap import SwapsEffectiveWeights, replaced


class ParamWrapper(SwapsEffectiveWeights):
    """A graft on the parameter ``parameter_name`` of a module. Grafts on two parameters of one module nest (one
    wraps the other), as LoRA's parameter wrappers do; each computes with its own parameter swapped in.

    The class carries LoRA's name on purpose: PEFT's parameter injection recognises a wrapper it may nest or add an
    adapter to by that class name."""

    mixed_batch_error = ValueError  # LoRA's ParamWrapper raises ValueError (its attention layer TypeError)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: GraftConfig, module_name: str, parameter_name: str
    ) -> None:
        self.base_weight_name = parameter_name  # read while the layer initialises
        super().__init__(base_layer, adapter_name, config=config, module_name=module_name)

    @property
    def parameter_name(self) -> str:
        """PEFT's name for the wrapped parameter (its own wrappers and tools read it)."""
        return self.base_weight_name

    def _graft_dims(self, base: nn.Module) -> tuple[int | None, int | None]:
        """(in, out) of one matrix of the parameter, read as it is stored; a 3-D stack also sets ``experts``."""
        param = getattr(base, self.base_weight_name, None)
        if not isinstance(param, torch.Tensor) or param.dim() not in (2, 3):
            found = "none" if param is None else f"shape {tuple(param.shape)}"
            raise UnsupportedLayerError(
                f"Cannot graft parameter {self.base_weight_name!r} of {type(base).__name__}: grafts adapt a 2-D weight "
                f"or a 3-D stack of expert matrices, found {found}. Name another parameter in target_parameters."
            )
        if param.dim() == 3:
            self.experts = param.shape[0]
        return param.shape[-1], param.shape[-2]

    def _svd_projections(self, config: GraftConfig, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.experts is None:
            return super()._svd_projections(config, r)
        weights = self._base_weight_out_in()
        niter, oversample, generator = self._solver(config)  # one generator, drawn from expert after expert
        return self._per_expert(lambda e: svd_projections(weights[e], r, config.mode, niter, oversample, generator))

    def _seeded_projections(self, config: GraftConfig, out_f: int, d: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.experts is None:
            return super()._seeded_projections(config, out_f, d, r)
        return self._per_expert(
            lambda e: orthogonal_projections(out_f, d, r, derived_seed(config.seed + 1, f"{self.module_name}/expert/{e}"))
        )

    def _per_expert(self, projections: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """(A, B) stacked over the experts from ``projections(e)``, computed one expert at a time."""
        As, Bs = zip(*(projections(e) for e in range(self.experts)))
        return torch.stack(As), torch.stack(Bs)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        """PEFT reads the base layer's ``weight``; a parameter graft's adapters follow the parameter it adapts."""
        param = self.base_weight_param()
        return param.device, param.dtype

    @contextmanager
    def _effective_weights(self, adapters: list[str]) -> Iterator[None]:
        """W + Σ ΔW. On an fp32 parameter each ΔW = (s·AΦ)·B is added by one fused product (addmm / baddbmm), so no
        second tensor the size of the expert stack is built; a half-precision one adds the fp32 ΔW as a merge does."""
        param = self.base_weight_param()
        weight = param
        for adapter in adapters:
            if param.dtype == torch.float32:
                proj, phi = self.graft_proj[adapter], self.graft_phi[adapter]
                left = self.graft_scaling[adapter] * (proj.A.float() @ phi.matrix().float())
                fused = torch.addmm if self.experts is None else torch.baddbmm
                weight = fused(weight, left, proj.B.float())
            else:
                weight = weight + self.delta_out_in(adapter).to(param.dtype)
        with replaced(self.get_base_layer(), self.base_weight_name, weight):
            yield

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """PEFT's unloading hook: the module itself, with every nested parameter graft merged (if asked) and gone."""
        layer: Any = self
        while isinstance(layer, ParamWrapper):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            layer = layer.base_layer
        if isinstance(layer, BaseTunerLayer):  # cannot happen: PEFT refuses module and parameter targets together
            raise UnsupportedLayerError(f"{self.module_name!r}: a parameter graft wraps another kind of adapter.")
        return layer

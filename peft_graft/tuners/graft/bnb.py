"""bitsandbytes bases (QLoRA-style grafts), through PEFT's generic quantization backends.

One fix on top of PEFT's 4-bit backend: on CPUs with AVX512-BF16, bitsandbytes repacks a `Linear4bit` weight in
place during an eval forward. Dequantizing the repacked bytes gives wrong weights, so grafted layers are kept in (or
brought back to) the standard layout.
"""

from __future__ import annotations

import torch
from peft.utils.quantization_utils import Bnb4bitBackend, QuantizationBackend, resolve_quantization_backend
from torch import nn


def unpack_cpu_4bit(base_layer: nn.Module) -> None:
    """Restore the standard 4-bit layout of a `Linear4bit` weight repacked for the CPU kernel (no-op otherwise)."""
    weight = base_layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = state.original_nested
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        # bitsandbytes 0.50 restores absmax only for double-quantized states; otherwise it stays transposed in
        # bf16. Undo the transpose (the bf16 rounding of absmax cannot be undone: ~0.4% per block scale).
        weight.quant_state.absmax = weight.quant_state.absmax.T.reshape(-1).float()


class CpuSafeBnb4bitBackend(Bnb4bitBackend):
    """PEFT's 4-bit backend, made safe against bitsandbytes' in-place CPU repacking."""

    def prepare(self, base_layer: nn.Module) -> None:
        """Keep a grafted layer's weight in the standard layout, so dequantizing (SVD, merges) is always exact.

        This turns off bitsandbytes' AVX512-BF16 eval kernel for grafted layers only (it repacks in place and
        rounds the block scales to bf16); other 4-bit layers keep it.
        """
        unpack_cpu_4bit(base_layer)
        base_layer.support_avx512bf16_for_cpu = False

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        unpack_cpu_4bit(base_layer)
        return super().get_base_weight(base_layer)


def resolve_backend(base_layer: nn.Module) -> QuantizationBackend | None:
    """PEFT's backend for ``base_layer`` (None if not quantized), with the 4-bit CPU fix applied."""
    backend = resolve_quantization_backend(base_layer)
    if isinstance(backend, Bnb4bitBackend):
        return CpuSafeBnb4bitBackend()
    return backend


def dequantized_linear(base_layer: nn.Module, backend: QuantizationBackend, dtype: torch.dtype) -> nn.Linear:
    """An exact `nn.Linear` copy of a quantized layer: the weights the quantized layer actually computes with."""
    weight = backend.get_base_weight(base_layer).to(dtype)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=base_layer.bias is not None, device=weight.device,
                       dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if base_layer.bias is not None:
            linear.bias.copy_(base_layer.bias.to(dtype))
    return linear

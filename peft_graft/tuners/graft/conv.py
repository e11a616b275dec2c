"""Grafts on convolutions, read as LoRA reads them: the kernel (out, in, *k) is the out × in·Πk matrix it applies to
every input patch."""

from __future__ import annotations

import torch

from .linear import ForwardsBaseSettings, GraftModule


class ConvNd(ForwardsBaseSettings, GraftModule):
    """A graft on `nn.Conv1d`, `nn.Conv2d` or `nn.Conv3d` with ``groups=1``.

    B x is a convolution of the input with B as an r-channel kernel, with the base's stride, padding, padding mode
    and dilation; Φ and A then act on those r channels at each output position (a 1×1 convolution), so the forward
    never builds ΔW. The output's channel axis is moved last for that and back after (inputs with or without a
    batch axis).
    """

    features_on_last_axis = False
    forwarded_attributes = frozenset(
        ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    )

    @property
    def _channel_axis(self) -> int:
        return -(len(self.get_base_layer().kernel_size) + 1)

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.get_base_layer().weight.shape)

    def _project_input(self, x: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        base = self.get_base_layer()
        kernel = B.reshape(B.shape[0], *base.weight.shape[1:])
        h = base._conv_forward(self._cast_input_dtype(x, dtype).to(dtype), kernel, None)
        # contiguous: matmul kernels then do not depend on whether Φ requires grad (train vs. eval outputs differ by
        # rounding otherwise), and the copy is only r channels wide
        return h.movedim(self._channel_axis, -1).contiguous()

    def _features_last(self, output: torch.Tensor) -> torch.Tensor:
        return output.movedim(self._channel_axis, -1)

    def _features_back(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.movedim(-1, self._channel_axis)

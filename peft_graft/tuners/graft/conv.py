"""Grafts on convolutions, read as LoRA reads them: the kernel (out, in, *k) is the out × in·Πk matrix it applies to
every input patch."""

from __future__ import annotations

import torch

from .linear import ForwardsBaseSettings, GraftModule


class ConvNd(ForwardsBaseSettings, GraftModule):
    """A graft on `nn.Conv1d`, `nn.Conv2d` or `nn.Conv3d`.

    B x is a convolution of the input with B as an r-channel kernel, with the base's stride, padding, padding mode
    and dilation; Φ and A then act on those r channels at each output position (a 1×1 convolution), so the forward
    never builds ΔW. The output's channel axis is moved last for that and back after (inputs with or without a
    batch axis).

    A grouped convolution (``groups=G``) has a kernel (out, in/G, *k): each output channel reads only its group's
    input channels. The graft reads that kernel as the out × (in/G)·Πk matrix it is, as LoHa and LoKr do, so ΔW has
    the base kernel's shape and merges into it exactly: B runs on each group's input channels (G·r channels, grouped
    as the base), Φ on each group's r of them, and output channel o reads its own group's r through row o of A.
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
        if base.groups > 1:  # the same r-channel kernel on every group's input channels
            kernel = kernel.repeat(base.groups, *(1,) * (kernel.dim() - 1))
        h = base._conv_forward(self._cast_input_dtype(x, dtype).to(dtype), kernel, None)
        # contiguous: matmul kernels then do not depend on whether Φ requires grad (train vs. eval outputs differ by
        # rounding otherwise), and the copy is only r channels (per group) wide
        h = h.movedim(self._channel_axis, -1).contiguous()
        return h if base.groups == 1 else h.unflatten(-1, (base.groups, B.shape[0]))  # [..., G, r]

    def _graft_out(self, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        groups = self.get_base_layer().groups
        if groups == 1:
            return super()._graft_out(h, A)
        # [..., G, r] -> [..., out]: the out channels of group g (rows of A) read that group's r channels
        return torch.einsum("...gr,gor->...go", h, A.unflatten(0, (groups, -1))).flatten(-2)

    def _features_last(self, output: torch.Tensor) -> torch.Tensor:
        return output.movedim(self._channel_axis, -1)

    def _features_back(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.movedim(-1, self._channel_axis)

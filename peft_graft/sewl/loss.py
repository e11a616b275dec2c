"""The loss a SEWL update learns from: the summed next-token NLL of a chunk, with a backward made for the update budget.

An update may cost only about half a forward on top of the forward itself, and for a small model with a large vocabulary
the [tokens × vocab] fp32 logits weigh on that: `F.cross_entropy` writes a log-softmax of that size, and its backward
a zero-filled NLL gradient and another full tensor. On a CPU each fresh tensor of that size is also tens of
milliseconds of page faults. Here the forward keeps one log-sum-exp per token (computed a few rows at a time, so the
scratch stays small and cache-resident), and the backward writes softmax − one-hot a few rows at a time, into the
logits themselves when the caller hands them over (``consume_logits``), so no tensor of the logits' size is allocated.
"""

from __future__ import annotations

import torch


IGNORE_INDEX = -100
_ROWS = 16  # rows per block: 16 × a 50k vocabulary is 3 MB of fp32 scratch


class _SummedNLL(torch.autograd.Function):
    """Σ_t (logsumexp(ℓ_t) − ℓ_t[y_t]) over targets y_t ≠ -100; ∂/∂ℓ_t = softmax(ℓ_t) − onehot(y_t) (0 if ignored)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, consume_logits: bool) -> torch.Tensor:
        keep = targets != IGNORE_INDEX
        safe = targets.clamp_min(0)  # ignored rows read a valid column; ``keep`` drops them
        lse = torch.cat([torch.logsumexp(block, dim=-1) for block in logits.split(_ROWS)])
        picked = logits.gather(-1, safe[:, None]).squeeze(-1)
        ctx.save_for_backward(logits, lse, safe, keep)
        ctx.consume_logits = consume_logits
        return ((lse - picked) * keep).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, lse, safe, keep = ctx.saved_tensors
        if ctx.consume_logits and getattr(ctx, "consumed", False):
            raise RuntimeError("summed_nll(consume_logits=True) overwrote its logits in the first backward pass.")
        grad = logits if ctx.consume_logits else torch.empty_like(logits)
        ctx.consumed = True
        scale = grad_output * keep
        for out, block, block_lse, block_scale in zip(
            grad.split(_ROWS), logits.split(_ROWS), lse.split(_ROWS), scale.split(_ROWS)
        ):
            torch.sub(block, block_lse[:, None], out=out).exp_().mul_(block_scale[:, None])
        return grad.scatter_add_(-1, safe[:, None], -scale[:, None]), None, None


def summed_nll(logits: torch.Tensor, targets: torch.Tensor, *, consume_logits: bool = False) -> torch.Tensor:
    """Summed NLL of ``targets`` (any shape, -100 = ignore) under ``logits`` (same shape + vocab), computed in fp32.

    ``consume_logits=True`` lets the backward pass overwrite fp32 ``logits`` with their gradient (pass it only for
    logits nothing else reads afterwards; a second backward through them raises)."""
    flat = logits.flatten(0, -2)
    private = consume_logits or flat.dtype != torch.float32  # the cast to fp32 is a private copy anyway
    return _SummedNLL.apply(flat.float(), targets.flatten(), private)

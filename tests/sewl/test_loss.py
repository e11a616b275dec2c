"""The update's loss: value and gradient of `summed_nll` equal `F.cross_entropy(reduction="sum")`, ignored targets
included, for fp32 and bf16 logits, with and without handing the logits over to the backward pass."""

import pytest
import torch
import torch.nn.functional as F

from peft_graft.sewl.loss import summed_nll


@pytest.mark.parametrize("consume", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summed_nll_matches_cross_entropy(dtype, consume):
    generator = torch.Generator().manual_seed(0)
    leaf = (torch.randn(2, 37, 50, generator=generator) * 3).to(dtype).requires_grad_(True)  # > one 16-row block
    targets = torch.randint(0, 50, (2, 37), generator=generator)
    targets[0, 2] = targets[1, 36] = -100
    reference = F.cross_entropy(leaf.float().flatten(0, 1), targets.flatten(), reduction="sum")
    (expected,) = torch.autograd.grad(reference * 0.5, leaf)
    logits = leaf * 1  # a non-leaf, as a model's logits are
    got = summed_nll(logits, targets, consume_logits=consume)
    before = logits.detach().clone()
    (grad,) = torch.autograd.grad(got * 0.5, leaf)
    torch.testing.assert_close(got, reference)
    torch.testing.assert_close(grad, expected)
    assert grad.dtype == dtype
    assert grad[0, 2].abs().sum() == 0 and grad[1, 36].abs().sum() == 0  # ignored targets pass no gradient
    if not consume or dtype != torch.float32:
        assert torch.equal(logits.detach(), before)  # the caller's logits are only overwritten when handed over

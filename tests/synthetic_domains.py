"""Tiny learnable text 'domains' for gate and growth tests: cheap to learn, disjoint by construction."""

import torch


def rule_blocks(seed: int, n: int, lo: int, hi: int, length: int = 16, p_rule: float = 0.75) -> torch.Tensor:
    """[n, length] token ids in [lo, hi) where the next token is usually (prob ``p_rule``) the previous one plus one."""
    g = torch.Generator().manual_seed(seed)
    width = hi - lo
    follow = torch.rand(n, length, generator=g) < p_rule
    steps = torch.where(follow, 1, torch.randint(0, width, (n, length), generator=g))
    steps[:, 0] = torch.randint(0, width, (n,), generator=g)
    return lo + steps.cumsum(1) % width

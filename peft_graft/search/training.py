"""Short, deterministic training of one adapter on top of a composition, and its mean loss on a data role.

Probes, the candidate sent through the gates and the LoRA controls all train through `train_adapter`, so the
search compares them under one recipe (AdamW, constant learning rate, seeded example order).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from peft import PeftModel
from torch import nn

from ..errors import NonFiniteLossError
from ..gates import GrowthData
from ..gates.context import causal_lm_example_losses, composed


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The trainable tensors of ``adapter`` (graft Φ or LoRA A/B): PEFT names them ``...<prefix>.<adapter>.``."""
    return [
        p
        for name, p in model.named_parameters()
        if f".{adapter}." in f"{name}." and ("graft_" in name or "lora_" in name)
    ]


def adapter_size(model: nn.Module, adapter: str) -> int:
    """Trainable numbers of ``adapter`` (what a parameter budget counts)."""
    return sum(p.numel() for p in adapter_parameters(model, adapter))


def train_adapter(
    model: nn.Module,
    adapter: str,
    blocks: torch.Tensor,
    *,
    steps: int,
    lr: float,
    accepted: Sequence[str] = (),
    batch_size: int = 8,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> torch.optim.Optimizer:
    """Train ``adapter`` of PeftModel ``model`` for ``steps`` AdamW steps on ``blocks`` with ``accepted`` active and
    frozen beneath it. Pass the returned optimizer back to continue the same run. A NaN/Inf loss raises
    `NonFiniteLossError` at once (the adapter is then broken and should be deleted)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    with composed(model, [*accepted, adapter]):  # inference mode for all; only ``adapter`` is unfrozen below
        params = adapter_parameters(model, adapter)
        for p in params:
            p.requires_grad_(True)
        optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        order = torch.cat(
            [torch.randperm(len(blocks), generator=generator) for _ in range(1 + steps * batch_size // len(blocks))]
        )
        model.train()
        try:
            for step in range(steps):
                batch = blocks[order[step * batch_size : (step + 1) * batch_size]].to(device)
                loss = model(input_ids=batch, labels=batch).loss
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"Training adapter {adapter!r} at lr={lr:g} gave a non-finite loss ({loss.item()}) at step "
                        f"{step}: too high a learning rate or scaling for it, or a broken base."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)
            model.train(was_training)
    return optimizer


@torch.no_grad()
def mean_loss(model: nn.Module, blocks: torch.Tensor, adapters: Sequence[str], batch_size: int = 8) -> float:
    """Mean next-token loss per block of ``blocks`` with exactly ``adapters`` active (NaN stays NaN)."""
    was_training = model.training
    model.eval()
    try:  # a plain model (no adapter yet) runs as it is
        with composed(model, list(adapters)) if isinstance(model, PeftModel) else nullcontext():
            return causal_lm_example_losses(model, blocks, batch_size).mean().item()
    finally:
        model.train(was_training)


def role_losses(
    model: nn.Module, data: GrowthData, roles: Sequence[str], adapters: Sequence[str], batch_size: int = 8
) -> dict[str, float]:
    """`mean_loss` on each named role of ``data`` (``"ranking"``, ``"acceptance"``...), ``adapters`` active."""
    return {role: mean_loss(model, getattr(data, role), adapters, batch_size) for role in roles}

"""The LoRA control of a stage: PEFT's LoRA on the same modules, at (as nearly as ranks allow) the same budget.

Where even r=1 on every module would cost more than the graft, the control takes r=1 on as many of the graft's
best-scored modules as the graft's budget pays for, when that comes nearer its budget (`lora_shape_for`).

A graft is only worth its parameters if a plain LoRA with as many trainable numbers, trained on the same data for
the same steps from the same composed model, does not do as well. PEFT keeps one adapter type per PeftModel, so the
control trains on a copy of the model with the accepted grafts merged in: the same function, up to float rounding.
The copy shares every weight it does not merge into (a new module tree over the same tensors), so a control costs no
second copy of the base.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..errors import NonFiniteLossError
from ..gates import GrowthData
from ..tuners.graft import GraftLayer
from .training import adapter_size, mean_loss, role_losses, train_adapter


CONTROL_ADAPTER = "lora_control"


def lora_shape_for(
    params: int, modules: Sequence[str], shapes: Sequence[tuple[int, int]]
) -> tuple[int, tuple[str, ...]]:
    """The LoRA (r, modules) whose trainable numbers come closest to ``params``.

    From r·Σ(in + out) numbers on every module, the nearest r. Below r=1 on all, the nearer of r=1 on all and r=1
    on the leading ``modules`` (callers pass them best-scored first) that ``params`` pays for, at least one: a graft
    smaller than any LoRA on its modules still gets a control near its own size, not one far larger.
    """
    sizes = [in_f + out_f for in_f, out_f in shapes]
    total = sum(sizes)
    if params >= total:
        return max(1, round(params / total)), tuple(modules)
    count, paid = 1, sizes[0]
    while count < len(sizes) and paid + sizes[count] <= params:
        paid, count = paid + sizes[count], count + 1
    return 1, tuple(modules) if total - params <= abs(params - paid) else tuple(modules[:count])


@dataclass(frozen=True)
class ControlResult:
    r: int
    params: int  # LoRA's trainable numbers (the graft's are in the stage report beside it)
    lr: float  # the learning rate picked on the ranking role
    gain: float  # acceptance loss without − with the LoRA, nats/token (NaN if every lr diverged)
    ranking_gain: float
    modules: int  # how many of the graft's modules the LoRA trains (fewer only where r=1 on all would be too big)
    regression: float | None = None  # retention loss with − without the LoRA (None without retention data)

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def _merged_copy(model: nn.Module, accepted: Sequence[str]) -> Iterator[nn.Module]:
    """A plain model computing what the ``accepted`` composition of ``model`` computes, for the block.

    The copy's module tree is new, but its tensors are ``model``'s own, except the base weights the accepted grafts
    are merged into (merging replaces a weight's data, so those are copied first). LoRA freezes every weight it
    does not train, shared ones included: the ``requires_grad`` flags of ``model`` are restored afterwards.
    """
    merged = set()
    if isinstance(model, PeftModel) and accepted:
        for layer in model.modules():
            if isinstance(layer, GraftLayer) and any(a in layer.graft_phi for a in accepted):
                merged.update(id(p) for p in layer.get_base_layer().parameters())
    shared = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in merged]
    flags = {p: p.requires_grad for p in model.parameters()}
    clone = copy.deepcopy(model, memo={id(t): t for t in shared})
    try:
        if isinstance(clone, PeftModel):
            clone = clone.merge_and_unload(adapter_names=list(accepted)) if accepted else clone.unload()
        yield clone
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def lora_control(
    model: nn.Module,
    accepted: Sequence[str],
    modules: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    params: int,
    data: GrowthData,
    *,
    steps: int,
    lrs: Sequence[float],
    batch_size: int = 8,
    seed: int = 0,
    baseline: Mapping[str, float] | None = None,
) -> ControlResult:
    """Train a LoRA of about ``params`` numbers on ``modules`` (their ``shapes``: (in, out)) over the ``accepted``
    composition of ``model``, for ``steps`` steps at each of ``lrs``; keep the lr with the best ranking gain and
    report its acceptance gain. ``model`` is not changed.

    ``baseline``: the ranking and acceptance losses of the ``accepted`` composition, where the caller already
    measured them (a stage has: it ranked its probes and judges its grafts against the same numbers); otherwise they
    are measured once here. Gains are against them, so graft and control are judged from the same starting loss.
    With retention data the control's regression there is reported too, as the retention gate measures a graft's.
    """
    r, modules = lora_shape_for(params, modules, shapes)
    roles = ("ranking", "acceptance") + (("retention",) if data.retention is not None else ())
    before = dict(baseline or {})
    best: ControlResult | None = None
    for lr in lrs:
        with _merged_copy(model, accepted) as base:
            torch.manual_seed(seed)  # LoRA's A is drawn at random: same init for every lr
            config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(modules))
            lora = get_peft_model(base, config, adapter_name=CONTROL_ADAPTER)
            for role in roles:
                if role not in before:
                    before[role] = mean_loss(lora, getattr(data, role), [], batch_size)
            try:
                train_adapter(lora, CONTROL_ADAPTER, data.train, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
                after = role_losses(lora, data, roles, [CONTROL_ADAPTER], batch_size)
            except NonFiniteLossError:
                after = dict.fromkeys(roles, float("nan"))
            result = ControlResult(
                r,
                adapter_size(lora, CONTROL_ADAPTER),
                lr,
                before["acceptance"] - after["acceptance"],
                before["ranking"] - after["ranking"],
                len(modules),
                after["retention"] - before["retention"] if "retention" in roles else None,
            )
        if best is None or result.ranking_gain > best.ranking_gain or best.ranking_gain != best.ranking_gain:
            best = result
    return best

"""Sensitivity maps: which modules of a causal LM a graft should go to, measured in one pass over a small sample.

Per targetable module (every linear map but the output head, or the ``target_modules`` asked for), with W its weight,
G = ∂L/∂W the gradient of the mean next-token loss over the sample, and x its inputs:

- ``grad_norm``  ‖G‖_F: how steeply the loss falls along the module's weights;
- ``fisher``     mean over examples n of ‖G_n‖²_F, the trace of the diagonal empirical Fisher. It is computed without
  materialising any per-example gradient: ‖Σ_t g_t x_tᵀ‖²_F = Σ_{t,s} (g_t·g_s)(x_t·x_s), two T×T Gram matrices per
  example (the squared *mean* gradient would be the wrong estimator);
- ``activation`` mean ‖x_t‖² over tokens: the input energy a graft would act on;
- ``projected``  ‖Aᵀ G Bᵀ‖_F for the projections A, B of a given `GraftConfig`: the gradient a graft with those
  projections sees on its Φ, i.e. the first-order gain it could buy (a step Φ = −η ∂L/∂Φ lowers the loss by
  η s² ‖Aᵀ G Bᵀ‖²_F to first order).

The pass wraps the targets in a temporary dense, identity-initialised graft adapter built from that config (so every
projection kind, both modes and GPT-2's Conv1D work as the tuner defines them): ∂L/∂Φ = s·Aᵀ G_u Bᵀ, read off Φ's
gradient. The adapter is removed afterwards and every ``requires_grad`` flag restored, so the caller's model computes
exactly what it computed before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from ..calibration import calibrate
from ..errors import EmptySearchDataError, NonFiniteLossError, NoTargetModulesError, SearchConfigError
from ..tuners.graft import GraftConfig, GraftLayer, Linear


logger = logging.getLogger(__name__)

SCORES = ("grad_norm", "fisher", "activation", "projected")
# The temporary adapter of a sensitivity pass; a name no user adapter is expected to have.
PROBE_ADAPTER = "graft_sensitivity_probe"
# The first numbered container in a module name is its layer: model.layers.3.mlp.down_proj -> (3, "mlp.down_proj").
_LAYER = re.compile(r"^(?:.*?\.)?(\d+)\.(.+)$")


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """The layer index a module sits in and its name inside the layer (None and the full name outside layers)."""
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


@dataclass(frozen=True)
class ModuleSensitivity:
    """The four scores of one module, with where it sits and its shape."""

    name: str  # relative to the transformers model, e.g. model.layers.3.self_attn.q_proj
    layer: int | None
    kind: str  # name inside the layer, e.g. self_attn.q_proj
    in_features: int
    out_features: int
    grad_norm: float
    fisher: float
    activation: float
    projected: float

    def score(self, which: str) -> float:
        return getattr(self, which)


@dataclass(frozen=True)
class SensitivityMap:
    """Scores of every targetable module, in model order, and how they were measured."""

    modules: tuple[ModuleSensitivity, ...]
    examples: int
    tokens: int
    loss: float  # mean next-token loss of the sample
    projections: dict[str, Any] = field(default_factory=dict)  # the GraftConfig fields that defined A and B

    def ranked(self, score: str = "projected") -> list[ModuleSensitivity]:
        """Modules by decreasing ``score`` (ties keep model order)."""
        check_score(score)
        return sorted(self.modules, key=lambda m: -m.score(score))

    def by_name(self) -> dict[str, ModuleSensitivity]:
        return {m.name: m for m in self.modules}

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "loss": self.loss,
            "projections": self.projections,
            "modules": [dataclasses.asdict(m) for m in self.modules],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the map as JSON (the input of `peft-graft sensitivity --plot` and of later searches)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityMap:
        modules = tuple(ModuleSensitivity(**m) for m in data["modules"])
        return cls(modules, data["examples"], data["tokens"], data["loss"], data.get("projections", {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityMap:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SearchConfigError(
                f"{path} is not a sensitivity map written by SensitivityMap.save ({err})."
            ) from err


def check_score(score: str) -> None:
    if score not in SCORES:
        raise SearchConfigError(f"Unknown sensitivity score {score!r}; choose one of {', '.join(SCORES)}.")


class _Accumulator:
    """Running sums of one module's statistics, in fp32 on the module's device."""

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None  # Σ_n G_n  [out, in]
        self.fisher = 0.0  # Σ_n ‖G_n‖²
        self.energy = 0.0  # Σ_t ‖x_t‖²

    def observe(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().float()  # [B, T, in]
        self.energy += x.square().sum().item()
        if output.requires_grad:
            output.register_hook(partial(self._on_grad, x))

    def _on_grad(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        g = grad.detach().float()  # [B, T, out]: the gradient of Σ_n loss_n, so g of example n gives G_n
        g_rows, x_rows = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        if self.grad is None:
            self.grad = g_rows.T @ x_rows
        else:  # in place: no new [out, in] tensor per batch
            self.grad.addmm_(g_rows.T, x_rows)
        per_example = (torch.einsum("bto,bso->bts", g, g) * torch.einsum("bti,bsi->bts", x, x)).sum((1, 2))
        self.fisher += per_example.sum().item()


def _example_losses(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each block of ``batch`` ([B], with a graph)."""
    logits = model(input_ids=batch).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(-1)


def _check_blocks(blocks: torch.Tensor, what: str) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2:
        raise SearchConfigError(f"The {what} must be a [N, T] tensor of token ids, got {type(blocks).__name__}.")
    if blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise EmptySearchDataError(
            f"The {what} has shape {tuple(blocks.shape)}: it needs at least one block of two or more tokens (a "
            "token to predict). Pass a few dozen real blocks, e.g. from tokenize_blocks."
        )


def _probe_config(projections: GraftConfig, target_modules: Any) -> GraftConfig:
    """The projections' config as a dense, identity-initialised adapter over ``target_modules`` (only A, B matter)."""
    return dataclasses.replace(
        projections,
        phi="dense",
        init_weights=True,
        sparse_residual=0,
        max_trainable_params=None,
        target_modules=target_modules if target_modules is not None else projections.target_modules or "all-linear",
        modules_to_save=None,
        inference_mode=False,
    )


@contextmanager
def probe_adapter(model: nn.Module, config: GraftConfig, name: str = PROBE_ADAPTER) -> Iterator[PeftModel]:
    """A PeftModel whose only active adapter is ``name`` (from ``config``) on top of ``model``'s active adapters.

    ``model`` is a plain transformers model (wrapped for the block, unwrapped after) or a PeftModel of graft adapters
    (the adapter is added and deleted again). Every ``requires_grad`` flag and the active adapters are restored.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    if isinstance(model, PeftModel):
        previous = list(model.base_model.active_adapters)
        if name in model.peft_config:
            raise SearchConfigError(f"The model already has an adapter named {name!r}; rename or delete it.")
        model.add_adapter(name, config)
        model.base_model.set_adapter([*previous, name])
        peft_model = model
    else:
        previous = None
        peft_model = get_peft_model(model, config, adapter_name=name)
    try:
        yield peft_model
    finally:
        if previous is None:
            peft_model.unload()
        else:
            model.base_model.set_adapter(previous)
            model.delete_adapter(name)
            model.base_model.set_adapter(previous)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def sensitivity_map(
    model: nn.Module,
    blocks: torch.Tensor,
    projections: GraftConfig | None = None,
    target_modules: list[str] | str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> SensitivityMap:
    """Measure the sensitivity of every targetable module of causal LM ``model`` on ``blocks`` ([N, T] token ids).

    ``projections`` defines A and B of the projected-gradient score (default: ``GraftConfig(r=16,
    projection="svd")``: the top-16 singular subspace of each weight); data-driven projections are calibrated on the
    same blocks. ``target_modules`` restricts the map (default: the config's, else every linear map but the output
    head). ``model`` may be a PeftModel of graft adapters: the map is then of the composed model. Raises
    `EmptySearchDataError`, `NoTargetModulesError` or `NonFiniteLossError`; the model is left as it was.
    """
    _check_blocks(blocks, "sensitivity sample")
    config = _probe_config(projections or GraftConfig(r=16, projection="svd"), target_modules)
    was_training = model.training
    model.eval()
    try:
        with probe_adapter(model, config) as peft_model:
            return _measure(peft_model, blocks, config, batch_size, progress)
    except ValueError as err:  # PEFT: "Target modules ... not found in the base model"
        if "not found in the base model" in str(err) or "No modules were targeted" in str(err):
            raise NoTargetModulesError(
                f"No module of {type(model).__name__} matches target_modules={config.target_modules!r}; the "
                "modules a sensitivity map measures are linear maps (nn.Linear, Conv1D) other than the output head. "
                "Check the names with `peft-graft inspect-base`."
            ) from err
        raise
    finally:
        model.train(was_training)


def _measure(
    peft_model: PeftModel, blocks: torch.Tensor, config: GraftConfig, batch_size: int, progress: bool
) -> SensitivityMap:
    base = peft_model.get_base_model()
    layers = {
        name: m for name, m in base.named_modules() if isinstance(m, GraftLayer) and PROBE_ADAPTER in m.graft_phi
    }
    if not layers:
        raise NoTargetModulesError(f"{type(base).__name__} has no module a graft can wrap; nothing to measure.")
    other = [f"{name} ({type(m.get_base_layer()).__name__})" for name, m in layers.items() if not isinstance(m, Linear)]
    if other:  # the statistics are those of y = W x with features last
        raise SearchConfigError(
            f"Sensitivity maps measure linear layers; target_modules also selects {', '.join(other)}. Name linear "
            "modules only (`peft-graft inspect-base` lists them by type)."
        )
    if config.needs_calibration:
        calibrate(
            peft_model,
            [{"input_ids": b, "labels": b} for b in blocks.split(batch_size)],
            PROBE_ADAPTER,
            progress=progress,
        )
    for p in peft_model.parameters():
        p.requires_grad_(False)
    phis = {name: layer.graft_phi[PROBE_ADAPTER].weight for name, layer in layers.items()}
    for phi in phis.values():
        phi.requires_grad_(True)
        phi.grad = None
    stats = {name: _Accumulator() for name in layers}
    handles = [layer.register_forward_hook(stats[name].observe) for name, layer in layers.items()]
    device = next(peft_model.parameters()).device
    total_loss = 0.0
    try:
        for batch in tqdm(blocks.split(batch_size), desc="Sensitivity map", disable=not progress or None):
            batch = batch.to(device)
            losses = _example_losses(peft_model, batch)
            if not torch.isfinite(losses).all():
                raise NonFiniteLossError(
                    f"The loss of {int((~torch.isfinite(losses)).sum())} sample blocks is NaN/Inf, so no gradient "
                    "can be measured. Check the model's weights (a broken merge?) and the token ids."
                )
            losses.sum().backward()
            total_loss += losses.sum().item()
    finally:
        for handle in handles:
            handle.remove()
    n, tokens = blocks.shape[0], blocks.numel()
    modules = []
    for name, layer in layers.items():
        s, grad = stats[name], stats[name].grad
        layer_index, kind = layer_and_kind(name)
        projected = phis[name].grad.float().norm().item() / (abs(layer.graft_scaling[PROBE_ADAPTER]) * n)
        modules.append(
            ModuleSensitivity(
                name=name,
                layer=layer_index,
                kind=kind,
                in_features=layer.in_features,
                out_features=layer.out_features,
                grad_norm=grad.norm().item() / n,
                fisher=s.fisher / n,
                activation=s.energy / tokens,
                projected=projected,
            )
        )
    for phi in phis.values():
        phi.grad = None
    fields = ("r", "projection", "mode", "seed", "scaling", "projection_niter", "projection_oversample")
    described = {k: getattr(config, k) for k in fields}
    logger.info("Sensitivity map of %d modules on %d blocks (loss %.4f)", len(modules), n, total_loss / n)
    return SensitivityMap(tuple(modules), n, tokens, total_loss / n, described)

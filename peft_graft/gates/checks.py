"""Deterministic gates: user behaviour checks, parameter budget, finite weights, exact recomposition."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from ..tuners.graft.layer import GraftLayer
from .context import GateContext, composed
from .core import Decision, Gate, GateResult


CheckOutcome = Union[bool, tuple[bool, dict]]


def _candidate_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, GraftLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                if adapter in container:
                    for key, t in container[adapter].state_dict().items():
                        tensors[f"{name}.{attr}.{key}"] = t
    return tensors


@dataclass
class BehaviourCheck(Gate):
    """A user-supplied safety/behaviour check run on the composed model with the candidate active.

    ``check(model)`` returns True/False, or (passed, evidence). An exception counts as a failure.
    """

    check: Callable[[nn.Module], CheckOutcome]
    name: str = "behaviour"

    def evaluate(self, ctx: GateContext) -> GateResult:
        try:
            with composed(ctx.model, ctx.accepted + [ctx.candidate]), torch.no_grad():
                outcome = self.check(ctx.model)
        except Exception as err:  # noqa: BLE001 (a crashing check must not let a graft through)
            return GateResult(self.name, Decision.REJECT, f"check raised {type(err).__name__}: {err}")
        passed, evidence = outcome if isinstance(outcome, tuple) else (outcome, {})
        verdict = Decision.ACCEPT if passed else Decision.REJECT
        metrics = {k: float(v) for k, v in evidence.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return GateResult(self.name, verdict, "passed" if passed else "failed", dict(evidence), metrics)


@dataclass
class ParameterBudget(Gate):
    """The candidate's trainable numbers stay within ``max_params``."""

    max_params: int
    name: str = "parameter_budget"

    def evaluate(self, ctx: GateContext) -> GateResult:
        count = sum(
            p.numel() for n, p in ctx.model.named_parameters() if f".{ctx.candidate}." in f"{n}." and "graft_" in n
        )
        evidence = {"params": count, "max_params": self.max_params}
        verdict = Decision.ACCEPT if count <= self.max_params else Decision.REJECT
        text = f"{count:,} trainable numbers (max {self.max_params:,})"
        return GateResult(self.name, verdict, text, evidence, {"params": float(count)})


@dataclass
class FiniteWeights(Gate):
    """Every tensor of the candidate is finite (NaN/Inf would poison the base on merge)."""

    name: str = "finite_weights"

    def evaluate(self, ctx: GateContext) -> GateResult:
        tensors = _candidate_tensors(ctx.model, ctx.candidate)
        bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
        if not tensors:
            return GateResult(self.name, Decision.REJECT, f"no tensors found for adapter {ctx.candidate!r}")
        verdict = Decision.REJECT if bad else Decision.ACCEPT
        return GateResult(
            self.name,
            verdict,
            f"{len(bad)} non-finite tensors",
            {"non_finite": bad[:20]},
            {"non_finite": float(len(bad))},
        )


@contextmanager
def preserved_base_weights(model: nn.Module) -> Iterator[None]:
    """Restore every grafted layer's base weight object and bytes on exit, undoing merge/unmerge rounding.

    Merging creates new weight tensors (see `GraftLayer.merge`), so holding the old parameter and its data is
    enough to put the model back bit for bit, quantized bases included.
    """
    layers = [m for m in model.modules() if isinstance(m, GraftLayer)]
    saved = [(layer, layer.base_weight_param(), layer.base_weight_param().data) for layer in layers]
    try:
        yield
    finally:
        for layer, param, data in saved:
            setattr(layer.get_base_layer(), layer.base_weight_name, param)
            param.data = data
            layer.merged_adapters = []


@dataclass
class ExactRecomposition(Gate):
    """Merging the composition reproduces the unmerged outputs, and unmerging restores them.

    Tolerance: |Δlogit| ≤ ``atol`` + ``rtol`` · max|logit| (fp32 summation order alone gives ~1e-6 relative on deep
    models). The model is left bit-identical: the rounding of the merge/unmerge round trip is undone.
    """

    atol: float = 1e-5
    rtol: float = 0.0
    probe_examples: int = 4
    name: str = "exact_recomposition"

    @torch.no_grad()
    def evaluate(self, ctx: GateContext) -> GateResult:
        probe = ctx.data.acceptance[: self.probe_examples].to(next(ctx.model.parameters()).device)
        adapters = ctx.accepted + [ctx.candidate]
        was_training = ctx.model.training
        ctx.model.eval()
        with composed(ctx.model, adapters), preserved_base_weights(ctx.model):
            unmerged = ctx.model(input_ids=probe).logits
            ctx.model.merge_adapter(adapters)
            merged = ctx.model(input_ids=probe).logits
            ctx.model.unmerge_adapter()
            restored = ctx.model(input_ids=probe).logits
        ctx.model.train(was_training)
        merge_error = (merged - unmerged).abs().max().item()
        unmerge_error = (restored - unmerged).abs().max().item()
        tolerance = self.atol + self.rtol * unmerged.abs().max().item()
        evidence = {"max_merge_error": merge_error, "max_unmerge_error": unmerge_error, "tolerance": tolerance}
        ok = merge_error <= tolerance and unmerge_error <= tolerance
        text = f"merge error {merge_error:.2e}, unmerge error {unmerge_error:.2e} (tolerance {tolerance:.1e})"
        metrics = {"max_merge_error": merge_error, "max_unmerge_error": unmerge_error}
        return GateResult(self.name, Decision.ACCEPT if ok else Decision.REJECT, text, evidence, metrics)

"""`calibrate()`: the explicit data pass that data-driven projections, inits and sparse residuals need.

While it runs, each graft layer of the adapter contributes nothing and instead records what its config asks for:
Gram matrices of its inputs/outputs (``projection="activation"``) and the weight gradient Σ gᵀu of a causal-LM (or
any) loss (``projection="gradient"``, ``init_weights="lstsq"/"gradient_diag"``, ``sparse_residual``). The
statistics then become A/B, Φ₀ and sparse positions in `GraftLayer.apply_calibration`.

Under ``torch.distributed`` (DDP, ``accelerate launch``, torchrun) every rank sees its own shard of the data, so the
statistics are summed over ranks before they are turned into projections: every rank computes the same subspace,
the one a single process would compute from all the shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Self

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .errors import CalibrationRequiredError, GraftConfigError, NonFiniteCalibrationError
from .tuners.graft.config import GraftConfig
from .tuners.graft.layer import GraftLayer
from .tuners.graft.model import PROGRESS_MIN_MODULES


class _Recorder:
    """Accumulates one layer's calibration statistics in fp32 on the layer's device."""

    def __init__(self, layer: GraftLayer, mode: str, grams: bool, grads: bool) -> None:
        self.layer, self.mode, self.grams, self.grads = layer, mode, grams, grads
        self.input_gram: torch.Tensor | None = None
        self.output_gram: torch.Tensor | None = None
        self.grad_u: torch.Tensor | None = None
        self._grad_x: torch.Tensor | None = None
        self._zero: torch.Tensor | None = None

    @property
    def grad_x(self) -> torch.Tensor:
        """Weight gradient w.r.t. the layer input (differs from ``grad_u`` only in output mode)."""
        return self.grad_u if self.mode == "additive" else self._grad_x

    @staticmethod
    def _add(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
        return term if total is None else total + term

    def observe(self, x: torch.Tensor, pre_bias: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # [N, in]
        y2 = pre_bias.detach().reshape(-1, pre_bias.shape[-1]).float()  # [N, out]
        u2 = x2 if self.mode == "additive" else y2
        if self.grams:
            self.input_gram = self._add(self.input_gram, u2.T @ u2)
            self.output_gram = self._add(self.output_gram, y2.T @ y2)
        if self.grads and torch.is_grad_enabled():
            if not result.requires_grad:
                # A frozen base gives outputs without a graph; adding a grad-requiring zero gives them one, so
                # dL/dy reaches this layer and, through it, every earlier one.
                if self._zero is None:
                    self._zero = torch.zeros((), device=result.device, dtype=result.dtype, requires_grad=True)
                result = result + self._zero
            result.register_hook(partial(self._on_grad, u2, x2))
        return result

    def finite(self) -> bool:
        stats = (self.input_gram, self.output_gram, self.grad_u, self._grad_x)
        return all(bool(torch.isfinite(s).all()) for s in stats if s is not None)

    def sum_over_ranks(self) -> None:
        """Add up every rank's statistics (each rank recorded the same ones, for its own batches)."""
        for name in ("input_gram", "output_gram", "grad_u", "_grad_x"):
            stat = getattr(self, name)
            if stat is not None:
                dist.all_reduce(stat, op=dist.ReduceOp.SUM)

    def _on_grad(self, u2: torch.Tensor, x2: torch.Tensor, grad: torch.Tensor) -> None:
        g2 = grad.detach().reshape(-1, grad.shape[-1]).float()  # [N, out]
        self.grad_u = self._add(self.grad_u, g2.T @ u2)  # [out, d]
        if self.mode == "output":
            self._grad_x = self._add(self._grad_x, g2.T @ x2)  # [out, in]


def _graft_layers(model: nn.Module, adapter: str) -> list[GraftLayer]:
    return [m for m in model.modules() if isinstance(m, GraftLayer) and adapter in m.graft_phi]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def needs_calibration(model: nn.Module, adapter_name: str | None = None) -> bool:
    """Whether graft adapter ``adapter_name`` (default: the active one) still waits for calibration data."""
    adapter = adapter_name or getattr(model, "active_adapter", "default")
    return any(layer.graft_pending.get(adapter) for layer in _graft_layers(model, adapter))


def _start(model: nn.Module, adapter_name: str | None, grads: bool) -> tuple[str, GraftConfig, list[GraftLayer]]:
    """Check that ``adapter_name`` is an active graft adapter and give each of its layers a recorder (the layers then
    contribute nothing and record instead); ``grads`` records the weight gradient even if the config needs none."""
    adapter = adapter_name or getattr(model, "active_adapter", "default")
    config = model.peft_config[adapter]
    if not isinstance(config, GraftConfig):
        raise GraftConfigError(f"Adapter {adapter!r} is not a graft adapter ({type(config).__name__}).")
    layers = _graft_layers(model, adapter)
    if not layers:
        raise GraftConfigError(f"No graft layers carry adapter {adapter!r}.")
    if adapter not in layers[0].active_adapters:
        raise GraftConfigError(f"Adapter {adapter!r} is not active; call model.set_adapter({adapter!r}) first.")
    statistics = set(config.calibration_needs.values())
    grams, grads = "activations" in statistics, grads or "gradient" in statistics
    for layer in layers:
        layer.graft_recorders[adapter] = _Recorder(layer, config.mode, grams, grads)
    return adapter, config, layers


def _finish(adapter: str, config: GraftConfig, layers: list[GraftLayer], progress: bool) -> None:
    """Sum the statistics over ranks (under torch.distributed) and turn them into each layer's projections and Φ₀."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for layer in layers:
            layer.graft_recorders[adapter].sum_over_ranks()
    broken = [layer.module_name for layer in layers if not layer.graft_recorders[adapter].finite()]
    if broken:  # checked for every layer before any changes, so a failure leaves the adapter as it was
        raise NonFiniteCalibrationError(
            f"Calibration of graft {adapter!r} recorded NaN/Inf statistics at {broken[0]!r} ({len(broken)} layers "
            "in all): the loss or the activations of the calibration data are not finite. Nothing was calibrated; "
            "check the data (and the loss on it) and calibrate again."
        )
    quiet = not progress or len(layers) < PROGRESS_MIN_MODULES or None
    for layer in tqdm(layers, desc=f"Graft {adapter!r} from calibration", unit="module", disable=quiet):
        layer.apply_calibration(adapter, config, layer.graft_recorders[adapter])


def _stop(adapter: str, layers: list[GraftLayer]) -> None:
    for layer in layers:
        layer.graft_recorders.pop(adapter, None)


def calibrate(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    adapter_name: str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> int:
    """Run ``model`` over ``dataloader`` to fit the data-driven parts of adapter ``adapter_name``.

    Batches are dicts of model inputs; when gradients are needed (gradient projections, ``lstsq``/``gradient_diag``
    inits, sparse residuals) they must produce a loss, e.g. carry ``labels``. Use data disjoint from your evaluation
    set. The model runs in eval mode; gradients of other trainable parameters are cleared afterwards. Under
    torch.distributed, call it on every rank with that rank's shard (every rank must yield at least one batch); the
    statistics are summed over ranks. Returns the number of batches this process used.

    To spend no extra passes on it, let the first training step calibrate instead: `calibrating_step`.
    """
    adapter, config, layers = _start(model, adapter_name, grads=False)
    grads = layers[0].graft_recorders[adapter].grads
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    used = 0
    try:
        for batch in tqdm(dataloader, desc=f"Calibrating graft {adapter!r}", disable=not progress, total=max_batches):
            if max_batches is not None and used >= max_batches:
                break
            batch = _to_device(batch, device)
            with torch.set_grad_enabled(grads):
                output = model(**batch)
                if grads:
                    loss = getattr(output, "loss", None)
                    if loss is None:
                        raise GraftConfigError(
                            "Calibration needs gradients but the model returned no loss: include `labels` in the "
                            "calibration batches."
                        )
                    loss.backward()
            used += 1
        if used == 0:
            raise CalibrationRequiredError("The calibration dataloader yielded no batches.")
        _finish(adapter, config, layers, progress)
    finally:
        _stop(adapter, layers)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return used


class CalibratingStep:
    """The context manager `calibrating_step` returns; `discard` leaves without calibrating (nothing changes)."""

    def __init__(self, model: nn.Module, adapter_name: str | None, max_grad_norm: float | None) -> None:
        self.model, self.adapter_name, self.max_grad_norm = model, adapter_name, max_grad_norm
        self._active: tuple[str, GraftConfig, list[GraftLayer]] | None = None

    def __enter__(self) -> Self:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise GraftConfigError(
                "calibrating_step runs in one process; under torch.distributed calibrate with "
                "`peft_graft.calibrate(model, shard)` on every rank before training."
            )
        adapter = self.adapter_name or getattr(self.model, "active_adapter", "default")
        config = self.model.peft_config.get(adapter)
        if isinstance(config, GraftConfig):
            if config.init_weights not in (True, "zeros"):
                raise GraftConfigError(
                    f"calibrating_step needs a graft that starts at ΔW = 0 (init_weights=True), so that the step it "
                    f"records is the step the calibrated adapter would take; adapter {adapter!r} has "
                    f"init_weights={config.init_weights!r}. Use `peft_graft.calibrate(model, dataloader)` instead."
                )
            if not needs_calibration(self.model, adapter):
                raise GraftConfigError(f"Adapter {adapter!r} has nothing left to calibrate.")
        self._active = _start(self.model, adapter, grads=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self.discard()
            return
        adapter, config, layers = self._active
        try:
            missing = [layer.module_name for layer in layers if layer.graft_recorders[adapter].grad_x is None]
            if missing:
                raise CalibrationRequiredError(
                    f"No gradient reached {missing[0]!r} (and {len(missing) - 1} more graft layers) inside "
                    "calibrating_step: run the first training step's forward and loss.backward() inside the block."
                )
            _finish(adapter, config, layers, progress=False)
            for layer in layers:
                layer.add_recorded_step_gradient(adapter, layer.graft_recorders[adapter])
        finally:
            self.discard()
        if self.max_grad_norm is not None:
            params = [p for layer in layers for p in layer.adapter_parameters(adapter) if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def discard(self) -> None:
        """Stop recording; an adapter not yet calibrated stays so (using it raises CalibrationRequiredError)."""
        if self._active is not None:
            adapter, _, layers = self._active
            _stop(adapter, layers)
            self._active = None


def calibrating_step(
    model: nn.Module, adapter_name: str | None = None, max_grad_norm: float | None = None
) -> CalibratingStep:
    """Calibrate adapter ``adapter_name`` on the first training step itself: no extra forward or backward pass.

    Run that step's forward and ``loss.backward()`` (every micro-batch of it) inside the block, then step the
    optimizer as usual::

        with peft_graft.calibrating_step(model):
            model(**batch).loss.backward()
        optimizer.step()

    Inside the block the graft layers record instead of contributing; on leaving it the statistics become the
    projections, and the adapter's parameters receive the gradients backpropagation would have given them had the
    calibrated adapter been in place: exact, because a graft that starts at ΔW = 0 changes neither the loss nor any
    gradient, so the loss's gradient w.r.t. each effective weight is the recorded Σ gᵀx. The optimizer thus takes the
    step a calibrated adapter takes on that batch, and the calibration costs the weight-gradient products and the
    projection solver, not a pass over data. Those gradients are set after any clipping your loop did; pass
    ``max_grad_norm`` to clip them (the adapter's own parameters, jointly). With `transformers.Trainer` use
    `peft_graft.CalibrateOnFirstStep`. Needs ``init_weights=True``; one process (under torch.distributed use
    `calibrate` on every rank).
    """
    return CalibratingStep(model, adapter_name, max_grad_norm)

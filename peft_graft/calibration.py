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
from typing import Any

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

    def __init__(self, layer: GraftLayer, mode: str, grams: bool, grads: bool, contributes: bool = False) -> None:
        self.layer, self.mode, self.grams, self.grads = layer, mode, grams, grads
        # False: the layer adds nothing while recording (calibration); True: the calibrated graft acts as usual and
        # the gradient at its effective weight is recorded (refining steps of `CalibratingSteps`)
        self.contributes = contributes
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

    def absorb(self, other: _Recorder) -> None:
        """Add ``other``'s statistics to these (statistics summed over several recorded steps)."""
        for name in ("input_gram", "output_gram", "grad_u", "_grad_x"):
            total, term = getattr(self, name), getattr(other, name)
            if term is not None:
                setattr(self, name, term.clone() if total is None else total.add_(term))

    def finite(self) -> bool:
        """Whether every statistic is finite: a NaN or Inf entry makes its sum non-finite (one pass, no mask)."""
        stats = (self.input_gram, self.output_gram, self.grad_u, self._grad_x)
        return all(bool(torch.isfinite(s.sum())) for s in stats if s is not None)

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


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's token embedding, or None where it has none to ask (a custom module, a time-series model
    whose ``get_input_embeddings`` raises, patch embeddings): the token-id range a batch is checked against."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embeddings, "num_embeddings", None)


def outside_vocabulary(ids: torch.Tensor, vocab_size: int | None) -> str | None:
    """Why integer ``ids`` are not token ids of a ``vocab_size`` vocabulary (None: they are, or it is unknown)."""
    if vocab_size is None or not ids.numel() or 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
        return None
    return (
        f"hold ids from {int(ids.min())} to {int(ids.max())}, outside the model's vocabulary of {vocab_size}: "
        "tokenize with the base model's tokenizer"
    )


def _check_batch(batch: Any, index: int, vocab_size: int | None) -> None:
    """A calibration batch is a dict of model inputs whose token ids the model can embed (else the forward fails
    deep inside the embedding, with the adapter half-recorded)."""
    if not isinstance(batch, Mapping):
        raise GraftConfigError(
            f"Calibration batch {index} is a {type(batch).__name__}, not a dict of model inputs "
            "(e.g. {'input_ids': ..., 'labels': ...})."
        )
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise GraftConfigError(f"Calibration batch {index}: input_ids must be integer token ids, got {ids.dtype}.")
    problem = outside_vocabulary(ids, vocab_size)
    if problem:
        raise GraftConfigError(f"Calibration batch {index}: input_ids {problem}.")


def _graft_layers(model: nn.Module, adapter: str) -> list[GraftLayer]:
    return [m for m in model.modules() if isinstance(m, GraftLayer) and adapter in m.graft_phi]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def adapter_or_active(model: nn.Module, adapter_name: str | None) -> str:
    """``adapter_name``, or the model's active adapter when it is None."""
    return adapter_name or getattr(model, "active_adapter", "default")


def needs_calibration(model: nn.Module, adapter_name: str | None = None) -> bool:
    """Whether graft adapter ``adapter_name`` (default: the active one) still waits for calibration data."""
    adapter = adapter_or_active(model, adapter_name)
    return any(layer.graft_pending.get(adapter) for layer in _graft_layers(model, adapter))


def start_recording(
    model: nn.Module, adapter_name: str | None, grads: bool, contributes: bool = False
) -> tuple[str, GraftConfig, list[GraftLayer]]:
    """Check that ``adapter_name`` is an active graft adapter and give each of its layers a recorder (the layers then
    record, and contribute nothing unless ``contributes``); ``grads`` records the weight gradient even if the config
    needs none."""
    adapter = adapter_or_active(model, adapter_name)
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
        layer.graft_recorders[adapter] = _Recorder(layer, config.mode, grams, grads, contributes)
    return adapter, config, layers


def check_finite(adapter: str, layers: list[GraftLayer]) -> None:
    """Raise before anything is changed if any layer recorded NaN/Inf."""
    broken = [layer.module_name for layer in layers if not layer.graft_recorders[adapter].finite()]
    if broken:  # checked for every layer before any changes, so a failure leaves the adapter as it was
        raise NonFiniteCalibrationError(
            f"Calibration of graft {adapter!r} recorded NaN/Inf statistics at {broken[0]!r} ({len(broken)} layers "
            "in all): the loss or the activations of the calibration data are not finite. Nothing was calibrated; "
            "check the data (and the loss on it) and calibrate again."
        )


def finish_recording(adapter: str, config: GraftConfig, layers: list[GraftLayer], progress: bool) -> None:
    """Sum the statistics over ranks (under torch.distributed) and turn them into each layer's projections and Φ₀."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for layer in layers:
            layer.graft_recorders[adapter].sum_over_ranks()
    check_finite(adapter, layers)
    quiet = not progress or len(layers) < PROGRESS_MIN_MODULES or None
    for layer in tqdm(layers, desc=f"Graft {adapter!r} from calibration", unit="module", disable=quiet):
        layer.apply_calibration(adapter, config, layer.graft_recorders[adapter])


def stop_recording(adapter: str, layers: list[GraftLayer]) -> None:
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

    To spend no extra passes on it, let the first training steps calibrate instead: `peft_graft.calibrating_step`,
    `peft_graft.CalibratingSteps`.
    """
    if isinstance(dataloader, (str, bytes, Mapping, torch.Tensor)) or not isinstance(dataloader, Iterable):
        raise GraftConfigError(
            f"calibrate() takes an iterable of batches (dicts of model inputs, e.g. a DataLoader), got "
            f"{type(dataloader).__name__}; for a single batch pass [batch]."
        )
    adapter, config, layers = start_recording(model, adapter_name, grads=False)
    grads = layers[0].graft_recorders[adapter].grads
    vocab = vocabulary_size(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    used = 0
    try:
        for batch in tqdm(dataloader, desc=f"Calibrating graft {adapter!r}", disable=not progress, total=max_batches):
            if max_batches is not None and used >= max_batches:
                break
            _check_batch(batch, used, vocab)
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
        finish_recording(adapter, config, layers, progress)
    finally:
        stop_recording(adapter, layers)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return used

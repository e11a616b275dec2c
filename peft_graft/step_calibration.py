"""Calibration from the training steps themselves: `calibrating_step` (the first step) and `CalibratingSteps` (the
first k steps, the later ones refining the projections), at no extra pass over data.

Step 1 is exact: a graft that starts at ΔW = 0 changes neither the loss nor any gradient, so the Σ gᵀx recorded at
each grafted layer is the loss's gradient w.r.t. its effective weight; the projections come from it and Φ gets the
gradient backpropagation would have given it with those projections in place. Steps 2..k run with the graft
acting; each adds its recorded gradient to the sum, the projections move to that sum's top-r subspaces, Φ is carried
over to the new basis (the part of ΔW the new subspaces hold), gets the step's gradient in that basis, and the
optimizer forgets its state for Φ (its moments were in the old basis). k steps thus sum the gradients of k batches,
as `calibrate()` on k batches does (each taken at its step's weights rather than at the base's), without the k extra
forward and backward passes. With ``refine_each_step=False`` steps 2..k-1 only add their gradients to the sum
(the graft trains in step 1's basis meanwhile) and step k moves the projections once: the same k-batch subspace for
the cost of recording, without a solve and a change of basis on every step.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import torch
import torch.distributed as dist
from torch import nn

from .calibration import (
    adapter_or_active,
    check_finite,
    finish_recording,
    needs_calibration,
    start_recording,
    stop_recording,
)
from .errors import CalibrationRequiredError, GraftConfigError
from .tuners.graft.config import GraftConfig
from .tuners.graft.layer import GraftLayer


class CalibratingSteps:
    """Calibrates adapter ``adapter_name`` on the first ``steps`` training steps; `step` wraps each one::

        calibration = peft_graft.CalibratingSteps(model, steps=4)
        for batch in loader:
            with calibration.step(optimizer):          # does nothing once the k steps are done
                model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    ``max_grad_norm`` clips the gradients it sets (the adapter's parameters, jointly; set after any clipping your
    loop did). ``refine_each_step=False`` solves for projections on the first and the last step only; the steps
    between add their gradients to the sum, so what they cost beyond an ordinary step is the weight-gradient
    product, not the solver and the change of basis. Needs ``init_weights=True``, one process (under
    torch.distributed use `calibrate` on every rank) and, for ``steps > 1``, a dense Φ with activation or gradient
    projections.
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int = 1,
        adapter_name: str | None = None,
        max_grad_norm: float | None = None,
        refine_each_step: bool = True,
    ) -> None:
        self.model, self.steps, self.max_grad_norm = model, steps, max_grad_norm
        self.refine_each_step = refine_each_step
        self.adapter = adapter_or_active(model, adapter_name)
        self.done = 0
        self._totals: dict[GraftLayer, object] = {}
        self._check()

    def _check(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise GraftConfigError(f"steps must be a positive integer, got {self.steps!r}.")
        if not isinstance(self.refine_each_step, bool):
            raise GraftConfigError(f"refine_each_step must be True or False, got {self.refine_each_step!r}.")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise GraftConfigError(
                "Calibrating on training steps runs in one process; under torch.distributed calibrate with "
                "`peft_graft.calibrate(model, shard)` on every rank before training."
            )
        config = getattr(self.model, "peft_config", {}).get(self.adapter)
        if not isinstance(config, GraftConfig):
            raise GraftConfigError(f"Adapter {self.adapter!r} is not a graft adapter ({type(config).__name__}).")
        if config.init_weights not in (True, "zeros"):
            raise GraftConfigError(
                f"Calibrating on training steps needs a graft that starts at ΔW = 0 (init_weights=True), so that the "
                f"first step records the step the calibrated adapter would take; adapter {self.adapter!r} has "
                f"init_weights={config.init_weights!r}. Use `peft_graft.calibrate(model, dataloader)` instead."
            )
        if not needs_calibration(self.model, self.adapter):
            raise GraftConfigError(f"Adapter {self.adapter!r} has nothing left to calibrate.")
        if self.steps > 1 and (config.phi != "dense" or config.projection not in ("activation", "gradient")):
            raise GraftConfigError(
                f"Refining the projections over {self.steps} steps carries Φ over to new bases, which needs "
                f"phi='dense' and projection='activation' or 'gradient' (adapter {self.adapter!r} has "
                f"phi={config.phi!r}, projection={config.projection!r}); use steps=1."
            )

    @property
    def finished(self) -> bool:
        return self.done >= self.steps

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> CalibratingStep:
        """The context for the next training step's forward and backward passes (all its micro-batches). From the
        second step on, ``optimizer`` is needed: its state for Φ is reset when Φ changes basis."""
        if self.done and not self.finished and optimizer is None:
            raise GraftConfigError(
                "From the second calibrating step on, pass the optimizer: CalibratingSteps.step(optimizer)."
            )
        return CalibratingStep(self, optimizer)

    def _begin(self) -> tuple[GraftConfig, list[GraftLayer]]:
        _, config, layers = start_recording(self.model, self.adapter, grads=True, contributes=self.done > 0)
        return config, layers

    def _absorb(self, layers: list[GraftLayer], config: GraftConfig, optimizer: torch.optim.Optimizer | None) -> None:
        """Turn the step just recorded into projections and gradients (changing nothing if it cannot)."""
        pairs = [(layer, layer.graft_recorders[self.adapter]) for layer in layers]
        missing = [layer.module_name for layer, rec in pairs if rec.grad_x is None]
        if missing:
            raise CalibrationRequiredError(
                f"No gradient reached {missing[0]!r} (and {len(missing) - 1} more graft layers) in a calibrating "
                "step: run the step's forward and loss.backward() inside the block."
            )
        if not self.done:
            finish_recording(self.adapter, config, layers, progress=False)
            for layer, rec in pairs:
                layer.add_recorded_step_gradient(self.adapter, rec)
            if self.steps > 1:  # the first step's statistics start the sums the later steps refine from
                self._totals = dict(pairs)
        else:
            check_finite(self.adapter, layers)
            refine = self.refine_each_step or self.done + 1 == self.steps
            for layer, rec in pairs:
                self._totals[layer].absorb(rec)
                if refine:
                    layer.refine_projections(self.adapter, config, self._totals[layer], rec)
                    if optimizer is not None:
                        optimizer.state.pop(layer.graft_phi[self.adapter].weight, None)
        self.done += 1
        if self.finished:
            self._totals = {}
        if self.max_grad_norm is not None:
            params = [p for layer in layers for p in layer.adapter_parameters(self.adapter) if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)


class CalibratingStep:
    """One step of `CalibratingSteps` (a context manager); `discard` leaves it without using what it recorded."""

    def __init__(self, owner: CalibratingSteps, optimizer: torch.optim.Optimizer | None) -> None:
        self.owner, self.optimizer = owner, optimizer
        self._active: tuple[GraftConfig, list[GraftLayer]] | None = None

    def __enter__(self) -> Self:
        if not self.owner.finished:
            self._active = self.owner._begin()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._active is None:
            return
        if exc_type is not None:
            self.discard()
            return
        config, layers = self._active
        try:
            self.owner._absorb(layers, config, self.optimizer)
        finally:
            self.discard()

    def discard(self) -> None:
        """Stop recording; what this step recorded is dropped (an uncalibrated adapter stays uncalibrated)."""
        if self._active is not None:
            stop_recording(self.owner.adapter, self._active[1])
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
    calibrated adapter been in place (exact: see the module docstring). The optimizer thus takes the step a
    calibrated adapter takes on that batch; the calibration costs the weight-gradient products and the projection
    solver, not a pass over data. ``CalibratingSteps(model, steps=k)`` refines the projections over k steps; with
    `transformers.Trainer` use `peft_graft.CalibrateOnFirstSteps`.
    """
    return CalibratingSteps(model, 1, adapter_name, max_grad_norm).step()

"""`CalibrateOnFirstSteps`: `CalibratingSteps` wired into `transformers.Trainer`, so a graft with data-driven
projections is calibrated by the first optimizer steps' own forward and backward passes."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .calibration import needs_calibration
from .step_calibration import CalibratingStep, CalibratingSteps


logger = logging.getLogger(__name__)


class CalibrateOnFirstSteps(TrainerCallback):
    """Calibrates adapter ``adapter_name`` on the first ``steps`` optimizer steps (each with all its
    gradient-accumulation micro-batches); see `peft_graft.CalibratingSteps`.

    ``Trainer(..., callbacks=[CalibrateOnFirstSteps(steps=4)])``. Does nothing when the adapter has nothing left to
    calibrate when training starts (already calibrated, or resumed from a checkpoint). Trainer clips gradients
    before this callback sets the adapter's, so they are clipped here to ``args.max_grad_norm``.
    ``refine_each_step=False`` moves the projections on the first and last of the steps only.
    """

    def __init__(self, steps: int = 1, adapter_name: str | None = None, refine_each_step: bool = True) -> None:
        self.steps, self.adapter_name, self.refine_each_step = steps, adapter_name, refine_each_step
        self._calibration: CalibratingSteps | None = None
        self._step: CalibratingStep | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        self._calibration = None
        if state.global_step == 0 and needs_calibration(model, self.adapter_name):
            clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
            self._calibration = CalibratingSteps(model, self.steps, self.adapter_name, clip, self.refine_each_step)
            logger.info("Calibrating the graft on the first %d training step(s).", self.steps)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._drop_open_step()  # one left open by a step that failed before the optimizer ran
        if self._calibration is not None and not self._calibration.finished:
            self._step = self._calibration.step(kwargs.get("optimizer")).__enter__()

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._step is not None:
            step, self._step = self._step, None
            step.__exit__(None, None, None)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._drop_open_step()

    def _drop_open_step(self) -> None:
        if self._step is not None:
            self._step.discard()
            self._step = None

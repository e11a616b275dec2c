"""`CalibrateOnFirstStep`: `calibrating_step` wired into `transformers.Trainer`, so a graft with data-driven
projections is calibrated by the first optimizer step's own forward and backward passes."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .calibration import CalibratingStep, calibrating_step, needs_calibration


logger = logging.getLogger(__name__)


class CalibrateOnFirstStep(TrainerCallback):
    """Records the first optimizer step (all its gradient-accumulation micro-batches) and calibrates adapter
    ``adapter_name`` from it before the optimizer steps; the step then is the one the calibrated adapter takes.

    ``Trainer(..., callbacks=[CalibrateOnFirstStep()])``. Does nothing when the adapter has nothing left to calibrate
    (already calibrated, or resumed from a checkpoint). Trainer clips gradients before this callback sets the
    adapter's, so they are clipped here to ``args.max_grad_norm``. See `peft_graft.calibrating_step`.
    """

    def __init__(self, adapter_name: str | None = None) -> None:
        self.adapter_name = adapter_name
        self._step: CalibratingStep | None = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        self.on_train_end(args, state, control)  # a recording left by a run that failed inside its first step
        if state.global_step != 0 or not needs_calibration(model, self.adapter_name):
            return
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        self._step = calibrating_step(model, self.adapter_name, clip).__enter__()
        logger.info("Calibrating the graft on the first training step.")

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._step is not None:
            step, self._step = self._step, None
            step.__exit__(None, None, None)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._step is not None:  # stopped before the first optimizer step: record nothing further
            self._step.discard()
            self._step = None

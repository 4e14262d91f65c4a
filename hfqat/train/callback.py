"""`QATCallback`: distillation from the full-precision teacher and dynamic bit re-allocation for any Trainer.

Usage: ``Trainer(..., callbacks=[hfqat.QATCallback()])`` on a model loaded with an `hfqat.QATConfig`; for trl,
``hfqat.integrations.trl.QATSFTTrainer(..., callbacks=[callback])`` (SFTTrainer computes its loss from a fused LM head;
other trainers that compute the loss from the logits take ``compute_loss_func=callback.make_compute_loss_func()``).

Per training run:

- train begin: builds the teacher and hooks the distillation loss into the model's forward
  (`hfqat.train.teachers`, `hfqat.train.distillation`); fits per-layer clip ratios; if the current bits break the
  budget, makes a first allocation (`hfqat.train.reallocation`).
- every step: sets the soft rounding/clamping sharpness from training progress (geometric from ``soft_anneal[0]``
  to ``soft_anneal[1]`` until ``freeze_after``, then ``inf``: the last steps train the exact quantizer that export
  packs); observes per-step sensitivities (Fisher) before the optimizer step in the last quarter of each
  re-allocation interval (`hfqat.train.schedule`; the rest run at QAT cost).
- every ``reallocate_every`` steps up to ``freeze_after · max_steps``: measures the loss increase of each kind of
  layer at each bit choice and calibrates the estimator's predictions to it (`hfqat.train.calibration`), then
  re-chooses every layer's bits (`hfqat.train.allocator`: exact, with hysteresis; ``tie_fused``: q/k/v and gate/up
  share one width, as vLLM serves them; MoE experts are units of the same allocation) and applies them in place
  (``set_bits``: the scale parameters keep shape and identity, so the optimizer, its Adam moments and the
  scheduler keep working). Per-row widths (``QATConfig(bits_granularity="row")``) do the same per output row.
- after every optimizer step: multiplies the weight and scale update of every row (or layer) narrower than the
  config's bits by ``2^(grid_lr_power · (config bits − width))`` (`hfqat.train.grid_updates`).
- logs ``task_loss`` and ``distill_loss`` next to Trainer's ``loss`` (their mix).
- train end: writes ``bit_allocation.png``, ``loss_curves.png`` and ``bit_allocation_history.json`` to
  ``args.output_dir`` (`hfqat.train.history`); ``callback.history`` holds the same history.

Resume: the callback is an `ExportableState`: Trainer stores its state in each checkpoint's ``trainer_state.json``
and the callback reads it back itself on ``train(resume_from_checkpoint=...)``, with its files (the snapshot
teacher, per-row EMAs) from the checkpoint being resumed (`hfqat.train.state_store`), so a resumed run continues
exactly (same allocation sequence). ``restore_callback_states_from_checkpoint`` is not needed; with it set,
Trainer re-creates the callback from its saved arguments, which cannot include a teacher *model* object.

The class is a thin Trainer adapter over parts that work without a Trainer: `CallbackArguments` (settings,
defaults, validation), `Schedule` (which step does what), `Reallocation` (the run's `SensitivityTracker` and
`LayerAllocator` / `RowAllocator`, step by step, into an `AllocationHistory`), `GridStepUpdates`,
`CheckpointStore`, `attach_distillation` and `logged_losses`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..distributed import is_sharded
from ..quant.modeling import bit_allocation, qat_layers, set_soft_sharpness
from .allocator import LayerAllocator, config_bits
from .arguments import CallbackArguments
from .distillation import DistillationHook, SnapshotTeacher
from .grid_updates import GridStepUpdates
from .history import HISTORY_FILE, AllocationHistory
from .reallocation import Reallocation
from .schedule import Schedule
from .state_store import ROW_SCORES_FILE, TEACHER_FILE, CheckpointStore
from .teachers import attach_distillation, logged_losses

__all__ = ["HISTORY_FILE", "ROW_SCORES_FILE", "TEACHER_FILE", "QATCallback"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class QATCallback(CallbackArguments, TrainerCallback, ExportableState):
    """Distillation from the full-precision teacher + sensitivity-aware bit re-allocation, for any Trainer.

    Settings (what each does, defaults, allowed values): `hfqat.train.arguments.CallbackArguments`, which this class
    extends with the Trainer events.
    """

    history: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store = CheckpointStore(type(self).__name__)
        self._hook: DistillationHook | None = None
        self._loss_in_trainer = False  # set by `make_compute_loss_func`
        self._model: nn.Module | None = None
        self._run: Reallocation | None = None  # set at train begin
        self._grid_updates: GridStepUpdates | None = None
        self._schedule = Schedule(self.reallocate_every, 0)
        self._history = AllocationHistory(self.history)
        self._soft = False
        self._last_logged_step = 0

    # -- public views -----------------------------------------------------------------------------------------
    @property
    def allocation(self) -> dict[str, int]:
        """The current bits of every quantized layer (and MoE expert) of the model being trained."""
        return bit_allocation(self._model) if self._model is not None else {}

    @property
    def _estimator(self):
        """The sensitivity estimator of the run (for inspection)."""
        return self._run.tracker.estimator if self._run is not None else None

    @property
    def _allocator(self) -> LayerAllocator | None:
        return self._run.allocator if self._run is not None else None

    def _calibration_batch(self) -> dict[str, Any] | None:
        return self._run.calibration_batch(self._last_batch()) if self._run is not None else None

    def _last_batch(self) -> dict[str, Any] | None:
        return self._hook.last_batch if self._hook is not None else None

    # -- ExportableState ----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        estimator = self._run.tracker.state_dict() if self._run is not None else {"scores": {}, "clip": {}}
        budget = self._run.budget if self._run is not None else None
        return self._store.state_record(self.saved_arguments(), self.history, budget, estimator)

    # -- training events ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model
        layers = list(qat_layers(model))
        self._soft = any(layer.spec.rounding == "soft" or layer.spec.clamping == "soft" for _, layer in layers)
        self._schedule = Schedule.for_run(self.reallocate_every, self.freeze_after, state.max_steps,
                                          self.soft_anneal if self._soft else None)
        self._last_logged_step = state.global_step
        if args.restore_callback_states_from_checkpoint and isinstance(self.teacher, nn.Module):
            logger.warning("QATCallback: restore_callback_states_from_checkpoint=True re-creates callbacks from "
                           "saved arguments, which cannot hold a teacher model; leave it False, QATCallback "
                           "restores its own state.")
        if self._run is not None:
            self._run.tracker.stop()
        self._run = Reallocation(model, self, self._schedule, self._history, kwargs.get("train_dataloader"),
                                 is_sharded(model))
        saved = self._store.saved_state(args, state)
        if self._hook is not None:
            self._hook.detach()
        self._hook = attach_distillation(self, model, self._store, args.gradient_accumulation_steps,
                                         self._loss_in_trainer)
        self._run.start(state.global_step, saved, self._store)
        # grid updates from the widths this run starts with (first allocation or checkpoint)
        deepspeed = bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        self._grid_updates = GridStepUpdates.for_run(layers, self.grid_lr_power, config_bits(model), deepspeed)
        self._anneal(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._anneal(state.global_step)
        self._run.before_step(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._run.before_optimizer_step(state.global_step, self._last_batch())
        if self._grid_updates is not None:
            self._grid_updates.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._grid_updates is not None:
            self._grid_updates.after_step()

    def on_step_end(self, args, state, control, **kwargs):
        if self._run.after_step(state.global_step, self._last_batch(), control.should_save) and \
                self._grid_updates is not None:
            self._grid_updates.refresh()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._hook is None or logs is None or "loss" not in logs:
            return
        steps = max(state.global_step - self._last_logged_step, 1)
        self._last_logged_step = state.global_step
        extra = logged_losses(self._hook, steps, args.world_size, args.average_tokens_across_devices)
        logs.update(extra)
        # Trainer appended a copy of `logs` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        teacher = self._hook.teacher if self._hook is not None else None
        self._store.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                         teacher if isinstance(teacher, SnapshotTeacher) else None,
                         self._run.tracker.row_scores if self._run is not None else {})

    def on_train_end(self, args, state, control, **kwargs):
        if self._run is not None:
            self._run.tracker.stop()
        if self._hook is not None:
            self._hook.detach()
            self._hook = None
        if self._soft:
            set_soft_sharpness(self._model, float("inf"))
        if state.is_world_process_zero:
            self._history.write(args.output_dir, self._run.summary(), state.log_history, self.write_plots)

    def make_compute_loss_func(self) -> Callable[..., torch.Tensor]:
        """A ``compute_loss_func`` for trainers that compute the loss from the logits themselves (what
        `hfqat.integrations.trl.QATSFTTrainer` uses; also ``Trainer(..., compute_loss_func=...)``). The callback's forward hook
        then only runs the teacher; the returned function mixes the task and distillation losses from the logits and
        the labels the trainer kept."""
        self._loss_in_trainer = True

        def compute_loss_func(outputs, labels, num_items_in_batch=None):
            if self._hook is None:
                raise RuntimeError("QATCallback's compute_loss_func runs during training only (after train begin)")
            return self._hook.compute_loss(outputs, labels, num_items_in_batch)

        return compute_loss_func

    def _anneal(self, step: int) -> None:
        sharpness = self._schedule.sharpness(step)
        if sharpness is not None:
            set_soft_sharpness(self._model, sharpness)

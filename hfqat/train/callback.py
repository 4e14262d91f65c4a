"""`QATCallback`: distillation from the full-precision teacher and dynamic bit re-allocation for any Trainer.

Usage: ``Trainer(..., callbacks=[hfqat.QATCallback()])`` on a model loaded with an `hfqat.QATConfig`; for trl,
``hfqat.integrations.trl.QATSFTTrainer(..., callbacks=[callback])`` (SFTTrainer computes its loss from a fused LM head; other
trainers that compute the loss from the logits take ``compute_loss_func=callback.make_compute_loss_func()``).

Per training run:

- train begin: builds the teacher and hooks the distillation loss into the model's forward
  (`hfqat.train.distillation`); fits per-layer clip ratios; if the current bits break the budget, makes a first
  allocation from the weight-variance prior (no gradient has been seen yet).
- every step: sets the soft rounding/clamping sharpness from training progress (geometric from
  ``soft_anneal[0]`` to ``soft_anneal[1]`` until ``freeze_after``, then ``inf``: the last steps train the
  exact quantizer that export packs); observes per-step sensitivities (Fisher) before the optimizer step, in
  the last quarter of each re-allocation interval (the steps the next allocation reads; the rest run at QAT cost).
- every ``reallocate_every`` steps up to ``freeze_after · max_steps``: measures the loss increase of each kind of
  layer at each bit choice and calibrates the estimator's predictions to it (`hfqat.train.calibration`), then
  re-chooses every layer's bits (`hfqat.train.allocation`, exact, with hysteresis; ``tie_fused``: q/k/v and gate/up
  share one width, as vLLM serves them; MoE experts are units of the same allocation) and applies them with
  ``layer.set_bits`` — in place, the scale parameters keep shape and identity, so the optimizer, its Adam
  moments and the scheduler keep working.
- after every optimizer step: multiplies the weight and scale update of every row (or layer) narrower than the
  config's bits by ``2^(grid_lr_power · (config bits − width))`` (`hfqat.train.grid_updates`), so low-bit rows re-round
  as often as the learning rate was tuned for.
- logs ``task_loss`` and ``distill_loss`` next to Trainer's ``loss`` (their mix).
- train end: writes ``bit_allocation.png``, ``loss_curves.png`` and ``bit_allocation_history.json`` to
  ``args.output_dir``; ``callback.history`` holds the same history.

Per-row widths: on a model loaded with ``QATConfig(bits_granularity="row")`` every step above works on output rows
instead of layers: the first allocation comes from squared gradients on the training set's first examples
(`PRIOR_TOKENS`, in pieces; not the weight-variance prior), the estimators predict each row's loss increase at
each width (the calibration still measures whole kinds of layers and rescales each layer's rows by the same
factor), `allocate_unit_bits` chooses every row's width under the budget (Lagrangian; hysteresis per row),
``layer.set_row_bits`` re-fits the rows that change, and the history records each layer's mean width. The per-row sensitivity EMAs are saved as
``hfqat_sensitivity.safetensors`` in each checkpoint (too large for ``trainer_state.json``); the row widths
themselves are the layers' ``weight_row_bits`` buffers, in the model checkpoint. Single process and DDP; not
FSDP2 / ZeRO-3 (their shards cut the rows).

Resume: the callback is an `ExportableState`, so Trainer stores its state (allocation history, sensitivity
EMAs, clip ratios) in each checkpoint's ``trainer_state.json``; on ``train(resume_from_checkpoint=...)``
the callback reads it back itself (``restore_callback_states_from_checkpoint`` is not needed; with it set,
Trainer re-creates the callback from its saved arguments, which cannot include a teacher *model* object).
The per-layer bits, scales and float weights are in the model checkpoint. The default snapshot teacher
is saved as ``hfqat_teacher.safetensors`` in each checkpoint, so a resumed run distills from the same
train-start weights and continues exactly (same allocation sequence). Files are read from the checkpoint being
resumed (a copied run reads its own); a damaged one raises a ``ValueError`` naming it.

The class is a thin Trainer adapter over parts that work without a Trainer: `CallbackArguments` (settings,
defaults, validation), `Schedule` (which step does what), `SensitivityTracker`, `LayerAllocator` /
`RowAllocator`, `GridStepUpdates`, `AllocationHistory`, `CheckpointStore` and `run_teacher`.
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

from ..distributed import full_numel, is_sharded, mean_across_ranks
from ..quant.modeling import bit_allocation, qat_layers, set_soft_sharpness
from .allocation import tied_groups
from .allocator import LayerAllocator, RowAllocator, config_bits
from .arguments import CallbackArguments
from .calibration import leading_batch
from .distillation import DistillationHook, SnapshotTeacher
from .expert_allocation import ExpertSensitivity
from .grid_updates import GridStepUpdates
from .history import HISTORY_FILE, AllocationHistory
from .schedule import Schedule
from .state_store import ROW_SCORES_FILE, TEACHER_FILE, CheckpointStore
from .teachers import run_teacher
from .tracker import SensitivityTracker

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
        self._tracker: SensitivityTracker | None = None
        self._allocator: LayerAllocator | None = None  # None: re-allocation off
        self._grid_updates: GridStepUpdates | None = None
        self._schedule = Schedule(self.reallocate_every, 0)
        self._history = AllocationHistory(self.history)
        self._soft = False
        self._calibrate = False  # `calibrate` resolved for this model
        self._leading_batch: dict[str, Any] | None = None
        self._last_logged_step = 0

    # -- public views -----------------------------------------------------------------------------------------
    @property
    def allocation(self) -> dict[str, int]:
        """The current bits of every quantized layer (and MoE expert) of the model being trained."""
        return bit_allocation(self._model) if self._model is not None else {}

    @property
    def _estimator(self):
        """The sensitivity estimator of the run (for inspection)."""
        return self._tracker.estimator if self._tracker is not None else None

    # -- ExportableState ----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        estimator = self._tracker.state_dict() if self._tracker is not None else {"scores": {}, "clip": {}}
        budget = self._allocator.budget if self._allocator is not None else None
        return self._store.state_record(self.saved_arguments(), self.history, budget, estimator)

    # -- training events ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model
        layers = list(qat_layers(model))
        if not layers:
            raise ValueError("QATCallback: the model has no hfqat fake-quantized layers; load it with "
                             "from_pretrained(..., quantization_config=hfqat.QATConfig(...))")
        rows = any(layer.weight_row_bits is not None for _, layer in layers)
        if rows and is_sharded(model):
            raise ValueError("QATCallback: per-row bit widths (QATConfig(bits_granularity='row')) need whole weights "
                             "on every rank; allowed there: single process or DDP, not FSDP2 / ZeRO-3 (use "
                             "bits_granularity='layer')")
        self._calibrate = self.calibrate if self.calibrate is not None else not rows
        self._grid_updates = self._make_grid_updates(args, layers)
        self._soft = any(layer.spec.rounding == "soft" or layer.spec.clamping == "soft" for _, layer in layers)
        self._schedule = Schedule.for_run(self.reallocate_every, self.freeze_after, state.max_steps,
                                          self.soft_anneal if self._soft else None)
        self._last_logged_step = state.global_step
        if args.restore_callback_states_from_checkpoint and isinstance(self.teacher, nn.Module):
            logger.warning("QATCallback: restore_callback_states_from_checkpoint=True re-creates callbacks from "
                           "saved arguments, which cannot hold a teacher model; leave it False, QATCallback "
                           "restores its own state.")
        saved = self._store.saved_state(args, state)
        self._attach_hook(args, model)
        self._allocator = None
        if self.reallocate_every:
            budget = float(self.budget_bits if self.budget_bits is not None else config_bits(model))
            numels = {name: full_numel(layer.weight) for name, layer in layers}
            groups = tied_groups(model) if self.tie_fused and not rows else ()
            self._allocator = (RowAllocator if rows else LayerAllocator)(model, layers, numels, self.bit_choices,
                                                                         budget, self.hysteresis, groups,
                                                                         experts=not is_sharded(model))
        self._leading_batch = None
        if self._calibrate and self._allocator is not None:
            self._leading_batch = leading_batch(kwargs.get("train_dataloader"), next(model.parameters()).device)
        if self._tracker is not None:
            self._tracker.stop()
        experts = ExpertSensitivity(self.bit_choices, self.ema) if self._allocator is not None and \
            self._allocator.experts else None
        self._tracker = SensitivityTracker(self.sensitivity, self.bit_choices, self.ema, layers, rows, self.seed,
                                           experts)
        if saved is not None:
            self.history[:] = saved["history"]
            self._tracker.load_state_dict(saved["estimator"])
            if rows:
                self._tracker.row_scores = self._store.load_row_scores(
                    {name: torch.Size((len(self.bit_choices), layer.out_features)) for name, layer in layers})
        else:
            self.history.clear()
            if self._allocator is not None:
                self._tracker.refit_clip()
                self._first_allocation(state.global_step, kwargs.get("train_dataloader"))
        if self._grid_updates is not None:
            self._grid_updates.refresh()  # the widths this run starts from (first allocation or checkpoint)
        self._anneal(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._anneal(state.global_step)
        if self._allocator is not None:  # statistics hooks (K-FAC) only on the steps the next allocation reads
            self._tracker.collect(self._schedule.measures(state.global_step + 1))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._allocator is not None and self._schedule.measures(state.global_step + 1):
            self._tracker.observe_step(self._model, state.global_step, self._last_batch())
        if self._grid_updates is not None:
            self._grid_updates.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._grid_updates is not None:
            self._grid_updates.after_step()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self._allocator is not None and self._schedule.reallocates(step):
            self._reallocate(step)
            if self._grid_updates is not None:
                self._grid_updates.refresh()
        if control.should_save and self._allocator is not None:
            self._tracker.share()  # the checkpoint (rank 0's state) then holds what every rank will average
        if self._schedule.frozen(step):
            self._tracker.stop()  # bits are final: stop collecting statistics

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._hook is None or logs is None or "loss" not in logs:
            return
        steps = max(state.global_step - self._last_logged_step, 1)
        self._last_logged_step = state.global_step
        # Every rank logs (Trainer gathers its own loss there too): report the global value, as Trainer does.
        sums = mean_across_ranks({"logs": self._hook.pop_sums()}).get("logs", {})
        # Trainer's own rule for a global item count (then each rank's value is a part of one global mean).
        if self._hook.saw_item_counts and args.average_tokens_across_devices and args.world_size > 1:
            sums = {key: value * args.world_size for key, value in sums.items()}
        extra = {key: value / steps for key, value in sums.items()}
        logs.update(extra)
        # Trainer appended a copy of `logs` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        teacher = self._hook.teacher if self._hook is not None else None
        self._store.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                         teacher if isinstance(teacher, SnapshotTeacher) else None,
                         self._tracker.row_scores if self._tracker is not None else {})

    def on_train_end(self, args, state, control, **kwargs):
        if self._tracker is not None:
            self._tracker.stop()
        if self._hook is not None:
            self._hook.detach()
            self._hook = None
        if self._soft:
            set_soft_sharpness(self._model, float("inf"))
        if state.is_world_process_zero:
            budget = self._allocator.budget if self._allocator is not None else None
            numels = self._allocator.numels if self._allocator is not None else {  # the allocator's: with experts
                name: full_numel(layer.weight) for name, layer in qat_layers(self._model)}
            summary = {"budget_bits": budget, "bit_choices": list(self.bit_choices), "sensitivity": self.sensitivity,
                       "numels": numels, "scores": self._tracker.estimator.scores}
            if self._tracker.experts is not None:
                summary["expert_scores"] = self._tracker.experts.scores
            self._history.write(args.output_dir, summary, state.log_history, self.write_plots)

    # -- pieces -------------------------------------------------------------------------------------------------
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

    def _make_grid_updates(self, args, layers) -> GridStepUpdates | None:
        if self.grid_lr_power <= 0:
            return None
        if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            logger.warning("QATCallback: grid_lr_power has no effect under DeepSpeed (its optimizer keeps its "
                           "own master weights); narrow rows train at the plain learning rate.")
            return None
        return GridStepUpdates(layers, self.grid_lr_power, config_bits(self._model))

    def _attach_hook(self, args, model: nn.Module) -> None:
        if self._hook is not None:
            self._hook.detach()
        teacher = run_teacher(self.teacher, model, self.replicate_teacher, self._store) if self.teacher is not None \
            else None
        self._hook = DistillationHook(teacher, self.distill_weight, self.temperature, args.gradient_accumulation_steps,
                                      loss_in_trainer=self._loss_in_trainer)
        self._hook.attach(model)

    def _last_batch(self) -> dict[str, Any] | None:
        return self._hook.last_batch if self._hook is not None else None

    def _calibration_batch(self) -> dict[str, Any] | None:
        # Fixed rows (the training set's first examples) where the dataset allows: the same at every
        # re-allocation, on every rank and after a resume, so measurements differ only by what training changed.
        return self._leading_batch if self._leading_batch is not None else self._last_batch()

    def _anneal(self, step: int) -> None:
        sharpness = self._schedule.sharpness(step)
        if sharpness is not None:
            set_soft_sharpness(self._model, sharpness)

    def _first_allocation(self, step: int, dataloader: Any) -> None:
        measured = None
        if self._allocator.needs_first_allocation():
            batch = self._calibration_batch()
            measured = self._allocator.measure(batch, self._tracker.clip)
            self._tracker.note_bits(self._allocator.first_allocation(measured, self._tracker.clip, dataloader, batch))
        self._history.record(step, bit_allocation(self._model), self._allocator.numels, None, measured)

    def _reallocate(self, step: int) -> None:
        self._tracker.observe_at_reallocation(self._model, step, self._last_batch())
        measured = self._allocator.measure(self._calibration_batch(), self._tracker.clip) if self._calibrate else None
        scores = self._tracker.shared_scores()
        expert_scores = self._tracker.expert_scores(self._model)
        if scores is None or expert_scores is None:
            return
        bits, predicted = self._allocator.reallocate(scores, measured, expert_scores)
        self._tracker.note_bits(bits)
        self._tracker.refit_clip()
        self._history.record(step, bit_allocation(self._model), self._allocator.numels, predicted, measured)

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
  re-chooses every layer's bits (`hfqat.train.allocation`, exact, with hysteresis) and applies them with
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
train-start weights and continues exactly (same allocation sequence).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..config import SUPPORTED_BITS
from ..distributed import (
    all_reduce_mean_,
    broadcast_object,
    full_numel,
    is_main_process,
    is_sharded,
    local_view,
    mean_across_ranks,
)
from ..quant.modeling import (
    average_bits,
    bit_allocation,
    qat_layers,
    set_soft_sharpness,
)
from .allocation import allocate_bits, allocate_unit_bits, weighted_average_bits
from .calibration import MAX_TOKENS, calibrate, leading_batch, measure_kinds, split_rows
from .distillation import DistillationHook, SnapshotTeacher, build_teacher
from .grid_updates import GridStepUpdates
from .sensitivity import (
    ESTIMATORS,
    SensitivityContext,
    gradient_row_costs,
    make_estimator,
    weight_variance_costs,
    weight_variance_row_costs,
)

logger = logging.getLogger(__name__)

TEACHER_FILE = "hfqat_teacher.safetensors"
ROW_SCORES_FILE = "hfqat_sensitivity.safetensors"
HISTORY_FILE = "bit_allocation_history.json"
STATE_VERSION = 1
MEASURED_FRACTION = 0.25  # of each re-allocation interval, at its end, in which per-step sensitivities are observed
PRIOR_TOKENS = 4 * MAX_TOKENS  # leading tokens whose gradients choose the first per-row allocation


def _invalid(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"QATCallback.{name}={value!r} is invalid; allowed values: {allowed}")


@dataclass(eq=False)
class QATCallback(TrainerCallback, ExportableState):
    """Distillation from the full-precision teacher + sensitivity-aware bit re-allocation.

    Args:
        teacher: "snapshot" (frozen copy of the quantized layers' float weights taken at train start, sharing
            everything else with the student), a model, a path/hub id loadable by `AutoModelForCausalLM`,
            or None (no distillation).
        replicate_teacher: under FSDP2, keep a whole copy of the snapshot teacher on every rank instead of
            sharding it like the weights (the teacher pass then gathers nothing; costs the quantized layers'
            full float weights per rank). Other engines keep it whole anyway.
        distill_weight: α in ``(1-α)·task + α·T²·KL(teacher‖student)``, in [0, 1].
        temperature: T > 0.
        budget_bits: parameter-weighted average bits the allocation must not exceed; None = the config's bits.
        bit_choices: bit widths a layer may take (2..8).
        reallocate_every: re-allocate every this many optimizer steps; 0 turns re-allocation off (then
            budget_bits must be None).
        sensitivity: "fisher" | "kfac" | "hutchinson" | "variance" (see `hfqat.train.sensitivity`).
        calibrate: before each re-allocation, measure the loss increase of every kind of layer at every bit
            choice on the training set's first examples (the last batch if the dataset cannot be indexed) and
            rescale the estimator's predictions to it (`hfqat.train.calibration`; ``kinds × bit choices + 1`` extra
            forward passes per re-allocation). None (default): on for per-layer widths, off for per-row widths
            (rescaling all rows of a layer by one factor trained worse on SmolLM2: bench/results).
        grid_lr_power: p in the update factor ``2^(p · (config bits − width))`` of rows narrower than the config's
            bits (`hfqat.train.grid_updates`); 0 turns it off, 1 keeps updates constant in grid steps; ≥ 0. Costs a copy
            of those layers' weights during each optimizer step; has no effect under DeepSpeed (its optimizer
            keeps its own master weights).
        ema: smoothing of the sensitivity measurements, in [0, 1).
        hysteresis: a layer only changes bits when the predicted gain of the whole new allocation exceeds
            ``hysteresis × (mean predicted loss increase per layer)`` for every layer that changes; ≥ 0.
        freeze_after: fraction of max_steps after which bits are frozen and soft rounding is exact, in (0, 1].
        soft_anneal: (start, end) sharpness of soft rounding/clamping, or None to leave it alone.
        seed: seed of the Hutchinson probes (derived per step, so resumed runs draw the same probes).
        write_plots: write the PNG figures at train end (the JSON history is always written).
    """

    teacher: Any = "snapshot"
    replicate_teacher: bool = False
    distill_weight: float = 0.5
    temperature: float = 2.0
    budget_bits: float | None = None
    bit_choices: tuple[int, ...] = (2, 3, 4, 8)
    reallocate_every: int = 50
    sensitivity: str = "fisher"
    calibrate: bool | None = None
    grid_lr_power: float = 2.0
    ema: float = 0.9
    hysteresis: float = 0.05
    freeze_after: float = 0.8
    soft_anneal: tuple[float, float] | None = (1.0, 100.0)
    seed: int = 0
    write_plots: bool = True
    history: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        self.bit_choices = tuple(sorted(self.bit_choices))
        if self.soft_anneal is not None:
            self.soft_anneal = (float(self.soft_anneal[0]), float(self.soft_anneal[1]))
        self._estimator = make_estimator(self.sensitivity, self.bit_choices, self.ema)
        self._hook: DistillationHook | None = None
        self._loss_in_trainer = False  # set by `make_compute_loss_func`
        self._model: nn.Module | None = None
        self._layers: list = []
        self._numels: dict[str, int] = {}
        self._budget: float | None = None
        self._freeze_step = 0
        self._soft = False
        self._last_logged_step = 0
        self._warned_no_scores = False
        self._checkpoint_root = ""  # where this run's checkpoints go (recorded in the state, for resume)
        self._leading_batch: dict[str, Any] | None = None
        self._step = 0
        self._rows = False  # the layers hold per-row widths: allocate rows, not layers
        self._calibrate = False  # `calibrate` resolved for this model
        self._grid_updates: GridStepUpdates | None = None

    def _validate(self) -> None:
        t = self.teacher
        if not (t is None or t == "snapshot" or isinstance(t, (str, os.PathLike, nn.Module))):
            raise _invalid("teacher", t, '"snapshot", a model, a path, or None')
        if not isinstance(self.replicate_teacher, bool):
            raise _invalid("replicate_teacher", self.replicate_teacher, "True or False")
        if isinstance(self.distill_weight, bool) or not 0.0 <= self.distill_weight <= 1.0:
            raise _invalid("distill_weight", self.distill_weight, "a number in [0, 1]")
        if not self.temperature > 0:
            raise _invalid("temperature", self.temperature, "a number > 0")
        choices = self.bit_choices
        if (not isinstance(choices, (tuple, list)) or not choices or len(set(choices)) != len(choices)
                or any(isinstance(b, bool) or b not in SUPPORTED_BITS for b in choices)):
            raise _invalid("bit_choices", choices, f"a non-empty sequence of distinct integers from {list(SUPPORTED_BITS)}")
        if isinstance(self.reallocate_every, bool) or not isinstance(self.reallocate_every, int) or \
                self.reallocate_every < 0:
            raise _invalid("reallocate_every", self.reallocate_every, "an integer >= 0 (0 = no re-allocation)")
        if self.budget_bits is not None:
            if not min(choices) <= self.budget_bits <= max(SUPPORTED_BITS):
                raise _invalid("budget_bits", self.budget_bits,
                               f"None (the config's bits) or a number in [{min(choices)}, {max(SUPPORTED_BITS)}]")
            if self.reallocate_every == 0:
                raise _invalid("budget_bits", self.budget_bits,
                               "None when reallocate_every=0 (re-allocation off); set reallocate_every > 0")
        if self.sensitivity not in ESTIMATORS:
            raise _invalid("sensitivity", self.sensitivity, str(sorted(ESTIMATORS)))
        if not (self.calibrate is None or isinstance(self.calibrate, bool)):
            raise _invalid("calibrate", self.calibrate, "None (per-layer widths: on, per-row: off), True or False")
        if isinstance(self.grid_lr_power, bool) or not isinstance(self.grid_lr_power, (int, float)) or \
                not self.grid_lr_power >= 0:
            raise _invalid("grid_lr_power", self.grid_lr_power, "a number >= 0 (0 = off)")
        if not 0.0 <= self.ema < 1.0:
            raise _invalid("ema", self.ema, "a number in [0, 1)")
        if not self.hysteresis >= 0:
            raise _invalid("hysteresis", self.hysteresis, "a number >= 0")
        if not 0.0 < self.freeze_after <= 1.0:
            raise _invalid("freeze_after", self.freeze_after, "a number in (0, 1]")
        if self.soft_anneal is not None and not (
                len(self.soft_anneal) == 2 and 0 < self.soft_anneal[0] <= self.soft_anneal[1]):
            raise _invalid("soft_anneal", self.soft_anneal, "None or (start, end) with 0 < start <= end")

    # -- public views -----------------------------------------------------------------------------------------
    @property
    def allocation(self) -> dict[str, int]:
        """The current bits of every quantized layer of the model being trained."""
        return bit_allocation(self._model) if self._model is not None else {}

    # -- ExportableState ----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        args = {name: getattr(self, name) for name in (
            "replicate_teacher", "distill_weight", "temperature", "budget_bits", "reallocate_every", "sensitivity",
            "calibrate", "grid_lr_power", "ema", "hysteresis", "freeze_after", "seed", "write_plots")}
        args["bit_choices"] = list(self.bit_choices)
        args["soft_anneal"] = list(self.soft_anneal) if self.soft_anneal is not None else None
        if self.teacher is None or isinstance(self.teacher, (str, os.PathLike)):
            args["teacher"] = os.fspath(self.teacher) if self.teacher is not None else None
        checkpoint = os.path.abspath(os.path.join(self._checkpoint_root, f"checkpoint-{self._step}"))
        resume = {"version": STATE_VERSION, "history": self.history, "budget": self._budget,
                  "estimator": self._estimator.state_dict(), "checkpoint": checkpoint}
        return {"args": args, "attributes": {"_saved_state": resume}}

    def _saved_state(self, state) -> dict[str, Any] | None:
        data = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(data, list):
            data = data[0] if data else None
        saved = (data or {}).get("attributes", {}).get("_saved_state")
        return saved if saved and saved.get("version") == STATE_VERSION else None

    # -- training events ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model
        self._layers = list(qat_layers(model))
        if not self._layers:
            raise ValueError("QATCallback: the model has no hfqat fake-quantized layers; load it with "
                             "from_pretrained(..., quantization_config=hfqat.QATConfig(...))")
        self._numels = {name: full_numel(layer.weight) for name, layer in self._layers}
        self._rows = any(layer.weight_row_bits is not None for _, layer in self._layers)
        if self._rows and is_sharded(model):
            raise ValueError("QATCallback: per-row bit widths (QATConfig(bits_granularity='row')) need whole weights "
                             "on every rank; allowed there: single process or DDP, not FSDP2 / ZeRO-3 (use "
                             "bits_granularity='layer')")
        self._calibrate = self.calibrate if self.calibrate is not None else not self._rows
        self._grid_updates = None
        if self.grid_lr_power > 0:
            if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
                logger.warning("QATCallback: grid_lr_power has no effect under DeepSpeed (its optimizer keeps its "
                               "own master weights); narrow rows train at the plain learning rate.")
            else:
                self._grid_updates = GridStepUpdates(self._layers, self.grid_lr_power, self._config_bits(model))
        self._soft = any(layer.spec.rounding == "soft" or layer.spec.clamping == "soft" for _, layer in self._layers)
        self._freeze_step = math.floor(self.freeze_after * state.max_steps)
        self._last_logged_step = self._step = state.global_step
        self._checkpoint_root = args.output_dir
        self._budget = None
        if self.reallocate_every:
            self._budget = float(self.budget_bits if self.budget_bits is not None else self._config_bits(model))
        if args.restore_callback_states_from_checkpoint and isinstance(self.teacher, nn.Module):
            logger.warning("QATCallback: restore_callback_states_from_checkpoint=True re-creates callbacks from "
                           "saved arguments, which cannot hold a teacher model; leave it False, QATCallback "
                           "restores its own state.")
        saved = self._saved_state(state) if state.global_step > 0 else None
        if state.global_step > 0 and saved is None:
            logger.warning("QATCallback: resuming without saved QATCallback state; starting its state afresh.")
        self._attach_hook(args, state, saved)
        self._leading_batch = None
        if self._calibrate and self._budget is not None:
            self._leading_batch = leading_batch(kwargs.get("train_dataloader"), next(model.parameters()).device)
        self._estimator.detach()
        self._estimator = make_estimator(self.sensitivity, self.bit_choices, self.ema, per_row=self._rows)
        if self._budget is not None and state.global_step < self._freeze_step:
            self._estimator.attach(self._layers)
        if saved is not None:
            self.history = list(saved["history"])
            self._estimator.load_state_dict(saved["estimator"])
            if self._rows:
                self._restore_row_scores(args, state, saved)
        else:
            self.history = []
            if self._budget is not None:
                with self._local():
                    self._estimator.refit_clip(self._layers)
                self._initial_allocation(state.global_step, kwargs.get("train_dataloader"))
        if self._grid_updates is not None:
            self._grid_updates.refresh()  # the widths this run starts from (first allocation or checkpoint)
        self._anneal(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._anneal(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._budget is not None and self._estimator.per_step and self._measures(state.global_step + 1):
            with self._local(gather_zero3=False):  # ZeRO-3 keeps gradients to itself: nothing to measure
                self._estimator.update(self._layers, self._context(state))
        if self._grid_updates is not None:
            self._grid_updates.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._grid_updates is not None:
            self._grid_updates.after_step()

    def on_step_end(self, args, state, control, **kwargs):
        step = self._step = state.global_step
        if self._budget is not None and step % self.reallocate_every == 0 and step <= self._freeze_step:
            # What runs the model (Hutchinson, calibration) runs outside the local view; the rest inside it.
            at_reallocation = not self._estimator.per_step
            if at_reallocation and self._estimator.runs_model:
                self._estimator.update(self._layers, self._context(state))
            measured = self._measure_kinds(self._calibration_batch()) if self._calibrate else None
            with self._local():
                if at_reallocation and not self._estimator.runs_model:  # e.g. variance: whole (ZeRO-3) or row weights
                    self._estimator.update(self._layers, self._context(state))
                self._reallocate(state, measured)
            if self._grid_updates is not None:
                self._grid_updates.refresh()
        if control.should_save and self._budget is not None:
            self._share_scores()  # the checkpoint (rank 0's state) then holds what every rank will average
        if step >= self._freeze_step:
            self._estimator.detach()  # bits are final: stop collecting statistics

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
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        # Every rank calls save (it gathers a sharded snapshot); rank 0 decides whether the folder exists.
        exists = broadcast_object(os.path.isdir(checkpoint))
        if isinstance(teacher, SnapshotTeacher) and exists:
            teacher.save(os.path.join(checkpoint, TEACHER_FILE))
        row_scores = self._estimator.row_scores if self._rows else {}
        if row_scores and exists and is_main_process():
            path = os.path.join(checkpoint, ROW_SCORES_FILE)
            save_file({name: t.contiguous() for name, t in row_scores.items()}, path + ".tmp")
            os.replace(path + ".tmp", path)

    def on_train_end(self, args, state, control, **kwargs):
        self._estimator.detach()
        if self._hook is not None:
            self._hook.detach()
            self._hook = None
        if self._soft:
            set_soft_sharpness(self._model, math.inf)
        if state.is_world_process_zero:
            self._write_outputs(args.output_dir, state.log_history)

    # -- pieces -------------------------------------------------------------------------------------------------
    @staticmethod
    def _config_bits(model: nn.Module) -> int:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        bits = config.get("bits") if isinstance(config, dict) else getattr(config, "bits", None)
        if bits is None:  # e.g. converted with quantize_model: the most common layer bits
            specs = [layer.spec.bits for _, layer in qat_layers(model)]
            bits = max(set(specs), key=specs.count)
        return int(bits)

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

    def _attach_hook(self, args, state, saved: dict[str, Any] | None) -> None:
        if self._hook is not None:
            self._hook.detach()
        teacher = None
        if self.teacher is not None:
            resumed = state.global_step > 0
            teacher = self._restored_snapshot(args, state, saved) if resumed and self.teacher == "snapshot" else None
            teacher = teacher or build_teacher(self.teacher, self._model, self.replicate_teacher)
        self._hook = DistillationHook(teacher, self.distill_weight, self.temperature, args.gradient_accumulation_steps,
                                      loss_in_trainer=self._loss_in_trainer)
        self._hook.attach(self._model)

    @staticmethod
    def _checkpoint_file(args, state, saved: dict[str, Any] | None, filename: str) -> tuple[str | None, list[str]]:
        """(path of ``filename`` in the checkpoint being resumed, or None; the folders tried)."""
        # Trainer does not tell callbacks the resume path: try the one recorded at save time, then the usual ones.
        candidates = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, args.resume_from_checkpoint)
        if saved and saved.get("checkpoint"):
            candidates.insert(0, saved["checkpoint"])
        found = [os.path.join(f, filename) for f in candidates if os.path.isfile(os.path.join(f, filename))]
        return (found[0] if found else None), candidates

    def _restored_snapshot(self, args, state, saved: dict[str, Any] | None) -> SnapshotTeacher | None:
        path, tried = self._checkpoint_file(args, state, saved, TEACHER_FILE)
        if path is not None:
            return SnapshotTeacher.load(self._model, path, self.replicate_teacher)
        logger.warning("QATCallback: %s not found in %s; the resumed run distills from a snapshot of the "
                       "resumed (already trained) weights instead of the original ones.", TEACHER_FILE, tried)
        return None

    def _restore_row_scores(self, args, state, saved: dict[str, Any]) -> None:
        path, tried = self._checkpoint_file(args, state, saved, ROW_SCORES_FILE)
        if path is None:
            logger.warning("QATCallback: %s not found in %s; per-row sensitivities start afresh.", ROW_SCORES_FILE,
                           tried)
            self._estimator.scores = {}  # the per-layer sums in the saved state cannot stand in for rows
            return
        self._estimator.row_scores = load_file(path)

    def _measures(self, step: int) -> bool:
        """Whether per-step sensitivities are observed at ``step``: only in the last `MEASURED_FRACTION` of each
        re-allocation interval (what the next allocation reads), so their cost is paid on few steps."""
        window = max(1, math.ceil(self.reallocate_every * MEASURED_FRACTION))
        return step <= self._freeze_step and (-step) % self.reallocate_every < window

    def _context(self, state) -> SensitivityContext:
        batch = self._hook.last_batch if self._hook is not None else None
        return SensitivityContext(self._model, state.global_step, batch, self.seed)

    def _anneal(self, step: int) -> None:
        if not self._soft or self.soft_anneal is None:
            return
        start, end = self.soft_anneal
        progress = step / self._freeze_step if self._freeze_step > 0 else 1.0
        set_soft_sharpness(self._model, math.inf if progress >= 1.0 else start * (end / start) ** progress)

    def _initial_allocation(self, step: int, dataloader: Any = None) -> None:
        if self._rows:
            self._initial_row_allocation(step, dataloader)
            return
        current = bit_allocation(self._model)
        measured = None
        if weighted_average_bits(current, self._numels) > self._budget or \
                any(b not in self.bit_choices for b in current.values()):
            measured = self._measure_kinds(self._calibration_batch())
            with self._local():
                costs = mean_across_ranks({name: weight_variance_costs(layer, self.bit_choices)
                                           for name, layer in self._layers})
                if measured:
                    costs = calibrate(costs, measured, self._numels)
                self._apply(allocate_bits(costs, self._numels, self._budget))
        self._record(step, None, measured)

    def _initial_row_allocation(self, step: int, dataloader: Any) -> None:
        measured = None
        off_choices = any(bool(torch.isin(layer.weight_row_bits, torch.tensor(self.bit_choices, dtype=torch.int8,
                                                                               device=layer.weight_row_bits.device),
                                          invert=True).any()) for _, layer in self._layers)
        if average_bits(self._model) > self._budget or off_choices:
            batch = self._calibration_batch()
            measured = self._measure_kinds(batch)
            # Squared gradients of the training set's first examples, in calibration-batch-sized pieces (trained
            # better than from the weight-variance prior: bench/results/h200_s7_row_allocation.txt), else the prior.
            leading = leading_batch(dataloader, next(self._model.parameters()).device, PRIOR_TOKENS)
            pieces = split_rows(leading) if leading is not None else [batch] if batch is not None else []
            prior = gradient_row_costs(self._model, self._layers, pieces, self.bit_choices, self._estimator.clip)
            if prior is None:
                prior = {name: weight_variance_row_costs(layer, self.bit_choices) for name, layer in self._layers}
            self._apply_rows(self._allocate_rows(prior, measured))
        self._record(step, None, measured)

    def _allocate_rows(self, row_costs: dict[str, torch.Tensor], measured: dict[str, dict[int, float]] | None,
                       hysteresis: bool = False) -> tuple[dict[str, torch.Tensor], float]:
        """Every row's width (``allocate_unit_bits``) from (bits, out) predicted costs per layer; with measured kind
        losses, each layer's rows are rescaled by the factor `calibrate` gives the layer's sum. Returns the widths
        and the predicted total cost."""
        names = [name for name, _ in self._layers]
        costs = {n: row_costs[n].double().cpu() for n in names}
        if measured:
            sums = {n: dict(zip(self.bit_choices, c.sum(1).tolist())) for n, c in costs.items()}
            target = calibrate(sums, measured, self._numels)
            for n, c in costs.items():
                for i, b in enumerate(self.bit_choices):
                    # a layer whose rows predict 0 takes its calibrated share evenly over its rows
                    c[i] = c[i] * (target[n][b] / sums[n][b]) if sums[n][b] > 0 else target[n][b] / c.shape[1]
        table = torch.cat([costs[n].t() for n in names])
        sizes = torch.cat([torch.full((costs[n].shape[1],), self._numels[n] // costs[n].shape[1]) for n in names])
        widths = torch.tensor(self.bit_choices)
        current, switch = None, 0.0
        if hysteresis:
            current = torch.cat([layer.weight_row_bits.long().cpu() for _, layer in self._layers])
            # the margin: hysteresis × the mean row's cost at its current width (off-choice widths: the next one up)
            at_current = torch.searchsorted(widths, current).clamp(max=len(widths) - 1)
            switch = self.hysteresis * float(table.gather(1, at_current.unsqueeze(1)).mean())
        bits = allocate_unit_bits(table, sizes, self.bit_choices, self._budget, current, switch)
        predicted = float(table.gather(1, torch.searchsorted(widths, bits).unsqueeze(1)).sum())
        return dict(zip(names, bits.split([costs[n].shape[1] for n in names]))), predicted

    def _apply_rows(self, allocation: tuple[dict[str, torch.Tensor], float]) -> float:
        row_bits, predicted = broadcast_object(allocation)  # rank 0's choice everywhere
        for name, layer in self._layers:
            layer.set_row_bits(row_bits[name])
        self._estimator.note_bits(bit_allocation(self._model))
        return predicted

    def _calibration_batch(self) -> dict[str, Any] | None:
        # Fixed rows (the training set's first examples) where the dataset allows: the same at every
        # re-allocation, on every rank and after a resume, so measurements differ only by what training changed.
        if self._leading_batch is not None:
            return self._leading_batch
        return self._hook.last_batch if self._hook is not None else None

    def _measure_kinds(self, batch: dict[str, Any] | None) -> dict[str, dict[int, float]] | None:
        if batch is None:
            return None
        measured = measure_kinds(self._model, self._layers, batch, self.bit_choices, self._estimator.clip,
                                 bit_allocation(self._model))
        return mean_across_ranks(measured)  # ranks saw different batches

    def _reallocate(self, state, measured: dict[str, dict[int, float]] | None = None) -> None:
        if self._rows:
            self._reallocate_rows(state, measured)
            return
        if not self._share_scores():
            self._warn_no_scores()
            return
        scores = self._estimator.scores
        costs = {name: scores[name] for name in self._numels}
        if measured:
            costs = calibrate(costs, measured, self._numels)
        current = bit_allocation(self._model)
        at_current = [costs[n].get(b, min(costs[n].values())) for n, b in current.items()]
        margin = self.hysteresis * sum(at_current) / len(at_current)
        bits = allocate_bits(costs, self._numels, self._budget, current=current, switch_cost=margin)
        self._apply(bits)
        self._estimator.refit_clip(self._layers)
        self._record(state.global_step, sum(costs[n][b] for n, b in bits.items()), measured)

    def _warn_no_scores(self) -> None:
        if not self._warned_no_scores:
            logger.warning("QATCallback: no %s sensitivity for some layers yet (frozen weights or no batch?); "
                           "keeping the current allocation.", self.sensitivity)
            self._warned_no_scores = True

    def _share_scores(self) -> bool:
        """Average the sensitivity EMAs over ranks, which measure different batches (DDP) or shards (FSDP2: per-shard
        sums, a common factor); EMAs are linear, so averaging early (at a checkpoint) changes no later allocation.
        Returns whether every layer has scores."""
        if not self._rows:
            self._estimator.scores = scores = mean_across_ranks(self._estimator.scores)
            return all(name in scores for name in self._numels)
        row_scores = self._estimator.row_scores
        if not broadcast_object(all(name in row_scores for name in self._numels)):
            return False
        all_reduce_mean_(row_scores[name] for name in self._numels)  # the same layers on every rank, in order
        self._estimator.row_scores = row_scores
        return True

    def _reallocate_rows(self, state, measured: dict[str, dict[int, float]] | None) -> None:
        if not self._share_scores():
            self._warn_no_scores()
            return
        row_scores = self._estimator.row_scores
        predicted = self._apply_rows(self._allocate_rows(row_scores, measured, hysteresis=True))
        self._estimator.refit_clip(self._layers)
        self._record(state.global_step, predicted, measured)

    def _local(self, gather_zero3: bool = True):
        # FSDP2: statistics and re-fits on this rank's rows; ZeRO-3: gathered partitions; else a no-op.
        return local_view((layer for _, layer in self._layers), gather_zero3)

    def _apply(self, bits: dict[str, int]) -> None:
        bits = broadcast_object(bits)  # rank 0's choice everywhere, whatever float noise did elsewhere
        for name, layer in self._layers:
            layer.set_bits(bits[name])
        self._estimator.note_bits(bits)

    def _record(self, step: int, predicted: float | None, measured: dict[str, dict[int, float]] | None = None) -> None:
        bits = bit_allocation(self._model)
        if measured is not None:  # JSON keys, as the history reads back from a checkpoint
            measured = {kind: {str(b): v for b, v in per_bits.items()} for kind, per_bits in measured.items()}
        self.history.append({"step": step, "bits": bits, "average_bits": weighted_average_bits(bits, self._numels),
                             "predicted_loss_increase": predicted, "measured_kind_loss_increase": measured})

    def _write_outputs(self, output_dir: str, log_history: list[dict[str, Any]]) -> None:
        from .plots import plot_bit_allocation, plot_loss_curves

        os.makedirs(output_dir, exist_ok=True)
        record = {"budget_bits": self._budget, "bit_choices": list(self.bit_choices), "sensitivity": self.sensitivity,
                  "numels": self._numels, "history": self.history, "scores": self._estimator.scores}
        path = os.path.join(output_dir, HISTORY_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
        if self.write_plots:
            if self.history:
                plot_bit_allocation(self.history, os.path.join(output_dir, "bit_allocation.png"))
            plot_loss_curves(log_history, os.path.join(output_dir, "loss_curves.png"))

"""`Reallocation`: the bit re-allocation of one QAT run, step by step, with or without a Trainer.

It owns the run's `SensitivityTracker` and allocator (`LayerAllocator`, or `RowAllocator` on a model loaded with
``QATConfig(bits_granularity="row")``) and drives them from step numbers and its `Schedule`:

- `start`: a fresh run fits the clip ratios and, when the current bits break the budget, makes a first allocation
  (per layer: the weight-variance prior, calibrated; per row: squared gradients of the training set's first
  examples, `hfqat.train.allocator.PRIOR_TOKENS`); a resumed one restores the saved estimator state instead;
- around each optimizer step: per-step statistics only on the steps the schedule measures;
- at each re-allocation step: measures (estimators that are not per-step), calibrates on a fixed batch
  (`hfqat.train.calibration`; on by default for per-layer widths only), re-chooses every layer's (row's) bits,
  refits the clip ratios and records the allocation in the `AllocationHistory`. On CUDA the Fisher weighing and the
  clip re-fit are one fused error pass per layer each (`hfqat.train.candidates`); the calibration's forwards are
  most of a re-allocation's time.

Its calibration batch is the training set's first examples (`leading_batch`) where the data loader's dataset can
be indexed, else the last training micro-batch the caller passes.

Per-row widths: the estimators predict each row's loss increase at each width (the calibration, when on, still
measures whole kinds of layers and rescales each layer's rows by one factor), `allocate_unit_bits` chooses every
row's width under the budget (Lagrangian; hysteresis per row), ``set_row_bits`` re-fits the rows that change, and
the history records each layer's mean width. The per-row EMAs are too large for ``trainer_state.json``: a checkpoint
holds them as ``hfqat_sensitivity.safetensors`` (`hfqat.train.state_store`); the widths themselves are the layers'
``weight_row_bits`` buffers, in the model checkpoint. Single process and DDP; not FSDP2 / ZeRO-3 (their shards cut
the rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import full_numel, is_sharded
from ..quant.modeling import bit_allocation, qat_layers
from .allocation import tied_groups
from .allocator import LayerAllocator, RowAllocator, config_bits
from .arguments import CallbackArguments
from .calibration import leading_batch
from .expert_allocation import ExpertSensitivity
from .history import AllocationHistory
from .schedule import Schedule
from .state_store import CheckpointStore
from .tracker import SensitivityTracker


class Reallocation:
    """``settings``: the `CallbackArguments` of the run; ``dataloader``: the training loader (for the fixed
    calibration batch and the per-row prior), or None; ``sharded``: whether FSDP2 / ZeRO-3 shard the weights (None:
    detected). With ``reallocate_every=0`` only the tracker is kept (its state is what a checkpoint stores) and the
    bits stay as they are."""

    def __init__(self, model: nn.Module, settings: CallbackArguments, schedule: Schedule,
                 history: AllocationHistory | None = None, dataloader: Any = None, sharded: bool | None = None
                 ) -> None:
        self.layers = list(qat_layers(model))
        if not self.layers:
            raise ValueError("QATCallback: the model has no hfqat fake-quantized layers; load it with "
                             "from_pretrained(..., quantization_config=hfqat.QATConfig(...))")
        sharded = is_sharded(model) if sharded is None else sharded
        self.rows = any(layer.weight_row_bits is not None for _, layer in self.layers)
        if self.rows and sharded:
            raise ValueError("QATCallback: per-row bit widths (QATConfig(bits_granularity='row')) need whole weights "
                             "on every rank; allowed there: single process or DDP, not FSDP2 / ZeRO-3 (use "
                             "bits_granularity='layer')")
        self.model, self.settings, self.schedule, self.dataloader = model, settings, schedule, dataloader
        self.history = history if history is not None else AllocationHistory()
        self.calibrate = settings.calibrate if settings.calibrate is not None else not self.rows
        self.allocator: LayerAllocator | None = None  # None: re-allocation off
        if settings.reallocate_every:
            budget = float(settings.budget_bits if settings.budget_bits is not None else config_bits(model))
            numels = {name: full_numel(layer.weight) for name, layer in self.layers}
            groups = tied_groups(model) if settings.tie_fused and not self.rows else ()
            self.allocator = (RowAllocator if self.rows else LayerAllocator)(
                model, self.layers, numels, settings.bit_choices, budget, settings.hysteresis, groups,
                experts=not sharded)
        self.leading_batch = leading_batch(dataloader, next(model.parameters()).device) \
            if self.calibrate and self.allocator is not None else None
        experts = ExpertSensitivity(settings.bit_choices, settings.ema) \
            if self.allocator is not None and self.allocator.experts else None
        self.tracker = SensitivityTracker(settings.sensitivity, settings.bit_choices, settings.ema, self.layers,
                                          self.rows, settings.seed, experts)

    @property
    def budget(self) -> float | None:
        return self.allocator.budget if self.allocator is not None else None

    def start(self, step: int, saved: Mapping[str, Any] | None = None, store: CheckpointStore | None = None) -> None:
        """Begin at optimizer step ``step``: from ``saved`` (`CheckpointStore.saved_state`; per-row EMAs from
        ``store``'s resumed checkpoint) when resuming, else afresh (clip ratios, first allocation if needed)."""
        if saved is not None:
            self.history.entries[:] = saved["history"]
            self.tracker.load_state_dict(saved["estimator"])
            if self.rows and store is not None:
                self.tracker.row_scores = store.load_row_scores({name: torch.Size(
                    (len(self.settings.bit_choices), layer.out_features)) for name, layer in self.layers})
            return
        self.history.entries.clear()
        if self.allocator is None:
            return
        self.tracker.refit_clip()
        measured = None
        if self.allocator.needs_first_allocation():
            batch = self.calibration_batch(None)
            measured = self.allocator.measure(batch, self.tracker.clip)
            self.tracker.note_bits(self.allocator.first_allocation(measured, self.tracker.clip, self.dataloader,
                                                                   batch))
        self.history.record(step, bit_allocation(self.model), self.allocator.numels, None, measured)

    def calibration_batch(self, last_batch: dict[str, Any] | None) -> dict[str, Any] | None:
        """Fixed rows (the training set's first examples) where the dataset allows: the same at every re-allocation,
        on every rank and after a resume, so measurements differ only by what training changed."""
        return self.leading_batch if self.leading_batch is not None else last_batch

    # -- around each optimizer step (``done``: optimizer steps completed before it, Trainer's global_step) ------
    def before_step(self, done: int) -> None:
        """Attach the statistics hooks (K-FAC) only for the steps the next allocation reads."""
        if self.allocator is not None:
            self.tracker.collect(self.schedule.measures(done + 1))

    def before_optimizer_step(self, done: int, batch: dict[str, Any] | None) -> None:
        """Fold in this step's gradients when the schedule measures it (per-step estimators)."""
        if self.allocator is not None and self.schedule.measures(done + 1):
            self.tracker.observe_step(self.model, done, batch)

    def after_step(self, step: int, batch: dict[str, Any] | None, saving: bool = False) -> bool:
        """After optimizer step ``step``: re-allocate when the schedule says so (returns whether it did: widths may
        have changed); ``saving``: a checkpoint follows (its state then holds what every rank averages)."""
        reallocates = self.allocator is not None and self.schedule.reallocates(step)
        if reallocates:
            self._reallocate(step, batch)
        if saving and self.allocator is not None:
            self.tracker.share()
        if self.schedule.frozen(step):
            self.tracker.stop()  # bits are final: stop collecting statistics
        return reallocates

    def _reallocate(self, step: int, batch: dict[str, Any] | None) -> None:
        self.tracker.observe_at_reallocation(self.model, step, batch)
        measured = self.allocator.measure(self.calibration_batch(batch), self.tracker.clip) if self.calibrate \
            else None
        scores = self.tracker.shared_scores()
        expert_scores = self.tracker.expert_scores(self.model)
        if scores is None or expert_scores is None:
            return
        bits, predicted = self.allocator.reallocate(scores, measured, expert_scores)
        self.tracker.note_bits(bits)
        self.tracker.refit_clip()
        self.history.record(step, bit_allocation(self.model), self.allocator.numels, predicted, measured)

    def summary(self) -> dict[str, Any]:
        """What the history file records besides the allocations (budget, choices, weight counts, final scores)."""
        numels = self.allocator.numels if self.allocator is not None else {  # the allocator's: with experts
            name: full_numel(layer.weight) for name, layer in self.layers}
        summary = {"budget_bits": self.budget, "bit_choices": list(self.settings.bit_choices),
                   "sensitivity": self.settings.sensitivity, "numels": numels,
                   "scores": self.tracker.estimator.scores}
        if self.tracker.experts is not None:
            summary["expert_scores"] = self.tracker.experts.scores
        return summary

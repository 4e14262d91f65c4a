"""`SensitivityTracker`: one run's sensitivity estimates across steps, observed when the schedule asks for them.

It owns the estimator of `hfqat.train.sensitivity` for a list of layers and decides how each observation runs:
per-step estimators (Fisher, K-FAC) read the step's gradients before the optimizer step, on this rank's rows
(FSDP2 shards; ZeRO-3 keeps its gradients to itself), Fisher weighs them by the quantization errors only when the
scores are read (`flush`: at re-allocation, checkpoint and freeze), and K-FAC's forward hooks are attached only on
the steps that are measured; the others measure at re-allocation time (Hutchinson runs the model as training sees it, the
variance prior reads the whole weights). Ranks measure different batches or shards: `share` averages the EMAs,
which are linear, so averaging at a checkpoint changes no later allocation.

Experts of MoE models (`hfqat.train.expert_allocation.ExpertSensitivity`, given as ``experts``) are observed on the
same steps and gradients, with the Fisher cost whatever the layers' estimator (the per-expert gradients are what
tells a rarely routed expert from a busy one); their scores are on the fisher layer estimator's scale.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_mean_, broadcast_object, local_view, mean_across_ranks
from .expert_allocation import ExpertSensitivity, expert_numels
from .sensitivity import LayerList, SensitivityContext, SensitivityEstimator, make_estimator

logger = logging.getLogger(__name__)


class SensitivityTracker:
    """Sensitivity EMAs of ``layers`` (per layer, or per output row with ``per_row``) for an allocator to read."""

    def __init__(self, sensitivity: str, bit_choices: tuple[int, ...], ema: float, layers: LayerList,
                 per_row: bool = False, seed: int = 0, experts: ExpertSensitivity | None = None) -> None:
        self.name, self.layers, self.seed, self.experts = sensitivity, layers, seed, experts
        self.estimator: SensitivityEstimator = make_estimator(sensitivity, bit_choices, ema, per_row=per_row)
        self._collecting = False
        self._warned_no_scores = False

    # -- observation ------------------------------------------------------------------------------------------
    def collect(self, on: bool) -> None:
        """Attach (or remove) the estimator's training hooks: on only for the steps that will be measured."""
        if on != self._collecting:
            self.estimator.attach(self.layers) if on else self.estimator.detach()
            self._collecting = on

    def observe_step(self, model: nn.Module, step: int, batch: dict[str, Any] | None) -> None:
        """Fold this step's gradients in (per-step estimators; call before the optimizer step)."""
        if self.estimator.per_step:
            with local_view((layer for _, layer in self.layers), gather_zero3=False):
                self.estimator.update(self.layers, SensitivityContext(model, step, batch, self.seed))
        if self.experts is not None:
            self.experts.observe(model)

    def observe_at_reallocation(self, model: nn.Module, step: int, batch: dict[str, Any] | None) -> None:
        """Measure now (estimators that are not per-step)."""
        if self.estimator.per_step:
            return
        context = SensitivityContext(model, step, batch, self.seed)
        if self.estimator.runs_model:  # the model as sharded training runs it, not per-layer local views
            self.estimator.update(self.layers, context)
            return
        with local_view(layer for _, layer in self.layers):  # e.g. variance: whole (ZeRO-3) weights
            self.estimator.update(self.layers, context)

    def flush(self) -> None:
        """Weigh what the per-step observations kept aside (Fisher: squared gradients) into the EMAs, on the rows
        they were observed on."""
        with local_view((layer for _, layer in self.layers), gather_zero3=False):
            self.estimator.flush()

    def stop(self) -> None:
        self.flush()
        self.collect(False)

    # -- reading ----------------------------------------------------------------------------------------------
    @property
    def clip(self) -> dict[str, dict[int, float]]:
        return self.estimator.clip

    def refit_clip(self) -> None:
        """Refit the clip ratios of off-grid widths (at start and after every re-allocation)."""
        with local_view(layer for _, layer in self.layers):
            self.estimator.refit_clip(self.layers)

    def note_bits(self, bits: Mapping[str, int]) -> None:
        self.estimator.note_bits(bits)

    def share(self) -> bool:
        """Average the EMAs over ranks (DDP: different batches; FSDP2: per-shard sums, a common factor). Returns
        whether every layer has scores (collective: call on every rank)."""
        self.flush()
        names = [name for name, _ in self.layers]
        if not self.estimator.per_row:
            self.estimator.scores = scores = mean_across_ranks(self.estimator.scores)
            return all(name in scores for name in names)
        row_scores = self.estimator.row_scores
        if not broadcast_object(all(name in row_scores for name in names)):
            return False
        all_reduce_mean_(row_scores[name] for name in names)  # the same layers on every rank, in order
        self.estimator.row_scores = row_scores
        return True

    def shared_scores(self) -> dict[str, Any] | None:
        """The scores every rank agrees on (per layer: {bits: float}; per row: (bits, out) tensors), or None
        (with one warning) while some layer has none yet."""
        if not self.share():
            if not self._warned_no_scores:
                logger.warning("QATCallback: no %s sensitivity for some layers yet (frozen weights or no batch?); "
                               "keeping the current allocation.", self.name)
                self._warned_no_scores = True
            return None
        return self.estimator.row_scores if self.estimator.per_row else self.estimator.scores

    def expert_scores(self, model: nn.Module) -> dict[str, dict[int, float]] | None:
        """Close the experts' window and return their scores averaged over ranks ({} without experts); None (with one
        warning) while some expert has none yet (collective: call on every rank)."""
        if self.experts is None:
            return {}
        self.experts.close_window(model)
        self.experts.scores = scores = mean_across_ranks(self.experts.scores)
        if not broadcast_object(len(scores) == len(expert_numels(model))):
            if not self._warned_no_scores:
                logger.warning("QATCallback: no sensitivity for some experts yet (no gradient reached them?); "
                               "keeping the current allocation.")
                self._warned_no_scores = True
            return None
        return scores

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly per-layer state (per-row EMAs are too large for JSON: `row_scores`), with the experts'."""
        state = dict(self.estimator.state_dict())
        if self.experts is not None:
            state["experts"] = self.experts.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.estimator.load_state_dict(state)
        if self.experts is not None:
            self.experts.load_state_dict(state.get("experts", {}))

    @property
    def row_scores(self) -> dict[str, torch.Tensor]:
        return self.estimator.row_scores if self.estimator.per_row else {}

    @row_scores.setter
    def row_scores(self, scores: Mapping[str, torch.Tensor] | None) -> None:
        if scores is None:
            self.estimator.scores = {}  # the per-layer sums in the saved state cannot stand in for rows
        else:
            self.estimator.row_scores = scores

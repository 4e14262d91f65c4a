"""`LayerAllocator` / `RowAllocator`: choose every layer's (or output row's) bits under the budget and apply them.

Both take predicted costs (a sensitivity tracker's scores, or a prior before any gradient), optionally the measured
loss increase of each kind of layer (`hfqat.train.calibration`) that rescales them, solve the budget problem
(`hfqat.train.allocation`: exact DP per layer, Lagrangian per row), and apply rank 0's choice on every rank in place
(``set_bits`` / ``set_row_bits``: scale parameters keep shape and identity, so the optimizer keeps working).
Hysteresis: a re-allocation only moves a layer (row) when the predicted gain exceeds ``hysteresis`` times the mean
cost at the current widths for each one that changes.

Per-layer widths also cover two things a serving engine cares about:

- fused shards (``groups``, e.g. `hfqat.train.allocation.tied_groups`): q/k/v and gate/up each take one width, as one
  item of the exact DP (`allocate_tied_bits`);
- the experts of MoE models: each expert (``<experts module>[e]``, `hfqat.train.expert_allocation`) is one more item
  of the same allocation, with its weight count in the same budget. Their costs are per-expert Fisher costs, on the
  scale of the fisher layer estimator (½ Σ g² e², averaged per observed step and smoothed per step alike). With
  calibration, each experts module kind is measured and rescaled like a kind of layer
  (`hfqat.train.calibration.measure_expert_kinds`): measured loss increases are comparable whatever the estimator.
  Without calibration the raw Fisher expert costs meet the layer estimator's predictions: the same scale under the
  default ``fisher`` (and ``kfac``, the same quadratic form), only roughly under ``hutchinson`` / ``variance``.

Per-row widths (`RowAllocator`) and sharded runs (FSDP2 / ZeRO-3: the expert statistics read whole tensors) leave
the experts at their widths, reported once; the budget there covers the linear layers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..distributed import broadcast_object, local_view, mean_across_ranks
from ..quant.modeling import bit_allocation, layer_average_bits, qat_layers
from .allocation import allocate_tied_bits, allocate_unit_bits, weighted_average_bits
from .calibration import (
    MAX_TOKENS,
    calibrate,
    expert_kind,
    leading_batch,
    measure_expert_kinds,
    measure_kinds,
    split_rows,
)
from .expert_allocation import apply_expert_bits, expert_numels, expert_variance_costs
from .sensitivity import LayerList, gradient_row_costs, weight_variance_costs, weight_variance_row_costs

logger = logging.getLogger(__name__)

Measured = dict[str, dict[int, float]]  # kind → {bits: measured loss increase}
PRIOR_TOKENS = 4 * MAX_TOKENS  # leading tokens whose gradients choose the first per-row allocation


def config_bits(model: nn.Module) -> int:
    """The bits the model's quantization config names (the default budget; what learning rates were tuned for)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    bits = config.get("bits") if isinstance(config, dict) else getattr(config, "bits", None)
    if bits is None:  # e.g. converted with quantize_model: the most common layer bits
        specs = [layer.spec.bits for _, layer in qat_layers(model)]
        bits = max(set(specs), key=specs.count)
    return int(bits)


class LayerAllocator:
    """One width per layer and, with ``experts``, per expert of an MoE model; ``groups`` of layers share one width."""

    def __init__(self, model: nn.Module, layers: LayerList, numels: Mapping[str, int], bit_choices: tuple[int, ...],
                 budget: float, hysteresis: float, groups: Sequence[tuple[str, ...]] = (), experts: bool = True
                 ) -> None:
        self.model, self.layers = model, layers
        units = expert_numels(model)  # unit name -> weights; empty for dense models
        self.numels = dict(numels) | units  # what the history's average counts (the budget, with the experts)
        self.experts = units if experts else {}  # the experts this allocator moves
        if units and not experts:
            logger.warning("QATCallback: the %d experts keep their widths here (allowed for per-expert widths: "
                           "bits_granularity='layer', single process or DDP); the budget covers the linear layers",
                           len(units))
        self.bit_choices, self.budget, self.hysteresis = bit_choices, budget, hysteresis
        self.groups = [tuple(group) for group in groups]

    def measure(self, batch: Mapping[str, Any] | None, clip: Mapping[str, Mapping[int, float]]) -> Measured | None:
        """The loss increase of each kind of layer at each bit choice on ``batch``, averaged over ranks (which saw
        different batches); None without a batch."""
        if batch is None:
            return None
        current = bit_allocation(self.model)
        measured = measure_kinds(self.model, self.layers, batch, self.bit_choices, clip, current)
        if self.experts:
            measured |= measure_expert_kinds(self.model, self.layers, batch, self.bit_choices, clip, current)
        return mean_across_ranks(measured)

    def needs_first_allocation(self) -> bool:
        """Whether the current bits break the budget or use a width outside the choices."""
        moved = [name for name, _ in self.layers] + list(self.experts)
        current = {name: bits for name, bits in bit_allocation(self.model).items() if name in moved}
        return weighted_average_bits(current, self.numels) > self.budget or \
            any(b not in self.bit_choices for b in current.values()) or \
            any(len({current[name] for name in group}) > 1 for group in self.groups)

    def first_allocation(self, measured: Measured | None, clip: Mapping[str, Mapping[int, float]],
                         dataloader: Any = None, batch: Mapping[str, Any] | None = None) -> dict[str, int]:
        """Allocate from the weight-variance prior (no gradient has been seen yet), calibrated when measured."""
        with local_view(layer for _, layer in self.layers):
            costs = mean_across_ranks({name: weight_variance_costs(layer, self.bit_choices)
                                       for name, layer in self.layers})
            costs = self._costs(costs, measured, expert_variance_costs(self.model, self.bit_choices))
            return self.apply(self._solve(costs))

    def reallocate(self, scores: Mapping[str, Mapping[int, float]], measured: Measured | None,
                   expert_scores: Mapping[str, Mapping[int, float]] | None = None) -> tuple[dict[str, int], float]:
        """Re-choose from the scores (layers, and ``expert_scores`` for every expert of an MoE model) with
        hysteresis; returns (applied bits, predicted total cost)."""
        costs = self._costs({name: scores[name] for name, _ in self.layers}, measured, expert_scores or {})
        current = {name: bits for name, bits in bit_allocation(self.model).items() if name in costs}
        at_current = [costs[n].get(b, min(costs[n].values())) for n, b in current.items()]
        margin = self.hysteresis * sum(at_current) / len(at_current)
        with local_view(layer for _, layer in self.layers):
            bits = self.apply(self._solve(costs, current, margin))
        return bits, sum(costs[n][b] for n, b in bits.items())

    def _costs(self, layer_costs: Mapping[str, Mapping[int, float]], measured: Measured | None,
               expert_costs: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
        """Layer costs and expert costs (each calibrated by its kinds' measurements when measured), on one scale
        (module docstring)."""
        costs = {name: dict(per_bits) for name, per_bits in layer_costs.items()}
        experts = {unit: dict(expert_costs[unit]) for unit in self.experts}
        if measured:
            costs = calibrate(costs, measured, self.numels)
            experts = calibrate(experts, measured, self.numels, kind_of=expert_kind)
        return costs | experts

    def _solve(self, costs: Mapping[str, Mapping[int, float]], current: Mapping[str, int] | None = None,
               switch_cost: float = 0.0) -> dict[str, int]:
        return allocate_tied_bits(costs, self.numels, self.budget, self.groups, current, switch_cost)

    def apply(self, bits: Mapping[str, int]) -> dict[str, int]:
        """Rank 0's ``bits`` on every rank (whatever float noise chose elsewhere); returns them."""
        bits = broadcast_object(dict(bits))
        for name, layer in self.layers:
            layer.set_bits(bits[name])
        if self.experts:
            apply_expert_bits(self.model, {unit: bits[unit] for unit in self.experts})
        return bits


class RowAllocator(LayerAllocator):
    """One width per output row (``QATConfig(bits_granularity="row")``); single process and DDP. Experts keep their
    widths (reported once)."""

    def __init__(self, model: nn.Module, layers: LayerList, numels: Mapping[str, int], bit_choices: tuple[int, ...],
                 budget: float, hysteresis: float, groups: Sequence[tuple[str, ...]] = (), experts: bool = False
                 ) -> None:
        # per-row widths: no fused ties (each row has its own width anyway); experts keep theirs (reported)
        super().__init__(model, layers, numels, bit_choices, budget, hysteresis, (), experts=False)

    def needs_first_allocation(self) -> bool:
        off_choices = any(bool(torch.isin(layer.weight_row_bits, torch.tensor(
            self.bit_choices, dtype=torch.int8, device=layer.weight_row_bits.device), invert=True).any())
            for _, layer in self.layers)
        rows = {name: layer_average_bits(layer) for name, layer in self.layers}
        return weighted_average_bits(rows, self.numels) > self.budget or off_choices

    def first_allocation(self, measured: Measured | None, clip: Mapping[str, Mapping[int, float]],
                         dataloader: Any = None, batch: Mapping[str, Any] | None = None) -> dict[str, int]:
        """From squared gradients of the training set's first examples in calibration-batch-sized pieces (trained
        better than the weight-variance prior: bench/results/h200_s7_row_allocation.txt), else from the prior."""
        leading = leading_batch(dataloader, next(self.model.parameters()).device, PRIOR_TOKENS)
        pieces = split_rows(leading) if leading is not None else [batch] if batch is not None else []
        prior = gradient_row_costs(self.model, self.layers, pieces, self.bit_choices, clip)
        if prior is None:
            prior = {name: weight_variance_row_costs(layer, self.bit_choices) for name, layer in self.layers}
        self.apply_rows(*self.choose_rows(prior, measured))
        return bit_allocation(self.model)

    def reallocate(self, scores: Mapping[str, torch.Tensor], measured: Measured | None,
                   expert_scores: Mapping[str, Mapping[int, float]] | None = None) -> tuple[dict[str, int], float]:
        predicted = self.apply_rows(*self.choose_rows(scores, measured, hysteresis=True))
        return bit_allocation(self.model), predicted

    def choose_rows(self, row_costs: Mapping[str, torch.Tensor], measured: Measured | None, hysteresis: bool = False
                    ) -> tuple[dict[str, torch.Tensor], float]:
        """Every row's width (``allocate_unit_bits``) from (bits, out) predicted costs per layer; with measured kind
        losses, each layer's rows are rescaled by the factor `calibrate` gives the layer's sum. Returns the widths
        and the predicted total cost."""
        names = [name for name, _ in self.layers]
        costs = {n: row_costs[n].double().cpu() for n in names}
        if measured:
            sums = {n: dict(zip(self.bit_choices, c.sum(1).tolist())) for n, c in costs.items()}
            target = calibrate(sums, measured, self.numels)
            for n, c in costs.items():
                for i, b in enumerate(self.bit_choices):
                    # a layer whose rows predict 0 takes its calibrated share evenly over its rows
                    c[i] = c[i] * (target[n][b] / sums[n][b]) if sums[n][b] > 0 else target[n][b] / c.shape[1]
        table = torch.cat([costs[n].t() for n in names])
        sizes = torch.cat([torch.full((costs[n].shape[1],), self.numels[n] // costs[n].shape[1]) for n in names])
        widths = torch.tensor(self.bit_choices)
        current, switch = None, 0.0
        if hysteresis:
            current = torch.cat([layer.weight_row_bits.long().cpu() for _, layer in self.layers])
            # the margin: hysteresis × the mean row's cost at its current width (off-choice widths: the next one up)
            at_current = torch.searchsorted(widths, current).clamp(max=len(widths) - 1)
            switch = self.hysteresis * float(table.gather(1, at_current.unsqueeze(1)).mean())
        bits = allocate_unit_bits(table, sizes, self.bit_choices, self.budget, current, switch)
        predicted = float(table.gather(1, torch.searchsorted(widths, bits).unsqueeze(1)).sum())
        return dict(zip(names, bits.split([costs[n].shape[1] for n in names]))), predicted

    def apply_rows(self, row_bits: Mapping[str, torch.Tensor], predicted: float) -> float:
        """Rank 0's widths on every rank; returns rank 0's predicted cost."""
        row_bits, predicted = broadcast_object((row_bits, predicted))
        for name, layer in self.layers:
            layer.set_row_bits(row_bits[name])
        return predicted

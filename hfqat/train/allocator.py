"""`LayerAllocator` / `RowAllocator`: choose every layer's (or output row's) bits under the budget and apply them.

Both take predicted costs (a sensitivity tracker's scores, or a prior before any gradient), optionally the measured
loss increase of each kind of layer (`hfqat.train.calibration`) that rescales them, solve the budget problem
(`hfqat.train.allocation`: exact DP per layer, Lagrangian per row), and apply rank 0's choice on every rank in place
(``set_bits`` / ``set_row_bits``: scale parameters keep shape and identity, so the optimizer keeps working).
Hysteresis: a re-allocation only moves a layer (row) when the predicted gain exceeds ``hysteresis`` times the mean
cost at the current widths for each one that changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import broadcast_object, local_view, mean_across_ranks
from ..quant.modeling import average_bits, bit_allocation, qat_layers
from .allocation import allocate_bits, allocate_unit_bits, weighted_average_bits
from .calibration import MAX_TOKENS, calibrate, leading_batch, measure_kinds, split_rows
from .sensitivity import LayerList, gradient_row_costs, weight_variance_costs, weight_variance_row_costs

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
    """One width per layer."""

    def __init__(self, model: nn.Module, layers: LayerList, numels: Mapping[str, int], bit_choices: tuple[int, ...],
                 budget: float, hysteresis: float) -> None:
        self.model, self.layers, self.numels = model, layers, dict(numels)
        self.bit_choices, self.budget, self.hysteresis = bit_choices, budget, hysteresis

    def measure(self, batch: Mapping[str, Any] | None, clip: Mapping[str, Mapping[int, float]]) -> Measured | None:
        """The loss increase of each kind of layer at each bit choice on ``batch``, averaged over ranks (which saw
        different batches); None without a batch."""
        if batch is None:
            return None
        measured = measure_kinds(self.model, self.layers, batch, self.bit_choices, clip, bit_allocation(self.model))
        return mean_across_ranks(measured)

    def needs_first_allocation(self) -> bool:
        """Whether the current bits break the budget or use a width outside the choices."""
        current = bit_allocation(self.model)
        return weighted_average_bits(current, self.numels) > self.budget or \
            any(b not in self.bit_choices for b in current.values())

    def first_allocation(self, measured: Measured | None, clip: Mapping[str, Mapping[int, float]],
                         dataloader: Any = None, batch: Mapping[str, Any] | None = None) -> dict[str, int]:
        """Allocate from the weight-variance prior (no gradient has been seen yet), calibrated when measured."""
        with local_view(layer for _, layer in self.layers):
            costs = mean_across_ranks({name: weight_variance_costs(layer, self.bit_choices)
                                       for name, layer in self.layers})
            if measured:
                costs = calibrate(costs, measured, self.numels)
            return self.apply(allocate_bits(costs, self.numels, self.budget))

    def reallocate(self, scores: Mapping[str, Mapping[int, float]], measured: Measured | None
                   ) -> tuple[dict[str, int], float]:
        """Re-choose from the scores with hysteresis; returns (applied bits, predicted total cost)."""
        costs = {name: scores[name] for name in self.numels}
        if measured:
            costs = calibrate(costs, measured, self.numels)
        current = bit_allocation(self.model)
        at_current = [costs[n].get(b, min(costs[n].values())) for n, b in current.items()]
        margin = self.hysteresis * sum(at_current) / len(at_current)
        with local_view(layer for _, layer in self.layers):
            bits = self.apply(allocate_bits(costs, self.numels, self.budget, current=current, switch_cost=margin))
        return bits, sum(costs[n][b] for n, b in bits.items())

    def apply(self, bits: Mapping[str, int]) -> dict[str, int]:
        """Rank 0's ``bits`` on every rank (whatever float noise chose elsewhere); returns them."""
        bits = broadcast_object(dict(bits))
        for name, layer in self.layers:
            layer.set_bits(bits[name])
        return bits


class RowAllocator(LayerAllocator):
    """One width per output row (``QATConfig(bits_granularity="row")``); single process and DDP."""

    def needs_first_allocation(self) -> bool:
        off_choices = any(bool(torch.isin(layer.weight_row_bits, torch.tensor(
            self.bit_choices, dtype=torch.int8, device=layer.weight_row_bits.device), invert=True).any())
            for _, layer in self.layers)
        return average_bits(self.model) > self.budget or off_choices

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

    def reallocate(self, scores: Mapping[str, torch.Tensor], measured: Measured | None) -> tuple[dict[str, int], float]:
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

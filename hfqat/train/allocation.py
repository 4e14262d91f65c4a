"""Bit allocation under a parameter-weighted average-bits budget: one width per layer (exact) or per unit.

Problem (a multiple-choice knapsack)::

    minimise   Σ_l cost_l(b_l)                  cost_l(b): predicted loss increase of layer l at b bits
    subject to Σ_l n_l · b_l  ≤  budget · Σ_l n_l   n_l: the layer's weight count, b_l ∈ bit_choices

Solved exactly by dynamic programming over integer "capacity units". Parameter counts are divided by
their greatest common divisor (transformer layers share a large one, e.g. 576·192 in SmolLM2, so the
table stays small). When the table would still be too large, counts are bucketed into coarser units,
always rounding each layer's count *up* and the capacity *down*: the solution may then be slightly
suboptimal but can never exceed the budget. The result is re-checked in exact integer arithmetic.

Ties (e.g. layers whose cost is 0 at every width) go to the wider choice: budget left unused buys nothing.

Hysteresis: ``switch_cost`` is added to every choice that differs from the layer's current bits, so the
allocation only moves when the predicted total gain exceeds the summed margins of the layers that change.

`allocate_unit_bits` solves the same problem for many small units (e.g. the output rows of every layer, ~10⁵
and more), where a DP table is too large: by Lagrangian relaxation. For a price ``λ`` per bit, every unit
independently picks ``argmin_b cost(b) + λ·n·b``; the bits used fall as ``λ`` rises, and bisection finds the
smallest ``λ`` that fits the budget. The result never exceeds the budget and is optimal for the budget it
uses (it lies on every unit's lower convex hull); with many units that is the given budget to within a unit.

Fused shards: vLLM serves q/k/v and gate/up each as one matmul with one scheme. `tied_groups` finds such siblings
and `allocate_tied_bits` solves the allocation with each group held at one width (a group is one DP item).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from fractions import Fraction
from functools import reduce

import numpy as np
import torch
from torch import nn

from ..quant.modeling import qat_layers

MAX_CAPACITY_UNITS = 20_000  # DP table width; the table is (layers × units) int8 for the backtrack


def _units(numels: list[int], spread: int) -> tuple[int, list[int]]:
    """(unit, per-layer weight in units): gcd-based when small enough, else bucketed (rounded up)."""
    unit = reduce(math.gcd, numels)
    if sum(n // unit for n in numels) * spread > MAX_CAPACITY_UNITS:
        unit = math.ceil(sum(numels) * spread / MAX_CAPACITY_UNITS)
    return unit, [math.ceil(n / unit) for n in numels]


def allocate_bits(
    costs: Mapping[str, Mapping[int, float]],
    numels: Mapping[str, int],
    budget_bits: float,
    current: Mapping[str, int] | None = None,
    switch_cost: float = 0.0,
) -> dict[str, int]:
    """Bits per layer minimising ``Σ cost`` with parameter-weighted average bits ≤ ``budget_bits``.

    Args:
        costs: layer name → {bits: predicted loss increase}; every layer must offer the same bit choices.
        numels: layer name → number of weights.
        budget_bits: the average-bits budget.
        current: layer name → current bits, for hysteresis.
        switch_cost: margin added to every choice that changes a layer's current bits (≥ 0).
    """
    names = list(costs)
    if not names:
        return {}
    choices = sorted(costs[names[0]])
    if any(sorted(costs[n]) != choices for n in names):
        raise ValueError("allocate_bits: every layer must offer the same bit choices")
    if budget_bits < choices[0]:
        raise ValueError(f"budget_bits={budget_bits} is below the smallest bit choice {choices[0]}; "
                         f"allowed: budget_bits >= {choices[0]}")
    lo, spread = choices[0], choices[-1] - choices[0]
    counts = [int(numels[n]) for n in names]
    unit, weights = _units(counts, max(spread, 1))
    # Capacity in units of "extra bits above the minimum": floor rounding keeps Σ n·b ≤ budget·N exact.
    capacity = math.floor(Fraction(budget_bits) * sum(counts) / unit) - sum(weights) * lo
    # < 0 only through bucketing: then the minimum everywhere (which always fits the true budget).
    capacity = min(max(capacity, 0), sum(weights) * spread)

    table = np.array([[costs[n][b] for b in choices] for n in names], dtype=np.float64)
    # Tie-break towards more bits, far below any real cost difference.
    table -= 1e-9 * max(float(np.abs(table).max()), 1e-30) * np.array(choices) / choices[-1]
    if current is not None and switch_cost > 0:
        table += switch_cost * np.array([[b != current.get(n) for b in choices] for n in names])

    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    picked = np.zeros((len(names), capacity + 1), dtype=np.int8)
    for i, w in enumerate(weights):
        new = np.full(capacity + 1, np.inf)
        for j, b in enumerate(choices):
            shift = w * (b - lo)
            if shift > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[shift:] = best[:capacity + 1 - shift] + table[i, j]
            better = candidate < new
            new[better] = candidate[better]
            picked[i, better] = j
        best = new

    used = int(np.argmin(best))
    bits: dict[str, int] = {}
    for i in range(len(names) - 1, -1, -1):
        j = int(picked[i, used])
        bits[names[i]] = choices[j]
        used -= weights[i] * (choices[j] - lo)
    bits = {n: bits[n] for n in names}
    if sum(bits[n] * c for n, c in zip(names, counts)) > Fraction(budget_bits) * sum(counts):
        raise RuntimeError("allocate_bits: internal error, the solution exceeds the budget")
    return bits


def allocate_unit_bits(
    costs: torch.Tensor,
    numels: torch.Tensor,
    bit_choices: tuple[int, ...],
    budget_bits: float,
    current: torch.Tensor | None = None,
    switch_cost: torch.Tensor | float = 0.0,
    iterations: int = 64,
) -> torch.Tensor:
    """(units,) bits minimising ``Σ costs`` with ``Σ numels·bits ≤ budget_bits · Σ numels`` (Lagrangian).

    Args:
        costs: (units, len(bit_choices)) predicted loss increase of each unit at each width.
        numels: (units,) weights per unit.
        bit_choices: the widths, ascending.
        budget_bits: the average-bits budget, ≥ the smallest choice.
        current: (units,) current bits, for hysteresis; ``switch_cost`` (a number or a (units,) tensor) is
            added to every choice that differs from it.
    """
    if list(bit_choices) != sorted(set(bit_choices)):
        raise ValueError(f"allocate_unit_bits: bit_choices={bit_choices} must be distinct and ascending")
    if budget_bits < bit_choices[0]:
        raise ValueError(f"budget_bits={budget_bits} is below the smallest bit choice {bit_choices[0]}; "
                         f"allowed: budget_bits >= {bit_choices[0]}")
    costs = costs.double()
    numels = numels.double().to(costs.device)
    bits = torch.tensor(bit_choices, dtype=torch.float64, device=costs.device)
    # Tie-break towards more bits, far below any real cost difference.
    costs = costs - 1e-9 * costs.abs().max().clamp_min(1e-30) * bits / bits[-1]
    if current is not None:
        switch = torch.as_tensor(switch_cost, dtype=torch.float64, device=costs.device).reshape(-1, 1)
        costs = costs + switch * (bits != current.to(costs.device).double().unsqueeze(1))
    capacity = budget_bits * float(numels.sum())

    def pick(price: float) -> tuple[torch.Tensor, float]:
        chosen = (costs + price * numels.unsqueeze(1) * bits).argmin(1)
        return chosen, float((numels * bits[chosen]).sum())

    chosen, used = pick(0.0)
    if used <= capacity:
        return bits[chosen].to(torch.int64)
    # A price at which every unit takes the smallest width: its cost gaps per bit, at most.
    steps = (costs[:, :1] - costs[:, 1:]) / ((bits[1:] - bits[0]) * numels.unsqueeze(1))
    high = max(float(steps.max()), 0.0) * 2 + 1e-30
    low = 0.0
    best = pick(high)[0]
    for _ in range(iterations):
        middle = (low + high) / 2
        candidate, used = pick(middle)
        if used <= capacity:
            high, best = middle, candidate
        else:
            low = middle
    return bits[best].to(torch.int64)


def weighted_average_bits(bits: Mapping[str, int], numels: Mapping[str, int]) -> float:
    """Parameter-weighted average of a bit map."""
    total = sum(numels[n] for n in bits)
    return sum(bits[n] * numels[n] for n in bits) / max(total, 1)


# -- fused shards: layers a serving engine runs as one matmul ------------------------------------------------------
# vLLM loads q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (Mixtral-style experts: w1/w3 as ``w13``),
# and one fused matmul has one quantization scheme: such siblings must get the same width to be served.
FUSED_SHARDS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "w13": ("w1", "w3"),
}


def tied_name_groups(names: Iterable[str]) -> list[tuple[str, ...]]:
    """Groups (in order of first appearance, each of ≥ 2 names) of the given module names that a serving engine fuses
    into one layer: siblings under one parent named by a `FUSED_SHARDS` entry."""
    present = list(names)
    by_parent: dict[tuple[str, str], list[str]] = {}
    for name in present:
        parent, _, leaf = name.rpartition(".")
        for fused, shards in FUSED_SHARDS.items():
            if leaf in shards:
                by_parent.setdefault((parent, fused), []).append(name)
    return [tuple(group) for group in by_parent.values() if len(group) > 1]


def tied_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The fake-quantized layers of `model` that vLLM fuses (q/k/v, gate/up), one tuple of names per fused layer."""
    return tied_name_groups(name for name, _ in qat_layers(model))


def allocate_tied_bits(
    costs: Mapping[str, Mapping[int, float]],
    numels: Mapping[str, int],
    budget_bits: float,
    groups: Iterable[tuple[str, ...]],
    current: Mapping[str, int] | None = None,
    switch_cost: float = 0.0,
) -> dict[str, int]:
    """`allocate_bits` with every group of `groups` (e.g. `tied_groups(model)`) held at one width.

    Each group is solved as one layer: its members' costs add up (the predicted loss increases are additive, as in
    `allocate_bits`), so do their weight counts; the DP stays exact and within the budget. A group's current width is
    its members' when they agree (otherwise it has none, so every choice pays the switch cost).
    """
    owner: dict[str, str] = {}
    for group in groups:
        for name in group:
            if name in owner:
                raise ValueError(f"allocate_tied_bits: layer {name!r} is in two groups")
            if name not in costs:
                raise ValueError(f"allocate_tied_bits: group member {name!r} has no cost")
            owner[name] = group[0]
    merged_costs: dict[str, dict[int, float]] = {}
    merged_numels: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    for name in costs:
        key = owner.get(name, name)
        members.setdefault(key, []).append(name)
        row = merged_costs.setdefault(key, {b: 0.0 for b in costs[name]})
        if sorted(row) != sorted(costs[name]):
            raise ValueError("allocate_tied_bits: every layer must offer the same bit choices")
        for b, c in costs[name].items():
            row[b] += c
        merged_numels[key] = merged_numels.get(key, 0) + int(numels[name])
    merged_current = None
    if current is not None:
        merged_current = {}
        for key, names in members.items():
            widths = {current.get(n) for n in names}
            if len(widths) == 1:
                merged_current[key] = widths.pop()
    merged = allocate_bits(merged_costs, merged_numels, budget_bits, merged_current, switch_cost)
    return {name: merged[owner.get(name, name)] for name in costs}


def tie_bits(bits: Mapping[str, int], groups: Iterable[tuple[str, ...]]) -> dict[str, int]:
    """A bit map with every group raised to its widest member's width (for a map made without ties, e.g. by hand:
    the result never loses precision, but its average grows; `allocate_tied_bits` keeps the budget instead)."""
    tied = dict(bits)
    for group in groups:
        width = max(bits[name] for name in group)
        tied.update({name: width for name in group})
    return tied

"""Exact bit allocation: choose one bit width per layer under a parameter-weighted average-bits budget.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from functools import reduce

import numpy as np

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


def weighted_average_bits(bits: Mapping[str, int], numels: Mapping[str, int]) -> float:
    """Parameter-weighted average of a bit map."""
    total = sum(numels[n] for n in bits)
    return sum(bits[n] * numels[n] for n in bits) / max(total, 1)

"""Bit allocation (exact knapsack, budget never exceeded, hysteresis) and the sensitivity estimators."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.quant.modeling import qat_layers
from hfqat.quant.primitives import dequantize, init_scales, quantize
from hfqat.train import allocation
from hfqat.train.allocation import (
    allocate_bits,
    allocate_unit_bits,
    weighted_average_bits,
)
from hfqat.train import candidates
from hfqat.train.candidates import (
    CLIP_GRID,
    CLIP_GROUPS_PER_ROW,
    _grid_errors,
    clip_error_totals,
    fit_clip_ratios,
    quantization_errors,
)
from hfqat.train.sensitivity import (
    ESTIMATORS,
    FisherEstimator,
    SensitivityContext,
    SensitivityEstimator,
    make_estimator,
    register_estimator,
    weight_variance_costs,
)

CHOICES = (2, 3, 4, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed: int, layers: int):
    g = torch.Generator().manual_seed(seed)
    numels = {f"l{i}": int(torch.randint(1, 50, (1,), generator=g)) * 64 for i in range(layers)}
    costs = {}
    for name in numels:
        base = float(torch.rand(1, generator=g)) * 10
        costs[name] = {b: base * 2.0 ** (-2 * b) * (1 + 0.2 * float(torch.rand(1, generator=g))) for b in CHOICES}
    return costs, numels


def _brute_force(costs, numels, budget):
    names = list(costs)
    best, best_bits = math.inf, None
    for combo in itertools.product(CHOICES, repeat=len(names)):
        bits = dict(zip(names, combo))
        if weighted_average_bits(bits, numels) <= budget + 1e-12:
            total = sum(costs[n][b] for n, b in bits.items())
            if total < best:
                best, best_bits = total, bits
    return best, best_bits


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [2.0, 2.7, 3.0, 3.5, 5.0])
def test_exact_solution_matches_brute_force(seed, budget):
    costs, numels = _problem(seed, 6)
    bits = allocate_bits(costs, numels, budget)
    assert weighted_average_bits(bits, numels) <= budget
    best, _ = _brute_force(costs, numels, budget)
    assert sum(costs[n][b] for n, b in bits.items()) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_bucketed_solution_never_exceeds_budget(seed, monkeypatch):
    monkeypatch.setattr(allocation, "MAX_CAPACITY_UNITS", 600)  # force coarse buckets
    costs, numels = _problem(seed, 7)
    numels = {n: c + 7 * i for i, (n, c) in enumerate(numels.items())}  # gcd 1
    unit, _ = allocation._units(list(numels.values()), CHOICES[-1] - CHOICES[0])
    assert unit > 1
    # Rounding each layer up by < 1 unit costs at most this much of the budget (the solver's guarantee).
    slack = unit * (len(numels) * CHOICES[-1] + 1) / sum(numels.values())
    for budget in (2.3, 3.0, 3.9, 5.5):
        bits = allocate_bits(costs, numels, budget)
        assert weighted_average_bits(bits, numels) <= budget
        best_tight, _ = _brute_force(costs, numels, budget - slack)
        assert sum(costs[n][b] for n, b in bits.items()) <= best_tight + 1e-12


def test_hysteresis_keeps_the_current_allocation_for_small_gains():
    costs = {"a": {2: 1.0, 4: 0.10}, "b": {2: 1.0, 4: 0.11}}
    numels = {"a": 100, "b": 100}
    current = {"a": 2, "b": 4}
    assert allocate_bits(costs, numels, 3.0) == {"a": 4, "b": 2}  # gain 0.01
    assert allocate_bits(costs, numels, 3.0, current=current, switch_cost=0.05) == current
    assert allocate_bits(costs, numels, 3.0, current=current, switch_cost=0.001) == {"a": 4, "b": 2}


def test_budget_below_smallest_choice_is_rejected():
    costs, numels = _problem(0, 3)
    with pytest.raises(ValueError, match="budget_bits"):
        allocate_bits(costs, numels, 1.5)


def _unit_problem(seed: int, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    costs, numels = _problem(seed, units)
    return (torch.tensor([[c[b] for b in CHOICES] for c in costs.values()], dtype=torch.float64),
            torch.tensor(list(numels.values())))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [2.0, 2.7, 3.0, 3.5, 5.0])
def test_unit_allocation_is_optimal_for_the_bits_it_uses(seed, budget):
    costs, numels = _unit_problem(seed, 6)
    bits = allocate_unit_bits(costs, numels, CHOICES, budget)
    used = float((bits * numels).sum())
    assert used <= budget * float(numels.sum())
    # Lagrangian optimality: no assignment using at most as many bits costs less.
    names = {f"l{i}": int(n) for i, n in enumerate(numels)}
    table = {f"l{i}": dict(zip(CHOICES, row.tolist())) for i, row in enumerate(costs)}
    best, _ = _brute_force(table, names, used / float(numels.sum()))
    total = float(costs.gather(1, torch.tensor([CHOICES.index(int(b)) for b in bits]).unsqueeze(1)).sum())
    assert total == pytest.approx(best, rel=1e-9)


def test_unit_allocation_fills_the_budget_with_many_units():
    costs, numels = _unit_problem(0, 2000)
    for budget in (2.5, 3.5, 6.0):
        used = float((allocate_unit_bits(costs, numels, CHOICES, budget) * numels).sum()) / float(numels.sum())
        assert budget - 0.01 < used <= budget


def test_unit_allocation_hysteresis_and_validation():
    costs = torch.tensor([[1.0, 0.10], [1.0, 0.11]])
    numels, current = torch.tensor([100, 100]), torch.tensor([2, 4])
    assert allocate_unit_bits(costs, numels, (2, 4), 3.0).tolist() == [4, 2]  # gain 0.01
    assert allocate_unit_bits(costs, numels, (2, 4), 3.0, current, switch_cost=0.05).tolist() == [2, 4]
    assert allocate_unit_bits(costs, numels, (2, 4), 3.0, current, switch_cost=0.001).tolist() == [4, 2]
    with pytest.raises(ValueError, match="budget_bits"):
        allocate_unit_bits(costs, numels, (2, 4), 1.5)
    with pytest.raises(ValueError, match="bit_choices"):
        allocate_unit_bits(costs, numels, (4, 2), 3.0)


# -- sensitivity ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"),
                                                quantization_config=hfqat.QATConfig(bits=4, group_size=32))


def test_errors_use_the_actual_quantizer_for_current_bits(model):
    _, layer = next(iter(qat_layers(model)))
    clip = fit_clip_ratios(layer, CHOICES)
    assert all(0 < c <= 1 for c in clip.values()) and clip[2] <= clip[8]
    errors = quantization_errors(layer, CHOICES, clip)
    exact = (layer.quantized_weight(exact=True) - layer.weight).pow(2)
    torch.testing.assert_close(errors[CHOICES.index(layer.bits)], exact.detach())
    sums = errors.sum((1, 2)).tolist()
    assert sums == sorted(sums, reverse=True)  # fewer bits, more error


@pytest.mark.parametrize("symmetric", [True, False])
def test_batched_grid_errors_equal_the_primitives(symmetric):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    shrink = (0.6, 0.8, 0.9, 1.0)
    errors = _grid_errors(w, CHOICES, shrink, 32, symmetric)
    for i, bits in enumerate(CHOICES):
        scale, zero = init_scales(w, bits, 32, symmetric, "minmax")
        scale = scale * shrink[i]
        expected = (dequantize(quantize(w, scale, zero, bits, 32), scale, zero, 32) - w).pow(2)
        torch.testing.assert_close(errors[i], expected, rtol=1e-5, atol=1e-8)  # same grid, same codes


@pytest.mark.parametrize("batch_elements", [2**27, 3 * 4 * 64 * 4 * 32])  # all factors at once; 3 to 12 per batch
def test_clip_search_totals_are_those_of_one_factor_at_a_time(model, monkeypatch, batch_elements):
    """The batched clip search reduces each factor's grid on its own: the totals of the plain per-factor loop, bit
    for bit (so the chosen ratios cannot move)."""
    monkeypatch.setattr(candidates, "CLIP_BATCH_ELEMENTS", {"cpu": batch_elements})
    for name, layer in qat_layers(model):
        w, spec = layer.weight_oi().detach(), layer.spec
        groups = w.shape[1] // spec.group_size
        step = max(1, groups // CLIP_GROUPS_PER_ROW)
        w = w.reshape(w.shape[0], groups, spec.group_size)[:, ::step].reshape(w.shape[0], -1)
        expected = torch.stack([_grid_errors(w, CHOICES, (c,) * len(CHOICES), spec.group_size, spec.symmetric)
                                .sum((1, 2)) for c in CLIP_GRID])
        assert torch.equal(clip_error_totals(layer, CHOICES), expected), name


def test_fisher_weights_error_by_squared_gradient(model, input_ids):
    layers = list(qat_layers(model))
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    estimator = make_estimator("fisher", CHOICES, ema=0.5)
    estimator.refit_clip(layers)
    assert estimator.update(layers, SensitivityContext(model, step=1))
    name, layer = layers[0]
    errors = quantization_errors(layer, CHOICES, estimator.clip[name])
    expected = {b: 0.5 * float((layer.weight.grad.pow(2) * errors[i]).sum()) for i, b in enumerate(CHOICES)}
    assert estimator.scores[name] == pytest.approx(expected)
    # EMA: a second identical observation leaves the values unchanged; halving the gradients moves them halfway.
    for _, l in layers:
        l.weight.grad.mul_(0.5)
    estimator.update(layers, SensitivityContext(model, step=2))
    assert estimator.scores[name] == pytest.approx({b: v * (0.5 + 0.5 * 0.25) for b, v in expected.items()})
    model.zero_grad(set_to_none=True)
    assert not FisherEstimator(CHOICES).update(layers, SensitivityContext(model, step=3))  # no gradients


def test_kfac_uses_per_token_statistics(model, input_ids):
    layers = list(qat_layers(model))
    name, layer = layers[2]
    seen = {}

    def record(module, inputs, output):
        if not output.requires_grad:
            return
        seen["x"] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        output.register_hook(lambda g: seen.__setitem__("g", g.detach().reshape(-1, g.shape[-1])))

    estimator = make_estimator("kfac", CHOICES, ema=0.0)
    estimator.refit_clip(layers)
    estimator.attach(layers)
    handle = layer.register_forward_hook(record)
    model.train()
    with torch.no_grad():  # a pass that is not back-propagated is not counted
        model(input_ids=input_ids)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    handle.remove()
    assert estimator.update(layers, SensitivityContext(model, step=1))
    estimator.detach()
    model.zero_grad(set_to_none=True)
    errors = quantization_errors(layer, CHOICES, estimator.clip[name])
    fisher = seen["g"].pow(2).sum(0)[:, None] * seen["x"].pow(2).mean(0)[None, :]
    expected = [0.5 * float((fisher * e).sum()) for e in errors]
    assert list(estimator.scores[name].values()) == pytest.approx(expected, rel=1e-5)
    assert not estimator.update(layers, SensitivityContext(model, step=2))  # statistics are per step


def test_hutchinson_is_nonnegative_and_decreasing(model, input_ids):
    layers = list(qat_layers(model))
    estimator = make_estimator("hutchinson", CHOICES, ema=0.0)
    estimator.refit_clip(layers)
    context = SensitivityContext(model, step=5, batch={"input_ids": input_ids})
    assert estimator.update(layers, context)
    first = {n: dict(v) for n, v in estimator.scores.items()}
    assert any(v[2] > 0 for v in first.values())
    for values in first.values():
        ordered = [values[b] for b in CHOICES]
        assert all(v >= 0 for v in ordered) and ordered == sorted(ordered, reverse=True)
    estimator.update(layers, context)  # same step → same probes → same estimate
    for name, values in first.items():
        assert estimator.scores[name] == pytest.approx(values)


def test_variance_closed_form(model):
    _, layer = next(iter(qat_layers(model)))
    costs = weight_variance_costs(layer, CHOICES)
    assert costs[3] / costs[4] == pytest.approx(4.0) and costs[2] / costs[8] == pytest.approx(4.0**6)
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1, 32)
    assert costs[2] == pytest.approx(layer.weight.numel() * float(w.var(-1, unbiased=False).mean()) / 16)


def test_state_roundtrip_and_registry():
    estimator = make_estimator("variance", CHOICES, 0.9)
    estimator.scores = {"x": {2: 1.5, 3: 1.0, 4: 0.5, 8: 0.25}}
    estimator.clip = {"x": {2: 0.7, 8: 1.0}}
    restored = make_estimator("variance", CHOICES, 0.9)
    restored.load_state_dict(json.loads(json.dumps(estimator.state_dict())))
    assert restored.scores == estimator.scores and restored.clip == estimator.clip
    assert set(ESTIMATORS) >= {"fisher", "hutchinson", "variance"}
    with pytest.raises(ValueError, match="already registered"):
        register_estimator(FisherEstimator)
    with pytest.raises(TypeError):
        register_estimator(int)
    with pytest.raises(ValueError, match="allowed values"):
        make_estimator("nope", CHOICES, 0.9)
    assert issubclass(ESTIMATORS["variance"], SensitivityEstimator)


def test_ties_go_to_more_bits():
    numels = {"a": 100, "b": 100, "c": 200}
    costs = {name: {2: 0.0, 3: 0.0, 4: 0.0, 8: 0.0} for name in numels}
    bits = allocate_bits(costs, numels, 4.0)
    assert weighted_average_bits(bits, numels) == 4.0

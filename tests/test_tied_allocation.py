"""Tied allocation: vLLM-fused siblings (q/k/v, gate/up) found by name and held at one width by the allocator."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.train.allocation import allocate_bits, allocate_tied_bits, tie_bits, tied_groups, tied_name_groups


def test_tied_groups_of_a_llama_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"),
                                                 quantization_config=hfqat.QATConfig(bits=4, group_size=32,
                                                                                     scale_init="minmax"))
    groups = tied_groups(model)
    assert groups == [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"),
        ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"),
    ]


def test_tied_name_groups_needs_siblings_under_one_parent():
    names = ["a.q_proj", "b.k_proj", "c.gate_proj", "c.up_proj", "d.experts.0.w1", "d.experts.0.w3", "e.o_proj"]
    assert tied_name_groups(names) == [("c.gate_proj", "c.up_proj"), ("d.experts.0.w1", "d.experts.0.w3")]


def _brute_force(costs, numels, budget, groups):
    names, best = list(costs), None
    units = [list(g) for g in groups] + [[n] for n in names if not any(n in g for g in groups)]
    for widths in itertools.product((2, 3, 4, 8), repeat=len(units)):
        bits = {n: b for unit, b in zip(units, widths) for n in unit}
        if sum(bits[n] * numels[n] for n in names) <= budget * sum(numels.values()):
            total = sum(costs[n][bits[n]] for n in names)
            if best is None or total < best[0] - 1e-12:
                best = (total, bits)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_allocate_tied_bits_is_the_optimum_over_tied_maps(seed):
    g = torch.Generator().manual_seed(seed)
    names = ["l0.q_proj", "l0.k_proj", "l0.v_proj", "l0.o_proj", "l0.gate_proj", "l0.up_proj", "l0.down_proj"]
    numels = {n: int(torch.randint(1, 6, (1,), generator=g)) * 64 for n in names}
    costs = {n: {b: float(torch.rand(1, generator=g)) * 2.0 ** -b for b in (2, 3, 4, 8)} for n in names}
    groups = tied_name_groups(names)
    bits = allocate_tied_bits(costs, numels, 3.5, groups)
    for group in groups:
        assert len({bits[n] for n in group}) == 1
    assert sum(bits[n] * numels[n] for n in names) <= 3.5 * sum(numels.values())
    best_cost, _ = _brute_force(costs, numels, 3.5, groups)
    assert sum(costs[n][bits[n]] for n in names) == pytest.approx(best_cost)


def test_untied_allocation_splits_a_group_that_the_tied_one_keeps_whole():
    names = ["l.q_proj", "l.k_proj", "l.v_proj", "l.o_proj"]
    numels = {"l.q_proj": 64, "l.k_proj": 64, "l.v_proj": 64, "l.o_proj": 192}
    costs = {"l.q_proj": {2: 10.0, 8: 0.0}, "l.k_proj": {2: 0.1, 8: 0.0}, "l.v_proj": {2: 0.2, 8: 0.0},
             "l.o_proj": {2: 1.0, 8: 0.0}}
    free = allocate_bits(costs, numels, 4.0)
    tied = allocate_tied_bits(costs, numels, 4.0, tied_name_groups(names))
    assert free == {"l.q_proj": 8, "l.k_proj": 2, "l.v_proj": 8, "l.o_proj": 2}
    assert tied == dict.fromkeys(names, 2)  # q/k/v at 8 would need o_proj below 2 bits


def test_allocate_tied_bits_rejects_overlapping_groups():
    costs = {n: {2: 1.0, 4: 0.0} for n in ("a", "b", "c")}
    with pytest.raises(ValueError, match="two groups"):
        allocate_tied_bits(costs, dict.fromkeys(costs, 1), 3.0, [("a", "b"), ("b", "c")])


def test_tie_bits_raises_each_group_to_its_widest():
    bits = {"x.q_proj": 3, "x.k_proj": 8, "x.v_proj": 4, "x.o_proj": 2}
    assert tie_bits(bits, tied_name_groups(bits)) == {"x.q_proj": 8, "x.k_proj": 8, "x.v_proj": 8, "x.o_proj": 2}

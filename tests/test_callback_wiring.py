"""QATCallback wiring of two allocation features: vLLM-fused shards held at one width (``tie_fused``) and the experts
of MoE models as allocation units next to the layers (parameter-weighted budget, save/resume)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import text_dataset
from moe_archs import VOCAB, tiny_moe_config
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hfqat
from hfqat.quant.modeling import qat_layers
from hfqat.train.allocation import tied_groups
from hfqat.train.allocator import LayerAllocator
from hfqat.train.callback import HISTORY_FILE, QATCallback
from hfqat.train.expert_allocation import expert_bits, expert_numels
from hfqat.train.tracker import SensitivityTracker

pytestmark = pytest.mark.usefixtures("one_thread")
CHOICES = (2, 4, 8)


def _args(out, **kw):
    base = {"max_steps": 20, "per_device_train_batch_size": 4, "logging_steps": 5, "save_strategy": "no",
            "report_to": [], "learning_rate": 1e-3, "use_cpu": True, "disable_tqdm": True, "seed": 0, "data_seed": 0}
    return TrainingArguments(str(out), **{**base, **kw})


def _llama(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(bits=4, group_size=32))


def _train(model, out, callback, resume=None, **kw):
    trainer = Trainer(model=model, args=_args(out, **kw), train_dataset=text_dataset(64), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# -- tied fused shards -----------------------------------------------------------------------------------------------
def test_fused_shards_end_at_one_width_and_export_to_compressed_tensors(tiny_model_dir, tmp_path):
    model = _llama(tiny_model_dir("llama"))
    callback = QATCallback(budget_bits=3.5, bit_choices=CHOICES, reallocate_every=4)
    _train(model, tmp_path / "run", callback)
    groups = tied_groups(model)
    assert len(groups) == 4 and len(callback.history) > 2  # q/k/v and gate/up of both blocks
    for entry in callback.history:  # every allocation of the run, the first one included
        assert all(len({entry["bits"][name] for name in group}) == 1 for group in groups), entry["bits"]
        assert entry["average_bits"] <= 3.5
    assert callback._allocator.groups == groups
    bits = hfqat.bit_allocation(model)
    assert len(set(bits.values())) > 1 and hfqat.average_bits(model) <= 3.5
    hfqat.export_compressed_tensors(model, tmp_path / "ct")
    assert (tmp_path / "ct" / "config.json").is_file()


def test_tie_fused_false_reaches_the_allocator(tiny_model_dir, tmp_path):
    model = _llama(tiny_model_dir("llama"))
    callback = QATCallback(budget_bits=3.5, bit_choices=CHOICES, reallocate_every=4, tie_fused=False)
    _train(model, tmp_path / "run", callback, max_steps=5)
    assert callback._allocator.groups == []
    assert callback.saved_arguments()["tie_fused"] is False


def test_allocator_ties_the_groups_that_untied_costs_would_split(tiny_model_dir):
    """Costs that send v_proj alone to 8 bits: untied the q/k/v group splits, tied it moves as one."""
    model = _llama(tiny_model_dir("llama"))
    layers = list(qat_layers(model))
    numels = {name: layer.weight.numel() for name, layer in layers}
    costs = {name: {2: 1.0, 4: 0.5, 8: 0.4} for name in numels}
    for name in numels:
        if name.endswith("v_proj"):
            costs[name] = {2: 100.0, 4: 50.0, 8: 0.0}
    qkv = [g for g in tied_groups(model) if g[0].endswith("q_proj")]
    untied = LayerAllocator(model, layers, numels, CHOICES, 3.0, 0.0).reallocate(costs, None)[0]
    assert any(len({untied[n] for n in group}) > 1 for group in qkv)
    tied = LayerAllocator(model, layers, numels, CHOICES, 3.0, 0.0, tied_groups(model)).reallocate(costs, None)[0]
    assert all(len({tied[n] for n in group}) == 1 for group in tied_groups(model))
    assert hfqat.average_bits(model) <= 3.0


@pytest.mark.parametrize("value", [1, "yes", None])
def test_tie_fused_must_be_a_bool(value):
    with pytest.raises(ValueError, match="tie_fused"):
        QATCallback(tie_fused=value)


# -- MoE experts -----------------------------------------------------------------------------------------------------
def _moe(tmp_path, model_type="mixtral"):
    torch.manual_seed(0)
    path = tmp_path / model_type
    if not (path / "config.json").is_file():
        AutoModelForCausalLM.from_config(tiny_moe_config(model_type)).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(bits=4, group_size=16))


def _mixtral(tmp_path):
    return _moe(tmp_path, "mixtral")


def test_bit_allocation_and_average_bits_count_experts(tmp_path):
    model = _mixtral(tmp_path)
    numels = expert_numels(model)
    bits = hfqat.bit_allocation(model)
    assert set(numels) <= set(bits) and len(numels) == 2 * 4
    assert all("[" in unit for unit in numels)
    module_name, module = next((n, m) for n, m in model.named_modules() if hasattr(m, "quantizers"))
    module.set_expert_bits(torch.tensor([2, 8, 4, 4], dtype=torch.int32))
    assert [hfqat.bit_allocation(model)[f"{module_name}[{e}]"] for e in range(4)] == [2, 8, 4, 4]
    layers = {name: layer.weight.numel() for name, layer in qat_layers(model)}
    total = sum(layers.values()) + sum(numels.values())
    widths = hfqat.bit_allocation(model)
    expected = (sum(4 * n for n in layers.values()) + sum(widths[u] * n for u, n in numels.items())) / total
    assert hfqat.average_bits(model) == pytest.approx(expected)
    assert hfqat.average_bits(model) != pytest.approx(4.0)


def test_tracker_state_holds_the_expert_scores(tmp_path):
    from hfqat.train.expert_allocation import ExpertSensitivity

    model = _mixtral(tmp_path).train()
    layers = list(qat_layers(model))
    tracker = SensitivityTracker("fisher", CHOICES, 0.9, layers, experts=ExpertSensitivity(CHOICES, 0.9, min_tokens=4))
    for step in range(2):
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(step))
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        tracker.observe_step(model, step, None)
    state = tracker.state_dict()  # mid-window: the window itself is saved
    again = SensitivityTracker("fisher", CHOICES, 0.9, layers, experts=ExpertSensitivity(CHOICES, 0.9, min_tokens=4))
    again.load_state_dict(state)
    assert again.expert_scores(model) == tracker.expert_scores(model)
    assert set(tracker.experts.scores) == set(expert_numels(model))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_moe_reallocation_moves_experts_within_the_budget_and_resumes(model_type, tmp_path):
    budget = 3.5  # below the config's 4 bits
    make = lambda: QATCallback(budget_bits=budget, bit_choices=CHOICES, reallocate_every=4, teacher=None)
    out = tmp_path / "run"
    model = _moe(tmp_path, model_type)
    start = expert_bits(model)
    assert set(start.values()) == {4}
    callback = make()
    _train(model, out, callback, save_strategy="steps", save_steps=8)
    final = expert_bits(model)
    units = list(expert_numels(model))
    experts_at = [[entry["bits"][u] for u in units] for entry in callback.history]
    assert len(experts_at) > 2 and any(widths != experts_at[0] for widths in experts_at[1:])  # re-allocations moved
    if model_type == "mixtral":  # its 8 experts (2 MoE layers) get different widths in one allocation
        assert any(len(set(widths)) > 1 for widths in experts_at)
    assert hfqat.average_bits(model) <= budget  # parameter-weighted over layers and experts
    assert all(entry["average_bits"] <= budget for entry in callback.history)
    assert all(set(expert_numels(model)) <= set(entry["bits"]) for entry in callback.history)
    assert all("model.layers.*.mlp.experts" in entry["measured_kind_loss_increase"] for entry in callback.history)
    assert callback.state()["attributes"]["_saved_state"]["estimator"]["experts"]["scores"]
    record = json.loads((out / HISTORY_FILE).read_text())
    assert set(record["expert_scores"]) == set(units) and set(units) <= set(record["numels"])

    # Resume from the checkpoint at step 8: the same allocations from there on, the same final expert widths.
    # The model comes from the checkpoint through from_pretrained: transformers 5 saves Mixtral's / Qwen3-MoE's fused
    # experts in their per-expert legacy layout and Trainer's resume loads the file without converting it back (all
    # expert keys "unexpected"), so a model that is not loaded from the checkpoint would resume with fresh experts.
    resumed_model = AutoModelForCausalLM.from_pretrained(
        out / "checkpoint-8", quantization_config=hfqat.QATConfig(bits=4, group_size=16))
    assert expert_bits(resumed_model) == dict(zip(units, experts_at[2]))  # the allocation of step 8
    resumed = make()
    _train(resumed_model, out, resumed, resume=str(out / "checkpoint-8"), save_strategy="steps", save_steps=8)
    assert resumed.history == callback.history
    assert expert_bits(resumed_model) == final
    assert hfqat.bit_allocation(resumed_model) == hfqat.bit_allocation(model)


def test_expert_kinds_are_measured_and_calibrated_like_layer_kinds(tmp_path):
    from hfqat.quant.experts import qat_experts
    from hfqat.train.calibration import (
        _expert_candidates,
        calibrate,
        expert_kind,
        measure_expert_kinds,
    )

    model = _mixtral(tmp_path)
    name, module = next(iter(qat_experts(model)))
    assert expert_kind(f"{name}[3]") == "model.layers.*.mlp.experts"
    module.set_expert_bits(torch.tensor([2, 4, 4, 8], dtype=torch.int32))
    exact = module.quantized_tensors()
    at4 = _expert_candidates(module, 4)
    for p, t in at4.items():  # experts at 4 bits compute with their own quantizer, the others with the 4-bit grid
        rows, own = module.quantizers[p].rows(t), module.quantizers[p].rows(exact[p])
        out = module.quantizers[p].layout.out_features
        torch.testing.assert_close(rows[out:3 * out], own[out:3 * out])
        assert not torch.equal(rows[:out], own[:out])
    layers = list(qat_layers(model))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    measured = measure_expert_kinds(model, layers, batch, CHOICES, {}, hfqat.bit_allocation(model))
    assert set(measured) == {"model.layers.*.mlp.experts"} and all(v >= 0 for v in measured[
        "model.layers.*.mlp.experts"].values())
    assert all("forward" not in vars(layer) for _, layer in layers)  # the layers compute as before again
    assert all("_float_tensors" not in vars(m) for _, m in qat_experts(model))  # so do the experts
    units = list(expert_numels(model))
    scores = {u: {2: 4.0 * (i + 1), 4: 2.0 * (i + 1), 8: 1.0} for i, u in enumerate(units)}
    target = {"model.layers.*.mlp.experts": {2: 10.0, 4: 5.0, 8: 0.0}}
    calibrated = calibrate(scores, target, expert_numels(model), kind_of=expert_kind)
    assert sum(c[2] for c in calibrated.values()) == pytest.approx(10.0)
    assert calibrated[units[1]][4] / calibrated[units[0]][4] == pytest.approx(2.0)  # the shares stay the estimator's


def test_allocator_without_experts_keeps_their_widths_and_budgets_the_layers(tmp_path, caplog):
    model = _mixtral(tmp_path)
    layers = list(qat_layers(model))
    numels = {name: layer.weight.numel() for name, layer in layers}
    with caplog.at_level("WARNING"):
        allocator = LayerAllocator(model, layers, numels, CHOICES, 3.0, 0.0, tied_groups(model), experts=False)
    assert "experts keep their widths" in caplog.text and allocator.experts == {}
    before = expert_bits(model)
    costs = {name: {2: 2.0, 4: 1.0, 8: 0.0} for name in numels}
    bits, _ = allocator.reallocate(costs, None)
    assert set(bits) == set(numels) and expert_bits(model) == before
    assert sum(bits[n] * numels[n] for n in numels) <= 3.0 * sum(numels.values())

"""Measured calibration of sensitivities: kinds, rescaling, and the measurement against a hand-built model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hfqat
from hfqat.quant.modeling import bit_allocation, qat_layers
from hfqat.train.allocation import allocate_tied_bits, tied_groups
from hfqat.train.calibration import calibrate, layer_kind, leading_batch, measure_kinds
from hfqat.train.candidates import candidate_weight, fit_clip_ratios
from hfqat.train.sensitivity import weight_variance_costs
from tests.conftest import text_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
CHOICES = (2, 3, 4, 8)


def test_layer_kind_drops_block_indices():
    assert layer_kind("model.layers.3.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert layer_kind("transformer.h.11.attn.c_attn") == "transformer.h.*.attn.c_attn"
    assert layer_kind("lm_head") == "lm_head"
    assert layer_kind("blocks.2") == "blocks.*"


def test_calibrate_matches_measured_totals_and_keeps_shares():
    scores = {"m.0.q": {2: 3.0, 4: 1.0}, "m.1.q": {2: 1.0, 4: 0.0}, "m.0.v": {2: 2.0, 4: 0.0}, "m.1.v": {2: 2.0, 4: 0.0}}
    numels = {"m.0.q": 10, "m.1.q": 10, "m.0.v": 30, "m.1.v": 10}
    measured = {"m.*.q": {2: 8.0, 4: 0.5}, "m.*.v": {2: 1.0, 4: 2.0}}
    out = calibrate(scores, measured, numels)
    assert out["m.0.q"][2] == pytest.approx(6.0) and out["m.1.q"][2] == pytest.approx(2.0)  # 3:1 shares kept
    assert out["m.0.q"][4] == pytest.approx(0.5) and out["m.1.q"][4] == 0.0
    # Nothing predicted at 4 bits for v: the measurement is shared by weight count.
    assert out["m.0.v"][4] == pytest.approx(1.5) and out["m.1.v"][4] == pytest.approx(0.5)
    assert scores["m.0.q"][2] == 3.0  # inputs untouched


def _reference_increase(model, batch, members: set[str], bits: int, clip, current) -> float:
    """The same loss increase from plain nn.Linear copies holding the float / candidate weights."""
    def plain(quantized_bits):
        ref = copy.deepcopy(model)
        for name, layer in list(qat_layers(ref)):
            weight = layer.weight_oi() if name not in members or quantized_bits is None else \
                candidate_weight(layer, quantized_bits, clip[name], current[name])
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, linear)
        with torch.no_grad():
            return ref.eval()(**batch, labels=batch["input_ids"]).loss.item()

    return max(plain(bits) - plain(None), 0.0)


def test_measure_kinds_equals_hand_built_models_and_restores_forward(tiny_model_dir, input_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32,
                                                 quantization_config=hfqat.QATConfig(bits=3, group_size=16))
    layers = list(qat_layers(model))
    model.get_submodule("model.layers.0.mlp.up_proj").set_bits(4)  # one layer off the uniform width
    clip = {name: fit_clip_ratios(layer, CHOICES) for name, layer in layers}
    current = bit_allocation(model)
    batch = {"input_ids": input_ids}
    model.train()
    with torch.no_grad():
        before = model.eval()(**batch).logits
    model.train()

    measured = measure_kinds(model, layers, batch, CHOICES, clip, current)

    assert model.training  # mode restored
    assert all("forward" not in vars(layer) for _, layer in layers)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, before)
    assert set(measured) == {layer_kind(name) for name, _ in layers}
    kind = "model.layers.*.mlp.up_proj"
    members = {name for name, _ in layers if layer_kind(name) == kind}
    for bits in (2, 4):  # 4: the layer already at 4 bits uses its learned quantizer, the other the stand-in
        assert measured[kind][bits] == pytest.approx(
            _reference_increase(model, batch, members, bits, clip, current), rel=1e-4, abs=1e-6)
    assert all(value >= 0 for per_bits in measured.values() for value in per_bits.values())


@pytest.mark.parametrize("calibrate_costs", [True, False])
def test_callback_records_measurements(tiny_model_dir, tmp_path, calibrate_costs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32,
                                                 quantization_config=hfqat.QATConfig(bits=4, group_size=16))
    callback = hfqat.QATCallback(teacher=None, budget_bits=3.0, reallocate_every=2, calibrate=calibrate_costs)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-3)
    Trainer(model=model, args=args, train_dataset=text_dataset(16), callbacks=[callback]).train()
    reallocations = [entry for entry in callback.history if entry["predicted_loss_increase"] is not None]
    assert reallocations
    for entry in reallocations:
        measured = entry["measured_kind_loss_increase"]
        if calibrate_costs:
            assert set(measured) == {layer_kind(name) for name, _ in qat_layers(model)}
            assert all(set(per_bits) == {str(b) for b in CHOICES} for per_bits in measured.values())
        else:
            assert measured is None
    assert hfqat.average_bits(model) <= 3.0


def test_first_allocation_is_the_variance_prior_calibrated_on_the_leading_batch(tiny_model_dir, tmp_path):
    """Config bits over budget: before any step, the callback allocates from the weight-variance prior rescaled by
    kind to the loss measured on the training set's first examples (the calibration batch of every later
    re-allocation too) — the same as doing it by hand."""
    path = tiny_model_dir("llama")
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                        quantization_config=hfqat.QATConfig(bits=4, group_size=16))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=0.0)
    dataset = text_dataset(100)  # 24 tokens each: the first 86 hold MAX_TOKENS = 2048
    model = load()
    callback = hfqat.QATCallback(teacher=None, budget_bits=3.0, reallocate_every=10)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    first = callback.history[0]
    assert first["step"] == 0 and first["measured_kind_loss_increase"] is not None

    reference = load()
    layers = list(qat_layers(reference))
    batch = leading_batch(trainer.get_train_dataloader(), torch.device("cpu"))
    assert torch.equal(batch["input_ids"], torch.stack([e["input_ids"] for e in dataset[:86]]))
    smaller = Trainer(model=reference, args=TrainingArguments(str(tmp_path / "b2"), per_device_train_batch_size=2,
                                                              use_cpu=True, report_to=[]), train_dataset=dataset)
    assert torch.equal(leading_batch(smaller.get_train_dataloader(), torch.device("cpu"))["input_ids"],
                       batch["input_ids"])  # the same rows whatever the batch (or world) size
    assert torch.equal(callback._calibration_batch()["input_ids"], batch["input_ids"])  # later ones measure it too
    clip = {name: fit_clip_ratios(layer, CHOICES) for name, layer in layers}
    measured = measure_kinds(reference, layers, batch, CHOICES, clip, bit_allocation(reference))
    recorded = first["measured_kind_loss_increase"]
    assert recorded.keys() == measured.keys()
    for kind, per_bits in measured.items():
        assert [recorded[kind][str(b)] for b in CHOICES] == pytest.approx([per_bits[b] for b in CHOICES], abs=1e-6)
    numels = {name: layer.weight.numel() for name, layer in layers}
    costs = calibrate({name: weight_variance_costs(layer, CHOICES) for name, layer in layers}, measured, numels)
    # tie_fused (the default): q/k/v and gate/up are one item each
    assert first["bits"] == allocate_tied_bits(costs, numels, 3.0, tied_groups(reference))
    assert len(set(first["bits"].values())) > 1 and first["average_bits"] <= 3.0


def test_leading_batch_without_token_ids_is_one_training_batch():
    loader = torch.utils.data.DataLoader([{"text": str(i)} for i in range(8)], batch_size=3,
                                         collate_fn=lambda rows: {"text": [r["text"] for r in rows]})
    assert leading_batch(loader, torch.device("cpu")) == {"text": ["0", "1", "2"]}


def test_leading_batch_needs_a_map_style_dataset():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(text_dataset(4))

    assert leading_batch(torch.utils.data.DataLoader(Stream(), batch_size=2), torch.device("cpu")) is None


def test_calibrate_must_be_a_bool():
    with pytest.raises(ValueError, match="calibrate"):
        hfqat.QATCallback(calibrate="yes")


def test_kinds_without_signal_keep_their_predictions():
    scores = {"m.0.q": {2: 3.0, 4: 1.0}, "m.0.v": {2: 2.0, 4: 0.5}}
    out = calibrate(scores, {"m.*.q": {2: 0.0, 4: 0.0}, "m.*.v": {2: 4.0, 4: 0.0}}, {"m.0.q": 1, "m.0.v": 1})
    assert out["m.0.q"] == scores["m.0.q"]
    assert out["m.0.v"] == {2: 4.0, 4: 0.0}

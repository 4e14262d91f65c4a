"""Per-row bit widths (``QATConfig(bits_granularity="row")``): the layer numerics, state round trips and export."""

import re

import pytest
import torch
from conftest import text_dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hfqat
from hfqat.export.compressed_tensors import export_compressed_tensors
from hfqat.export.packed import PackedLinear, PackedRowsLinear, save_packed
from hfqat.export.packing import packed_rows
from hfqat.quant.modeling import qat_layers
from hfqat.quant.primitives import fake_quantize, init_scales
from hfqat.train.calibration import split_rows
from hfqat.train.callback import ROW_SCORES_FILE, QATCallback
from hfqat.train.candidates import quantization_errors
from hfqat.train.sensitivity import gradient_row_costs

pytestmark = pytest.mark.usefixtures("one_thread")


def _row_model(path, **config):
    config = {"bits": 4, "group_size": 32, "bits_granularity": "row", **config}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(**config)).eval()


def _mixed_rows(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in qat_layers(model):
        layer.set_row_bits(torch.tensor((2, 3, 4, 8))[torch.randint(0, 4, (layer.out_features,), generator=g)])


def test_config_validates_the_granularity():
    with pytest.raises(ValueError, match="bits_granularity.*allowed values"):
        hfqat.QATConfig(bits_granularity="group")
    with pytest.raises(ValueError, match="bits_granularity='row' needs weight_format='int'"):
        hfqat.QATConfig(bits_granularity="row", weight_format="codebook")


@pytest.mark.parametrize("symmetric", [True, False])
def test_each_row_is_quantized_at_its_own_width(tiny_model_dir, symmetric):
    model = _row_model(tiny_model_dir("llama"), symmetric=symmetric)
    name, layer = next(iter(qat_layers(model)))
    assert layer.weight_row_bits.shape == (layer.out_features,) and layer.bits == 4
    scale_before = layer.weight_scale.detach().clone()
    row_bits = torch.full((layer.out_features,), 4)
    row_bits[::3] = 2
    row_bits[1::3] = 8
    layer.set_row_bits(row_bits)
    assert layer.bits == 8 and torch.equal(layer.weight_row_bits.long(), row_bits)
    # rows that kept 4 bits keep their scales (parameter identity too); the others are re-fit for their width
    assert torch.equal(layer.weight_scale[2::3], scale_before[2::3])
    w, g = layer.weight.detach(), layer.spec.group_size
    for bits in (2, 8):
        rows = (row_bits == bits).nonzero().squeeze(1)
        scale, _ = init_scales(w[rows], bits, g, symmetric, "mse")
        torch.testing.assert_close(layer.weight_scale[rows], scale)
        expected = fake_quantize(w[rows], layer.weight_scale[rows],
                                 None if symmetric else layer.weight_zero_point[rows], bits, g)
        torch.testing.assert_close(layer.quantized_weight()[rows], expected, rtol=0, atol=0)
    assert hfqat.bit_allocation(model)[name] == pytest.approx(row_bits.float().mean().item())
    layer.set_bits(3)
    assert layer.bits == 3 and bool((layer.weight_row_bits == 3).all())
    with pytest.raises(ValueError, match="one width per output row"):
        layer.set_row_bits(torch.full((3,), 4))


def test_average_bits_counts_rows(tiny_model_dir):
    model = _row_model(tiny_model_dir("llama"))
    _mixed_rows(model)
    layers = [layer for _, layer in qat_layers(model)]
    expected = sum(float(layer.weight_row_bits.sum()) * layer.in_features for layer in layers) / sum(
        layer.weight.numel() for layer in layers)
    assert hfqat.average_bits(model) == pytest.approx(expected)


def test_row_widths_survive_save_and_reload(tiny_model_dir, tmp_path, input_ids):
    model = _row_model(tiny_model_dir("llama"))
    _mixed_rows(model)
    model.save_pretrained(tmp_path / "ft")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()
    for (_, a), (_, b) in zip(qat_layers(model), qat_layers(reloaded)):
        assert torch.equal(a.weight_row_bits, b.weight_row_bits) and a.bits == b.bits
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_plain_checkpoint_starts_every_row_at_the_config_bits(tiny_model_dir):
    model = _row_model(tiny_model_dir("qwen2"), bits=3)
    for _, layer in qat_layers(model):
        assert bool((layer.weight_row_bits == 3).all()) and layer.bits == 3


@pytest.mark.parametrize("arch,symmetric", [("llama", True), ("llama", False), ("gpt2", True)])
def test_packed_export_stores_each_width_and_is_exact(tiny_model_dir, tmp_path, input_ids, arch, symmetric):
    model = _row_model(tiny_model_dir(arch), group_size=16, symmetric=symmetric)
    _mixed_rows(model)
    name, layer = next(iter(qat_layers(model)))
    layer.set_bits(3)  # a layer whose rows agree packs as a plain PackedLinear
    save_packed(model, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids).logits, model(input_ids).logits, rtol=1e-4, atol=1e-4)
    assert isinstance(packed.get_submodule(name), PackedLinear) and packed.get_submodule(name).bits == 3
    for layer_name, qat in list(qat_layers(model))[1:]:
        rows = packed.get_submodule(layer_name)
        assert isinstance(rows, PackedRowsLinear)
        # every width's rows packed at that width: the stored words count Σ rows_b · in · b bits
        widths = {int(b): int((qat.weight_row_bits == b).sum()) for b in qat.weight_row_bits.unique()}
        assert {part.bits: part.out_features for part in rows.parts} == widths
        words = sum(part.qweight.numel() for part in rows.parts)
        assert words == sum(packed_rows(qat.in_features, b) * n for b, n in widths.items())
        torch.testing.assert_close(rows.dequantized_weight(), qat.quantized_weight(exact=True).float(), rtol=0, atol=0)


def test_compressed_tensors_export_names_mixed_rows(tiny_model_dir, tmp_path):
    model = _row_model(tiny_model_dir("llama"))
    _mixed_rows(model)
    with pytest.raises(ValueError, match="its rows have different bit widths"):
        export_compressed_tensors(model, tmp_path / "ct")


def _train(path, out, callback, resume=None, **kw):
    args = dict(max_steps=30, per_device_train_batch_size=4, logging_steps=5, save_strategy="steps", save_steps=15,
                report_to=[], learning_rate=1e-3, use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, **kw)
    model = _row_model(path).train()
    trainer = Trainer(model=model, args=TrainingArguments(str(out), **args), train_dataset=text_dataset(64),
                      callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("sensitivity", ["fisher", "kfac", "variance"])
def test_callback_allocates_rows_under_the_budget_and_resumes_exactly(tiny_model_dir, tmp_path, sensitivity):
    path, out = tiny_model_dir("llama"), tmp_path / "run"
    make = lambda: QATCallback(budget_bits=3.0, bit_choices=(2, 3, 4, 8), reallocate_every=5, sensitivity=sensitivity)
    callback = make()
    model = _train(path, out, callback)
    layers = [layer for _, layer in qat_layers(model)]
    # one width per row, several widths inside single layers, the budget counted row by row
    assert any(len(layer.weight_row_bits.unique()) > 1 for layer in layers)
    used = sum(int(layer.weight_row_bits.long().sum()) * layer.in_features for layer in layers)
    assert used <= 3.0 * sum(layer.weight.numel() for layer in layers)
    assert [h["step"] for h in callback.history] == [0, 5, 10, 15, 20]
    assert all(h["average_bits"] <= 3.0 for h in callback.history)
    assert len({tuple(h["bits"].values()) for h in callback.history}) > 2  # rows keep moving while training
    assert all(h["measured_kind_loss_increase"] is None for h in callback.history)  # calibrate=None: off for rows
    assert (out / "bit_allocation.png").stat().st_size > 0
    assert (out / "checkpoint-15" / ROW_SCORES_FILE).is_file()

    resumed_callback = make()
    resumed = _train(path, out, resumed_callback, resume=str(out / "checkpoint-15"))
    assert resumed_callback.history == callback.history
    for a, (_, b) in zip(layers, qat_layers(resumed)):
        assert torch.equal(a.weight_row_bits, b.weight_row_bits)
        torch.testing.assert_close(a.weight_scale, b.weight_scale)


def test_callback_refuses_rows_on_sharded_models(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("hfqat.train.callback.is_sharded", lambda model: True)
    with pytest.raises(ValueError, match="bits_granularity='row'.*not FSDP2 / ZeRO-3"):
        _train(tiny_model_dir("llama"), tmp_path / "run", QATCallback(budget_bits=3.0, reallocate_every=5))


def test_gradient_row_costs_are_fisher_weighted_noise_per_row(tiny_model_dir):
    model = _row_model(tiny_model_dir("llama")).train()
    layers = list(qat_layers(model))
    examples = text_dataset(4)
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    pieces = split_rows(batch, max_tokens=2 * batch["input_ids"].shape[1])
    assert [p["input_ids"].shape[0] for p in pieces] == [2, 2]
    choices = (2, 3, 4)
    costs = gradient_row_costs(model, layers, pieces, choices, {})
    assert model.training and all(layer.weight.grad is None for _, layer in layers)  # nothing left behind
    model.eval()
    fisher = {name: torch.zeros_like(layer.weight) for name, layer in layers}
    for piece in pieces:  # the empirical Fisher: squared gradients of each piece, summed
        model.zero_grad()
        model(**piece).loss.backward()
        for name, layer in layers:
            fisher[name] += layer.weight.grad.pow(2)
    for name, layer in layers:
        errors = quantization_errors(layer, choices, {})
        expected = 0.5 * (errors * fisher[name]).sum(2, dtype=torch.float64)
        assert costs[name].shape == (len(choices), layer.out_features)
        torch.testing.assert_close(costs[name], expected, rtol=1e-4, atol=1e-12)
    assert bool((costs[layers[0][0]][0] > costs[layers[0][0]][2]).any())  # 2-bit rows cost more than 4-bit ones
    assert gradient_row_costs(model, layers, [], choices, {}) is None
    layers[0][1].weight.requires_grad_(False)
    assert gradient_row_costs(model, layers, pieces, choices, {}) is None


def test_model_card_counts_each_rows_width(tiny_model_dir, tmp_path):
    from hfqat.hub.card import write_model_card

    model = _row_model(tiny_model_dir("llama"))
    _mixed_rows(model)
    expected = f"{hfqat.average_bits(model):.2f} bits per"
    assert expected in write_model_card(model, tmp_path / "card").read_text()
    save_packed(model, tmp_path / "export")
    # from the export's config.json alone (no weight counts there: the table, not the average)
    card = write_model_card(None, tmp_path / "export").read_text()
    name, layer = next(iter(qat_layers(model)))
    rows = re.findall(rf"^\| `{re.escape(name)}` \| (\d+) \|", card, re.MULTILINE)
    assert sorted(map(int, rows)) == sorted(layer.weight_row_bits.unique().tolist())


def test_packed_rows_dequantize_to_plain_linear(tiny_model_dir, tmp_path, input_ids):
    model = _row_model(tiny_model_dir("llama"))
    _mixed_rows(model)
    save_packed(model, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    with torch.no_grad():
        expected = packed(input_ids).logits
    packed.dequantize(dtype=torch.float32)
    assert not any(isinstance(m, (PackedLinear, PackedRowsLinear)) for m in packed.modules())
    with torch.no_grad():
        assert (packed(input_ids).logits - expected).abs().max() <= 1e-5


def test_gptq_rounds_each_row_onto_its_own_grid(tiny_model_dir):
    from hfqat.quant.ptq import gptq

    model = _row_model(tiny_model_dir("llama"))
    _mixed_rows(model)
    g = torch.Generator().manual_seed(0)
    gptq(model, [torch.randint(0, 256, (2, 32), generator=g) for _ in range(2)])
    for _, layer in qat_layers(model):  # the weights sit on each row's grid: fake quant leaves them unchanged
        torch.testing.assert_close(layer.quantized_weight(exact=True), layer.weight, rtol=0, atol=1e-6)


def test_recipe_passes_the_granularity():
    from hfqat.cli.recipe import QuantArguments, RecipeError

    assert QuantArguments(bits_granularity="row").to_qat_config().bits_granularity == "row"
    with pytest.raises((ValueError, RecipeError), match="bits_granularity"):
        QuantArguments(bits_granularity="rows")


def test_lora_merges_exactly_into_per_row_widths(tiny_model_dir, input_ids, tmp_path):
    from peft import LoraConfig, get_peft_model

    import hfqat.integrations.peft  # noqa: F401  (peft builds hfqat's exact-merge LoRA layers)

    base = _row_model(tiny_model_dir("llama"))
    _mixed_rows(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        before = model.eval()(input_ids).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert (merged(input_ids).logits - before).abs().max() <= 1e-4
    save_packed(merged, tmp_path / "packed")  # the merge keeps every row's width and packs it
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    with torch.no_grad():
        assert (packed(input_ids).logits - before).abs().max() <= 1e-4

"""QATConfig through from_pretrained: conversion, training under Trainer, save/reload, architectures."""

import importlib
import warnings

import pytest
import torch
from conftest import ARCHS, text_dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

import hfqat
from hfqat import QATConfig, bit_allocation
from hfqat.quant.layers import QATConv1D, QATLinear
from hfqat.quant.modeling import qat_layers


def _load(path, **cfg):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QATConfig(**cfg))


def test_import_registers_idempotently():
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    importlib.reload(hfqat.integrations.transformers)
    hfqat.integrations.transformers.register()
    hfqat.integrations.transformers.register()
    assert AUTO_QUANTIZER_MAPPING["hfqat"] is hfqat.integrations.transformers.QATHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hfqat"] is QATConfig


def test_llama_acceptance(tiny_model_dir, input_ids, tmp_path):
    """Every decoder linear converted, lm_head not; 3 Trainer steps change weights and scales; exact reload."""
    model = _load(tiny_model_dir("llama"), bits=4, group_size=32, symmetric=False)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = dict(qat_layers(model))
    assert set(converted) == {n for n in linear_names if n != "lm_head"} and len(converted) == 14
    assert type(model.lm_head) is torch.nn.Linear
    layer = converted["model.layers.0.mlp.down_proj"]
    assert layer.weight_zero_point is not None and layer.weight_scale.shape == (64, 128 // 32)

    before_w = layer.weight.detach().clone()
    before_s = layer.weight_scale.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=text_dataset()).train()
    assert not torch.equal(before_w, layer.weight.detach())
    assert not torch.equal(before_s, layer.weight_scale.detach())

    model.eval()
    with torch.no_grad():
        logits = model(input_ids).logits
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, logits)
    assert bit_allocation(reloaded) == bit_allocation(model)
    for name, layer in qat_layers(reloaded):
        assert torch.equal(layer.weight_scale, converted[name].weight_scale)
        assert torch.equal(layer.weight_zero_point, converted[name].weight_zero_point)


def test_quant_params_are_initialised_from_loaded_weights(tiny_model_dir, input_ids):
    """Scales are missing keys of a float checkpoint: they must be fitted, not left uninitialised."""
    path = tiny_model_dir("llama")
    plain = AutoModelForCausalLM.from_pretrained(path)
    model = _load(path, bits=8, group_size=-1)
    for name, layer in qat_layers(model):
        assert torch.isfinite(layer.weight_scale).all() and (layer.weight_scale > 0).all()
        assert layer.bits == 8
        assert torch.equal(layer.weight, plain.get_submodule(name).weight)
    with torch.no_grad():
        diff = (model(input_ids).logits - plain(input_ids).logits).abs().max()
    assert diff < 0.02  # 8-bit per-channel: close to float


def test_reallocated_bits_survive_reload(tiny_model_dir, input_ids, tmp_path):
    model = _load(tiny_model_dir("llama"), bits=4, group_size=32)
    layers = dict(qat_layers(model))
    layers["model.layers.1.mlp.up_proj"].set_bits(2)
    layers["model.layers.0.self_attn.v_proj"].set_bits(8)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    alloc = bit_allocation(reloaded)
    assert alloc["model.layers.1.mlp.up_proj"] == 2 and alloc["model.layers.0.self_attn.v_proj"] == 8
    assert alloc == bit_allocation(model)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model.eval()(input_ids).logits)


def test_set_bits_keeps_parameter_identity(tiny_model_dir):
    model = _load(tiny_model_dir("llama"), bits=4, group_size=32, symmetric=False)
    layer = dict(qat_layers(model))["model.layers.0.self_attn.q_proj"]
    scale, zero = layer.weight_scale, layer.weight_zero_point
    old = scale.detach().clone()
    layer.set_bits(2)
    assert layer.weight_scale is scale and layer.weight_zero_point is zero
    assert not torch.equal(old, scale.detach())  # refit for the coarser grid
    groups = layer.quantized_weight(exact=True).reshape(-1, 32)
    assert max(len(torch.unique(g)) for g in groups) <= 4  # a 2-bit grid


def test_saved_config_wins_with_warning(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir("llama"), bits=3, group_size=32)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = _load(tmp_path, bits=8, group_size=-1)
    assert any("quantization_config" in str(w.message) for w in caught)
    assert reloaded.config.quantization_config.bits == 3
    assert set(bit_allocation(reloaded).values()) == {3}
    assert dict(qat_layers(reloaded))["model.layers.0.mlp.up_proj"].spec.group_size == 32


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_architectures_train_and_reload(arch, dtype, tiny_model_dir, input_ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=dtype,
                                                 quantization_config=QATConfig(bits=4, group_size=32))
    layers = dict(qat_layers(model))
    assert layers and all(layer.weight.dtype == dtype for layer in layers.values())
    if arch == "gpt2":
        assert isinstance(layers["transformer.h.0.attn.c_attn"], QATConv1D)
        assert not any(type(m) is Conv1D for m in model.modules())
    else:
        assert all(isinstance(layer, QATLinear) for layer in layers.values())
    model.train()
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(layer.weight_scale.grad is not None for layer in layers.values())
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


def test_group_size_must_divide_and_names_layer(tiny_model_dir):
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features=64 of layer 'model\.layers\.0"):
        _load(tiny_model_dir("llama"), group_size=48)
    model = _load(tiny_model_dir("llama"), group_size=48, ragged_groups="shrink")
    assert {layer.spec.group_size for _, layer in qat_layers(model)} == {32}


def test_layer_bits_and_skips(tiny_model_dir):
    model = _load(tiny_model_dir("llama"), bits=4, group_size=32, layer_bits={"down_proj": 8, r".*\.1\.self_attn\..*": 2},
                  modules_to_not_convert=["lm_head", "model.layers.0.self_attn.q_proj"])
    alloc = bit_allocation(model)
    assert "model.layers.0.self_attn.q_proj" not in alloc
    assert alloc["model.layers.0.mlp.down_proj"] == 8 and alloc["model.layers.1.self_attn.k_proj"] == 2
    assert alloc["model.layers.0.mlp.up_proj"] == 4


def test_activation_fake_quant_changes_output(tiny_model_dir, input_ids):
    base = _load(tiny_model_dir("llama"), bits=8, group_size=32)
    act = _load(tiny_model_dir("llama"), bits=8, group_size=32, activation_bits=8)
    with torch.no_grad():
        a, b = base(input_ids).logits, act(input_ids).logits
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.05


def test_soft_rounding_anneals_to_exact(tiny_model_dir, input_ids):
    model = _load(tiny_model_dir("llama"), bits=3, group_size=32, rounding="soft", clamping="soft")
    with torch.no_grad():
        exact = model.eval()(input_ids).logits
        model.train()
        hfqat.set_soft_sharpness(model, 1.0)
        soft = model(input_ids).logits
        hfqat.set_soft_sharpness(model, float("inf"))
        annealed = model(input_ids).logits
    assert not torch.allclose(soft, exact, atol=1e-3)
    assert torch.equal(annealed, exact)


def test_dequantize_gives_plain_model_with_same_logits(tiny_model_dir, input_ids):
    model = _load(tiny_model_dir("llama"), bits=3, group_size=32, symmetric=False)
    with torch.no_grad():
        expected = model.eval()(input_ids).logits
    model.dequantize()
    assert not list(qat_layers(model))
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, expected, atol=1e-5)

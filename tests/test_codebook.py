"""Codebook (weight clustering) QAT: k-means, numerics and gradients, Trainer, re-allocation, LoRA, save/load,
packed export (exact reload, ≤ 2^bits values per group), model card, CUDA LUT kernel."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import text_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hfqat
from hfqat.export.codebook import PackedCodebookLinear
from hfqat.export.packed import save_packed, set_backend
from hfqat.hub.card import write_model_card
from hfqat.integrations.peft import apply_lora
from hfqat.quant.codebook import (
    CodebookConv1D,
    CodebookLinear,
    codebook_fake_quantize,
    codebook_indices,
    fisher_diagonal,
    fit_codebooks,
    kmeans_1d,
    nearest_centroid,
)
from hfqat.quant.modeling import qat_layers
from hfqat.quant.primitives import effective_scale
from hfqat.train.callback import QATCallback

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(path, **config):
    config = {"bits": 3, "group_size": -1, "weight_format": "codebook", "codebook_max_bits": 4, **config}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(**config))


def _args(out, **kw):
    base = dict(max_steps=6, per_device_train_batch_size=4, logging_steps=3, save_strategy="no", report_to=[],
                learning_rate=1e-3, use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    return TrainingArguments(str(out), **{**base, **kw})


@torch.no_grad()
def _logits(model, ids):
    return model.eval()(ids).logits


def _distinct_per_group(weight: torch.Tensor, group_size: int) -> int:
    groups = weight.reshape(weight.shape[0], -1, group_size).flatten(0, 1)
    return max(len(torch.unique(g)) for g in groups)


# -- k-means and assignment ----------------------------------------------------------------------------------
def test_nearest_centroid_is_the_argmin_and_skips_masked_slots():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g)
    c = torch.randn(5, 16, generator=g)
    c[:, 8:] = float("inf")  # inactive slots
    idx = nearest_centroid(x, c)
    brute = (x.unsqueeze(-1) - c[:, :8].unsqueeze(1)).abs().argmin(-1)
    assert idx.max() < 8
    assert torch.equal(c.gather(-1, idx), c[:, :8].gather(-1, brute))


def test_kmeans_is_a_lloyd_fixed_point_and_beats_quantiles():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 512, generator=g) * torch.rand(6, 1, generator=g)
    c = kmeans_1d(x, 8)
    assert c.shape == (6, 8) and torch.equal(c, c.sort(-1).values)
    idx = nearest_centroid(x, c)
    for k in range(8):  # every centroid is the mean of its cluster
        members = idx == k
        means = (x * members).sum(-1) / members.sum(-1).clamp_min(1)
        torch.testing.assert_close(c[:, k][members.any(-1)], means[members.any(-1)], atol=1e-6, rtol=1e-5)
    init = kmeans_1d(x, 8, iters=0)
    err = lambda cb: (cb.gather(-1, nearest_centroid(x, cb)) - x).pow(2).sum()
    assert err(c) < err(init)


def test_weighted_kmeans_follows_the_weights():
    x = torch.linspace(-1, 1, 400).repeat(2, 1)
    h = torch.ones_like(x)
    h[1, x[1] > 0.5] = 1000.0  # row 1: the top values matter most
    c = kmeans_1d(x, 4, sample_weight=h)
    assert (c[1] > 0.5).sum() > (c[0] > 0.5).sum()
    top = x[1] > 0.5
    err = lambda row: (c[row].gather(-1, nearest_centroid(x[row:row + 1], c[row:row + 1])[0]) - x[row])
    assert err(1)[top].pow(2).mean() < err(0)[top].pow(2).mean()


def test_gradients_are_ste_scatter_add_and_gain():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g, requires_grad=True)
    scale = (1 + 0.1 * torch.rand(6, 2, generator=g)).requires_grad_()
    codebook = torch.randn(6, 2, 16, generator=g).requires_grad_()
    out = torch.randn(6, 64, generator=g)
    codebook_fake_quantize(w, scale, codebook, 3, 32).mul(out).sum().backward()

    idx = codebook_indices(w, scale, codebook, 3, 32)
    assert idx.max() < 8
    w2, s2, c2 = (t.detach().clone().requires_grad_() for t in (w, scale, codebook))
    ref = (effective_scale(s2).unsqueeze(-1) * c2.gather(-1, idx)).reshape(6, 64)
    ref = w2 + (ref - w2).detach() + (ref - ref.detach())  # value ref, gradient 1 to w and autograd to s, C
    ref.mul(out).sum().backward()
    assert torch.equal(w.grad, out)
    torch.testing.assert_close(codebook.grad, c2.grad)
    torch.testing.assert_close(scale.grad, s2.grad)
    assert codebook.grad[..., 8:].abs().sum() == 0  # inactive slots get nothing


# -- layers, training, re-allocation -------------------------------------------------------------------------
def test_layers_are_codebook_layers_with_kmeans_init(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    layers = dict(qat_layers(model))
    assert layers and all(isinstance(layer, CodebookLinear) for layer in layers.values())
    layer = layers["model.layers.0.mlp.down_proj"]
    assert layer.weight_codebook.shape == (64, 1, 16) and layer.weight_zero_point is None
    assert layer.weight_codebook.requires_grad and torch.all(layer.weight_scale == 1)
    wq = layer.quantized_weight(exact=True)
    assert _distinct_per_group(wq, 128) <= 8
    w = layer.weight.detach()
    uniform = hfqat.QATConfig(bits=3, group_size=-1, scale_init="mse")
    int_layer = hfqat.quant.modeling.QATLinear.from_float(torch.nn.Linear(128, 64, bias=False), uniform.spec_for("l", 128))
    int_layer.weight.data.copy_(w)
    int_layer.reset_quant_params()
    assert (wq - w).pow(2).sum() < (int_layer.quantized_weight(exact=True) - w).pow(2).sum()  # k-means < grid


def test_gpt2_conv1d_codebook(tiny_model_dir, input_ids, tmp_path):
    model = _model(tiny_model_dir("gpt2"), group_size=32).eval()
    assert any(isinstance(layer, CodebookConv1D) for _, layer in qat_layers(model))
    ref = _logits(model, input_ids)
    reloaded = AutoModelForCausalLM.from_pretrained(save_packed(model, tmp_path / "p")).eval()
    assert (_logits(reloaded, input_ids) - ref).abs().max() <= TOL


def test_trains_under_trainer_with_distillation(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir("llama"))
    before = {name: layer.weight_codebook.detach().clone() for name, layer in qat_layers(model)}
    callback = QATCallback(reallocate_every=0)  # distillation from the float snapshot, no re-allocation
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=text_dataset(24), callbacks=[callback])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all("distill_loss" in e for e in logs)
    for name, layer in qat_layers(model):
        assert not torch.equal(layer.weight_codebook[..., :8], before[name][..., :8]), name  # centroids learned
        assert torch.equal(layer.weight_codebook[..., 8:], before[name][..., 8:])  # inactive slots untouched


def test_set_bits_keeps_identity_and_reruns_kmeans(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    layer = dict(qat_layers(model))["model.layers.1.self_attn.q_proj"]
    params = (layer.weight_codebook, layer.weight_scale, layer.weight_bits)
    with torch.no_grad():
        layer.weight_scale.mul_(1.1)
    layer.set_bits(2)
    assert (layer.weight_codebook, layer.weight_scale, layer.weight_bits) == params
    assert layer.bits == 2 and torch.all(layer.weight_scale == 1)
    assert _distinct_per_group(layer.quantized_weight(exact=True), 64) <= 4
    torch.testing.assert_close(layer.weight_codebook[..., :4],
                               kmeans_1d(layer.weight.detach(), 4).view(64, 1, 4))
    layer.set_bits(4)
    assert _distinct_per_group(layer.quantized_weight(exact=True), 64) <= 16
    with pytest.raises(ValueError, match="codebook_max_bits=4"):
        layer.set_bits(8)


def test_callback_reallocates_codebook_layers(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir("llama"))
    params = {name: (layer.weight_codebook, layer.weight_scale) for name, layer in qat_layers(model)}
    callback = QATCallback(teacher=None, budget_bits=3.0, bit_choices=(2, 3, 4), reallocate_every=2,
                           freeze_after=1.0, hysteresis=0.0)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=text_dataset(32), callbacks=[callback])
    trainer.train()
    assert [h["step"] for h in callback.history] == [0, 2, 4, 6]
    allocations = [h["bits"] for h in callback.history]
    assert any(a != allocations[0] for a in allocations), "expected re-allocation to move some layer"
    assert all(h["average_bits"] <= 3.0 for h in callback.history)
    scores = callback._estimator.scores
    assert all(s[2] > s[3] > s[4] for s in scores.values())  # k-means stand-ins: fewer bits, more loss
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, layer in qat_layers(model):
        assert (layer.weight_codebook, layer.weight_scale) == params[name]
        assert id(layer.weight_codebook) in in_optimizer
        assert _distinct_per_group(layer.quantized_weight(exact=True), layer.in_features) <= 2 ** layer.bits
    with pytest.raises(ValueError, match=r"bit choices \[8\] exceed QATConfig.codebook_max_bits=4"):
        Trainer(model=model, args=_args(tmp_path), train_dataset=text_dataset(8),
                callbacks=[QATCallback(teacher=None, budget_bits=3.0, bit_choices=(2, 4, 8))]).train()


def test_fisher_weighted_fit(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    fisher = fisher_diagonal(model, [ids])
    name = "model.layers.0.mlp.up_proj"
    assert fisher[name].shape == (128, 64) and (fisher[name] >= 0).all() and fisher[name].sum() > 0
    layers = dict(qat_layers(model))

    def fisher_error():  # the SqueezeLLM objective Σ F (Q(w) - w)² over all layers
        return sum(((layer.quantized_weight(exact=True) - layer.weight).pow(2) * fisher[n]).sum()
                   for n, layer in layers.items()).item()

    plain = fisher_error()
    assert set(fit_codebooks(model, fisher)) == set(layers) and layers[name].kmeans_weight is not None
    assert fisher_error() < 0.9 * plain
    assert all(p.grad is None for p in model.parameters())


# -- LoRA ----------------------------------------------------------------------------------------------------
def test_lora_quantizes_inside_the_codebook_and_merges_exactly(tiny_model_dir, input_ids, tmp_path):
    model = _model(tiny_model_dir("llama"))
    peft_model = apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif ".lora_scale_factor." in name:
                p.copy_(torch.empty(p.shape).uniform_(0.8, 1.2, generator=g))
    adapted = _logits(peft_model, input_ids)
    merged = peft_model.merge_and_unload()
    assert (_logits(merged, input_ids) - adapted).abs().max() <= TOL
    reloaded = AutoModelForCausalLM.from_pretrained(save_packed(merged, tmp_path / "p")).eval()
    assert (_logits(reloaded, input_ids) - adapted).abs().max() <= TOL


# -- save / load / export ------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(tiny_model_dir, input_ids, tmp_path):
    model = _model(tiny_model_dir("llama"))
    layers = list(qat_layers(model))
    layers[0][1].set_bits(2)
    with torch.no_grad():
        layers[1][1].weight_codebook.add_(0.01)
    model.save_pretrained(tmp_path / "fq")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fq")
    assert again.config.quantization_config.weight_format == "codebook"
    assert hfqat.bit_allocation(again) == hfqat.bit_allocation(model)
    for (_, a), (_, b) in zip(layers, qat_layers(again)):
        assert isinstance(b, CodebookLinear) and torch.equal(a.weight_codebook, b.weight_codebook)
    assert torch.equal(_logits(again, input_ids), _logits(model, input_ids))


@pytest.mark.parametrize("group_size", [-1, 32])
def test_packed_export_reload_exact_and_at_most_8_values(tiny_model_dir, input_ids, tmp_path, group_size):
    model = _model(tiny_model_dir("llama"), group_size=group_size)
    torch.manual_seed(0)
    with torch.no_grad():  # as training leaves them: gains off 1, centroids moved
        for _, layer in qat_layers(model):
            layer.weight_scale.mul_(1 + 0.05 * torch.rand_like(layer.weight_scale))
            layer.weight_codebook.add_(1e-3 * torch.randn_like(layer.weight_codebook))
    ref = _logits(model, input_ids)
    out = save_packed(model, tmp_path / "packed")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["weight_format"] == "codebook"
    assert all(entry["weight_format"] == "codebook" and entry["bits"] == 3 for entry in qc["packed_layers"].values())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (_logits(reloaded, input_ids) - ref).abs().max() <= TOL
    fake = dict(qat_layers(model))
    packed = {n: m for n, m in reloaded.named_modules() if isinstance(m, PackedCodebookLinear)}
    assert set(packed) == set(fake)
    for name, layer in packed.items():
        assert layer.codebook.shape[-1] == 8 and not layer.qweight.is_floating_point()
        w = layer.dequantized_weight()
        assert torch.equal(w, fake[name].quantized_weight(exact=True))  # bit for bit
        assert _distinct_per_group(w, layer.group_size) <= 8
    assert torch.equal(reloaded.model.layers[0].mlp.down_proj.to_float().weight,
                       fake["model.layers.0.mlp.down_proj"].quantized_weight(exact=True))


def test_packed_from_float_is_the_kmeans_init(tiny_model_dir):
    model = _model(tiny_model_dir("llama"), group_size=32)
    layer = dict(qat_layers(model))["model.layers.0.mlp.up_proj"]
    linear = torch.nn.Linear(64, 128, bias=False)
    linear.weight.data.copy_(layer.weight.detach())
    packed = PackedCodebookLinear.from_float(linear, 3, 32)
    assert torch.equal(packed.dequantized_weight(), layer.quantized_weight(exact=True))


def test_model_card_says_codebook(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir("llama"))
    out = save_packed(model, tmp_path / "packed")
    card = write_model_card(None, out).read_text()
    assert "codebook" in card.split("---")[1]  # YAML metadata (tags, hfqat.weight_format)
    assert "| weight format | codebook |" in card and "indices into learned per-group codebooks" in card


def test_config_validation():
    with pytest.raises(ValueError, match="weight_format"):
        hfqat.QATConfig(weight_format="kmeans")
    with pytest.raises(ValueError, match="rounding='soft'.*codebook"):
        hfqat.QATConfig(weight_format="codebook", rounding="soft")
    with pytest.raises(ValueError, match="codebook_max_bits=3"):
        hfqat.QATConfig(weight_format="codebook", bits=3, codebook_max_bits=3, layer_bits={"q_proj": 4})
    with pytest.warns(UserWarning, match="symmetric=False is ignored"):
        config = hfqat.QATConfig(weight_format="codebook", symmetric=False, group_size=32)
    layer = CodebookLinear.from_float(torch.nn.Linear(64, 8), config.spec_for("l", 64))
    assert layer.weight_zero_point is None and "weight_zero_point" not in layer.state_dict()
    assert layer.weight_codebook.shape == (8, 2, 256)
    assert hfqat.QATConfig().spec_for("l", 128).weight_format == "int"


# -- CUDA LUT kernel -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 64])
def test_triton_lut_matches_exact_fallback(tiny_model_dir, bits, group_size):
    model = _model(tiny_model_dir("llama"), bits=bits, group_size=group_size, codebook_max_bits=8).cuda()
    packed = PackedCodebookLinear.from_qat(dict(qat_layers(model))["model.layers.0.mlp.down_proj"])
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for m in (1, 5, 80):
            x = torch.randn(m, packed.in_features, device="cuda", dtype=dtype)
            packed.force_backend = "dequant"
            ref = packed(x).float()
            packed.force_backend = "triton_lut"
            got = packed(x)
            assert packed.backend == "triton_lut" and got.dtype == dtype
            assert (got.float() - ref).abs().max() <= tol * ref.abs().max().clamp_min(1.0)
    set_backend(model, None)

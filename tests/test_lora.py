"""LoRA + QAT through peft: the adapter trains inside the quantizer, merges exactly, saves/reloads and exports."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import text_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hfqat import QATCallback, QATConfig, average_bits, bit_allocation
from hfqat.integrations.peft import (
    QATLoraLinear,
    apply_lora,
    register,
    set_train_scales,
)
from hfqat.quant.layers import FakeQuantMixin, QATConv1D, QATLinear

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qat_model(path, **overrides):
    cfg = {"bits": 4, "group_size": 32}
    cfg.update(overrides)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QATConfig(**cfg))


@torch.no_grad()
def randomize_adapters(model, seed: int = 0) -> None:
    """Non-trivial adapters: B large enough to move weights across rounding boundaries, scales off 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        elif ".lora_scale_factor." in name:
            p.copy_(torch.empty(p.shape).uniform_(0.8, 1.2, generator=g))
        elif ".lora_zero_point_offset." in name:
            p.copy_(torch.empty(p.shape).uniform_(-1.5, 1.5, generator=g))


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, QATLoraLinear)]


@torch.no_grad()
def logits(model, input_ids):
    model.eval()
    return model(input_ids).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# -- the formulation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ["ste", "soft"])
def test_forward_is_quantized_merged_weight(tiny_model_dir, rounding):
    model = get_peft_model(qat_model(tiny_model_dir("llama"), rounding=rounding, clamping="hard"),
                           LoraConfig(r=8, target_modules=["q_proj"]))
    randomize_adapters(model)
    layer = lora_layers(model)[0]
    base = layer.get_base_layer()
    base.soft_sharpness = 4.0
    expected = copy.deepcopy(base)
    with torch.no_grad():
        expected.weight += layer.get_delta_weight("default")
        expected.weight_scale *= layer.lora_scale_factor["default"]
    x = torch.randn(3, 5, base.in_features)
    for training in (True, False):  # soft sharpness in training, exact quantizer in eval, as the merged layer
        layer.train(training)
        expected.train(training)
        with torch.no_grad():
            assert torch.equal(layer(x), expected(x))
    # The naive "Q(W)x + s·BAx" is a different function: that is why the adapter lives inside the quantizer.
    with torch.no_grad():
        naive = base(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        assert max_diff(naive, layer(x)) > 1e-3


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_recomputed_backward_matches_autograd(tiny_model_dir, symmetric, autocast):
    """The recomputed backward = plain autograd; also under bf16 autocast (Trainer(bf16=True), trl's SFTConfig
    default), where the bf16 gradient meets the fp32 weights rebuilt under the forward's autocast state."""
    model = get_peft_model(qat_model(tiny_model_dir("llama"), symmetric=symmetric),
                           LoraConfig(r=4, target_modules=["gate_proj"], lora_bias=False))
    randomize_adapters(model, seed=1)
    layer = lora_layers(model)[0]
    layer.train()
    x = torch.randn(2, 7, layer.in_features, requires_grad=True)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert len(trainable) == (3 if symmetric else 4)  # A, B, scale factor (+ zero-point offset)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    (out.float() ** 2).sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in trainable]
    for t in [x] + trainable:
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference = F.linear(x, layer._quantized_weight(["default"], float("inf")))  # plain autograd, no recompute
    (reference.float() ** 2).sum().backward()
    rtol = 1e-4 if autocast else 1e-5
    for got, want in zip(ours, [x.grad] + [p.grad for p in trainable]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)
    base = layer.get_base_layer()
    assert base.weight.grad is None and base.weight_scale.grad is None


# -- acceptance: train, merge, export, adapter round trip ----------------------------------------------------
def test_acceptance_trainer_merge_export_and_adapter_roundtrip(tiny_model_dir, input_ids, tmp_path):
    path = tiny_model_dir("llama")
    model = get_peft_model(qat_model(path), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS))
    assert len(lora_layers(model)) == 2 * len(LLAMA_TARGETS)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=text_dataset())
    trainer.train()

    # Only adapter tensors trained and carry optimizer state; base weights/scales untouched, no grads.
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen_before.items())
    assert all(params[n].grad is None for n in frozen_before)
    state_ids = {id(p) for p in trainer.optimizer.state}
    assert state_ids and state_ids <= {id(p) for n, p in params.items() if ".lora_" in n}
    assert all(layer.lora_B["default"].weight.abs().max() > 0 for layer in lora_layers(model))

    adapter_logits = logits(model, input_ids)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(qat_model(path), tmp_path / "adapter")
    assert len(lora_layers(reloaded)) == len(lora_layers(model))
    assert max_diff(logits(reloaded, input_ids), adapter_logits) == 0.0

    merged = model.merge_and_unload()
    assert not lora_layers(merged)
    assert all(isinstance(m, QATLinear) for n, m in merged.named_modules() if n.endswith(tuple(LLAMA_TARGETS)))
    merged_logits = logits(merged, input_ids)
    assert max_diff(merged_logits, adapter_logits) <= 1e-4

    if importlib.util.find_spec("hfqat.export.packed") is None:
        pytest.skip("hfqat.export.packed (save_packed) not available yet")
    from hfqat.export.packed import save_packed

    save_packed(merged, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert max_diff(logits(packed, input_ids), merged_logits) <= 1e-4


def test_qat_callback_distills_and_reallocates_on_peft_model(tiny_model_dir, input_ids, tmp_path):
    # K-FAC: its statistics come from hooks on the quantized layers, which the adapter layer runs through.
    # (The default "fisher" estimator reads weight gradients, which frozen LoRA base weights do not have.)
    model = get_peft_model(qat_model(tiny_model_dir("llama")), LoraConfig(r=8, target_modules=LLAMA_TARGETS))
    callback = QATCallback(budget_bits=3.0, reallocate_every=2, sensitivity="kfac")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=text_dataset(), callbacks=[callback])
    trainer.train()

    # The float teacher pass bypasses the adapters (QATCallback swaps the base layers' forward): KL > 0.
    distill = [float(log["distill_loss"]) for log in trainer.state.log_history if "distill_loss" in log]
    assert distill and min(distill) > 0
    assert average_bits(model) <= 3.0
    assert len(callback.history) >= 2 and callback.history[-1]["predicted_loss_increase"] is not None
    assert len(set(bit_allocation(model).values())) > 1  # sensitivities moved bits away from the uniform prior
    adapter_logits = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert max_diff(logits(merged, input_ids), adapter_logits) <= 1e-4


def test_asymmetric_conv1d_merge_and_unmerge(tiny_model_dir, input_ids):
    model = get_peft_model(qat_model(tiny_model_dir("gpt2"), symmetric=False),
                           LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    layers = lora_layers(model)
    assert layers and all(isinstance(m.get_base_layer(), QATConv1D) for m in layers)
    randomize_adapters(model, seed=2)
    before = logits(model, input_ids)
    with model.disable_adapter():
        base_only = logits(model, input_ids)
    assert max_diff(before, base_only) > 1e-3

    model.merge_adapter()
    assert max_diff(logits(model, input_ids), before) <= 1e-4
    model.unmerge_adapter()
    assert max_diff(logits(model, input_ids), before) <= 1e-4
    with model.disable_adapter():
        assert max_diff(logits(model, input_ids), base_only) <= 1e-4


# -- options and errors ---------------------------------------------------------------------------------------
def test_train_scales_follows_learn_scales_and_can_be_overridden(tiny_model_dir):
    path = tiny_model_dir("llama")
    fixed = get_peft_model(qat_model(path, learn_scales=False), LoraConfig(r=4, target_modules=["v_proj"]))
    assert all(not p.requires_grad for m in lora_layers(fixed) for p in m.lora_scale_factor.values())
    assert all(m.lora_A["default"].weight.requires_grad for m in lora_layers(fixed))
    set_train_scales(fixed, True)
    assert all(p.requires_grad for m in lora_layers(fixed) for p in m.lora_scale_factor.values())

    learned = apply_lora(qat_model(path), LoraConfig(r=4, target_modules=["v_proj"]), train_scales=False)
    assert all(not p.requires_grad for m in lora_layers(learned) for p in m.lora_scale_factor.values())


def test_unsupported_options_raise_or_warn(tiny_model_dir, input_ids):
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="variant"):
        get_peft_model(qat_model(path), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(qat_model(path), LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match="lora_dropout"):
        model = get_peft_model(qat_model(path), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    with pytest.raises(ValueError, match="adapter_names"):
        model(input_ids, adapter_names=["default"] * len(input_ids))


def test_register_is_idempotent_and_keeps_plain_layers_stock(tiny_model_dir):
    register()
    register()
    func = LoraModel.__dict__["_create_new_module"].__func__
    assert not hasattr(func._hfqat_original, "_hfqat_original")
    model = get_peft_model(qat_model(tiny_model_dir("llama"), modules_to_not_convert=["lm_head", "o_proj"]),
                           LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    wrapped = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped["q_proj"] is QATLoraLinear
    assert wrapped["o_proj"] is not QATLoraLinear and not isinstance(
        model.get_submodule("base_model.model.model.layers.0.self_attn.o_proj").get_base_layer(), FakeQuantMixin)

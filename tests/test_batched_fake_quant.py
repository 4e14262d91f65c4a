"""Small layers' weights fake-quantized in buckets (`hfqat.quant.batched_fake_quant`): the same values and gradients as
each layer's own pass, bit for bit (widths per layer or per row, symmetric or not), buckets within their bounds, no
batching where it would be wrong or wasted (a swapped forward, a stale slice, checkpointing, an unconsumed slice).
On the CPU with ``DEVICES`` widened (the torch code); on CUDA the fused kernels, when a GPU is present."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hfqat
from hfqat.quant import batched_fake_quant
from hfqat.quant.batched_fake_quant import BatchedWeights
from hfqat.quant.layers import BATCHED_WEIGHT
from hfqat.quant.modeling import qat_layers, quantize_model
from hfqat.train.distillation import SnapshotTeacher

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128)


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(batched_fake_quant, "DEVICES", ("cpu", "cuda"))


def _model(symmetric=True, granularity="layer", dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device, dtype)
    quantize_model(model, hfqat.QATConfig(bits=3, group_size=32, symmetric=symmetric, bits_granularity=granularity))
    if granularity == "row":
        for _, layer in qat_layers(model):
            layer.weight_row_bits[::3] = 4
            layer.weight_row_bits[1::3] = 2
    return model


def _step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _hook(model) -> BatchedWeights:
    return model.__dict__["_hfqat_batched_weights"]


def _assert_same_step(model, device, monkeypatch):
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    reference = copy.deepcopy(model)
    loss, grads = _step(model, ids)
    assert all(b.layers for b in _hook(model)._plans[next(iter(_hook(model)._plans))])  # it batched
    assert not _hook(model).left_out  # every slice was consumed
    monkeypatch.setattr(batched_fake_quant, "DEVICES", ())  # the reference: every layer quantizes itself
    ref_loss, ref_grads = _step(reference, ids)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[name], ref_grads[name]) for name in grads)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["layer", "row"])
def test_buckets_give_the_layers_own_values_and_gradients(on_cpu, monkeypatch, symmetric, granularity):
    _assert_same_step(_model(symmetric, granularity), "cpu", monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_buckets_give_the_layers_own_values_and_gradients(monkeypatch, symmetric, dtype):
    _assert_same_step(_model(symmetric, "row", dtype, "cuda"), "cuda", monkeypatch)


def test_buckets_keep_to_their_bounds(on_cpu, monkeypatch):
    monkeypatch.setattr(batched_fake_quant, "BUCKET_ELEMENTS", 64 * 128 * 2)
    monkeypatch.setattr(batched_fake_quant, "MAX_LAYER_ELEMENTS", 64 * 128)  # the MLP's gate/up/down are left alone
    model = _model()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16))
    model(input_ids=ids)
    (buckets,) = _hook(model)._plans.values()
    batched = [layer for bucket in buckets for layer in bucket.layers]
    assert len(buckets) > 1 and all(sum(layer.weight.numel() for layer in b.layers) <= 64 * 128 * 2 for b in buckets)
    assert batched and all(layer.weight.numel() <= 64 * 128 for layer in batched)
    assert not any(BATCHED_WEIGHT in vars(layer) for _, layer in qat_layers(model))  # nothing left behind


def test_eval_forward_is_batched_and_exact(on_cpu, monkeypatch):
    model = _model().eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert _hook(model)._plans and not _hook(model).left_out
        monkeypatch.setattr(batched_fake_quant, "DEVICES", ())
        assert torch.equal(logits, model(input_ids=ids).logits)


def test_a_slice_made_stale_by_an_update_is_not_used(on_cpu):
    model = _model()
    hook = _hook(model)
    _, layer = next(qat_layers(model))
    x = torch.randn(3, layer.in_features)
    hook.before(model, ())
    with torch.no_grad():
        layer.weight.mul_(1.5)  # after the bucket pass, before the layer runs
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.quantized_weight()), rtol=0, atol=0)


def test_teacher_pass_and_checkpointing_are_not_batched(on_cpu):
    model = _model()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16))
    _step(model, ids)
    plan = _hook(model)._plans
    SnapshotTeacher(model).logits((), {"input_ids": ids})  # its layers' forwards are swapped: nothing to batch
    assert _hook(model)._plans is plan and not _hook(model).left_out
    # transformers >= 5.2x: activation_checkpointing_enable (the old name warns)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    hook = _hook(model)
    hook.before(model, ())
    assert not any(BATCHED_WEIGHT in vars(layer) for _, layer in qat_layers(model))


def test_a_layer_that_does_not_consume_its_slice_is_left_out(on_cpu):
    model = _model()
    (_, skipped), *others = qat_layers(model)
    hook = _hook(model)
    hook.before(model, ())
    for _, layer in others:  # as their forwards do; `skipped` computes its weight another way (a LoRA adapter)
        assert layer._take_batched_weight() is not None
    hook.after(model, (), None)
    assert hook.left_out == {id(skipped)}
    hook.before(model, ())
    assert BATCHED_WEIGHT not in vars(skipped) and all(BATCHED_WEIGHT in vars(layer) for _, layer in others)


def test_new_widths_reach_the_bucket(on_cpu, monkeypatch):
    model = _model()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16))
    _step(model, ids)
    model.zero_grad(set_to_none=True)
    for _, layer in list(qat_layers(model))[::2]:  # what a re-allocation does: widths changed in place
        layer.set_bits(2)
    _assert_same_step(model, "cpu", monkeypatch)


def test_a_bucket_is_quantized_when_the_forward_reaches_it(on_cpu, monkeypatch):
    # lazily: a no-grad forward (evaluation, generate) holds one bucket's quantized weights at a time
    monkeypatch.setattr(batched_fake_quant, "BUCKET_ELEMENTS", 64 * 128 * 2)
    model = _model()
    hook = _hook(model)
    with torch.no_grad():
        hook.before(model, ())
        first, *later = hook._active
        assert len(later) > 1 and all(not isinstance(vars(layer)[BATCHED_WEIGHT], tuple)
                                      for bucket in hook._active for layer in bucket.layers)
        assert first.layers[0]._take_batched_weight() is not None  # its bucket's pass runs now, for it alone
        assert all(isinstance(vars(layer)[BATCHED_WEIGHT], tuple) for layer in first.layers[1:])
        assert all(vars(layer)[BATCHED_WEIGHT] is bucket for bucket in later for layer in bucket.layers)
        hook.after(model, (), None)
    assert hook.left_out == {id(layer) for layer in first.layers[1:]}  # computed, never used

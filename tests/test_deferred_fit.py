"""A float checkpoint loaded on the CPU of a GPU machine fits its scales where the model goes next, not on the CPU.

The GPU stall (issue 26): `from_pretrained` fitted every layer's clip search on the CPU before the user's `.cuda()`.
Here the "has a GPU" decision is forced on (the CI machine has none); the deferred fit must then give exactly the
scales an immediate fit gives, whichever first use triggers it.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.quant.modeling import fit_belongs_on_accelerator, qat_layers


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(bits=4, group_size=32,
                                                                                          symmetric=False))


@pytest.fixture
def pair(tiny_model_dir, monkeypatch):
    path = tiny_model_dir("llama")
    eager = _load(path)
    monkeypatch.setattr("hfqat.integrations.transformers.fit_belongs_on_accelerator", lambda model: True)
    deferred = _load(path)
    return eager, deferred


def _pending(model):
    return [name for name, layer in qat_layers(model) if layer.__dict__.get("_fit_pending")]


def _assert_same_quant_params(a, b):
    for (name, la), (_, lb) in zip(qat_layers(a), qat_layers(b)):
        assert torch.equal(la.weight_scale, lb.weight_scale), name
        assert torch.equal(la.weight_zero_point, lb.weight_zero_point), name


def test_loading_defers_and_a_move_fits(pair):
    eager, deferred = pair
    assert len(_pending(deferred)) == len(list(qat_layers(deferred))) and not _pending(eager)
    deferred.to(torch.float32)  # what .cuda() / Trainer's model.to(device) do: the layers are moved (here: cast)
    assert not _pending(deferred)
    _assert_same_quant_params(eager, deferred)


def test_reads_that_bypass_the_fit_see_finite_placeholders(pair):
    # model.named_parameters() reads the tensors without a layer's attribute access: before the fit they hold scale 1
    # and zero point 0, not what a meta-device load leaves (the GPU machine read NaN there)
    _, deferred = pair
    quant = {name: p for name, p in deferred.named_parameters() if "weight_scale" in name or "zero_point" in name}
    assert quant and _pending(deferred)
    assert all(bool((p == (1.0 if "scale" in name else 0.0)).all()) for name, p in quant.items())


def test_forward_fits_a_pending_layer(pair, input_ids):
    eager, deferred = pair
    with torch.no_grad():
        assert torch.equal(deferred(input_ids).logits, eager(input_ids).logits)
    assert not _pending(deferred)


def test_state_dict_and_scale_reads_fit(pair, tmp_path):
    eager, deferred = pair
    name, layer = next(iter(qat_layers(deferred)))
    assert torch.equal(layer.weight_scale, dict(qat_layers(eager))[name].weight_scale)  # a read fits that layer
    assert len(_pending(deferred)) == len(list(qat_layers(deferred))) - 1
    deferred.save_pretrained(tmp_path / "saved")  # state_dict fits the rest before anything is written
    assert not _pending(deferred)
    _assert_same_quant_params(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), eager)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's path")
def test_fit_stays_immediate_without_a_gpu(tiny_model_dir):
    model = _load(tiny_model_dir("llama"))
    assert not fit_belongs_on_accelerator(model) and not _pending(model)


def test_fit_is_deferred_for_a_cpu_model_when_a_gpu_is_present(tiny_model_dir, monkeypatch):
    model = _load(tiny_model_dir("llama"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fit_belongs_on_accelerator(model)
    model.to("meta")  # weights off the CPU (as after device_map="cuda"): fit at once
    assert not fit_belongs_on_accelerator(model)

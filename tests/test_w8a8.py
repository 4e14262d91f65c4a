"""W8A8: training's activation quantizers are vLLM's (int8: scale amax/127, round half to even; FP8 e4m3: scale
amax/448), and packed reloads run real int8 / FP8 matmuls (CPU: exact ``torch._int_mm``; CUDA paths in
tests/test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.export.packed import PackedLinear, backends_in_use, save_packed
from hfqat.export.packing import unpack
from hfqat.export.w8a8 import PackedFP8Linear
from hfqat.quant.modeling import qat_layers
from hfqat.quant.primitives import (
    FP8_MAX,
    fake_quantize_activations,
    quantize_activations_fp8,
    quantize_activations_int8,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_activation_codes_are_vllms():
    x = torch.tensor([[1.27, -0.005, 0.635, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.54, 0.01, 0.03, 1.0]])
    q, scale = quantize_activations_int8(x)
    # amax times the fp32 reciprocal of 127 (what torch's CUDA division by a constant computes: the same scale
    # bits on every device), within an ulp of the exact quotient
    assert torch.equal(scale.squeeze(1), torch.tensor([1.27, 0.0, 2.54]) * (1 / 127))
    torch.testing.assert_close(scale.squeeze(1), torch.tensor([1.27, 0.0, 2.54]) / 127, rtol=1.2e-7, atol=0)
    # x · (127 / amax), rounded half to even (vLLM: cvt.rni), saturated; an all-zero token gives zeros
    inverse = torch.tensor([[127 / 1.27], [0.0], [127 / 2.54]])
    assert torch.equal(q, torch.round(x * inverse).to(torch.int8))
    assert q[0, 0] == 127 and q[2, 0] == -127 and q[0, 2] == 64  # 63.5 rounds to even
    assert torch.equal(fake_quantize_activations(x), q.float() * scale)


def test_fp8_activation_codes_are_vllms():
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 6).unsqueeze(1)
    q, scale = quantize_activations_fp8(x)
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(scale, amax * (1 / FP8_MAX))  # as the int8 scale: the fp32 reciprocal, on every device
    assert torch.equal(q, (x * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
    assert q.float().abs().amax() == FP8_MAX  # every token's largest element lands on e4m3's largest value
    assert torch.equal(fake_quantize_activations(x, kind="fp8"), q.float() * scale)


def test_activation_quantizer_is_straight_through():
    x = torch.randn(3, 16, requires_grad=True)
    fake_quantize_activations(x, kind="fp8").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _model(path, **config):
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(**config))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in qat_layers(model):
            layer.weight_scale.mul_(1 + 0.05 * torch.rand_like(layer.weight_scale))
    return model.eval()


@pytest.mark.parametrize("config,backend", [
    (dict(bits=8, group_size=-1, activation_bits=8), "w8a8_int8"),
    (dict(weight_format="fp8", activation_bits=8), "dequant"),
    (dict(weight_format="fp8"), "dequant"),
])
def test_packed_w8a8_reload_computes_the_fake_quant_model(tiny_model_dir, tmp_path, input_ids, config, backend):
    model = _model(tiny_model_dir("llama"), **config)
    with torch.no_grad():
        ref = model(input_ids).logits
    save_packed(model, tmp_path / "packed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    with torch.no_grad():
        out = reloaded(input_ids).logits
    assert set(backends_in_use(reloaded).values()) == {backend}
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    if config.get("weight_format") == "fp8":
        for name, layer in qat_layers(model):
            packed = reloaded.get_submodule(name)
            assert isinstance(packed, PackedFP8Linear)
            torch.testing.assert_close(packed.dequantized_weight(), layer.quantized_weight(exact=True),
                                       rtol=0, atol=0)


def test_w8a8_int8_matmul_is_exact_integer_arithmetic(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir("llama"), bits=8, group_size=-1, activation_bits=8)
    save_packed(model, tmp_path / "packed")
    layer = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    q, s = quantize_activations_int8(x.reshape(-1, layer.in_features))
    codes = unpack(layer.qweight, 8, layer.in_features) - 128  # (out, in) signed weight codes
    exact = (q.double() @ codes.double().t()) * s.double() * layer.scales.double()  # exact in float64
    assert layer.backend == "w8a8_int8"
    torch.testing.assert_close(y.reshape(-1, layer.out_features).double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", [dict(weight_format="fp8", activation_bits=8),
                                    dict(bits=8, group_size=-1, activation_bits=8)])
def test_w8a8_qat_trains(tiny_model_dir, config):
    from conftest import text_dataset

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), quantization_config=hfqat.QATConfig(**config))
    batch = torch.stack([row["input_ids"] for row in text_dataset(8)])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight_scale.grad is not None and bool(layer.weight_scale.grad.abs().sum() > 0)
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("config,field", [
    (dict(weight_format="fp8", symmetric=False), "symmetric"),
    (dict(weight_format="fp8", layer_bits={"q_proj": 4}), "layer_bits"),
    (dict(weight_format="fp8", rounding="soft"), "rounding"),
    (dict(weight_format="fp8", bits_granularity="row"), "bits_granularity"),
])
def test_fp8_config_rejects_what_e4m3_cannot_be(config, field):
    with pytest.raises(ValueError, match=field):
        hfqat.QATConfig(**config)


def test_fp8_config_is_8_bit_per_channel():
    qc = hfqat.QATConfig(weight_format="fp8")
    assert (qc.bits, qc.group_size) == (8, -1) and qc.spec_for("x", 64).activation_format == "fp8"


def test_packed_int8_w8a8_layer_compiles_without_graph_breaks():
    """Prefill runs compiled too: the layer's forward, its quantizer and its GEMM trace as one graph (CUDA paths,
    with the Triton ops: tests/test_w8a8_gpu.py)."""
    layer = PackedLinear.from_float(torch.nn.Linear(64, 48), 8, -1, True, scale_init="minmax")
    layer.activation_bits = 8
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # raises on a graph break
    assert layer.backend == "w8a8_int8" and torch.equal(compiled(x), eager)

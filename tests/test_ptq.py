"""PTQ baselines: GPTQ beats round-to-nearest on its calibration data and stays on the grid (int and codebook)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfqat import QATConfig
from hfqat.quant.modeling import qat_layers
from hfqat.quant.ptq import collect_hessians, gptq, rtn


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 32), generator=g) for _ in range(n)]


def _output_error(layer, float_weight, hessian):
    delta = (layer.quantized_weight(exact=True).float() - float_weight).t()  # (in, out)
    return torch.trace(delta.t() @ hessian @ delta)  # = 2/n · ||X ΔWᵀ||²


@pytest.mark.parametrize("weight_format", ["int", "codebook"])
def test_gptq_reduces_layer_output_error_and_stays_on_grid(tiny_model_dir, weight_format):
    config = QATConfig(bits=3, group_size=32, weight_format=weight_format)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), quantization_config=config)
    rtn(model)
    dict(qat_layers(model))["model.layers.0.mlp.up_proj"].set_bits(2)  # a mixed map: per-layer grids/codebooks
    floats = {n: layer.weight.detach().clone() for n, layer in qat_layers(model)}
    hessians = collect_hessians(model, _batches())
    before = {n: _output_error(layer, floats[n], hessians[n]) for n, layer in qat_layers(model)}
    gptq(model, _batches())
    after = {n: _output_error(layer, floats[n], hessians[n]) for n, layer in qat_layers(model)}
    assert sum(after.values()) < 0.9 * sum(before.values())
    assert sum(a <= b * 1.01 for a, b in zip(after.values(), before.values())) >= len(after) - 1
    for _, layer in qat_layers(model):  # weights now sit on the grid: fake quant leaves them unchanged
        assert torch.allclose(layer.quantized_weight(exact=True), layer.weight, atol=1e-6)
        groups = layer.weight.detach().reshape(-1, layer.spec.group_size)
        assert max(len(torch.unique(g)) for g in groups) <= 1 << layer.bits  # codebook: only the active centroids


def test_hessian_is_mean_outer_product(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"),
                                                 quantization_config=QATConfig(bits=4, group_size=32))
    captured = []
    layer = dict(qat_layers(model))["model.layers.0.mlp.down_proj"]
    handle = layer.register_forward_pre_hook(lambda m, args: captured.append(args[0].flatten(0, -2)))
    hessian = collect_hessians(model, _batches(2))["model.layers.0.mlp.down_proj"]
    handle.remove()
    x = torch.cat(captured)
    assert torch.allclose(hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-6)

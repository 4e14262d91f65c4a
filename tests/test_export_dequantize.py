"""`model.dequantize()` on a packed checkpoint (integer or codebook) gives plain float layers with the same logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.export import PACKED_CLASSES, packed_modules
from hfqat.modeling import qat_layers


@pytest.mark.parametrize("weight_format", ["int", "codebook"])
def test_packed_model_dequantizes_to_plain_linear(tiny_model_dir, input_ids, tmp_path, weight_format):
    config = hfqat.QATConfig(bits=3, group_size=32, weight_format=weight_format)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), quantization_config=config)
    dict(qat_layers(model))["model.layers.0.mlp.up_proj"].set_bits(4 if weight_format == "codebook" else 8)
    with torch.no_grad():
        expected = model.eval()(input_ids).logits
    hfqat.save_packed(model, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert {type(m) for _, m in packed_modules(packed)} == {PACKED_CLASSES[weight_format]}
    packed.dequantize(dtype=torch.float32)
    assert not list(packed_modules(packed))
    assert all(type(m) is torch.nn.Linear for n, m in packed.named_modules() if n.endswith("_proj"))
    with torch.no_grad():
        assert (packed(input_ids).logits - expected).abs().max() <= 1e-4

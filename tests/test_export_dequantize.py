"""`model.dequantize()` on a packed checkpoint (integer or codebook, Llama or GPT-2 ``Conv1D``) gives plain
`nn.Linear` layers holding exactly the packed layers' dequantized weights, with the same logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.export.packed import PACKED_CLASSES, packed_modules
from hfqat.quant.modeling import qat_layers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("weight_format", ["int", "codebook"])
def test_packed_model_dequantizes_to_plain_linear(tiny_model_dir, input_ids, tmp_path, weight_format, arch):
    config = hfqat.QATConfig(bits=3, group_size=32, weight_format=weight_format)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), quantization_config=config)
    next(iter(qat_layers(model)))[1].set_bits(4 if weight_format == "codebook" else 8)  # a mixed-width map
    with torch.no_grad():
        fake_quant = model.eval()(input_ids).logits
    hfqat.save_packed(model, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    layers = dict(packed_modules(packed))
    assert layers and {type(m) for m in layers.values()} == {PACKED_CLASSES[weight_format]}
    weights = {name: layer.dequantized_weight() for name, layer in layers.items()}
    with torch.no_grad():
        expected = packed(input_ids).logits

    packed.dequantize(dtype=torch.float32)
    assert not list(packed_modules(packed))
    for name, weight in weights.items():
        linear = packed.get_submodule(name)
        assert type(linear) is torch.nn.Linear and linear.weight.dtype == torch.float32
        assert torch.equal(linear.weight, weight)
    with torch.no_grad():
        logits = packed(input_ids).logits
    assert (logits - expected).abs().max() <= 1e-5
    assert (logits - fake_quant).abs().max() <= 1e-4

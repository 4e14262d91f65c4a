"""CUDA kernels for packed layers agree with the exact dequantize fallback (every width, sym/asym, group/channel,
decode GEMV / small-M GEMM / prefill paths), and a packed model on the GPU matches its fake-quant twin."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from transformers import AutoModelForCausalLM  # noqa: E402

import hfqat  # noqa: E402
from hfqat.export.packed import (  # noqa: E402
    PackedLinear,
    PackedRowsLinear,
    backends_in_use,
    prepare_backends,
    save_packed,
    set_backend,
)
from hfqat.quant.modeling import qat_layers  # noqa: E402

triton_lowbit = pytest.importorskip("hfqat.export.kernels.triton_lowbit")
DEVICE = "cuda"


def _packed(bits, symmetric, group_size, k=512, n=384, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=True, device=DEVICE)
    return PackedLinear.from_float(linear, bits, group_size, symmetric, scale_init="minmax")


def _rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [128, -1])
def test_triton_matches_fallback(bits, symmetric, group_size):
    layer = _packed(bits, symmetric, group_size)
    reference = layer.dequantized_weight().double()
    for m, dtype, tol in ((1, torch.bfloat16, 1e-2), (7, torch.bfloat16, 1e-2), (100, torch.bfloat16, 1e-2),
                          (1, torch.float32, 1e-5), (7, torch.float32, 1e-5)):
        x = torch.randn(m, 512, device=DEVICE, dtype=dtype)
        ref = x.double() @ reference.t() + layer.bias.double()
        layer.force_backend = "triton"
        y = layer(x)
        assert layer.backend == "triton" and y.dtype == dtype and y.isfinite().all()
        assert _rel_err(y, ref) < tol, (m, dtype)
        layer.force_backend = "dequant"
        assert _rel_err(layer(x), ref) < tol


def test_split_k_workspace_is_left_clean():
    layer = _packed(4, True, 128, k=4096, n=256)
    x = torch.randn(1, 4096, device=DEVICE, dtype=torch.bfloat16)
    key = triton_lowbit._gemv_key(256, 4096, 4, 128, True)
    triton_lowbit._tuned[key] = triton_lowbit.GemvConfig(128, 4, 4, 1, 1)
    single = torch.ops.hfqat.lowbit_mm(x, layer.qweight, layer.scales, None, 4, 128)
    triton_lowbit._tuned[key] = triton_lowbit.GemvConfig(64, 4, 2, 1, 8)
    for _ in range(3):  # repeated launches reuse the workspace
        split = torch.ops.hfqat.lowbit_mm(x, layer.qweight, layer.scales, None, 4, 128)
        assert _rel_err(split, single) < 1e-2
    ws, cnt = triton_lowbit._workspaces[x.device]
    assert ws.abs().max() == 0 and cnt.abs().max() == 0
    del triton_lowbit._tuned[key]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7])
def test_every_gemv_candidate_config(bits):
    """The tuner may pick any candidate: each one (with and without split-K) must be right."""
    layer = _packed(bits, bits != 3, 256, k=1024, n=320)
    x = torch.randn(1, 1024, device=DEVICE, dtype=torch.bfloat16)
    ref = x.double() @ layer.dequantized_weight().double().t()
    y = torch.empty(1, 320, device=DEVICE, dtype=torch.bfloat16)
    for block_n, block_r, warps in triton_lowbit.GEMV_CANDIDATES:
        if not triton_lowbit._fits(bits, 256, block_r):
            continue
        for split in (1, 4):
            cfg = triton_lowbit.GemvConfig(block_n, block_r, warps, 1, split)
            y.fill_(float("nan"))
            triton_lowbit._launch_gemv(x, triton_lowbit.layer_parts(layer)[0], y, 256, cfg)
            assert _rel_err(y, ref) < 1e-2, cfg


def test_large_batches_fused_and_dequantized():
    layer = _packed(3, False, 128)
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        x = torch.randn(300, 512, device=DEVICE, dtype=dtype)
        ref = x.double() @ layer.dequantized_weight().double().t()
        via_dequant = torch.ops.hfqat.lowbit_mm(x, layer.qweight, layer.scales, layer.zeros, 3, 128)
        triton_lowbit.FUSED_LARGE_M = True
        try:
            fused = torch.ops.hfqat.lowbit_mm(x, layer.qweight, layer.scales, layer.zeros, 3, 128)
        finally:
            triton_lowbit.FUSED_LARGE_M = False
        assert _rel_err(via_dequant, ref) < tol and _rel_err(fused, ref) < tol


def test_tinygemm_matches_fallback():
    for symmetric in (True, False):
        layer = _packed(4, symmetric, 128)
        for m in (3, 200):  # 200 rows: handed to the Triton path
            x = torch.randn(m, 512, device=DEVICE, dtype=torch.bfloat16)
            ref = x.double() @ layer.dequantized_weight().double().t() + layer.bias.double()
            layer.force_backend = None
            assert _rel_err(layer(x), ref) < 1e-2 and layer.backend == "tinygemm"  # the automatic choice


@pytest.mark.parametrize("backend", ["triton", "tinygemm"])
def test_compile_and_cuda_graph(backend):
    layer = _packed(4, True, 128)
    layer.force_backend = backend
    x = torch.randn(1, 512, device=DEVICE, dtype=torch.bfloat16)
    eager = layer(x)  # picks the backend outside the compiled region
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True)
    assert _rel_err(compiled(x), eager * 2) < 1e-3
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    assert _rel_err(static_y, layer(static_x)) < 1e-3


def test_packed_model_on_gpu_matches_fake_quant(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir("llama"), quantization_config=hfqat.QATConfig(bits=4, group_size=32, scale_init="minmax"))
    for i, (_, layer) in enumerate(qat_layers(model)):
        layer.set_bits((2, 3, 4, 8)[i % 4])
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model.eval()(ids).logits
        ref_step = model(ids[:, :1]).logits
    save_packed(model, tmp_path / "p")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "p").to(DEVICE).eval()
    with torch.no_grad():
        assert (packed(ids.to(DEVICE)).logits.cpu() - ref).abs().max() <= 1e-4  # GEMM path (M = 48)
        step = packed(ids[:1, :1].to(DEVICE)).logits.cpu()  # GEMV path (M = 1)
    assert (step - ref_step[:1]).abs().max() <= 1e-4
    assert set(backends_in_use(packed).values()) == {"triton"}
    set_backend(packed, "dequant")
    with torch.no_grad():
        assert (packed(ids.to(DEVICE)).logits.cpu() - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("widths", [(3, 4, 5), (2, 3, 4, 6, 8)])  # five widths: two GEMV launches
def test_rows_layer_runs_in_one_fused_path(widths):
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 300, bias=True, device=DEVICE)
    row_bits = torch.tensor(widths)[torch.randint(0, len(widths), (300,))]
    layer = PackedRowsLinear.from_float(linear, row_bits, 128, True, scale_init="minmax")
    reference = layer.dequantized_weight().double()
    for m, dtype, tol in ((1, torch.bfloat16, 1e-2), (1, torch.float32, 1e-5), (9, torch.bfloat16, 1e-2),
                          (200, torch.bfloat16, 1e-2)):
        x = torch.randn(m, 512, device=DEVICE, dtype=dtype)
        ref = x.double() @ reference.t() + layer.bias.double()
        y = layer(x)
        assert layer.backend == "triton_rows" and y.dtype == dtype and _rel_err(y, ref) < tol, (m, dtype)
    set_backend(torch.nn.Sequential(layer), "dequant")
    x = torch.randn(1, 512, device=DEVICE, dtype=torch.bfloat16)
    assert _rel_err(layer(x), x.double() @ reference.t() + layer.bias.double()) < 1e-2 and layer.backend == "parts"
    set_backend(torch.nn.Sequential(layer), None)
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True)
    assert _rel_err(compiled(x), layer(x) * 2) < 1e-3
    for _ in range(2):  # split-K workspace reused and left clean across launches and graph replays
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(x)
        graph.replay()
        assert _rel_err(static_y, layer(x)) < 1e-3


def test_rows_model_on_gpu_matches_fake_quant(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir("llama"), quantization_config=hfqat.QATConfig(bits=4, group_size=32, scale_init="minmax",
                                                                     bits_granularity="row"))
    g = torch.Generator().manual_seed(0)
    for _, layer in qat_layers(model):
        layer.set_row_bits(torch.tensor((3, 4, 5))[torch.randint(0, 3, (layer.out_features,), generator=g)])
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model.eval()(ids).logits
        ref_step = model(ids[:1, :1]).logits
    save_packed(model, tmp_path / "p")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "p").to(DEVICE).eval()
    prepare_backends(packed, torch.float32)
    assert set(backends_in_use(packed).values()) == {"triton_rows"}
    with torch.no_grad():
        assert (packed(ids.to(DEVICE)).logits.cpu() - ref).abs().max() <= 1e-4  # GEMM path, one launch per width
        assert (packed(ids[:1, :1].to(DEVICE)).logits.cpu() - ref_step).abs().max() <= 1e-4  # one fused GEMV


@pytest.mark.parametrize("widths", [(4,) * 8, (2, 3, 4, 8, 4, 4, 3, 2)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_grouped_experts_gemv_matches_the_reference_and_replays_new_ids(widths, symmetric):
    """`hfqat.export.kernels.experts` on CUDA: the Triton grouped GEMV (gate_up's (tokens, top-k) and down's
    (pairs, 1) shapes, split-K at K=2048) against the exact torch reference; compiled with fullgraph=True and
    captured in a CUDA graph, a replay with other expert ids (written on the device) gives their experts' outputs."""
    from hfqat.export.kernels.experts import ExpertStacks, experts_mv_reference

    torch.manual_seed(0)
    parts = [_packed(b, symmetric, 128, k=2048, n=512, seed=e) for e, b in enumerate(widths)]
    stacks = ExpertStacks(parts, torch.bfloat16, max_pairs=8)
    assert stacks.backend == "triton_experts"
    tables = (stacks.expert_index, *map(stacks.stacks, ("qweight", "scales", "zeros")), stacks.bits, 128)
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        for shape in ((1, 2), (4, 2), (6, 1)):
            x = torch.randn(shape[0], 2048, device=DEVICE, dtype=dtype)
            ids = torch.randint(0, len(parts), shape, device=DEVICE)
            ref = experts_mv_reference(x, ids, *tables)
            y = stacks(x, ids)
            assert y.shape == (*shape, 512) and y.dtype == dtype and _rel_err(y, ref) < tol, (dtype, shape)
    x = torch.randn(1, 2048, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 6]], device=DEVICE)
    compiled = torch.compile(lambda t, i: stacks(t, i) * 2, fullgraph=True)
    assert _rel_err(compiled(x, ids), stacks(x, ids) * 2) < 1e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = stacks(x, ids)
    ids.copy_(torch.tensor([[7, 7]], device=DEVICE))
    graph.replay()
    assert _rel_err(static_y, experts_mv_reference(x, ids, *tables)) < 1e-2


def test_packed_moe_on_gpu_decodes_through_the_grouped_gemv(tmp_path):
    """A tiny packed Mixtral on CUDA (mixed expert widths): prefill (Triton-dequantized routed experts) and batch-1
    decode logits match fake quant, and static-cache generate (compiled, CUDA graphs) gives eager generate's tokens."""
    from moe_archs import tiny_moe_config

    from hfqat.export.packed_experts import packed_experts
    from hfqat.quant.experts import qat_experts

    torch.manual_seed(0)
    config = tiny_moe_config("mixtral")  # hidden and intermediate 64, 4 experts: sizes the Triton kernel takes
    model = AutoModelForCausalLM.from_config(config).to(DEVICE)
    hfqat.quantize_model(model, hfqat.QATConfig(bits=4, group_size=32))
    for _, experts in qat_experts(model):
        experts.set_expert_bits([2, 3, 4, 8])
    model.eval()
    save_packed(model, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", device_map=DEVICE).eval()
    prepare_backends(packed, torch.float32)
    assert {m.decode_backend for _, m in packed_experts(packed)} == {"triton_experts"}
    prompt = torch.randint(0, config.vocab_size, (1, 6), device=DEVICE)
    with torch.no_grad():
        assert _rel_err(packed(prompt).logits, model(prompt).logits) < 1e-4  # prefill: routed experts dequantized
        one = prompt[:, :1]
        assert _rel_err(packed(one).logits, model(one).logits) < 1e-4  # decode: the grouped GEMV
        kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
        eager = packed.generate(prompt, **kwargs)
        static = packed.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(eager, static)

"""The W8A8 Triton kernels (`hfqat.export.kernels.triton_w8a8`) run on the CPU by Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess: the variable must be set before the kernels are defined).

- The per-token quantizer gives vLLM's codes (as `hfqat.quant.primitives` computes them) bit for bit, and the
  same fp32 scales: int8 and e4m3, bf16 and fp32 activations, all-zero and -0.0 tokens, every e4m3 value and every
  midpoint between two (ties round to even), rows longer than one register block.
- The fused int8 GEMM equals ``torch._int_mm`` then the rescale: exactly with fp32 output; with bf16 output within
  one bf16 rounding (the interpreter's fp32→bf16 cast truncates, the GPU's rounds to nearest as torch does:
  tests/test_w8a8_gpu.py checks equality there). Partial tiles in M, N and K, grouped tile order with a partial
  group, the persistent schedule, one-row batches.
- The ``w8a8_triton`` backend's matmul computes what ``w8a8_int8`` (exact CPU integer arithmetic) computes, and
  both ops trace under ``torch.compile(fullgraph=True)``.
Skipped where triton is not installed.
"""

import textwrap

import pytest
from triton_interpreter import run_in_interpreter

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(r'''
    import torch
    from hfqat.export.kernels import triton_w8a8 as K
    from hfqat.export.kernels import w8a8
    from hfqat.export.packed import PackedLinear
    from hfqat.quant.primitives import FP8_DTYPE, quantize_activations_fp8, quantize_activations_int8

    torch.manual_seed(0)
    REFERENCE = {"int": quantize_activations_int8, "fp8": quantize_activations_fp8}

    def check_quantizer(x, what, block_k=K.MAX_BLOCK_K, op=K.quantize_per_token):
        for kind, reference in REFERENCE.items():
            q, s = op(x, kind) if block_k == K.MAX_BLOCK_K else K._quantize_per_token(x, kind, block_k)
            q_ref, s_ref = reference(x)
            assert q.dtype == q_ref.dtype and s.shape == s_ref.shape, (what, kind)
            assert torch.equal(s, s_ref), (what, kind, (s - s_ref).abs().max())
            bad = q.view(torch.uint8) != q_ref.view(torch.uint8)
            assert not bad.any(), (what, kind, x[bad][:4], q[bad][:4], q_ref[bad][:4])

    # tokens from 1e-3 to 1e3, an all-zero token, -0.0 entries, an fp32-subnormal entry, K not a power of two
    x = torch.randn(24, 200) * torch.logspace(-3, 3, 24)[:, None]
    x[2] = 0
    x[4, :5] = -0.0
    x[5, 7] = 1e-40
    check_quantizer(x.to(torch.bfloat16), "bf16")
    check_quantizer(x, "fp32")
    check_quantizer(x.to(torch.bfloat16), "chunked rows", block_k=64)  # 4 chunks, the last one partial
    # every finite e4m3 value and every midpoint between neighbours (ties), scaled by 448 / amax = 1
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
    grid = grid[grid.isfinite()].unique()
    check_quantizer(torch.cat([grid, (grid[1:] + grid[:-1]) / 2]).reshape(1, -1), "e4m3 grid and midpoints")
    check_quantizer(torch.cat([grid, (grid[1:] + grid[:-1]) / 2]).reshape(1, -1) * 0.37, "scaled grid")
    # int8 ties: 0.635 · 127 / 1.27 = 63.5 rounds to 64
    check_quantizer(torch.tensor([[1.27, -0.005, 0.635, 0.0], [-2.54, 0.01, 0.03, 1.0]]), "int8 ties")

    def reference_mm(q, w, sa, sb, dtype):
        return (torch._int_mm(q, w.t()).float() * sa * sb).to(dtype)

    for m, k, n, config in [(37, 80, 40, K.INTERPRETER_CONFIG), (1, 48, 24, K.INTERPRETER_CONFIG),
                            (70, 64, 72, K._config(16, 16, 16, 1, 4)), (65, 96, 48, K._config(32, 16, 64, 1, 4))]:
        q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        sa, sb = torch.rand(m, 1) * 1e-2, torch.rand(1, n) * 1e-2
        y = K._int8_scaled_mm(q, w, sa, sb, torch.float32, config)
        assert torch.equal(y, reference_mm(q, w, sa, sb, torch.float32)), (m, k, n, "fp32")
        y = K._int8_scaled_mm(q, w, sa, sb, torch.bfloat16, config)
        torch.testing.assert_close(y, reference_mm(q, w, sa, sb, torch.bfloat16), rtol=2 ** -7, atol=0)
    q, w = torch.randint(-128, 128, (70, 32), dtype=torch.int8), torch.randint(-128, 128, (56, 32), dtype=torch.int8)
    sa, sb = torch.rand(70, 1), torch.rand(1, 56)
    for persistent in (False, True):  # persistent: 3 programs loop over the 20 tiles
        grouped = K._config(16, 16, 32, 1, 4, persistent)
        grouped.kwargs["GROUP_M"] = 2  # 5 row blocks: groups of 2, 2 and 1
        assert torch.equal(K._int8_scaled_mm(q, w, sa, sb, torch.float32, grouped),
                           reference_mm(q, w, sa, sb, torch.float32)), ("grouped order", persistent)

    # the w8a8_triton backend's matmul (on CPU tensors here) against the exact int_mm path
    layer = PackedLinear.from_float(torch.nn.Linear(96, 40), 8, -1, True, scale_init="minmax")
    layer.activation_bits = 8
    exact = w8a8.w8a8_int8_backend(layer, torch.device("cpu"), torch.float32)  # attaches the int8 weight
    fused = w8a8.w8a8_triton_matmul
    x = torch.randn(3, 7, 96)
    assert torch.equal(fused(layer, x), exact(layer, x)), "w8a8_triton vs w8a8_int8"
    compiled = torch.compile(lambda x: fused(layer, x), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), exact(layer, x)), "compiled matmul op"
    compiled_quantizer = torch.compile(K.quantize_per_token, fullgraph=True, backend="aot_eager")
    check_quantizer(torch.randn(5, 64).to(torch.bfloat16), "compiled quantizer op", op=compiled_quantizer)
    print("w8a8 interpreter kernels ok")
''')


def test_w8a8_kernels_match_the_torch_reference_in_the_interpreter():
    proc = run_in_interpreter(SCRIPT)
    assert proc.returncode == 0 and "w8a8 interpreter kernels ok" in proc.stdout, proc.stderr[-4000:]

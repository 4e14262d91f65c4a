"""The Triton kernels of `hfqat.export.kernels.triton_lowbit`, run on the CPU by Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess: the variable must be set before the kernels are defined).

Checked against the exact dequantize fallback: every width 2-8 (one, two and three bit planes), symmetric and
with zero points, through the batch-1 GEMV (with and without split-K), the small-M GEMM and the prefill path
(dequantize + matmul); the per-row fused path (one GEMV launch over the width blocks, output order applied by
the stores; five widths take two launches); the op path traced by ``torch.compile(fullgraph=True)``; and the
grouped GEMV over routed experts (`triton_lowbit.experts_mv`) against its torch reference.
Skipped where triton is not installed (the GPU tests in test_kernels_gpu.py cover the compiled kernels).
"""

import textwrap

import pytest
from triton_interpreter import run_in_interpreter

pytest.importorskip("triton")

PREAMBLE = textwrap.dedent(r'''
    import torch
    from hfqat.export.kernels import triton_lowbit as K
    from hfqat.export.packed import PackedLinear
    from packed_layers import random_experts, random_rows_layer

    torch.manual_seed(0)

    def check(y, ref, what):
        err = (y - ref).abs().max().item()
        assert err < 1e-4 * max(1.0, ref.abs().max().item()), (what, err)
''')
LAYERS = PREAMBLE + textwrap.dedent(r'''
    k = 256

    for bits in range(2, 9):
        for symmetric in (True, False):
            layer = PackedLinear.from_float(torch.nn.Linear(k, 96), bits, 128, symmetric, scale_init="minmax")
            w = layer.dequantized_weight()
            for m in (1, 3, 70):
                x = torch.randn(m, k)
                check(K._triton_matmul(layer, x), x @ w.t() + layer.bias, (bits, symmetric, m))
            x = torch.randn(1, k)
            y = torch.empty(1, 96)
            parts, _ = K.layer_parts(layer)
            K._launch_gemv(x, parts, y, 128, K.GemvConfig(64, 2, 2, 1, 4))  # split-K
            check(y, x @ w.t(), (bits, symmetric, "split"))

    for widths in ((3, 4, 5), (2, 3, 4, 6, 8)):
        counts = {b: 24 + 8 * i for i, b in enumerate(widths)}
        rows = random_rows_layer(k, counts, 64)
        matmul = K.rows_backend(rows, torch.device("cuda"), torch.float32)  # the fused path, run on the CPU
        w = rows.dequantized_weight()
        for m in (1, 5, 80):
            x = torch.randn(m, k)
            check(matmul(rows, x), x @ w.t() + rows.bias, (widths, m))
        ws, cnt = K._workspaces[torch.device("cpu")]
        assert ws.abs().max() == 0 and cnt.abs().max() == 0, "split-K left the workspace dirty"

    layer = PackedLinear.from_float(torch.nn.Linear(k, 64), 3, 128, True, scale_init="minmax")
    x = torch.randn(1, k)
    compiled = torch.compile(lambda x: K._triton_matmul(layer, x), fullgraph=True, backend="aot_eager")
    check(compiled(x), x @ layer.dequantized_weight().t() + layer.bias, "compiled op")
    compiled = torch.compile(lambda x: matmul(rows, x), fullgraph=True, backend="aot_eager")
    x = torch.randn(1, k)
    check(compiled(x), x @ rows.dequantized_weight().t() + rows.bias, "compiled rows op")
    print("interpreter kernels ok")
''')


EXPERTS = PREAMBLE + textwrap.dedent(r'''
    from hfqat.export.kernels.experts import ExpertStacks, experts_mv_reference

    k, n = 128, 48
    for group in (32, 128):  # group 32: split-K (4 splits), 128: one program along K
        for symmetric in (True, False):
            for widths in ((4, 4, 4), (2, 3, 4, 8, 4, 3)):  # one stack; four (3 and 4 repeated)
                parts = random_experts(k, n, list(widths), group, symmetric)
                weights = [part.dequantized_weight() for part in parts]
                stacks = ExpertStacks(parts, torch.float32, max_pairs=8)
                e = len(parts)
                ids = torch.tensor([[1, 1], [0, e - 1], [e + 3, 2]])  # a repeated expert; a sentinel (no expert)
                x = torch.randn(3, k)
                truth = torch.stack([torch.stack([x[t] @ weights[i].t() if i < e else torch.zeros(n)
                                                  for i in row.tolist()]) for t, row in enumerate(ids)])
                args = (x, ids, stacks.expert_index, *map(stacks.stacks, ("qweight", "scales", "zeros")), stacks.bits, group)
                what = (group, symmetric, widths)
                check(experts_mv_reference(*args), truth, ("reference",) + what)
                check(K.experts_mv(*args), truth, ("triton",) + what)
                h = torch.randn(6, k)  # the down projection's shape: one row per pair, one slot
                args = (h, ids.view(-1, 1)) + args[2:]
                check(K.experts_mv(*args), experts_mv_reference(*args), ("triton, one slot",) + what)
                storage = {b: q.untyped_storage().data_ptr() for b, q in zip(stacks.bits, stacks.stacks("qweight"))}
                assert all(part.qweight.untyped_storage().data_ptr() == storage[part.bits] for part in parts)
                for part, w in zip(parts, weights):  # the prefill path's dequantization on CUDA: the same values
                    kn = K.dequantize(part.qweight, part.scales, part.zeros, part.bits, group, k, torch.float32)
                    assert torch.equal(kn, w.t()), ("dequantize", part.bits)
    ws, cnt = K._workspaces[torch.device("cpu")]
    assert ws.abs().max() == 0 and cnt.abs().max() == 0, "split-K left the workspace dirty"
    print("interpreter experts ok")
''')


def test_kernels_match_the_exact_fallback_in_the_interpreter():
    proc = run_in_interpreter(LAYERS)
    assert proc.returncode == 0 and "interpreter kernels ok" in proc.stdout, proc.stderr[-4000:]


def test_grouped_experts_gemv_matches_the_reference_in_the_interpreter():
    """The grouped GEMV of `hfqat.export.kernels.experts`, expert ids read on the device: widths 2/3/4/8 (a stack
    and a launch per width; mixed widths in one call), symmetric and with zero points, with and without split-K,
    a repeated expert and a sentinel id, gate_up's (rows, top-k) and down's (pairs, 1) shapes; the torch reference
    against per-expert dequantized matmuls; the experts' own buffers left as views of the stacks; the Triton
    dequantization (packed experts' prefill on CUDA) bit-equal to ``dequantized_weight``."""
    proc = run_in_interpreter(EXPERTS)
    assert proc.returncode == 0 and "interpreter experts ok" in proc.stdout, proc.stderr[-4000:]

"""CUDA W8A8 matmuls (our fused Triton int8 GEMM, ``torch._int_mm`` int8, ``torch._scaled_mm`` FP8 row-wise) agree
with their exact CPU references (tests/test_w8a8.py checks those against the fake-quantized model), the two int8
backends agree bit for bit, the activation quantizers give the eager torch codes and scales bit for bit, and the
packed layers compile without graph breaks. The same kernels run under the interpreter in
tests/test_w8a8_triton.py."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from hfqat.config import QATConfig  # noqa: E402
from hfqat.export.packed import PackedLinear  # noqa: E402
from hfqat.export.w8a8 import PackedFP8Linear  # noqa: E402
from hfqat.quant.fp8 import FP8Linear  # noqa: E402

pytestmark = pytest.mark.gpu
INT8_BACKENDS = ["w8a8_int8", "w8a8_triton"]


def _rel_err(y, ref):
    return ((y.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def _int8_layer(k=1024, n=768):
    torch.manual_seed(0)
    layer = PackedLinear.from_float(torch.nn.Linear(k, n, bias=True), 8, -1, True, scale_init="minmax")
    layer.activation_bits = 8
    return layer


def _fp8_layer(k=1024, n=768):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability >= 8.9")
    torch.manual_seed(0)
    qc = QATConfig(weight_format="fp8", activation_bits=8)
    qat = FP8Linear.from_float(torch.nn.Linear(k, n, bias=True), qc.spec_for("x", k))
    qat.reset_quant_params()
    return PackedFP8Linear.from_qat(qat).cuda().to(torch.bfloat16)


@pytest.mark.parametrize("backend", INT8_BACKENDS)
@pytest.mark.parametrize("rows", [1, 16, 17, 512])
def test_int8_matmul_matches_the_exact_cpu_path(rows, backend):
    layer = _int8_layer()
    x = torch.randn(rows, 1024)
    ref = layer(x)  # CPU: exact torch._int_mm
    gpu = layer.cuda().to(torch.bfloat16)
    gpu.force_backend = backend
    y = gpu(x.cuda().to(torch.bfloat16))
    assert gpu.backend == backend and y.dtype == torch.bfloat16
    assert _rel_err(y, ref) < 1e-2  # bf16 input and output rounding only


def test_the_first_int8_backend_of_auto_order_is_chosen():
    from hfqat.export.kernels import AUTO_ORDER

    layer = _int8_layer().cuda().to(torch.bfloat16)
    layer(torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16))
    assert layer.backend == next(name for name in AUTO_ORDER if name in INT8_BACKENDS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 17, 300, 2048])
def test_fused_int8_gemm_equals_int_mm_then_rescale(rows, dtype):
    """Same codes, exact int32 sums, the same three roundings: the fused epilogue gives int_mm's bits."""
    layer = _int8_layer(4096, 1536).cuda().to(dtype)
    x = torch.randn(rows, 4096, device="cuda", dtype=dtype)
    outputs = {}
    for backend in INT8_BACKENDS:
        layer.force_backend = backend
        outputs[backend] = layer(x)
    assert torch.equal(outputs["w8a8_triton"], outputs["w8a8_int8"])


@pytest.mark.parametrize("rows", [1, 64, 512])
def test_fp8_scaled_mm_matches_the_dequant_path(rows):
    layer = _fp8_layer()
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert layer.backend == "fp8_scaled_mm"
    layer.force_backend = "dequant"
    assert _rel_err(y, layer(x)) < 1e-2


@pytest.mark.parametrize("impl", ["triton", "inductor"])
@pytest.mark.parametrize("kind", ["int", "fp8"])
@pytest.mark.parametrize("k", [4096, 14336, 20000])  # 20000: longer than one register block (two passes)
def test_cuda_activation_quantizers_give_the_eager_codes(kind, impl, k):
    from hfqat.export.kernels.w8a8 import _EAGER_QUANTIZERS, quantize

    x = torch.randn(37, k, device="cuda", dtype=torch.bfloat16) * torch.logspace(-2, 2, 37, device="cuda")[:, None]
    x[3] = 0  # an all-zero token
    x[5, :7] = -0.0
    q, s = quantize(x, kind, impl)
    q_ref, s_ref = _EAGER_QUANTIZERS[kind](x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_packed_w8a8_layers_compile_without_graph_breaks(fmt):
    layer = _fp8_layer() if fmt == "fp8" else _int8_layer().cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 1024, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # raises on a graph break
    assert layer.backend != "dequant"
    torch.testing.assert_close(compiled(x), eager)  # bf16 tolerances: inductor may fuse the bias add differently


@pytest.mark.parametrize("schedule", ["tiles", "persistent"])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 1024), (300, 4096, 14336), (8192, 14336, 4096)])
def test_both_gemm_schedules_equal_int_mm_then_rescale(schedule, m, k, n):
    from hfqat.export.kernels import triton_w8a8, w8a8

    layer = _int8_layer(k, n).cuda().to(torch.bfloat16)
    layer.force_backend = "w8a8_int8"
    layer(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))  # attaches the int8 weight and scales
    q, s = w8a8.quantize(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), "int")
    y = triton_w8a8.int8_scaled_mm(q, layer._w8a8_weight, s, layer._w8a8_scale, torch.bfloat16, schedule)
    assert torch.equal(y, w8a8.int_mm_gemm(layer, q, s, torch.bfloat16))

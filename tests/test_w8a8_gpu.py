"""CUDA W8A8 matmuls (``torch._int_mm`` int8, ``torch._scaled_mm`` FP8 row-wise) agree with their exact CPU
references (tests/test_w8a8.py checks those against the fake-quantized model)."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from hfqat.config import QATConfig  # noqa: E402
from hfqat.export.packed import PackedLinear  # noqa: E402
from hfqat.export.w8a8 import PackedFP8Linear  # noqa: E402
from hfqat.quant.fp8 import FP8Linear  # noqa: E402

pytestmark = pytest.mark.gpu


def _rel_err(y, ref):
    return ((y.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


@pytest.mark.parametrize("rows", [1, 16, 17, 512])
def test_int8_int_mm_matches_the_exact_cpu_path(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 768, bias=True)
    layer = PackedLinear.from_float(linear, 8, -1, True, scale_init="minmax")
    layer.activation_bits = 8
    x = torch.randn(rows, 1024)
    ref = layer(x)  # CPU: exact torch._int_mm
    gpu = layer.cuda().to(torch.bfloat16)
    y = gpu(x.cuda().to(torch.bfloat16))
    assert gpu.backend == "w8a8_int8" and y.dtype == torch.bfloat16
    assert _rel_err(y, ref) < 1e-2  # bf16 input and output rounding only


@pytest.mark.parametrize("rows", [1, 64, 512])
def test_fp8_scaled_mm_matches_the_dequant_path(rows):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability >= 8.9")
    torch.manual_seed(0)
    qc = QATConfig(weight_format="fp8", activation_bits=8)
    qat = FP8Linear.from_float(torch.nn.Linear(1024, 768, bias=True), qc.spec_for("x", 1024))
    qat.reset_quant_params()
    layer = PackedFP8Linear.from_qat(qat).cuda().to(torch.bfloat16)
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert layer.backend == "fp8_scaled_mm"
    layer.force_backend = "dequant"
    assert _rel_err(y, layer(x)) < 1e-2


@pytest.mark.parametrize("kind", ["int", "fp8"])
def test_fused_activation_quantizer_gives_the_eager_codes(kind):
    from hfqat.export.kernels.w8a8 import _QUANTIZERS, _quantize

    x = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16) * torch.logspace(-2, 2, 37, device="cuda")[:, None]
    x[3] = 0  # an all-zero token
    q, s = _quantize(x, kind)
    q_ref, s_ref = _QUANTIZERS[kind](x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8) if kind == "fp8" else q, q_ref.view(torch.uint8) if kind == "fp8" else q_ref)

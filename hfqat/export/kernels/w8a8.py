"""W8A8 matmuls on tensor cores: int8 (our fused Triton GEMM, or ``torch._int_mm``) and FP8 row-wise
(``torch._scaled_mm``).

All quantize the activations themselves, with vLLM's dynamic per-token quantizers
(`hfqat.quant.primitives.quantize_activations_int8` / `quantize_activations_fp8`, the ones training used), then run
``y = (q_x · q_wᵀ) · s_x · s_w`` with integer (int32) or FP8 (fp32-accumulated) products, as vLLM's CUTLASS kernels
do (``cutlass_scaled_mm``: per-token ``scale_a`` (M, 1), per-channel ``scale_b`` (1, N), fp32 epilogue).

- ``w8a8_triton``: `PackedLinear` layers of 8-bit symmetric per-channel weights with ``activation_bits=8``, CUDA
  compute capability ≥ 9.0 (TMA), K % 16 == 0: `triton_w8a8.int8_scaled_mm`, the int32 accumulators rescaled in
  the GEMM's epilogue and written in the activation dtype (no int32 tensor in memory). Same numerics as
  ``w8a8_int8``, bit for bit.
- ``w8a8_int8``: the same layers, CUDA and CPU, ``torch._int_mm`` then a rescale pass; on the CPU it is exact
  integer arithmetic (the reference). cuBLASLt wants more than 16 rows, so smaller batches are zero-padded to 17
  rows on CUDA. Which of the two goes first on CUDA is the order of `hfqat.export.kernels.AUTO_ORDER` (measured by
  bench/bench_w8a8.py, which times both).
- ``fp8_scaled_mm``: `hfqat.export.w8a8.PackedFP8Linear` with ``activation_bits=8``, CUDA only (compute capability
  ≥ 8.9), bf16 activations, K and N multiples of 16; row-wise fp32 scales (one per token, one per output channel).
  Elsewhere the FP8 layer's ``dequant`` backend computes the same function in fp32 (dequantized codes, exact products).

On CUDA the activation quantizer is `CUDA_QUANTIZER` (`QUANTIZERS`): ``"triton"``, our one-pass kernel
(`triton_w8a8.quantize_per_token`, a custom op, so it stays one kernel under an outer ``torch.compile`` too), or
``"inductor"``, vLLM's torch function compiled on its own (~8 elementwise passes eager, which at prefill sizes cost
about what the int8 GEMM saves; under an outer ``torch.compile`` it is traced and fused with the model instead).
Both give the eager function's codes and scales bit for bit (tests/test_w8a8_gpu.py, tests/test_w8a8_triton.py).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from ...quant.primitives import quantize_activations_fp8, quantize_activations_int8
from .torch_ops import _add_bias, _flat

INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # once, not while torch.compile traces
_EAGER_QUANTIZERS = {"int": quantize_activations_int8, "fp8": quantize_activations_fp8}


@functools.cache
def _compiled_quantizer(kind: str):
    return torch.compile(_EAGER_QUANTIZERS[kind], dynamic=True)


def _inductor_quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():  # traced with the model
        return _EAGER_QUANTIZERS[kind](x)
    return _compiled_quantizer(kind)(x)


def _triton_quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton_w8a8

    return triton_w8a8.quantize_per_token(x, kind)


QUANTIZERS = {"triton": _triton_quantize, "inductor": _inductor_quantize}
CUDA_QUANTIZER = "triton"  # expected to win (one pass over the activations); bench/bench_w8a8.py times both


def quantize(x: torch.Tensor, kind: str, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 (M, 1) per-token scales) of vLLM's quantizer `kind` ("int" / "fp8") for x (M, K).

    `impl`: one of `QUANTIZERS`, CUDA only; default `CUDA_QUANTIZER` on CUDA where triton is installed, the eager
    torch function elsewhere.
    """
    if impl is None:
        if not x.is_cuda or not _HAS_TRITON:
            return _EAGER_QUANTIZERS[kind](x)
        impl = CUDA_QUANTIZER
    if impl not in QUANTIZERS:
        raise ValueError(f"impl={impl!r} is unknown; allowed values: {list(QUANTIZERS)} or None")
    return QUANTIZERS[impl](x, kind)


def _w8a8_int8_applies(layer) -> bool:
    return (layer.activation_bits == 8 and layer.bits == 8 and getattr(layer, "zeros", None) is None
            and getattr(layer, "weight_format", "int") == "int" and layer.group_size == layer.in_features
            and layer.in_features % 8 == 0 and layer.out_features % 8 == 0)


def _attach_int8_weight(layer) -> None:
    """The (N, K) signed int8 weight codes and the (1, N) fp32 channel scales, as non-persistent buffers."""
    from ..packing import unpack

    codes = (unpack(layer.qweight, 8, layer.in_features) - 128).to(torch.int8)  # (N, K) signed
    layer.register_buffer("_w8a8_weight", codes.contiguous(), persistent=False)
    layer.register_buffer("_w8a8_scale", layer.scales.float().reshape(1, -1).contiguous(), persistent=False)


# -- GEMMs of quantized activations: codes q (M, K), fp32 per-token scales (M, 1) → (M, N) in `dtype` -------------
def int_mm_gemm(layer, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch._int_mm`` (int32 product, exact) then the rescale as a separate pass."""
    rows = q.shape[0]
    if q.is_cuda and rows < INT_MM_MIN_ROWS:
        q = F.pad(q, (0, 0, 0, INT_MM_MIN_ROWS - rows))
    acc = torch._int_mm(q, layer._w8a8_weight.t())[:rows]
    return (acc.float() * scale * layer._w8a8_scale).to(dtype)


def triton_gemm(layer, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Our int8 GEMM with the rescale in its epilogue (`triton_w8a8.int8_scaled_mm`); `int_mm_gemm`'s numbers."""
    from . import triton_w8a8

    return triton_w8a8.int8_scaled_mm(q, layer._w8a8_weight, scale, layer._w8a8_scale, dtype)


def fp8_gemm(layer, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch._scaled_mm`` with row-wise scales: scale_a (M, 1), scale_b (1, N), both fp32; mat2 must be
    column-major, i.e. the (N, K) weight transposed."""
    return torch._scaled_mm(q, layer._fp8_weight.t(), scale_a=scale, scale_b=layer._fp8_scale, out_dtype=dtype)


def _w8a8_matmul(kind: str, gemm):
    """The backend's matmul: quantize the activations (`quantize`), `gemm`, add the bias."""
    def matmul(layer, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize(_flat(x), kind)
        y = gemm(layer, q, scale, x.dtype)
        return _add_bias(y.reshape(*x.shape[:-1], -1), layer)

    matmul.quantizes_input = True  # PackedLayer.forward leaves the activations to it
    return matmul


w8a8_int8_matmul = _w8a8_matmul("int", int_mm_gemm)
w8a8_triton_matmul = _w8a8_matmul("int", triton_gemm)
fp8_scaled_mm_matmul = _w8a8_matmul("fp8", fp8_gemm)
TRITON_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _has_tma(device: torch.device) -> bool:
    """Hopper or newer: the fused GEMM reads its operands through TMA descriptors."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


# -- backend factories -------------------------------------------------------------------------------------------
def w8a8_int8_backend(layer, device: torch.device, dtype: torch.dtype):
    if device.type not in ("cuda", "cpu") or not _w8a8_int8_applies(layer):
        return None
    _attach_int8_weight(layer)
    return w8a8_int8_matmul


def w8a8_triton_backend(layer, device: torch.device, dtype: torch.dtype):
    if (device.type != "cuda" or not _w8a8_int8_applies(layer) or layer.in_features % 16
            or dtype not in TRITON_OUT_DTYPES or not _HAS_TRITON or not _has_tma(device)):
        return None
    _attach_int8_weight(layer)
    return w8a8_triton_matmul


def fp8_scaled_mm_backend(layer, device: torch.device, dtype: torch.dtype):
    if (device.type != "cuda" or dtype != torch.bfloat16 or layer.activation_bits != 8
            or layer.in_features % 16 or layer.out_features % 16 or not hasattr(torch, "_scaled_mm")
            or torch.cuda.get_device_capability(device) < (8, 9)):
        return None
    layer.register_buffer("_fp8_weight", layer.fp8_weight().contiguous(), persistent=False)  # (N, K) e4m3
    layer.register_buffer("_fp8_scale", layer.scales.float().reshape(1, -1).contiguous(), persistent=False)
    return fp8_scaled_mm_matmul


def fp8_dequant_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """Anywhere: the FP8 layer's function in fp32 (its activation quantizer, if any, already ran)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.dequantized_weight(torch.float32), bias).to(x.dtype)

"""W8A8 matmuls on tensor cores: int8 (``torch._int_mm``) and FP8 row-wise (``torch._scaled_mm``).

Both quantize the activations themselves, with vLLM's dynamic per-token quantizers
(`hfqat.quant.primitives.quantize_activations_int8` / `quantize_activations_fp8`, the ones training used), then run
``y = (q_x · q_wᵀ) · s_x · s_w`` with integer (int32) or FP8 (fp32-accumulated) products, as vLLM's CUTLASS kernels do.

- ``w8a8_int8``: `PackedLinear` layers of 8-bit symmetric per-channel weights with ``activation_bits=8``. CUDA and
  CPU both run ``torch._int_mm``; on the CPU it is exact integer arithmetic (the reference). cuBLASLt wants more than
  16 rows, so smaller batches are zero-padded to 17 rows on CUDA.
- ``fp8_scaled_mm``: `hfqat.export.w8a8.PackedFP8Linear` with ``activation_bits=8``, CUDA only (compute capability
  ≥ 8.9), bf16 activations, K and N multiples of 16; row-wise fp32 scales (one per token, one per output channel).
  Elsewhere the FP8 layer's ``dequant`` backend computes the same function in fp32 (dequantized codes, exact products).

On CUDA the activation quantizer runs as one ``torch.compile``-fused kernel (`_quantize`): eager it is ~8 elementwise
passes over the activations, which at prefill sizes costs about what the int8 GEMM saves. Under an outer
``torch.compile`` the plain function is traced (and fused) with the model instead.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from ...quant.primitives import quantize_activations_fp8, quantize_activations_int8
from .torch_ops import _add_bias, _flat

INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows
_QUANTIZERS = {"int": quantize_activations_int8, "fp8": quantize_activations_fp8}


@functools.cache
def _fused_quantizer(kind: str):
    return torch.compile(_QUANTIZERS[kind], dynamic=True)


def _quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-token scales) of vLLM's quantizer for `kind`; fused on CUDA (same codes, see tests/test_w8a8_gpu)."""
    if x.is_cuda and not torch.compiler.is_compiling() and importlib.util.find_spec("triton") is not None:
        return _fused_quantizer(kind)(x)
    return _QUANTIZERS[kind](x)


def _w8a8_int8_applies(layer) -> bool:
    return (layer.activation_bits == 8 and layer.bits == 8 and getattr(layer, "zeros", None) is None
            and getattr(layer, "weight_format", "int") == "int" and layer.group_size == layer.in_features
            and layer.in_features % 8 == 0 and layer.out_features % 8 == 0)


def w8a8_int8_backend(layer, device: torch.device, dtype: torch.dtype):
    if device.type not in ("cuda", "cpu") or not _w8a8_int8_applies(layer):
        return None
    from ..packing import unpack

    codes = (unpack(layer.qweight, 8, layer.in_features) - 128).to(torch.int8)  # (N, K) signed
    layer.register_buffer("_w8a8_weight", codes.contiguous(), persistent=False)
    layer.register_buffer("_w8a8_scale", layer.scales.float().reshape(1, -1).contiguous(), persistent=False)
    return w8a8_int8_matmul


def w8a8_int8_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    flat = _flat(x)
    q, scale = _quantize(flat, "int")
    rows = q.shape[0]
    if q.is_cuda and rows < INT_MM_MIN_ROWS:
        q = F.pad(q, (0, 0, 0, INT_MM_MIN_ROWS - rows))
    acc = torch._int_mm(q, layer._w8a8_weight.t())[:rows]  # int32, exact
    y = (acc.float() * scale * layer._w8a8_scale).to(x.dtype)
    return _add_bias(y.reshape(*x.shape[:-1], -1), layer)


w8a8_int8_matmul.quantizes_input = True  # PackedLayer.forward leaves the activations to it


def fp8_scaled_mm_backend(layer, device: torch.device, dtype: torch.dtype):
    if (device.type != "cuda" or dtype != torch.bfloat16 or layer.activation_bits != 8
            or layer.in_features % 16 or layer.out_features % 16 or not hasattr(torch, "_scaled_mm")
            or torch.cuda.get_device_capability(device) < (8, 9)):
        return None
    layer.register_buffer("_fp8_weight", layer.fp8_weight().contiguous(), persistent=False)  # (N, K) e4m3
    layer.register_buffer("_fp8_scale", layer.scales.float().reshape(1, -1).contiguous(), persistent=False)
    return fp8_scaled_mm_matmul


def fp8_scaled_mm_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    q, scale = _quantize(_flat(x), "fp8")  # (M, K) e4m3, (M, 1) fp32
    # row-wise scaling: scale_a (M, 1), scale_b (1, N), both fp32; mat2 must be column-major, i.e. (N, K)ᵀ
    y = torch._scaled_mm(q, layer._fp8_weight.t(), scale_a=scale, scale_b=layer._fp8_scale, out_dtype=torch.bfloat16)
    return _add_bias(y.reshape(*x.shape[:-1], -1), layer)


fp8_scaled_mm_matmul.quantizes_input = True


def fp8_dequant_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """Anywhere: the FP8 layer's function in fp32 (its activation quantizer, if any, already ran)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.dequantized_weight(torch.float32), bias).to(x.dtype)

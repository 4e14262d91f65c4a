"""Backends built on PyTorch's own low-bit matmul ops, and the exact dequantize-then-matmul fallback.

- ``tinygemm`` (CUDA): ``aten._weight_int4pack_mm``, bf16 activations, 4-bit groups of 32/64/128/256.
- ``cpu_int4``: ``aten._weight_int4pack_mm_for_cpu`` (same grid), bf16 activations.
- ``cpu_int8``: ``aten._weight_int8pack_mm`` (int8 codes with one scale per output channel), bf16 activations.

On CPU both ops are fast only for bf16 activations (measured here, 4096x4096 at batch 1: int4 1.0 ms, int8 1.3 ms,
dense bf16 4.9 ms, dense fp32 4.7 ms); for fp32 they run a reference loop (int4 31 ms), so fp32 activations
take the exact dequantize fallback instead.

tinygemm dequantizes ``w = (u - 8) · scale + zero`` with unsigned 4-bit codes ``u`` and a float ``zero``; our
grid ``w = (u - z) · s`` maps onto it exactly with ``scale = s`` and ``zero = (8 - z) · s`` (0 when symmetric,
z = 8). The only differences from the fake-quantized layer are the float arithmetic (accumulation order, and
bf16 scales where the op takes bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import unpack

INT4_GROUP_SIZES = (32, 64, 128, 256)
TINYGEMM_MAX_M = 64  # tinygemm is a small-batch kernel; larger batches (prefill) go to `_large_m_matmul`


def dequant_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """Exact fallback: the float weight is rebuilt for each call (nothing float is kept in memory)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.dequantized_weight(x.dtype), bias)


def _add_bias(y: torch.Tensor, layer) -> torch.Tensor:
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _int4_scales_and_zeros(layer, dtype: torch.dtype) -> torch.Tensor:
    """(groups, N, 2) [scale, zero] of tinygemm's ``(u - 8) · scale + zero`` for our ``(u - z) · s``."""
    scale = layer.scales.float()
    zero_code = 8.0 if layer.zeros is None else layer.zeros.float()
    return torch.stack([scale, (8.0 - zero_code) * scale], dim=-1).to(dtype).contiguous()


def _inner_k_tiles(in_features: int) -> int | None:
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


def _int4_applies(layer) -> bool:
    return (layer.bits == 4 and layer.group_size in INT4_GROUP_SIZES and layer.out_features % 8 == 0
            and _inner_k_tiles(layer.in_features) is not None)


def tinygemm_backend(layer, device: torch.device, dtype: torch.dtype):
    if device.type != "cuda" or dtype != torch.bfloat16 or not _int4_applies(layer):
        return None
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return None
    codes = unpack(layer.qweight, 4, layer.in_features)
    # torch >= 2.5 takes two codes per uint8, the even input feature in the high nibble
    u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
    weight = torch.ops.aten._convert_weight_to_int4pack(u8, _inner_k_tiles(layer.in_features))
    layer.register_buffer("_tinygemm_weight", weight, persistent=False)
    layer.register_buffer("_tinygemm_scales_and_zeros", _int4_scales_and_zeros(layer, torch.bfloat16),
                          persistent=False)
    layer._tinygemm_large_m = _large_m_matmul(layer, device, dtype)
    return _tinygemm_matmul


def _large_m_matmul(layer, device: torch.device, dtype: torch.dtype):
    """The Triton path (dequantize once + cuBLAS for large M) where it applies, else the exact fallback."""
    try:
        from . import triton_lowbit
    except ImportError:
        return dequant_matmul
    return triton_lowbit.backend(layer, device, dtype) or dequant_matmul


def _tinygemm_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    if x.numel() // x.shape[-1] > TINYGEMM_MAX_M:
        return layer._tinygemm_large_m(layer, x)
    y = torch.ops.aten._weight_int4pack_mm(_flat(x), layer._tinygemm_weight, layer.group_size,
                                           layer._tinygemm_scales_and_zeros)
    return _add_bias(y.reshape(*x.shape[:-1], -1), layer)


def cpu_int4_backend(layer, device: torch.device, dtype: torch.dtype):
    if device.type != "cpu" or dtype != torch.bfloat16 or not _int4_applies(layer):
        return None
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    codes = unpack(layer.qweight, 4, layer.in_features).contiguous()
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _inner_k_tiles(layer.in_features))
    layer.register_buffer("_cpu_int4_weight", weight, persistent=False)
    layer.register_buffer("_cpu_int4_scales_and_zeros", _int4_scales_and_zeros(layer, dtype), persistent=False)
    return _cpu_int4_matmul


def _cpu_int4_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(_flat(x), layer._cpu_int4_weight, layer.group_size,
                                                   layer._cpu_int4_scales_and_zeros)
    return _add_bias(y.reshape(*x.shape[:-1], -1), layer)


def cpu_int8_backend(layer, device: torch.device, dtype: torch.dtype):
    if (device.type != "cpu" or dtype != torch.bfloat16 or layer.bits != 8
            or layer.zeros is not None or layer.group_size != layer.in_features):
        return None
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return None
    codes = unpack(layer.qweight, 8, layer.in_features) - 128  # symmetric codes, back to signed
    layer.register_buffer("_cpu_int8_weight", codes.to(torch.int8).contiguous(), persistent=False)
    layer.register_buffer("_cpu_int8_scales", layer.scales[0].to(dtype).contiguous(), persistent=False)
    return _cpu_int8_matmul


def _cpu_int8_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.aten._weight_int8pack_mm(_flat(x), layer._cpu_int8_weight, layer._cpu_int8_scales)
    return _add_bias(y.reshape(*x.shape[:-1], -1), layer)

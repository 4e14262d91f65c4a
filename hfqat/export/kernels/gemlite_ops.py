"""``gemlite`` backend: Mobius Labs' Triton A16Wn kernels (PyPI ``gemlite``, Apache-2.0; extra ``hfqat[gemlite]``).

Applies to 1/2/4/8-bit layers with groups smaller than the row, fp16/bf16 activations, on CUDA. Our codes and
grid map onto gemlite's ``W = (W_q - zeros) · scales`` directly: symmetric layers take the integer shift
2^(bits-1), asymmetric ones their zero points. gemlite repacks the codes into its own layout (a second copy of
the packed words, not saved) and keeps scales and zeros in the activation dtype, so its numerics are those of
bf16 scales (as tinygemm's). It is not in the automatic order (`hfqat.export.kernels.AUTO_ORDER`) until a
measured run on the target GPU puts it there (bench/bench_decode.py ``--backends``); ``set_backend(model,
"gemlite")`` selects it.
"""

from __future__ import annotations

import torch

from ..packing import unpack

GEMLITE_BITS = (1, 2, 4, 8)
GEMLITE_DTYPES = (torch.float16, torch.bfloat16)


def backend(layer, device: torch.device, dtype: torch.dtype):
    if (device.type != "cuda" or dtype not in GEMLITE_DTYPES or layer.bits not in GEMLITE_BITS
            or layer.group_size >= layer.in_features or layer.in_features % 32):
        return None
    try:
        from gemlite.core import DType, GemLiteLinearTriton
    except ImportError:  # not installed (extra hfqat[gemlite]) or its triton too old
        return None
    gemlite_dtype = DType.BF16 if dtype == torch.bfloat16 else DType.FP16
    module = GemLiteLinearTriton(layer.bits, group_size=layer.group_size, in_features=layer.in_features,
                                 out_features=layer.out_features, input_dtype=gemlite_dtype,
                                 output_dtype=gemlite_dtype, scaled_activations=False)
    codes = unpack(layer.qweight, layer.bits, layer.in_features).to(torch.uint8)
    scales = layer.scales.t().contiguous().to(dtype)
    zeros = 1 << (layer.bits - 1) if layer.zeros is None else layer.zeros.t().contiguous().to(dtype)
    module.pack(codes, scales, zeros, bias=None)
    object.__setattr__(layer, "_gemlite", module)  # not a submodule: nothing of it enters the state dict
    return _gemlite_matmul


def _gemlite_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    y = layer._gemlite(x.reshape(-1, layer.in_features)).reshape(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)

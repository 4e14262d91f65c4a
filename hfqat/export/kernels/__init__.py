"""Matmul backends for packed layers (`hfqat.export.packed.PackedLinear`), chosen per layer.

A backend factory looks at one layer and where it runs (device, activation dtype) and returns a matmul
function ``fn(layer, x) -> x @ W.T + bias`` for it, or ``None`` when it does not apply. It may first attach
kernel-specific tensors to the layer as non-persistent buffers (never saved). Auto selection tries the
factories in `AUTO_ORDER`; the last one, ``dequant``, always applies and is exact (it computes precisely what
the fake-quantized layer computes), so every layer runs somewhere.

| backend    | where | applies to                                         | numerics vs fake quant          |
|------------|-------|----------------------------------------------------|---------------------------------|
| tinygemm   | CUDA  | 4 bit, groups 32/64/128/256, bf16 activations      | bf16 scales/zeros               |
| triton     | CUDA  | 2-8 bit, sym/asym, groups of 32k, K % 32 == 0      | fp32 accumulate, order differs  |
| gemlite    | CUDA  | 1/2/4/8 bit, groups < row, fp16/bf16 (optional)    | bf16 scales, order differs      |
| cpu_int4   | CPU   | 4 bit, groups 32/64/128/256, bf16 activations      | bf16 scales, order differs      |
| cpu_int8   | CPU   | 8 bit symmetric per channel, bf16 activations      | bf16 scales, order differs      |
| dequant    | any   | everything                                         | exact                           |
| w8a8_triton| CUDA  | 8 bit sym per channel + activation_bits=8, K % 16  | int8 × int8 → int32, exact      |
| w8a8_int8  | both  | 8 bit sym per channel + activation_bits=8          | int8 × int8 → int32, exact      |

FP8 layers (`hfqat.export.w8a8.PackedFP8Linear`) have `FP8_BACKENDS`: ``fp8_scaled_mm`` (CUDA ≥ sm89, bf16, W8A8:
``torch._scaled_mm`` row-wise) and ``dequant`` (anywhere, fp32). See `hfqat.export.kernels.w8a8`.

Codebook layers (`hfqat.export.codebook.PackedCodebookLinear`) have their own table, `CODEBOOK_BACKENDS`:

| backend    | where | applies to                                         | numerics vs fake quant          |
|------------|-------|----------------------------------------------------|---------------------------------|
| triton_lut | CUDA  | 2/3/4/8 bit, groups of 32k, K % 32 == 0            | fp32 accumulate, order differs  |
| dequant    | any   | everything (gather from the tables + matmul)       | exact                           |

W8A8 int8 layers go first (they are the only backends that quantize the activations to real int8); on CUDA,
``w8a8_triton`` (fused rescale epilogue, `triton_w8a8`) or ``w8a8_int8`` (``torch._int_mm`` + a rescale pass),
whichever `AUTO_ORDER` names first: bench/bench_w8a8.py times both side by side.

On an H100, batch-1 4-bit GEMVs ran 15-30% faster in tinygemm than in our Triton kernel (bench/bench_decode.py),
so tinygemm goes first where it applies; it hands batches above `torch_ops.TINYGEMM_MAX_M` rows (prefill) to the
Triton path. fp32 activations on CPU take ``dequant`` (torch's CPU int4/int8 ops are fast only for bf16).
Packed MoE experts (`hfqat.export.packed_experts`) decode through their own op, ``hfqat::lowbit_experts_mv``
(`hfqat.export.kernels.experts`: one grouped Triton GEMV per width over the routed experts on CUDA, an exact torch
reference elsewhere). Optional libraries (triton, gemlite) are imported only when their factory runs. Per-row layers
(`hfqat.export.packed.PackedRowsLinear`) run all their width blocks in one Triton launch on CUDA
(``triton_rows``, `triton_lowbit.rows_backend`), and their parts one by one elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

MatmulFn = Callable[[Any, torch.Tensor], torch.Tensor]
BackendFactory = Callable[[Any, torch.device, torch.dtype], "MatmulFn | None"]


def _triton(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn | None:
    if device.type != "cuda":
        return None
    try:
        from . import triton_lowbit
    except ImportError:  # triton missing or too old
        return None
    return triton_lowbit.backend(layer, device, dtype)


def _tinygemm(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn | None:
    from . import torch_ops

    return torch_ops.tinygemm_backend(layer, device, dtype)


def _gemlite(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn | None:
    if device.type != "cuda":
        return None
    from . import gemlite_ops

    return gemlite_ops.backend(layer, device, dtype)


def _cpu_int4(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn | None:
    from . import torch_ops

    return torch_ops.cpu_int4_backend(layer, device, dtype)


def _cpu_int8(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn | None:
    from . import torch_ops

    return torch_ops.cpu_int8_backend(layer, device, dtype)


def _w8a8_int8(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn | None:
    from . import w8a8

    return w8a8.w8a8_int8_backend(layer, device, dtype)


def _w8a8_triton(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn | None:
    from . import w8a8

    return w8a8.w8a8_triton_backend(layer, device, dtype)


def _dequant(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn:
    from . import torch_ops

    return torch_ops.dequant_matmul


BACKENDS: dict[str, BackendFactory] = {
    "triton": _triton,
    "tinygemm": _tinygemm,
    "cpu_int4": _cpu_int4,
    "cpu_int8": _cpu_int8,
    "dequant": _dequant,
    "w8a8_int8": _w8a8_int8,
    "w8a8_triton": _w8a8_triton,
    "gemlite": _gemlite,  # optional (hfqat[gemlite]); chosen by set_backend only, see gemlite_ops
}
AUTO_ORDER: tuple[str, ...] = ("w8a8_triton", "w8a8_int8", "tinygemm", "triton", "cpu_int4", "cpu_int8", "dequant")


def _triton_lut(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn | None:
    if device.type != "cuda":
        return None
    try:
        from . import triton_lut
    except ImportError:  # triton missing or too old
        return None
    return triton_lut.backend(layer, device, dtype)


CODEBOOK_BACKENDS: dict[str, BackendFactory] = {"triton_lut": _triton_lut, "dequant": _dequant}
CODEBOOK_AUTO_ORDER: tuple[str, ...] = ("triton_lut", "dequant")


def select_backend(layer, device: torch.device, dtype: torch.dtype, force: str | None = None,
                   backends: dict[str, BackendFactory] = BACKENDS,
                   order: tuple[str, ...] = AUTO_ORDER) -> tuple[str, MatmulFn]:
    """(name, matmul function) for `layer` running on `device` with activations of `dtype`.

    `force` names one backend; it raises a `ValueError` when that backend cannot run this layer here.
    `backends` / `order`: the layer kind's table (`CODEBOOK_BACKENDS` / `CODEBOOK_AUTO_ORDER` for codebook layers);
    the last backend of `order` must always apply.
    """
    if force is not None:
        if force not in backends:
            raise ValueError(f"backend={force!r} is unknown; allowed values: {list(backends)} or None (auto)")
        fn = backends[force](layer, device, dtype)
        if fn is None:
            raise ValueError(
                f"backend {force!r} does not apply to this layer ({layer.extra_repr()}) on {device} with {dtype} "
                f"activations; see hfqat.export.kernels for what each backend supports, or use 'dequant'"
            )
        return force, fn
    for name in order[:-1]:
        fn = backends[name](layer, device, dtype)
        if fn is not None:
            return name, fn
    return order[-1], backends[order[-1]](layer, device, dtype)  # dequant: applies everywhere


def _fp8_scaled_mm(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn | None:
    from . import w8a8

    return w8a8.fp8_scaled_mm_backend(layer, device, dtype)


def _fp8_dequant(layer, device: torch.device, dtype: torch.dtype) -> MatmulFn:
    from . import w8a8

    return w8a8.fp8_dequant_matmul


FP8_BACKENDS: dict[str, BackendFactory] = {"fp8_scaled_mm": _fp8_scaled_mm, "dequant": _fp8_dequant}
FP8_AUTO_ORDER: tuple[str, ...] = ("fp8_scaled_mm", "dequant")

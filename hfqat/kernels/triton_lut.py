"""Triton look-up-table (LUT) matmul for packed codebook layers (`hfqat.codebook.PackedCodebookLinear`).

``W[n, k] = T[n, k // group, q[k, n]]``: codes ``q`` packed in the `hfqat.packing` layout (2/3/4/8 bits),
per-(row, group) tables ``T`` of ``2^bits`` fp32 entries laid out (N, groups, 2^bits), so the table of one output
column in one group is 2^bits consecutive floats (32 bytes at 3 bits).

- ``M == 1`` (batch-1 decode): `_lut_gemv_kernel`. A program owns ``BLOCK_N`` output columns and one K split;
  per tile of ``BLOCK_K`` inputs it unpacks the codes in registers (`triton_lowbit._codes`: shift + mask, the
  3-bit planes recombined), looks each code up in its column's table — a gather from the few hundred bytes of
  tables the program touches, which stay in L1 (Triton exposes no explicit shared-memory gather; the L1 lines play
  the shared-memory codebook's role) — and accumulates ``x[k]·T[...]`` in fp32. K is split over programs so that
  narrow layers still fill the GPU; partial sums meet in an fp32 buffer through atomics.
- ``M > 1`` (prefill, batches): `_lut_dequant_kernel` writes the weight once in the activation dtype, then cuBLAS.

Numerics: the looked-up values are exactly the fake-quant weights (fp32); only the summation order differs from
the exact ``dequant`` fallback. Entry point: the custom op ``torch.ops.hfqat.lut_mm`` (opaque to torch.compile).
"""

import torch
import triton
import triton.language as tl

from .triton_lowbit import _codes, _sm_count

KERNEL_BITS = (2, 3, 4, 8)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _lut_gemv_kernel(x_ptr, w_ptr, t_ptr, y_ptr, N, K, G, group, k_per_split,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n] += Σ_{k in this split} x[k]·T[n, k // group, q[k, n]]   (y fp32, zeroed by the launcher)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    row_base = offs_n[None, :].to(tl.int64) * G  # table row of each column, group 0
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        kk = k0 + offs_k
        q = _codes(w_ptr, kk, offs_n, mask_n, N, K, BITS)  # (BLOCK_K, BLOCK_N) int32, tile inside one group
        g = k0 // group
        w = tl.load(t_ptr + ((row_base + g) << BITS) + q, mask=mask_n[None, :], other=0.0)
        xk = tl.load(x_ptr + kk).to(tl.float32)
        acc += xk[:, None] * w
    tl.atomic_add(y_ptr + offs_n, tl.sum(acc, axis=0), mask=mask_n)


@triton.jit
def _lut_dequant_kernel(w_ptr, t_ptr, out_ptr, N, K, G, group,
                        BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out (K, N) = T[n, k // group, q[k, n]] in out's dtype."""
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    q = _codes(w_ptr, kk, offs_n, mask_n, N, K, BITS)
    row = offs_n[None, :].to(tl.int64) * G + (kk // group)[:, None]
    w = tl.load(t_ptr + (row << BITS) + q, mask=mask_n[None, :], other=0.0)
    tl.store(out_ptr + kk[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


# -- launchers ---------------------------------------------------------------------------------------------------
GEMV_BLOCK_N = 64
GEMV_WARPS = 4


def _block_k(group_size: int) -> int:
    return 64 if group_size % 64 == 0 else 32


def _split(n: int, k: int, block_k: int, device: torch.device) -> int:
    """K splits (a power of two dividing the K tiles) until ~4 programs per SM."""
    tiles = k // block_k
    split = 1
    while tiles % (split * 2) == 0 and triton.cdiv(n, GEMV_BLOCK_N) * split * 2 <= 4 * _sm_count(device):
        split *= 2
    return split


def lut_gemv(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """x (1, K) → (1, N) in x's dtype."""
    k = x.shape[1]
    n, groups = table.shape[0], table.shape[1]
    block_k = _block_k(group_size)
    split = _split(n, k, block_k, x.device)
    y = torch.zeros(1, n, dtype=torch.float32, device=x.device)
    _lut_gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N), split)](
        x, qweight, table, y, n, k, groups, group_size, k // split,
        BITS=bits, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=block_k, num_warps=GEMV_WARPS,
    )
    return y.to(x.dtype)


def lut_dequantize(qweight: torch.Tensor, table: torch.Tensor, bits: int, group_size: int, in_features: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """(in_features, N) weight in `dtype`, written by one kernel."""
    n, groups = table.shape[0], table.shape[1]
    out = torch.empty(in_features, n, dtype=dtype, device=qweight.device)
    _lut_dequant_kernel[(in_features // 32, triton.cdiv(n, 128))](
        qweight, table, out, n, in_features, groups, group_size, BITS=bits, BLOCK_K=32, BLOCK_N=128, num_warps=4,
    )
    return out


@torch.library.custom_op("hfqat::lut_mm", mutates_args=())
def lut_mm(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """x (M, K) @ codebook weight → (M, N) in x's dtype."""
    if x.shape[0] == 1:
        return lut_gemv(x, qweight, table, bits, group_size)
    return x @ lut_dequantize(qweight, table, bits, group_size, x.shape[1], x.dtype)


@lut_mm.register_fake
def _(x, qweight, table, bits, group_size):
    return x.new_empty(x.shape[0], table.shape[0])


# -- backend -----------------------------------------------------------------------------------------------------
def applies(layer, dtype: torch.dtype) -> bool:
    return (layer.bits in KERNEL_BITS and layer.in_features % 32 == 0 and layer.group_size % 32 == 0
            and dtype in ACTIVATION_DTYPES)


def backend(layer, device: torch.device, dtype: torch.dtype):
    return _lut_matmul if applies(layer, dtype) else None


def _lut_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.hfqat.lut_mm(x.reshape(-1, layer.in_features).contiguous(), layer.qweight, layer.codebook,
                               layer.bits, layer.group_size)
    y = y.reshape(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)

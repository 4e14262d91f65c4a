"""Triton look-up-table (LUT) matmul for packed codebook layers (`hfqat.export.codebook.PackedCodebookLinear`).

``W[n, k] = T[n, k // group, q[k, n]]``: codes ``q`` packed in the `hfqat.export.packing` layout (2/3/4/8 bits),
per-(row, group) tables ``T`` of ``2^bits`` fp32 entries laid out (N, groups, 2^bits), so the table of one output
column in one group is 2^bits consecutive floats (32 bytes at 3 bits).

- ``M == 1`` (batch-1 decode): `_lut_gemv_kernel`. A program owns ``BLOCK_N`` output columns and one K split;
  per tile it loads each packed word once and extracts its codes in registers (shift + mask; the 3-bit planes
  recombined), looks each code up in its column's table and accumulates ``x[k]·T[...]`` in fp32. At 2 bits the
  4-entry table is held in registers and the lookup is a select chain (the register codebook); at 3/4/8 bits it is
  a gather from the tables the program touches, which stay in L1 (Triton has no explicit shared-memory gather; the
  L1 lines play the shared-memory codebook's role). The tables are read through a transposed (groups, 2^bits, N)
  copy made when the backend is set up. K is split over programs so that narrow layers still fill the GPU;
  partial sums meet in an fp32 buffer through atomics.
- ``M > 1`` (prefill, batches): `_lut_dequant_kernel` writes the weight once in the activation dtype, then cuBLAS.

Measured on an H100 (bench/bench_codebook.py --gpu, bf16 activations, batch 1, per-channel tables, CUDA-graph
replays; microseconds for 576x576 | 14336x4096 | 4096x14336, int = hfqat's Triton int kernel, bf16 = cuBLAS
3.3 | 41.8 | 44.5):
    gather lookup, words re-read per code:   W2 12.8 | 60.4 | 53.5   W3 17.3 | 90.3 | 80.2   W4 13.1 | 64.6 | 57.5
    select chain, words loaded once:          W2 12.9 | 44.7 | 38.6   W3 19.9 | 97.4 | 85.4   W4 31.6 | 169.5 | 149.1
    int Triton GEMV:                          W2  5.5 | 17.3 | 17.6   W3  6.8 | 30.7 | 31.3   W4  5.0 | 20.7 | 19.4
The shipped combination (select chain at 2 bits, words loaded once + gather at 3/4/8 bits) was assembled from
these two runs and checked for correctness (Triton interpreter), but its 3/4-bit times were not measured
separately. The LUT kernel is 2-3x slower than the int kernel (one table access or a select chain per weight
against one FADD/FFMA) and at 3/4 bits not faster than bf16 on large layers: it saves memory, not time, so far.

Numerics: the looked-up values are exactly the fake-quant weights (fp32); only the summation order differs from
the exact ``dequant`` fallback. Entry point: the custom op ``torch.ops.hfqat.lut_mm`` (opaque to torch.compile).
"""

import torch
import triton
import triton.language as tl

from .triton_lowbit import _codes, _sm_count

KERNEL_BITS = (2, 3, 4, 8)
SELECT_MAX_BITS: tl.constexpr = tl.constexpr(2)  # register select chain up to this width, gather above
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _lookup(c, tt_ptr, g, N, offs_n, mask_n, BITS: tl.constexpr):
    """T[g, c, n] for codes ``c`` (rows, BLOCK_N) from the transposed tables ``tt`` (groups, 2^BITS, N).

    Up to `SELECT_MAX_BITS`: a select chain over the column's entries, each loaded once per tile (coalesced along
    n) and kept in registers — no per-weight memory access, but 2^BITS - 1 compare+selects per weight. Wider: a
    gather from the L1-resident tables. On an H100 the chain won at 2 bits and lost clearly at 3 and 4 bits
    (module docstring).
    """
    if BITS <= SELECT_MAX_BITS:
        base = tt_ptr + g * (N << BITS) + offs_n
        v = tl.zeros(c.shape, dtype=tl.float32) + tl.load(base, mask=mask_n, other=0.0)[None, :]
        for j in tl.static_range(1, 1 << BITS):
            v = tl.where(c == j, tl.load(base + j * N, mask=mask_n, other=0.0)[None, :], v)
    else:
        v = tl.load(tt_ptr + (g * (1 << BITS) + c) * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    return v


@triton.jit
def _lut_gemv_kernel(x_ptr, w_ptr, tt_ptr, y_ptr, N, K, group, tiles_per_split,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[n] += Σ_{k in this split} x[k]·T[k // group, q[k, n], n]   (y fp32, zeroed by the launcher).

    A tile is BLOCK_R·32 inputs inside one group. Each packed word is loaded once; its codes are extracted with
    a shift and a mask per position (3 bits: a 2-bit plane plus the 1-bit plane, recombined in registers).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    P0: tl.constexpr = 2 if BITS == 3 else BITS
    rr = tl.arange(0, BLOCK_R * P0)  # word rows of the (first) plane inside a tile
    acc = tl.zeros((BLOCK_R * P0, BLOCK_N), dtype=tl.float32)
    for i in range(tiles_per_split):
        t = pid_k * tiles_per_split + i
        rows = t * (BLOCK_R * P0) + rr  # plane-0 word row R holds inputs R·(32/P0) + jj
        w0 = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        if BITS == 3:
            # input R·16 + jj has its third bit in 1-bit-plane row R // 2, at bit (R % 2)·16 + jj
            w1 = tl.load(w_ptr + (K // 16 + t * BLOCK_R + rr // 2)[:, None] * N + offs_n[None, :],
                         mask=mask_n[None, :], other=0)
            w1 = w1 >> ((rr % 2) * 16)[:, None]
        g = (t * BLOCK_R * 32) // group
        for jj in tl.static_range(32 // P0):
            c = (w0 >> (jj * P0)) & ((1 << P0) - 1)
            if BITS == 3:
                c = c | (((w1 >> jj) & 1) << 2)
            xj = tl.load(x_ptr + rows * (32 // P0) + jj).to(tl.float32)
            acc += xj[:, None] * _lookup(c, tt_ptr, g, N, offs_n, mask_n, BITS)
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
GEMV_WARPS = 2


def _first_plane(bits: int) -> int:
    return 2 if bits == 3 else bits


def _block_r(bits: int, group_size: int) -> int:
    """Super rows (32 inputs) per tile: the tile must lie in one group; ≤ 16 word rows per plane tile."""
    return next(r for r in (4, 2, 1) if group_size % (32 * r) == 0 and r * _first_plane(bits) <= 16)


def _split(n: int, tiles: int, device: torch.device) -> int:
    """K splits (a power of two dividing the tiles) until ~4 programs per SM."""
    split = 1
    while tiles % (split * 2) == 0 and triton.cdiv(n, GEMV_BLOCK_N) * split * 2 <= 4 * _sm_count(device):
        split *= 2
    return split


def lut_gemv(x: torch.Tensor, qweight: torch.Tensor, table_t: torch.Tensor, bits: int,
             group_size: int) -> torch.Tensor:
    """x (1, K) → (1, N) in x's dtype; ``table_t`` is the (groups, 2^bits, N) transposed table."""
    k = x.shape[1]
    n = table_t.shape[2]
    block_r = _block_r(bits, group_size)
    tiles = k // (32 * block_r)
    split = _split(n, tiles, x.device)
    y = torch.zeros(1, n, dtype=torch.float32, device=x.device)
    _lut_gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N), split)](
        x, qweight, table_t, y, n, k, group_size, tiles // split,
        BITS=bits, BLOCK_N=GEMV_BLOCK_N, BLOCK_R=block_r, num_warps=GEMV_WARPS,
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
def lut_mm(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor, table_t: torch.Tensor, bits: int,
           group_size: int) -> torch.Tensor:
    """x (M, K) @ codebook weight → (M, N) in x's dtype (``table`` (N, groups, 2^bits), ``table_t`` transposed)."""
    if x.shape[0] == 1:
        return lut_gemv(x, qweight, table_t, bits, group_size)
    return x @ lut_dequantize(qweight, table, bits, group_size, x.shape[1], x.dtype)


@lut_mm.register_fake
def _(x, qweight, table, table_t, bits, group_size):
    return x.new_empty(x.shape[0], table.shape[0])


# -- backend -----------------------------------------------------------------------------------------------------
def applies(layer, dtype: torch.dtype) -> bool:
    return (layer.bits in KERNEL_BITS and layer.in_features % 32 == 0 and layer.group_size % 32 == 0
            and dtype in ACTIVATION_DTYPES)


def backend(layer, device: torch.device, dtype: torch.dtype):
    if not applies(layer, dtype):
        return None
    # the GEMV reads the tables with n contiguous: a (groups, 2^bits, N) copy, never saved
    layer.register_buffer("_lut_table_t", layer.codebook.permute(1, 2, 0).contiguous(), persistent=False)
    return _lut_matmul


def _lut_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.hfqat.lut_mm(x.reshape(-1, layer.in_features).contiguous(), layer.qweight, layer.codebook,
                               layer._lut_table_t, layer.bits, layer.group_size)
    y = y.reshape(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)

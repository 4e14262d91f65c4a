"""Triton kernels for packed low-bit weights (layout `hfqat.export.packing`): every width 2-8 (a width is up to three
power-of-two bit planes: 2|4|8, then 2 and/or 1), symmetric or with zero points, any group size that is a multiple
of 32 (per channel included). Codes are unpacked in registers.

- ``M == 1`` (batch-1 decode): `_gemv_part`. Each packed word is loaded once (coalesced along the output
  channels) and its codes are turned into floats without int→float conversions: a code field ``u`` at bit
  ``pos < 16`` of a word, OR-ed into the exponent bits of 2^23, reads as the float ``2^23 + u·2^pos``; one
  subtraction of ``2^23 + z·2^pos`` gives ``(u - z)·2^pos`` exactly, and the matching activation is pre-scaled
  by ``2^-pos`` (exact). Per code: one AND/OR, one FADD, one FFMA (+ one shift per 16-bit half word). Group
  scales are applied once per tile. Optional split-K: partial sums go to a workspace with fp32 atomics and the
  last program of each column block writes the output and re-zeroes the workspace, so one launch suffices.
  One matrix: `_gemv_one_kernel`. A per-row layer (`hfqat.export.packed.PackedRowsLinear`: one matrix per width,
  rows grouped by width): `_gemv_kernel` runs up to `MAX_PARTS` of them in one launch, each program branching to
  its block's width, and stores every output at its row's place (``out_index``), so no concatenation or
  reordering follows.
- routed MoE experts (`experts_mv`, for `hfqat.export.kernels.experts`): `_experts_gemv_kernel`, the same GEMV per
  (column block, K split, routed pair), the pair's expert id and its place in the width's stack read on the device.
- ``2 ≤ M ≤ GEMM_MAX_M``: `_gemm_kernel`, dequantized tiles fed to ``tl.dot`` (tensor cores); one launch per width.
- larger M (prefill): `_dequant_kernel` writes the float weight once (per-row layers: every width into one
  matrix, rows in place), then one cuBLAS matmul.

All math is fp32 apart from the tensor-core inputs (the activation dtype, as in the dequantize fallback).
Entry points: the custom ops ``torch.ops.hfqat.lowbit_mm`` and ``torch.ops.hfqat.lowbit_rows_mm`` (opaque to
torch.compile, CUDA-graph safe; ``hfqat::lowbit_experts_mv``'s CUDA kernel is `experts_mv`); eager calls skip the
op dispatcher (`_op`), whose cost is that of a GEMV.

Measured on an H100 (bench/bench_decode.py, batch-1 bf16, 8B-Llama shapes, CUDA-graph replays): 4-bit GEMV
14336x4096 in 19.7 us (1.58 TB/s of packed bytes; bf16 cuBLAS 41.8 us), 4096x4096 in 9.0 us. The kernel is
instruction-bound rather than bandwidth-bound (2-bit runs barely faster than 4-bit, 3-bit slower); torch's
tinygemm does 4-bit faster (16.9 / 5.9 us), so it is preferred there. The fused large-M GEMM
(`FUSED_LARGE_M`) ran prefill at 0.41x of bf16 against 0.88x for dequantize+cuBLAS, hence off by default.
"""

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

KERNEL_BITS = (2, 3, 4, 5, 6, 7, 8)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMM_MAX_M = 64
FUSED_LARGE_M = False  # True: large M also runs `_gemm_kernel` (dequantize in registers) instead of dequant+cuBLAS
_MAGIC_I = tl.constexpr(0x4B000000)  # bit pattern of 2^23 as float32
_MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _load_plane(w_ptr, row0, t, offs_n, mask, N, P: tl.constexpr, BLOCK_R: tl.constexpr):
    """Words of tile t of the bit plane of width P starting at row `row0`: (BLOCK_R·P, BLOCK_N) int32."""
    rr = t * (BLOCK_R * P) + tl.arange(0, BLOCK_R * P)
    return tl.load(w_ptr + (row0 + rr)[:, None] * N + offs_n[None, :], mask=mask, other=0)


@triton.jit
def _plane_dot(wv, x_ptr, t, zf, P: tl.constexpr, LOW: tl.constexpr, BLOCK_R: tl.constexpr):
    """x·(field·2^LOW - zf) for every code of a plane tile `wv` (fields = code bits LOW..LOW+P-1).

    Word row rr of the plane holds the codes of inputs rr·(32/P) .. rr·(32/P) + 32/P - 1.
    """
    rr = t * (BLOCK_R * P) + tl.arange(0, BLOCK_R * P)
    part = tl.zeros(wv.shape, dtype=tl.float32)
    for half in tl.static_range(2):
        if half == 0:
            wh = wv
        else:
            wh = wv >> 16  # arithmetic shift; the masks below drop the sign bits
        for jj in tl.static_range(16 // P):
            # input rr*(32/P) + half*(16/P) + jj sits at bit jj*P of `wh`; 2^23 | field<<pos reads 2^23 + field·2^pos
            xj = tl.load(x_ptr + rr * (32 // P) + (half * (16 // P) + jj)).to(tl.float32)
            f = ((wh & (((1 << P) - 1) << (jj * P))) | _MAGIC_I).to(tl.float32, bitcast=True)
            part += (xj * ((1 << LOW) / (1 << (jj * P))))[:, None] * (f - (_MAGIC_F + zf * (1 << (jj * P))))
    return part


@triton.jit
def _gemv_part(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, idx_ptr, pid, blk, col0, N, K, group,
               tiles_per_split, BITS: tl.constexpr, SYM: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, PERMUTE: tl.constexpr):
    """Column block `blk` of one packed matrix (N columns): y[dst(n)] = Σ_k x[k]·(q[k,n] - z)·s.

    A tile is BLOCK_R·32 inputs inside one scale group. A width is up to three planes (`planes` in
    `hfqat.export.packing`: 2|4|8, then 2 and/or 1); the zero point is subtracted in the first. The words of tile
    t+1 are loaded before tile t is computed (register double buffering). Output column n goes to
    ``col0 + n`` or, with PERMUTE, to ``idx[col0 + n]``; `pid` numbers the split-K arrival counter.
    """
    P0: tl.constexpr = 8 if BITS == 8 else (4 if BITS >= 4 else 2)
    R: tl.constexpr = BITS - P0
    P1: tl.constexpr = 2 if R >= 2 else R
    P2: tl.constexpr = R - P1
    pid_k = tl.program_id(1)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_w = mask_n[None, :]
    t0 = pid_k * tiles_per_split  # the launcher makes the splits divide the tiles evenly
    acc0 = tl.zeros((BLOCK_R * P0, BLOCK_N), dtype=tl.float32)
    w0 = _load_plane(w_ptr, 0, t0, offs_n, mask_w, N, P0, BLOCK_R)
    if P1 > 0:
        acc1 = tl.zeros((BLOCK_R * P1, BLOCK_N), dtype=tl.float32)
        w1 = _load_plane(w_ptr, K * P0 // 32, t0, offs_n, mask_w, N, P1, BLOCK_R)
    if P2 > 0:
        acc2 = tl.zeros((BLOCK_R * P2, BLOCK_N), dtype=tl.float32)
        w2 = _load_plane(w_ptr, K * (P0 + P1) // 32, t0, offs_n, mask_w, N, P2, BLOCK_R)
    for i in range(tiles_per_split):
        t = t0 + i
        more = mask_w & (i + 1 < tiles_per_split)
        w0_next = _load_plane(w_ptr, 0, t + 1, offs_n, more, N, P0, BLOCK_R)
        if P1 > 0:
            w1_next = _load_plane(w_ptr, K * P0 // 32, t + 1, offs_n, more, N, P1, BLOCK_R)
        if P2 > 0:
            w2_next = _load_plane(w_ptr, K * (P0 + P1) // 32, t + 1, offs_n, more, N, P2, BLOCK_R)
        g = (t * BLOCK_R * 32) // group
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
        if SYM:
            zf = 1.0 * (1 << (BITS - 1))
        else:
            zf = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        acc0 += _plane_dot(w0, x_ptr, t, zf, P0, 0, BLOCK_R) * s
        w0 = w0_next
        if P1 > 0:
            acc1 += _plane_dot(w1, x_ptr, t, 0.0, P1, P0, BLOCK_R) * s
            w1 = w1_next
        if P2 > 0:
            acc2 += _plane_dot(w2, x_ptr, t, 0.0, P2, P0 + P1, BLOCK_R) * s
            w2 = w2_next
    y = tl.sum(acc0, axis=0)
    if P1 > 0:
        y += tl.sum(acc1, axis=0)
    if P2 > 0:
        y += tl.sum(acc2, axis=0)
    if PERMUTE:
        dst = tl.load(idx_ptr + col0 + offs_n, mask=mask_n, other=0)
    else:
        dst = col0 + offs_n
    if SPLIT:
        tl.atomic_add(ws_ptr + dst, y, mask=mask_n)
        tl.debug_barrier()  # every thread's partial sum is in before the arrival is counted
        done = tl.atomic_add(cnt_ptr + pid, 1)
        if done == tl.num_programs(1) - 1:  # last arrival: all partial sums are in (read them through L2)
            total = tl.atomic_add(ws_ptr + dst, tl.zeros_like(y), mask=mask_n)
            tl.store(y_ptr + dst, total.to(y_ptr.dtype.element_ty), mask=mask_n)
            tl.store(ws_ptr + dst, tl.zeros_like(y), mask=mask_n)
            tl.store(cnt_ptr + pid, 0)
    else:
        tl.store(y_ptr + dst, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gemv_one_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, group, tiles_per_split,
                     BITS: tl.constexpr, SYM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                     SPLIT: tl.constexpr):
    """Batch-1 GEMV of one packed matrix (few arguments: Triton's per-launch cost grows with their number)."""
    pid = tl.program_id(0)
    _gemv_part(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, y_ptr, pid, pid, 0, N, K, group,
               tiles_per_split, BITS, SYM, BLOCK_N, BLOCK_R, SPLIT, False)


@triton.jit
def _gemv_kernel(x_ptr, y_ptr, ws_ptr, cnt_ptr, idx_ptr, K, group, tiles_per_split,
                 w0, s0, z0, n0, c0, w1, s1, z1, n1, c1, b1, w2, s2, z2, n2, c2, b2, w3, s3, z3, n3, c3, b3,
                 B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, PARTS: tl.constexpr,
                 SYM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
                 PERMUTE: tl.constexpr):
    """Batch-1 GEMV over 1-4 packed matrices (the width blocks of a per-row layer) in one launch.

    Part p (B_p bits, n_p columns, output columns from c_p) owns the column-block programs from b_p on; each
    program runs `_gemv_part` for its part, selected by a runtime branch (every width compiled in).
    """
    pid = tl.program_id(0)
    if PARTS == 1:
        _gemv_part(x_ptr, w0, s0, z0, y_ptr, ws_ptr, cnt_ptr, idx_ptr, pid, pid, c0, n0, K, group,
                   tiles_per_split, B0, SYM, BLOCK_N, BLOCK_R, SPLIT, PERMUTE)
    else:  # absent parts have b_p beyond every program id
        if pid < b1:
            _gemv_part(x_ptr, w0, s0, z0, y_ptr, ws_ptr, cnt_ptr, idx_ptr, pid, pid, c0, n0, K, group,
                       tiles_per_split, B0, SYM, BLOCK_N, BLOCK_R, SPLIT, PERMUTE)
        elif pid < b2:
            _gemv_part(x_ptr, w1, s1, z1, y_ptr, ws_ptr, cnt_ptr, idx_ptr, pid, pid - b1, c1, n1, K, group,
                       tiles_per_split, B1, SYM, BLOCK_N, BLOCK_R, SPLIT, PERMUTE)
        elif pid < b3:
            _gemv_part(x_ptr, w2, s2, z2, y_ptr, ws_ptr, cnt_ptr, idx_ptr, pid, pid - b2, c2, n2, K, group,
                       tiles_per_split, B2, SYM, BLOCK_N, BLOCK_R, SPLIT, PERMUTE)
        else:
            _gemv_part(x_ptr, w3, s3, z3, y_ptr, ws_ptr, cnt_ptr, idx_ptr, pid, pid - b3, c3, n3, K, group,
                       tiles_per_split, B3, SYM, BLOCK_N, BLOCK_R, SPLIT, PERMUTE)


@triton.jit
def _experts_gemv_kernel(x_ptr, ids_ptr, index_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, num_experts,
                         slots, stride_x, stride_w, stride_s, N, K, group, tiles_per_split, BITS: tl.constexpr,
                         SYM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
                         ZERO_OTHERS: tl.constexpr):
    """Batch-1 GEMVs of routed pairs over the stacked experts of one width: y[p] = x[p // slots] @ W_{ids[p]}.

    Program (column block, K split, pair p) reads the pair's expert id on the device and its place in this width's
    stack (``index[id]``, -1: another width); pairs of other widths (and expert-parallel sentinels, id ≥ num_experts)
    are skipped, or their outputs zeroed with ZERO_OTHERS (the first launch of a call), so every output is written.
    """
    blk = tl.program_id(0)
    pair = tl.program_id(2)
    e = tl.load(ids_ptr + pair)
    idx = tl.load(index_ptr + e, mask=(e >= 0) & (e < num_experts), other=-1)
    y_row = y_ptr + pair * N
    if idx >= 0:
        i = idx.to(tl.int64)  # stacks of many experts pass 2^31 elements
        _gemv_part(x_ptr + (pair // slots) * stride_x, w_ptr + i * stride_w, s_ptr + i * stride_s,
                   z_ptr + i * stride_s, y_row, ws_ptr + pair * N, cnt_ptr, y_row, pair * tl.num_programs(0) + blk,
                   blk, 0, N, K, group, tiles_per_split, BITS, SYM, BLOCK_N, BLOCK_R, SPLIT, False)
    elif ZERO_OTHERS:
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_row + offs_n, tl.zeros((BLOCK_N,), dtype=y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _plane_codes(w_ptr, row0, kk, offs_n, mask_n, N, P: tl.constexpr):
    per: tl.constexpr = 32 // P
    w = tl.load(w_ptr + (row0 + kk // per)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    return (w >> ((kk % per) * P)[:, None]) & ((1 << P) - 1)


@triton.jit
def _codes(w_ptr, kk, offs_n, mask_n, N, K, BITS: tl.constexpr):
    """Unsigned codes (len(kk), BLOCK_N) int32 of input features kk (gathered; words re-read per code)."""
    P0: tl.constexpr = 8 if BITS == 8 else (4 if BITS >= 4 else 2)
    R: tl.constexpr = BITS - P0
    P1: tl.constexpr = 2 if R >= 2 else R
    P2: tl.constexpr = R - P1
    q = _plane_codes(w_ptr, 0, kk, offs_n, mask_n, N, P0)
    if P1 > 0:
        q |= _plane_codes(w_ptr, K * P0 // 32, kk, offs_n, mask_n, N, P1) << P0
    if P2 > 0:
        q |= _plane_codes(w_ptr, K * (P0 + P1) // 32, kk, offs_n, mask_n, N, P2) << (P0 + P1)
    return q

@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, idx_ptr, col0, M, N, K, group, stride_xm, stride_ym,
                 BITS: tl.constexpr, SYM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PERMUTE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=offs_m[:, None] < M, other=0.0)
        q = _codes(w_ptr, kk, offs_n, mask_n, N, K, BITS)
        g = k0 // group
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)
        if SYM:
            z = 1 << (BITS - 1)
        else:
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)[None, :]
        w = ((q - z).to(tl.float32) * s[None, :]).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if PERMUTE:
        dst = tl.load(idx_ptr + col0 + offs_n, mask=mask_n, other=0)
    else:
        dst = col0 + offs_n
    y_mask = (offs_m[:, None] < M) & mask_n[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + dst[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, idx_ptr, col0, N, K, group, stride_out,
                    BITS: tl.constexpr, SYM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    PERMUTE: tl.constexpr):
    """out[k, dst(n)] = (q - z)·s in out's dtype (the same values as the exact fallback's weight).

    BLOCK_K divides the group size, so a program reads one row of scales (and zero points).
    """
    k0 = tl.program_id(0) * BLOCK_K
    kk = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    q = _codes(w_ptr, kk, offs_n, mask_n, N, K, BITS)
    g = k0 // group
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
    if SYM:
        z = 1 << (BITS - 1)
    else:
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)[None, :]
    w = (q - z).to(tl.float32) * s
    if PERMUTE:
        dst = tl.load(idx_ptr + col0 + offs_n, mask=mask_n, other=0)
    else:
        dst = col0 + offs_n
    tl.store(out_ptr + kk[:, None] * stride_out + dst[None, :], w.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


# -- launch configuration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int  # 1: the kernel double-buffers its loads itself
    split: int  # programs along K; 1 = no split (no atomics)


class Part(NamedTuple):  # a NamedTuple: built on every eager call, cheaper than a dataclass
    """One packed matrix of a launch: (K·bits/32, N) int32 words, (groups, N) fp32 scales, int16 zeros or None."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int

    @property
    def n(self) -> int:
        return self.qweight.shape[1]


GEMV_CANDIDATES = ((128, 4, 4), (256, 2, 4), (64, 4, 2), (128, 2, 4), (256, 1, 4))  # (block_n, block_r, warps)
SPLIT_CANDIDATES = (1, 2, 4, 8, 16)
MAX_TILE_ROWS = 16  # word rows per tile over all planes; more spills registers (8-bit at block_r=4 needs ~240)
MAX_PARTS = 4  # widths one GEMV launch takes; a per-row layer with more runs in several launches
_NO_PART = 1 << 30  # block start of an absent part: beyond every program id
_tuned: dict[tuple, GemvConfig] = {}
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _fits(bits: int, group_size: int, block_r: int) -> bool:
    return group_size % (32 * block_r) == 0 and block_r * bits <= MAX_TILE_ROWS


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)  # called on every untuned batch-1 launch
def default_gemv_config(n: int, k: int, bits: int | tuple[int, ...], group_size: int,
                        device: torch.device) -> GemvConfig:
    """Used when no tuned entry exists (`bits`: one width, or every part's). On an H100 the tuned choices for
    8B-Llama shapes were 64-256 column blocks with 8-16 K splits (~1000 programs); 64 columns, 2 warps and up
    to 16 splits were within ~10%."""
    widths = (bits,) if isinstance(bits, int) else tuple(bits)
    block_r = next(r for r in (4, 2, 1) if all(_fits(b, group_size, r) for b in widths))
    tiles = k // (32 * block_r)
    split = 1
    while split * 2 <= min(tiles, 16) and triton.cdiv(n, 64) * split < 8 * _sm_count(device):
        split *= 2
    return GemvConfig(64, block_r, 2, 1, split)


def _gemv_key(n: int, k: int, bits: int | tuple[int, ...], group_size: int, symmetric: bool) -> tuple:
    return (n, k, bits, group_size, symmetric)


def _parts_key(parts: list[Part], k: int, group_size: int) -> tuple:
    bits = parts[0].bits if len(parts) == 1 else tuple(p.bits for p in parts)
    return _gemv_key(sum(p.n for p in parts), k, bits, group_size, parts[0].zeros is None)


def _workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device fp32 accumulator + arrival counters for split-K, left zeroed by every launch."""
    ws, cnt = _workspaces.get(device, (None, None))
    if ws is None or ws.numel() < n:
        ws = torch.zeros(max(n, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(ws.numel() // 16 + 1, dtype=torch.int32, device=device)
        _workspaces[device] = (ws, cnt)
    return ws, cnt


def _splits(k: int, cfg: GemvConfig) -> tuple[int, int]:
    """(K splits, tiles per split): at most cfg.split, dividing the tiles evenly."""
    tiles = k // (32 * cfg.block_r)
    split = max(1, min(cfg.split, tiles))
    while tiles % split:
        split -= 1
    return split, tiles // split


def _launch_gemv(x, parts: list[Part], y, group_size: int, cfg: GemvConfig, out_index=None) -> None:
    """y[0, :] = x[0] @ W for the parts' matrices side by side (columns through `out_index`), ≤ MAX_PARTS
    parts per launch."""
    k = x.shape[1]
    split, per_split = _splits(k, cfg)
    if len(parts) == 1 and out_index is None:
        p = parts[0]
        ws, cnt = _workspace(x.device, p.n) if split > 1 else (y, y)
        _gemv_one_kernel[(triton.cdiv(p.n, cfg.block_n), split)](
            x, p.qweight, p.scales, p.scales if p.zeros is None else p.zeros, y, ws, cnt, p.n, k, group_size,
            per_split, BITS=p.bits, SYM=p.zeros is None, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
            SPLIT=split > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return
    col = 0
    for first in range(0, len(parts), MAX_PARTS):
        chunk = parts[first:first + MAX_PARTS]
        blocks, cols, starts = [], [], []
        for p in chunk:
            starts.append(sum(blocks))
            blocks.append(triton.cdiv(p.n, cfg.block_n))
            cols.append(col)
            col += p.n
        ws, cnt = _workspace(x.device, y.shape[1]) if split > 1 else (y, y)
        args = []
        for i in range(MAX_PARTS):
            p = chunk[min(i, len(chunk) - 1)]  # absent parts repeat the last one (never run)
            args += [p.qweight, p.scales, p.scales if p.zeros is None else p.zeros, p.n,
                     cols[i] if i < len(chunk) else 0]
            if i > 0:
                args.append(starts[i] if i < len(chunk) else _NO_PART)
        widths = [p.bits for p in chunk] + [chunk[-1].bits] * (MAX_PARTS - len(chunk))
        _gemv_kernel[(sum(blocks), split)](
            x, y, ws, cnt, y if out_index is None else out_index, k, group_size, per_split, *args,
            B0=widths[0], B1=widths[1], B2=widths[2], B3=widths[3], PARTS=len(chunk), SYM=chunk[0].zeros is None,
            BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, SPLIT=split > 1, PERMUTE=out_index is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


def _gemm_tiles(m: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps); fp32 tiles stay small (they spill at 64-wide K)."""
    if dtype == torch.float32:
        return 16 if m <= 16 else 32, 64, 32, 4
    if m <= GEMM_MAX_M:
        return (16 if m <= 16 else (32 if m <= 32 else 64)), 64, 64, 4
    return 128, 128, 64, 8


def _launch_gemm(x, part: Part, y, group_size: int, col0: int = 0, out_index=None) -> None:
    m, k = x.shape
    block_m, block_n, block_k, warps = _gemm_tiles(m, x.dtype)
    block_k = block_k if group_size % block_k == 0 else 32
    _gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(part.n, block_n))](
        x, part.qweight, part.scales, part.scales if part.zeros is None else part.zeros, y,
        y if out_index is None else out_index, col0, m, part.n, k, group_size, x.stride(0), y.stride(0),
        BITS=part.bits, SYM=part.zeros is None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PERMUTE=out_index is not None,
        num_warps=warps, num_stages=3,
    )


def _dequantize_into(out, part: Part, group_size: int, col0: int = 0, out_index=None) -> None:
    """Write the part's (K, N) float weight into columns of `out` (K, total) — one kernel."""
    k = out.shape[0]
    block_k = 64 if group_size % 64 == 0 else 32
    _dequant_kernel[(k // block_k, triton.cdiv(part.n, 128))](
        part.qweight, part.scales, part.scales if part.zeros is None else part.zeros, out,
        out if out_index is None else out_index, col0, part.n, k, group_size, out.stride(0),
        BITS=part.bits, SYM=part.zeros is None, BLOCK_K=block_k, BLOCK_N=128, PERMUTE=out_index is not None,
        num_warps=4,
    )


def dequantize(qweight, scales, zeros, bits: int, group_size: int, in_features: int, dtype: torch.dtype):
    """(in_features, N) weight in `dtype`, written by one kernel."""
    out = torch.empty(in_features, qweight.shape[1], dtype=dtype, device=qweight.device)
    _dequantize_into(out, Part(qweight, scales, zeros, bits), group_size)
    return out


def _parts_mm(x, parts: list[Part], group_size: int, out_index=None):
    """x (M, K) @ [W_0 | W_1 | ...] with output columns through `out_index` (None: in order) → (M, ΣN)."""
    m, k = x.shape
    n = sum(p.n for p in parts)
    if m > GEMM_MAX_M and not FUSED_LARGE_M:  # prefill: the float weight once, then cuBLAS
        w = torch.empty(k, n, dtype=x.dtype, device=x.device)
        col = 0
        for p in parts:
            _dequantize_into(w, p, group_size, col, out_index)
            col += p.n
        return x @ w
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 1:
        cfg = _tuned.get(_parts_key(parts, k, group_size)) or default_gemv_config(
            n, k, tuple(p.bits for p in parts), group_size, x.device)
        _launch_gemv(x, parts, y, group_size, cfg, out_index)
    else:
        col = 0
        for p in parts:
            _launch_gemm(x, p, y, group_size, col, out_index)
            col += p.n
    return y


def _lowbit_mm(x, qweight, scales, zeros, bits: int, group_size: int):
    return _parts_mm(x, [Part(qweight, scales, zeros, bits)], group_size)


@torch.library.custom_op("hfqat::lowbit_mm", mutates_args=())
def lowbit_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              bits: int, group_size: int) -> torch.Tensor:
    """x (M, K) @ packed weight → (M, N) in x's dtype."""
    return _lowbit_mm(x, qweight, scales, zeros, bits, group_size)


@lowbit_mm.register_fake
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty(x.shape[0], qweight.shape[1])


def _rows_mm(x, qweights, scales, zeros, bits, group_size: int, out_index):
    parts = [Part(q, s, zeros[i] if zeros else None, b)
             for i, (q, s, b) in enumerate(zip(qweights, scales, bits, strict=True))]
    return _parts_mm(x, parts, group_size, out_index)


@torch.library.custom_op("hfqat::lowbit_rows_mm", mutates_args=())
def lowbit_rows_mm(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor],
                   zeros: list[torch.Tensor], bits: list[int], group_size: int,
                   out_index: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ a per-row layer's width blocks → (M, N): part i's column j lands in ``out_index[Σ_{<i} N + j]``
    (one launch for batch 1; `zeros` empty when symmetric)."""
    return _rows_mm(x, qweights, scales, zeros, bits, group_size, out_index)


@lowbit_rows_mm.register_fake
def _(x, qweights, scales, zeros, bits, group_size, out_index):
    return x.new_empty(x.shape[0], out_index.shape[0])


def experts_mv(x, expert_ids, expert_index, qweights, scales, zeros, bits, group_size: int):
    """y[t, j] = x[t] @ W_{expert_ids[t, j]}ᵀ → (rows, slots, N) in x's dtype, one launch per width (see
    `hfqat.export.kernels.experts` for the arguments). ``x`` (rows, K) contiguous."""
    rows, slots = expert_ids.shape
    pairs, k, n = rows * slots, x.shape[1], qweights[0].shape[2]
    y = torch.empty(rows, slots, n, dtype=x.dtype, device=x.device)
    cfg = default_gemv_config(n * pairs, k, tuple(bits), group_size, x.device)
    split, per_split = _splits(k, cfg)
    ws, cnt = _workspace(x.device, pairs * n) if split > 1 else (y, y)
    ids = expert_ids.reshape(-1)
    for g, (q, s, b) in enumerate(zip(qweights, scales, bits, strict=True)):
        z = zeros[g] if zeros else s
        _experts_gemv_kernel[(triton.cdiv(n, cfg.block_n), split, pairs)](
            x, ids, expert_index[g], q, s, z, y, ws, cnt, expert_index.shape[1], slots, x.stride(0), q.stride(0),
            s.stride(0), n, k, group_size, per_split, BITS=b, SYM=not zeros, BLOCK_N=cfg.block_n,
            BLOCK_R=cfg.block_r, SPLIT=split > 1, ZERO_OTHERS=g == 0, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return y


# -- backend ------------------------------------------------------------------------------------------------
def applies(layer, dtype: torch.dtype) -> bool:
    if layer.bits not in KERNEL_BITS or layer.in_features % 32 or layer.group_size % 32:
        return False
    if dtype not in ACTIVATION_DTYPES:
        return False
    if layer.zeros is not None:
        # the exponent trick needs (code - zero)·2^pos exact in fp32: zero points near the code range
        lo, hi = int(layer.zeros.min()), int(layer.zeros.max())
        if lo < -(1 << layer.bits) or hi >= 1 << (layer.bits + 1):
            return False
    return True


def backend(layer, device: torch.device, dtype: torch.dtype):
    if not applies(layer, dtype):
        return None
    _workspace(layer.qweight.device, layer.out_features)  # now, not inside a CUDA-graph capture or warm-up
    return _triton_matmul


def _op(name: str):
    """The custom op while torch.compile traces (opaque to it); the plain function in eager mode, where the
    op's dispatch would cost more than a decode GEMV takes."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.hfqat, name)
    return _EAGER[name]


_EAGER = {"lowbit_mm": _lowbit_mm, "lowbit_rows_mm": _rows_mm}


def _triton_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    y = _op("lowbit_mm")(x.reshape(-1, layer.in_features).contiguous(), layer.qweight, layer.scales,
                         layer.zeros, layer.bits, layer.group_size)
    y = y.reshape(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


def rows_backend(layer, device: torch.device, dtype: torch.dtype):
    """The fused per-row path (`hfqat.export.packed.PackedRowsLinear`): every width block in one launch, the
    output order applied by the kernel's stores. Sets up ``layer._out_index`` (position in the blocks →
    output column), the inverse of ``output_order``."""
    if device.type != "cuda" or not all(applies(part, dtype) for part in layer.parts):
        return None
    out_index = torch.argsort(layer.output_order.long()).to(torch.int32)
    layer.register_buffer("_out_index", out_index, persistent=False)
    _workspace(out_index.device, layer.out_features)
    return _triton_rows_matmul


def _triton_rows_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    parts = layer.parts
    zeros = [] if layer.symmetric else [p.zeros for p in parts]
    y = _op("lowbit_rows_mm")(x.reshape(-1, layer.in_features).contiguous(), [p.qweight for p in parts],
                              [p.scales for p in parts], zeros, [p.bits for p in parts], layer.group_size,
                              layer._out_index)
    y = y.reshape(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


def layer_parts(layer) -> tuple[list[Part], torch.Tensor | None]:
    """The launch parts of a `PackedLinear` (one) or a `PackedRowsLinear` (its width blocks, with the output
    index of `rows_backend`)."""
    if hasattr(layer, "parts"):
        out_index = getattr(layer, "_out_index", None)
        if out_index is None:
            out_index = torch.argsort(layer.output_order.long()).to(torch.int32)
        return [Part(p.qweight, p.scales, p.zeros, p.bits) for p in layer.parts], out_index
    return [Part(layer.qweight, layer.scales, layer.zeros, layer.bits)], None


# -- tuning -------------------------------------------------------------------------------------------------
def tune_gemv(layer, dtype: torch.dtype = torch.bfloat16, verbose: bool = False) -> GemvConfig:
    """Time the candidate launch configurations on this layer's shape (CUDA) and keep the fastest.

    `layer`: a `PackedLinear` or a `PackedRowsLinear`. Timed as CUDA-graph replays, so launch overhead does not
    drown microsecond kernels. The choice is shared by every layer of the same (N, K, bits, group size,
    symmetry).
    """
    from triton.testing import do_bench_cudagraph

    parts, out_index = layer_parts(layer)
    n, k = layer.out_features, layer.in_features
    key = _parts_key(parts, k, layer.group_size)
    x = torch.randn(1, k, device=parts[0].qweight.device, dtype=dtype)
    y = torch.empty(1, n, device=x.device, dtype=dtype)
    _workspace(x.device, n)  # allocated outside the graphs
    timings = {}
    for block_n, block_r, warps in GEMV_CANDIDATES:
        if not all(_fits(p.bits, layer.group_size, block_r) for p in parts):
            continue
        for split in SPLIT_CANDIDATES:
            if split > k // (32 * block_r):
                continue
            cfg = GemvConfig(block_n, block_r, warps, 1, split)

            def run(cfg=cfg):
                _launch_gemv(x, parts, y, layer.group_size, cfg, out_index)

            run()  # compile outside the graph
            timings[cfg] = do_bench_cudagraph(run, rep=10, return_mode="median")
    best = min(timings, key=timings.get)
    _tuned[key] = best
    if verbose:
        default = default_gemv_config(n, k, tuple(p.bits for p in parts), layer.group_size, x.device)
        print(f"tune_gemv N={n} K={k} bits={key[2]}: best {best} {timings[best] * 1e3:.1f} us; "
              f"default {default} {timings.get(default, float('nan')) * 1e3:.1f} us")
    return best

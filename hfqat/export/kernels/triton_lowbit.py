"""Triton kernels for packed low-bit weights (layout `hfqat.export.packing`): 2/3/4/8 bits, symmetric or with zero
points, any group size that is a multiple of 32 (per channel included). Codes are unpacked in registers.

- ``M == 1`` (batch-1 decode): `_gemv_kernel`. Each packed word is loaded once (coalesced along the output
  channels) and its codes are turned into floats without int→float conversions: a code field ``u`` at bit
  ``pos < 16`` of a word, OR-ed into the exponent bits of 2^23, reads as the float ``2^23 + u·2^pos``; one
  subtraction of ``2^23 + z·2^pos`` gives ``(u - z)·2^pos`` exactly, and the matching activation is pre-scaled
  by ``2^-pos`` (exact). Per code: one AND/OR, one FADD, one FFMA (+ one shift per 16-bit half word). Group
  scales are applied once per tile. Optional split-K: partial sums go to a workspace with fp32 atomics and the
  last program of each column block writes the output and re-zeroes the workspace, so one launch suffices.
- ``2 ≤ M ≤ GEMM_MAX_M``: `_gemm_kernel`, dequantized tiles fed to ``tl.dot`` (tensor cores).
- larger M (prefill): `_dequant_kernel` writes the float weight once, then cuBLAS does the matmul.

All math is fp32 apart from the tensor-core inputs (the activation dtype, as in the dequantize fallback).
The entry point is the custom op ``torch.ops.hfqat.lowbit_mm`` (opaque to torch.compile, CUDA-graph safe).

Measured on an H100 (bench/bench_decode.py, batch-1 bf16, 8B-Llama shapes, CUDA-graph replays): 4-bit GEMV
14336x4096 in 19.7 us (1.58 TB/s of packed bytes; bf16 cuBLAS 41.8 us), 4096x4096 in 9.0 us. The kernel is
instruction-bound rather than bandwidth-bound (2-bit runs barely faster than 4-bit, 3-bit slower); torch's
tinygemm does 4-bit faster (16.9 / 5.9 us), so it is preferred there. The fused large-M GEMM
(`FUSED_LARGE_M`) ran prefill at 0.41x of bf16 against 0.88x for dequantize+cuBLAS, hence off by default.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

KERNEL_BITS = (2, 3, 4, 8)
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
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, group, tiles_per_split,
                 BITS: tl.constexpr, SYM: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr):
    """y[n] = Σ_k x[k]·(q[k,n] - z)·s; a tile is BLOCK_R·32 inputs inside one scale group.

    Bit widths are a single plane (2, 4, 8) or, for 3, a 2-bit plane (with the zero point) plus a 1-bit plane.
    The words of tile t+1 are loaded before tile t is computed (register double buffering).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_w = mask_n[None, :]
    P0: tl.constexpr = 2 if BITS == 3 else BITS
    t0 = pid_k * tiles_per_split  # the launcher makes the splits divide the tiles evenly
    acc0 = tl.zeros((BLOCK_R * P0, BLOCK_N), dtype=tl.float32)
    w0 = _load_plane(w_ptr, 0, t0, offs_n, mask_w, N, P0, BLOCK_R)
    if BITS == 3:
        acc1 = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        w1 = _load_plane(w_ptr, K // 16, t0, offs_n, mask_w, N, 1, BLOCK_R)
    for i in range(tiles_per_split):
        t = t0 + i
        more = mask_w & (i + 1 < tiles_per_split)
        w0_next = _load_plane(w_ptr, 0, t + 1, offs_n, more, N, P0, BLOCK_R)
        if BITS == 3:
            w1_next = _load_plane(w_ptr, K // 16, t + 1, offs_n, more, N, 1, BLOCK_R)
        g = (t * BLOCK_R * 32) // group
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
        if SYM:
            zf = 1.0 * (1 << (BITS - 1))
        else:
            zf = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        acc0 += _plane_dot(w0, x_ptr, t, zf, P0, 0, BLOCK_R) * s
        w0 = w0_next
        if BITS == 3:
            acc1 += _plane_dot(w1, x_ptr, t, 0.0, 1, 2, BLOCK_R) * s
            w1 = w1_next
    y = tl.sum(acc0, axis=0)
    if BITS == 3:
        y += tl.sum(acc1, axis=0)
    if SPLIT:
        tl.atomic_add(ws_ptr + offs_n, y, mask=mask_n)
        tl.debug_barrier()  # every thread's partial sum is in before the arrival is counted
        done = tl.atomic_add(cnt_ptr + pid_n, 1)
        if done == tl.num_programs(1) - 1:  # last arrival: all partial sums are in (read them through L2)
            total = tl.atomic_add(ws_ptr + offs_n, tl.zeros_like(y), mask=mask_n)
            tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=mask_n)
            tl.store(ws_ptr + offs_n, tl.zeros_like(y), mask=mask_n)
            tl.store(cnt_ptr + pid_n, 0)
    else:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _codes(w_ptr, kk, offs_n, mask_n, N, K, BITS: tl.constexpr):
    """Unsigned codes (len(kk), BLOCK_N) int32 of input features kk (gathered; words re-read per code)."""
    r = kk // 32
    j = kk % 32
    if BITS == 3:
        a = tl.load(w_ptr + (r * 2 + j // 16)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        c = tl.load(w_ptr + (K // 16 + r)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        q = ((a >> ((j % 16) * 2)[:, None]) & 3) | (((c >> j[:, None]) & 1) << 2)
    else:
        w = tl.load(w_ptr + (kk // (32 // BITS))[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        q = (w >> ((kk % (32 // BITS)) * BITS)[:, None]) & ((1 << BITS) - 1)
    return q


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, group, stride_xm, stride_ym,
                 BITS: tl.constexpr, SYM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
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
    y_mask = (offs_m[:, None] < M) & mask_n[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, group, BITS: tl.constexpr, SYM: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out (K, N) = (q - z)·s in out's dtype (the same values as the exact fallback's weight)."""
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    q = _codes(w_ptr, kk, offs_n, mask_n, N, K, BITS)
    meta = (kk // group)[:, None] * N + offs_n[None, :]
    s = tl.load(s_ptr + meta, mask=mask_n[None, :], other=0.0)
    if SYM:
        z = 1 << (BITS - 1)
    else:
        z = tl.load(z_ptr + meta, mask=mask_n[None, :], other=0).to(tl.int32)
    w = (q - z).to(tl.float32) * s
    tl.store(out_ptr + kk[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


# -- launch configuration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int  # 1: the kernel double-buffers its loads itself
    split: int  # programs along K; 1 = no split (no atomics)


GEMV_CANDIDATES = ((128, 4, 4), (256, 2, 4), (64, 4, 2), (128, 2, 4), (256, 1, 4))  # (block_n, block_r, warps)
SPLIT_CANDIDATES = (1, 2, 4, 8, 16)
MAX_TILE_ROWS = 16  # word rows per plane tile; more spills registers (8-bit at block_r=4 needs ~240)
_tuned: dict[tuple, GemvConfig] = {}
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _first_plane(bits: int) -> int:
    return 2 if bits == 3 else bits


def _fits(bits: int, group_size: int, block_r: int) -> bool:
    return group_size % (32 * block_r) == 0 and block_r * _first_plane(bits) <= MAX_TILE_ROWS


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_gemv_config(n: int, k: int, bits: int, group_size: int, device: torch.device) -> GemvConfig:
    """Used when no tuned entry exists. On an H100 the tuned choices for 8B-Llama shapes were 64-256 column
    blocks with 8-16 K splits (~1000 programs); 64 columns, 2 warps and up to 16 splits were within ~10%."""
    block_r = next(r for r in (4, 2, 1) if _fits(bits, group_size, r))
    tiles = k // (32 * block_r)
    split = 1
    while split * 2 <= min(tiles, 16) and triton.cdiv(n, 64) * split < 8 * _sm_count(device):
        split *= 2
    return GemvConfig(64, block_r, 2, 1, split)


def _gemv_key(n: int, k: int, bits: int, group_size: int, symmetric: bool) -> tuple:
    return (n, k, bits, group_size, symmetric)


def _workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device fp32 accumulator + arrival counters for split-K, left zeroed by every launch."""
    ws, cnt = _workspaces.get(device, (None, None))
    if ws is None or ws.numel() < n:
        ws = torch.zeros(max(n, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(ws.numel() // 16 + 1, dtype=torch.int32, device=device)
        _workspaces[device] = (ws, cnt)
    return ws, cnt


def _launch_gemv(x, qweight, scales, zeros, y, bits, group_size, cfg: GemvConfig) -> None:
    k = x.shape[1]
    n = qweight.shape[1]
    tiles = k // (32 * cfg.block_r)
    split = max(1, min(cfg.split, tiles))
    while tiles % split:
        split -= 1
    per_split = tiles // split
    ws, cnt = _workspace(x.device, n) if split > 1 else (y, y)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, qweight, scales, scales if zeros is None else zeros, y, ws, cnt, n, k, group_size, per_split,
        BITS=bits, SYM=zeros is None, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
        SPLIT=split > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _gemm_tiles(m: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps); fp32 tiles stay small (they spill at 64-wide K)."""
    if dtype == torch.float32:
        return 16 if m <= 16 else 32, 64, 32, 4
    if m <= GEMM_MAX_M:
        return (16 if m <= 16 else (32 if m <= 32 else 64)), 64, 64, 4
    return 128, 128, 64, 8


def _launch_gemm(x, qweight, scales, zeros, y, bits, group_size) -> None:
    m, k = x.shape
    n = qweight.shape[1]
    block_m, block_n, block_k, warps = _gemm_tiles(m, x.dtype)
    block_k = block_k if group_size % block_k == 0 else 32
    _gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, qweight, scales, scales if zeros is None else zeros, y, m, n, k, group_size, x.stride(0), y.stride(0),
        BITS=bits, SYM=zeros is None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=3,
    )


def dequantize(qweight, scales, zeros, bits: int, group_size: int, in_features: int, dtype: torch.dtype):
    """(in_features, N) weight in `dtype`, written by one kernel."""
    n = qweight.shape[1]
    out = torch.empty(in_features, n, dtype=dtype, device=qweight.device)
    block_k = 32
    _dequant_kernel[(in_features // block_k, triton.cdiv(n, 128))](
        qweight, scales, scales if zeros is None else zeros, out, n, in_features, group_size,
        BITS=bits, SYM=zeros is None, BLOCK_K=block_k, BLOCK_N=128, num_warps=4,
    )
    return out


def _lowbit_mm(x, qweight, scales, zeros, bits: int, group_size: int):
    m, k = x.shape
    n = qweight.shape[1]
    if m > GEMM_MAX_M and not FUSED_LARGE_M:
        return x @ dequantize(qweight, scales, zeros, bits, group_size, k, x.dtype)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 1:
        cfg = _tuned.get(_gemv_key(n, k, bits, group_size, zeros is None)) or default_gemv_config(
            n, k, bits, group_size, x.device)
        _launch_gemv(x, qweight, scales, zeros, y, bits, group_size, cfg)
    else:
        _launch_gemm(x, qweight, scales, zeros, y, bits, group_size)
    return y


@torch.library.custom_op("hfqat::lowbit_mm", mutates_args=())
def lowbit_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              bits: int, group_size: int) -> torch.Tensor:
    """x (M, K) @ packed weight → (M, N) in x's dtype."""
    return _lowbit_mm(x, qweight, scales, zeros, bits, group_size)


@lowbit_mm.register_fake
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty(x.shape[0], qweight.shape[1])


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
    return _triton_matmul if applies(layer, dtype) else None


def _triton_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.hfqat.lowbit_mm(x.reshape(-1, layer.in_features).contiguous(), layer.qweight, layer.scales,
                                  layer.zeros, layer.bits, layer.group_size)
    y = y.reshape(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


# -- tuning -------------------------------------------------------------------------------------------------
def tune_gemv(layer, dtype: torch.dtype = torch.bfloat16, verbose: bool = False) -> GemvConfig:
    """Time the candidate launch configurations on this layer's shape (CUDA) and keep the fastest.

    Timed as CUDA-graph replays, so launch overhead does not drown microsecond kernels. The choice is shared
    by every layer of the same (N, K, bits, group size, symmetry).
    """
    from triton.testing import do_bench_cudagraph

    n, k = layer.out_features, layer.in_features
    key = _gemv_key(n, k, layer.bits, layer.group_size, layer.zeros is None)
    x = torch.randn(1, k, device=layer.qweight.device, dtype=dtype)
    y = torch.empty(1, n, device=x.device, dtype=dtype)
    _workspace(x.device, n)  # allocated outside the graphs
    timings = {}
    for block_n, block_r, warps in GEMV_CANDIDATES:
        if not _fits(layer.bits, layer.group_size, block_r):
            continue
        for split in SPLIT_CANDIDATES:
            if split > k // (32 * block_r):
                continue
            cfg = GemvConfig(block_n, block_r, warps, 1, split)

            def run(cfg=cfg):
                _launch_gemv(x, layer.qweight, layer.scales, layer.zeros, y, layer.bits, layer.group_size, cfg)

            run()  # compile outside the graph
            timings[cfg] = do_bench_cudagraph(run, rep=10, return_mode="median")
    best = min(timings, key=timings.get)
    _tuned[key] = best
    if verbose:
        default = default_gemv_config(n, k, layer.bits, layer.group_size, x.device)
        print(f"tune_gemv N={n} K={k} bits={layer.bits}: best {best} {timings[best] * 1e3:.1f} us; "
              f"default {default} {timings.get(default, float('nan')) * 1e3:.1f} us")
    return best

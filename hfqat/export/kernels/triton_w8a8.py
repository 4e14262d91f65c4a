"""Triton kernels of the W8A8 layers (`hfqat.export.kernels.w8a8`): the per-token activation quantizer in one pass,
and the int8 GEMM with the per-token × per-channel rescale fused into its epilogue.

- `quantize_per_token` (op ``hfqat::quantize_per_token``): one program per token row; the row (up to
  `MAX_BLOCK_K` elements; longer rows read the rest twice) is loaded once into registers, its amax reduced, the
  scale computed and the codes written, int8 or e4m3, with fp32 (M, 1) scales. Bit for bit vLLM's quantizers as
  hfqat trains with them (`hfqat.quant.primitives.quantize_activations_int8` / `_fp8`): the same fp32 products and
  IEEE reciprocals (``div_rn``; Triton's ``/`` is approximate on the GPU), and rounding done in fp32 arithmetic
  that is exact on every target (half to even by adding and subtracting 1.5·2^23; e4m3 by rounding at the value's
  own step, so the final cast meets a representable value and its rounding mode does not matter). That also makes
  the kernel check out exactly under ``TRITON_INTERPRET=1``, whose own fp8 cast rounds differently from the GPU's.
- `int8_scaled_mm` (op ``hfqat::int8_scaled_mm``): ``y = (q_x · q_wᵀ) · s_x · s_w`` with int32 tensor-core
  accumulators (``tl.dot`` on int8), rescaled in fp32 in registers and stored in the activation dtype: the int32
  product never goes to memory (for 8192 tokens × 14336 channels that is 470 MB of traffic saved against
  ``torch._int_mm`` + a rescale pass). Operands arrive through TMA tensor descriptors (both K-major, as Hopper's
  int8 wgmma wants them; out-of-range tiles read as zeros); tiles are visited in groups of `GROUP_M` row blocks so
  that a group's weight columns stay in L2. Two schedules (`GEMM_SCHEDULE`): a program per output tile, or
  persistent (a program per SM looping over the tiles, loops flattened so that a tile's epilogue overlaps the next
  tile's loads). Tile shapes are autotuned per (N, K, M rounded up to a power of two, output dtype) over
  `MM_CONFIGS`: the first call of each such key times them all (about a second, once per process). Same numerics
  as the reference ``(int32 product).float() * s_x * s_w`` cast to the output dtype, in that order: exact integer
  sums, then the same three roundings (vLLM's CUTLASS epilogue multiplies the channel scale first; either order is
  within one fp32 rounding).

Both ops are opaque to torch.compile (fake implementations give the shapes); eager calls skip the op dispatcher.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ...quant.primitives import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, INT8_MAX

MAX_BLOCK_K = 16384  # longest row the quantizer holds in registers (Llama-3-8B's down_proj reads 14336)
GROUP_M = 8
_ROUND = tl.constexpr(12582912.0)  # 1.5·2^23: v + this rounds v (|v| < 2^22) to an integer, half to even
_FP8_MAX = tl.constexpr(FP8_MAX)
_FP8_MIN_SCALE = tl.constexpr(FP8_MIN_SCALE)
_INT8_MAX = tl.constexpr(INT8_MAX)
_INV_FP8_MAX = tl.constexpr(1 / FP8_MAX)  # fp32 constants: the products the torch quantizers compute
_INV_INT8_MAX = tl.constexpr(1 / INT8_MAX)


# -- per-token activation quantizer --------------------------------------------------------------------------
@triton.jit
def _round_half_even(v):
    # exact for |v| < 2^22: the addition's own rounding drops the fraction (v is no product, so no FMA contraction)
    return (v + _ROUND) - _ROUND


@triton.jit
def _round_to_e4m3(v):
    """|v| ≤ 448 rounded half to even onto e4m3's grid, still in fp32 (so the cast after it is exact)."""
    bits = v.to(tl.int32, bitcast=True)
    # e4m3: 3 mantissa bits, smallest normal exponent -6 (below it, subnormal steps of 2^-9)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse_step = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    r = _round_half_even(tl.abs(v) * inverse_step) * step  # powers of two: both products are exact
    # v's sign bit back on (-0.0 included, which e4m3 keeps as 0x80; Triton's negation is 0 - r)
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _codes(x, inverse, FP8: tl.constexpr, dtype: tl.constexpr):
    if FP8:
        v = tl.minimum(tl.maximum(x * inverse, -_FP8_MAX), _FP8_MAX)
        return _round_to_e4m3(v).to(dtype)
    # clamped before rounding (the same for integer bounds), which also keeps x·inverse from fusing into the
    # rounding addition
    v = tl.minimum(tl.maximum(x * inverse, -_INT8_MAX - 1), _INT8_MAX)
    return _round_half_even(v).to(dtype)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, FP8: tl.constexpr, BLOCK_K: tl.constexpr,
                          CHUNKS: tl.constexpr):
    """One token row: amax, scale, codes. The first BLOCK_K elements stay in registers; rows longer than that
    (CHUNKS > 1) read their other chunks twice."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * K
    offs = tl.arange(0, BLOCK_K)
    x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    for c in range(1, CHUNKS):
        o = c * BLOCK_K + offs
        amax = tl.maximum(amax, tl.max(tl.abs(tl.load(x_row + o, mask=o < K, other=0.0).to(tl.float32)), axis=0))
    if FP8:
        scale = tl.maximum(amax * _INV_FP8_MAX, _FP8_MIN_SCALE)
        inverse = tl.math.div_rn(1.0, scale)
    else:
        scale = amax * _INV_INT8_MAX
        inverse = tl.where(amax > 0, tl.math.div_rn(1.0, amax) * _INT8_MAX, 0.0)
    dtype = q_ptr.dtype.element_ty
    tl.store(q_row + offs, _codes(x, inverse, FP8, dtype), mask=offs < K)
    for c in range(1, CHUNKS):
        o = c * BLOCK_K + offs
        x = tl.load(x_row + o, mask=o < K, other=0.0).to(tl.float32)
        tl.store(q_row + o, _codes(x, inverse, FP8, dtype), mask=o < K)
    tl.store(s_ptr + row, scale)


def _quantize_per_token(x: torch.Tensor, kind: str, block_k: int = MAX_BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = torch.empty(m, k, device=x.device, dtype=FP8_DTYPE if kind == "fp8" else torch.int8)
    scales = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(k), block_k)
    if m:
        _quantize_rows_kernel[(m,)](x, codes, scales, k, x.stride(0), FP8=kind == "fp8", BLOCK_K=block,
                                    CHUNKS=triton.cdiv(k, block), num_warps=min(16, max(4, block // 512)),
                                    enable_fp_fusion=False)
    return codes, scales


@torch.library.custom_op("hfqat::quantize_per_token", mutates_args=())
def quantize_per_token_op(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 (M, 1) scales) of vLLM's dynamic per-token quantizer ``kind`` ("int" or "fp8") of x (M, K)."""
    return _quantize_per_token(x, kind)


@quantize_per_token_op.register_fake
def _(x, kind):
    return (torch.empty_like(x, dtype=FP8_DTYPE if kind == "fp8" else torch.int8),
            x.new_empty(x.shape[0], 1, dtype=torch.float32))


def quantize_per_token(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_token_op`; the op while torch.compile traces, the plain launch in eager mode."""
    if torch.compiler.is_compiling():
        return torch.ops.hfqat.quantize_per_token(x, kind)
    return _quantize_per_token(x, kind)


# -- int8 GEMM with the rescale in its epilogue ----------------------------------------------------------------
@triton.jit
def _mm_tile(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, M, N, K, tile, grid_m, grid_n,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile number `tile` (grouped order: GROUP_M row blocks, then the next column block)."""
    per_group = GROUP_M * grid_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    off_m = (first_m + (tile % per_group) % group_rows) * BLOCK_M
    off_n = ((tile % per_group) // group_rows) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for t in range(tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, t * BLOCK_K])
        b = b_desc.load([off_n, t * BLOCK_K])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    sa = tl.load(sa_ptr + rows, mask=rows < M, other=0.0)
    sb = tl.load(sb_ptr + cols, mask=cols < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    c = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c, y.to(c_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _int8_mm_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, M, N, K, M_KEY, OUT_BYTES,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    PERSISTENT: tl.constexpr):
    """c (M, N) = (a (M, K) int8 · b (N, K) int8 ᵀ) · sa (M,) · sb (N,): one tile per program, or (PERSISTENT) one
    program per SM looping over tiles, its loops flattened so one tile's epilogue overlaps the next one's loads.
    ``M_KEY`` (M rounded up to a power of two) and ``OUT_BYTES`` (c's element size) only key the autotuner."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), grid_m * grid_n, tl.num_programs(0), flatten=True):
            _mm_tile(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, M, N, K, tile, grid_m, grid_n,
                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _mm_tile(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, M, N, K, tl.program_id(0), grid_m, grid_n,
                 BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: the descriptors' tile shapes follow the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]


def _config(bm: int, bn: int, bk: int, stages: int, warps: int, persistent: bool = False) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M, "PERSISTENT": persistent},
                         num_stages=stages, num_warps=warps, pre_hook=_set_block_shapes)


# Hopper-sized tiles (128-256 × 128-256 × 64-128, 3-4 stages of shared memory), and two for small M (decode)
_TILES = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 4, 8),
          (128, 128, 128, 4, 8), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (64, 256, 128, 3, 8)]
MM_CONFIGS = {"tiles": [_config(*tile) for tile in _TILES],
              "persistent": [_config(*tile, persistent=True) for tile in _TILES[:6]]}
_TUNED = {schedule: triton.autotune(configs, key=["M_KEY", "N", "K", "OUT_BYTES"])(_int8_mm_kernel)
          for schedule, configs in MM_CONFIGS.items()}
GEMM_SCHEDULE = "tiles"  # or "persistent"; bench/bench_w8a8.py times both
# CPU tensors run only under TRITON_INTERPRET=1 (tests), where nothing can be timed: one small fixed config
INTERPRETER_CONFIG = _config(16, 16, 32, 1, 4)


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (CPU tensors, under the interpreter: 3, so that each program
    loops over several tiles)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def _grid(m: int, n: int, device: torch.device):
    def grid(meta: dict) -> tuple[int]:
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(tiles, _num_sms(device)) if meta["PERSISTENT"] else tiles,)
    return grid


def _int8_scaled_mm(q: torch.Tensor, weight: torch.Tensor, scale_x: torch.Tensor, scale_w: torch.Tensor,
                    out_dtype: torch.dtype, config: triton.Config | None = None,
                    schedule: str | None = None) -> torch.Tensor:
    """`config`: run that one (no autotuning); else the autotuned configs of `schedule` (default
    `GEMM_SCHEDULE`)."""
    m, k = q.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=q.device, dtype=out_dtype)
    if m == 0:
        return out
    # block shapes are placeholders until a config is chosen (`_set_block_shapes`)
    a, b = (TensorDescriptor.from_tensor(t, [16, 16]) for t in (q, weight))
    args = (a, b, out, scale_x, scale_w, m, n, k, triton.next_power_of_2(m), out.element_size())
    if config is None and not q.is_cuda:
        config = INTERPRETER_CONFIG
    grid = _grid(m, n, q.device)
    if config is None:
        schedule = schedule or GEMM_SCHEDULE
        if schedule not in _TUNED:
            raise ValueError(f"schedule={schedule!r} is unknown; allowed values: {list(_TUNED)} or None")
        _TUNED[schedule][grid](*args)
    else:
        _set_block_shapes({"a_desc": a, "b_desc": b, **config.kwargs})
        _int8_mm_kernel[grid(config.kwargs)](*args, **config.kwargs, num_warps=config.num_warps,
                                              num_stages=config.num_stages)
    return out


@torch.library.custom_op("hfqat::int8_scaled_mm", mutates_args=())
def int8_scaled_mm_op(q: torch.Tensor, weight: torch.Tensor, scale_x: torch.Tensor, scale_w: torch.Tensor,
                      out_dtype: torch.dtype, schedule: str | None = None) -> torch.Tensor:
    """(q (M, K) int8 · weight (N, K) int8 ᵀ) · scale_x (M, 1) · scale_w (1, N), fp32 scales, in `out_dtype`."""
    return _int8_scaled_mm(q, weight, scale_x, scale_w, out_dtype, schedule=schedule)


@int8_scaled_mm_op.register_fake
def _(q, weight, scale_x, scale_w, out_dtype, schedule=None):
    return q.new_empty(q.shape[0], weight.shape[0], dtype=out_dtype)


def int8_scaled_mm(q: torch.Tensor, weight: torch.Tensor, scale_x: torch.Tensor, scale_w: torch.Tensor,
                   out_dtype: torch.dtype, schedule: str | None = None) -> torch.Tensor:
    """`int8_scaled_mm_op`; the op while torch.compile traces, the plain launch in eager mode.

    Needs K % 16 == 0 (TMA strides), contiguous operands, and contiguous fp32 scales. `schedule`: one of
    `MM_CONFIGS` (default `GEMM_SCHEDULE`).
    """
    if torch.compiler.is_compiling():
        return torch.ops.hfqat.int8_scaled_mm(q, weight, scale_x, scale_w, out_dtype, schedule)
    return _int8_scaled_mm(q, weight, scale_x, scale_w, out_dtype, schedule=schedule)

r"""Fused Triton kernels for the exact (STE / hard-clamp) fake quantizer on CUDA.

`hfqat.quant.primitives._FakeQuantSTE` dispatches here for plain contiguous CUDA tensors and keeps its torch code as the
fallback (CPU, DTensor shards, strided weights, groups wider than `MAX_GROUP`).

Why: the torch version makes ~6 weight-sized float32 temporaries per pass (upcast, divide, round, clamp, multiply,
downcast); each kernel here reads the weight once and writes once, in the weight's dtype, and the backward kernel
also reduces the learned-scale (LSQ) and zero-point gradients per group in the same pass.

Exactness: every step is the fp32 operation the torch code performs, in the same order: ``x = w / s`` correctly
rounded (``div_rn``, not Triton's default approximate division), round half to even (like ``torch.round``),
clamp, ``(q - z) · s``, one rounding to the output dtype. So the forward equals ``dequantize(quantize(w))``
bit for bit (checked on GPU by ``tests/test_compile.py`` and ``bench/bench_qat_speed.py``).

Layout: a weight (out, in) with groups of ``g`` consecutive input features is, in memory, ``out · in / g`` rows of
``g`` elements, and the scale tensor (out, in / g) holds one value per row. A program handles ``BLOCK_G`` rows.
The bits are one width for the weight, or one per output row (``bits_granularity="row"``: an (out, 1, 1) tensor)
or per group; group row ``r`` reads width ``r // (rows per width)``.
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:  # optional: CPU-only installs have no Triton, and everything falls back to torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SCALE_EPS = 1e-10  # = primitives.SCALE_EPS (not imported: primitives imports this module)
MAX_GROUP = 16384  # widest group (per-channel in_features) a program holds in registers
_ELEMENTS_PER_PROGRAM = 4096
ENABLED = True  # set False to force the torch code (benchmarks compare the two)


@functools.cache
def available() -> bool:
    """Triton importable and a CUDA device present."""
    return triton is not None and torch.cuda.is_available()


def supports(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: torch.Tensor,
             group_size: int) -> bool:
    """Whether the fused kernels apply: plain (non-subclass) contiguous CUDA tensors, one bit width for the weight,
    each output row or each group, a group that fits."""
    tensors = (w, scale) if zero_point is None else (w, scale, zero_point)
    return (
        ENABLED
        and w.is_cuda
        and bits.numel() in (1, w.shape[0], w.numel() // group_size)
        and bits.is_contiguous()
        and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_contiguous() for t in tensors)
        and group_size <= MAX_GROUP
        and available()
    )


if triton is not None:
    _EPS = tl.constexpr(SCALE_EPS)

    @triton.jit
    def _round_half_even(x):
        # = torch.round (rint) for |x| < 2^21; beyond, both land outside every clamp range (|q| <= 255).
        # Written with floor so that the Triton interpreter (which lacks libdevice) runs it too.
        t = x + 0.5
        r = tl.floor(t)
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where((r == t) & odd, r - 1.0, r)

    @triton.jit
    def _grid_bounds(bits_ptr, rows, row_mask, groups_per_width, HAS_Z: tl.constexpr):
        # int_range of each group row's width: symmetric [-2^(b-1), 2^(b-1) - 1]; asymmetric (has a zero point)
        # [0, 2^b - 1]. (BLOCK_G, 1) bounds.
        b = tl.load(bits_ptr + rows // groups_per_width, mask=row_mask, other=2).to(tl.int32)
        if HAS_Z:
            qmax = ((1 << b) - 1).to(tl.float32)
            qmin = tl.zeros_like(qmax)
        else:
            half = (1 << (b - 1)).to(tl.float32)
            qmin = -half
            qmax = half - 1.0
        return qmin[:, None], qmax[:, None]

    @triton.jit
    def _load_tile(w_ptr, s_ptr, z_ptr, n_groups, pid, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_E: tl.constexpr, HAS_Z: tl.constexpr):
        rows = pid * BLOCK_G + tl.arange(0, BLOCK_G)
        cols = tl.arange(0, BLOCK_E)
        row_mask = rows < n_groups
        mask = row_mask[:, None] & (cols[None, :] < GROUP)
        offs = rows[:, None].to(tl.int64) * GROUP + cols[None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s_raw = tl.load(s_ptr + rows, mask=row_mask, other=1.0).to(tl.float32)
        s = tl.maximum(tl.abs(s_raw), _EPS)
        if HAS_Z:
            z = _round_half_even(tl.load(z_ptr + rows, mask=row_mask, other=0.0).to(tl.float32))
        else:
            z = tl.zeros_like(s)
        return rows, row_mask, offs, mask, w, s_raw, s, z

    @triton.jit
    def _fwd(w_ptr, s_ptr, z_ptr, bits_ptr, out_ptr, n_groups, groups_per_width, GROUP: tl.constexpr,
            BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, HAS_Z: tl.constexpr):
        rows, row_mask, offs, mask, w, _s_raw, s, z = _load_tile(
            w_ptr, s_ptr, z_ptr, n_groups, tl.program_id(0), GROUP, BLOCK_G, BLOCK_E, HAS_Z)
        qmin, qmax = _grid_bounds(bits_ptr, rows, row_mask, groups_per_width, HAS_Z)
        q = _round_half_even(tl.div_rn(w, s[:, None]))
        if HAS_Z:
            q = q + z[:, None]
        q = tl.minimum(tl.maximum(q, qmin), qmax)
        if HAS_Z:
            q = q - z[:, None]
        tl.store(out_ptr + offs, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd(w_ptr, s_ptr, z_ptr, bits_ptr, g_ptr, gw_ptr, gs_ptr, gz_ptr, n_groups, groups_per_width,
            GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, HAS_Z: tl.constexpr):
        rows, row_mask, offs, mask, w, s_raw, s, z = _load_tile(
            w_ptr, s_ptr, z_ptr, n_groups, tl.program_id(0), GROUP, BLOCK_G, BLOCK_E, HAS_Z)
        qmin, qmax = _grid_bounds(bits_ptr, rows, row_mask, groups_per_width, HAS_Z)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.div_rn(w, s[:, None])
        r = _round_half_even(x) + z[:, None]
        inside = (r >= qmin) & (r <= qmax)
        tl.store(gw_ptr + offs, tl.where(inside, g, 0.0).to(gw_ptr.dtype.element_ty), mask=mask)
        # LSQ: d(q·s)/ds = (q - z) - x inside the range; through |s| clamped at SCALE_EPS.
        q_minus_z = tl.minimum(tl.maximum(r, qmin), qmax) - z[:, None]
        ds = tl.sum(g * (q_minus_z - tl.where(inside, x, 0.0)), axis=1)
        sign = tl.where(s_raw > 0, 1.0, tl.where(s_raw < 0, -1.0, 0.0))
        ds = ds * sign * (tl.abs(s_raw) > _EPS).to(tl.float32)
        tl.store(gs_ptr + rows, ds.to(gs_ptr.dtype.element_ty), mask=row_mask)
        if HAS_Z:
            dz = tl.sum(tl.where(inside, 0.0, -g * s[:, None]), axis=1)
            tl.store(gz_ptr + rows, dz.to(gz_ptr.dtype.element_ty), mask=row_mask)


def _on(device: torch.device):
    # Triton launches on the current CUDA device; the interpreter (TRITON_INTERPRET=1) also runs on CPU tensors.
    # Switching costs host time on every launch (hundreds per training step): only when the device is another.
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@functools.cache  # a few shapes per model, asked for on every launch
def _launch_shape(n_groups: int, group_size: int) -> tuple[tuple[int], dict]:
    block_e = triton.next_power_of_2(group_size)
    block_g = max(1, _ELEMENTS_PER_PROGRAM // block_e)
    meta = {"GROUP": group_size, "BLOCK_G": block_g, "BLOCK_E": block_e, "num_warps": 8 if block_e >= 4096 else 4}
    return (triton.cdiv(n_groups, block_g),), meta


def forward(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: torch.Tensor,
                       group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``out_dtype`` (exact), one fused pass."""
    out = torch.empty(w.shape, dtype=out_dtype, device=w.device)
    n_groups = w.numel() // group_size
    grid, meta = _launch_shape(n_groups, group_size)
    bits = bits.to(device=w.device, dtype=torch.int32)
    with _on(w.device):
        _fwd[grid](w, scale, zero_point if zero_point is not None else scale, bits, out, n_groups,
                  n_groups // bits.numel(), HAS_Z=zero_point is not None, **meta)
    return out


def backward(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: torch.Tensor,
                        group_size: int, grad: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad_w in w's dtype, grad_scale, grad_zero_point or None) for the STE/LSQ fake quantizer."""
    grad = grad.contiguous()
    grad_w = torch.empty_like(w)
    grad_s = torch.empty_like(scale)
    grad_z = torch.empty_like(zero_point) if zero_point is not None else None
    n_groups = w.numel() // group_size
    grid, meta = _launch_shape(n_groups, group_size)
    bits = bits.to(device=w.device, dtype=torch.int32)
    with _on(w.device):
        _bwd[grid](w, scale, zero_point if zero_point is not None else scale, bits, grad, grad_w, grad_s,
                  grad_z if grad_z is not None else grad_s, n_groups, n_groups // bits.numel(),
                  HAS_Z=zero_point is not None, **meta)
    return grad_w, grad_s, grad_z

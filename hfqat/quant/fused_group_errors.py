r"""Fused Triton kernel: per-group squared errors of one weight under several exact fake quantizers, on CUDA.

The sensitivity estimators (`hfqat.train.sensitivity`) weigh a layer's quantization error at every candidate width
(Fisher: ``½ Σ F (Q_b(w) - w)²``) and search clip ratios (``Σ (Q_{b,c}(w) - w)²`` over widths × shrink factors).
Their torch code builds a (quantizers, out, in) float32 error tensor: several weight-sized temporaries per quantizer,
and on a GPU one fake-quant launch per quantizer and layer (the clip search of a 1B model was launch-bound, the
Fisher weighing bandwidth-bound). Here one launch per weight reads it (and the optional element weights, e.g. the
Fisher ``F``) once and writes, for each of the K quantizers, one sum per group.

Exactness: each element's quantized value is the fp32 computation of `hfqat.quant.fused_fake_quant` (hence of
``dequantize(quantize(w))``), rounded to the weight's dtype first where ``rounded`` says so (a layer's actual
quantizer outputs that dtype); error, square and weighting in fp32. Only the order of the sums differs from the torch
code: within each group here, then over groups by the caller.
"""

from __future__ import annotations

import torch

from . import fused_fake_quant
from .fused_fake_quant import MAX_GROUP, available, triton

if triton is not None:
    import triton.language as tl

    from .fused_fake_quant import _EPS, _launch_shape, _on, _round_half_even

    @triton.jit
    def _group_sums(w_ptr, s_ptr, z_ptr, bits_ptr, rounded_ptr, f_ptr, out_ptr, n_groups, n_quantizers,
                    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, HAS_Z: tl.constexpr,
                    HAS_F: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
        cols = tl.arange(0, BLOCK_E)
        row_mask = rows < n_groups
        mask = row_mask[:, None] & (cols[None, :] < GROUP)
        offs = rows[:, None].to(tl.int64) * GROUP + cols[None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_F:
            f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        for k in range(0, n_quantizers):
            s = tl.load(s_ptr + k * n_groups + rows, mask=row_mask, other=1.0).to(tl.float32)
            s = tl.maximum(tl.abs(s), _EPS)
            b = tl.load(bits_ptr + k)
            q = _round_half_even(tl.div_rn(w, s[:, None]))
            if HAS_Z:  # asymmetric: [0, 2^b - 1] around a rounded zero point
                z = _round_half_even(tl.load(z_ptr + k * n_groups + rows, mask=row_mask, other=0.0).to(tl.float32))
                q = tl.minimum(tl.maximum(q + z[:, None], 0.0), ((1 << b) - 1).to(tl.float32)) - z[:, None]
            else:  # symmetric: [-2^(b-1), 2^(b-1) - 1]
                half = (1 << (b - 1)).to(tl.float32)
                q = tl.minimum(tl.maximum(q, -half), half - 1.0)
            value = q * s[:, None]
            as_weight = value.to(w_ptr.dtype.element_ty).to(tl.float32)
            value = tl.where(tl.load(rounded_ptr + k) != 0, as_weight, value)
            error = value - w
            error = error * error
            if HAS_F:
                error = error * f
            tl.store(out_ptr + k * n_groups + rows, tl.sum(tl.where(mask, error, 0.0), axis=1), mask=row_mask)


def supports(w: torch.Tensor, group_size: int, weight: torch.Tensor | None = None) -> bool:
    """Whether the kernel applies: plain contiguous CUDA tensors (no DTensor shard, no transposed view), a group
    that fits; `fused_fake_quant.ENABLED` switches it off with the other kernels."""
    tensors = (w,) if weight is None else (w, weight)
    return (fused_fake_quant.ENABLED and w.is_cuda and group_size <= MAX_GROUP
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_contiguous() for t in tensors)
            and (weight is None or weight.shape == w.shape) and available())


def group_error_sums(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: torch.Tensor,
                     rounded: torch.Tensor, group_size: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(K, out, in // group_size) float32: per group, ``Σ weight · (Q_k(w) - w)²`` for K exact quantizers.

    ``scale`` / ``zero_point``: (K, out, in // group_size) (``zero_point`` None: symmetric grids); ``bits`` and
    ``rounded``: (K,) int32 on ``w``'s device (``rounded`` ≠ 0: round quantizer k's values to ``w``'s dtype before
    the error); ``weight``: None (all 1) or a tensor of ``w``'s shape.
    """
    quantizers, out_features = scale.shape[0], w.shape[0]
    n_groups = w.numel() // group_size
    out = torch.empty((quantizers, out_features, n_groups // out_features), dtype=torch.float32, device=w.device)
    grid, meta = _launch_shape(n_groups, group_size)
    scale = scale.float().contiguous()
    zero = zero_point.float().contiguous() if zero_point is not None else scale
    with _on(w.device):
        _group_sums[grid](w, scale, zero, bits, rounded, weight if weight is not None else w, out, n_groups,
                          quantizers, HAS_Z=zero_point is not None, HAS_F=weight is not None, **meta)
    return out

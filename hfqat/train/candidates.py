r"""The candidate quantizers of every layer: what it would compute at each bit width it may take, and their errors.

The sensitivity estimators (`hfqat.train.sensitivity`) price ``Q_b(W) - W`` and the calibration
(`hfqat.train.calibration`) runs the model with ``Q_b(W)``. ``Q_b`` for the layer's current bits is its actual
quantizer (learned scales); for other bits it is the quantizer `set_bits` would start from, approximated cheaply by
the min-max grid shrunk by a per-layer clip ratio (`fit_clip_ratios`, refit at every re-allocation) so that low bit
widths are not penalised for the outliers a real clip search would cut off. Codebook layers (`hfqat.quant.codebook`)
provide their own stand-ins instead (k-means codebooks per bit width, refit at the same moments:
`FakeQuantMixin.refit_candidates` / `candidate_errors`).

Cost: on CUDA the clip search and the weighing of errors (Fisher, Hutchinson) run through one fused kernel per layer
(`hfqat.quant.fused_group_errors`: every width, or every width × shrink factor, in one pass over the weight, no error
tensor) and each candidate weight through one fused fake-quant pass in the weight's dtype; no host sync but one per
clip re-fit of the whole model. Elsewhere the torch code below (the same values; sums in another order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache

import torch

from ..quant import fused_fake_quant, fused_group_errors
from ..quant.layers import FakeQuantMixin, QATConv1D
from ..quant.primitives import MSE_SHRINK_GRID, SCALE_EPS

CLIP_GRID = MSE_SHRINK_GRID[::4]  # per-layer clip search: a coarse grid is enough for a sensitivity estimate
# Groups of each row the clip search reads (evenly spaced): one ratio per layer and width needs no more than a
# sample (thousands of rows × this), and re-fits after every re-allocation then cost a fraction of a step. The
# same columns on every row shard (FSDP2 shards rows), so shards add up to the whole layer's choice.
CLIP_GROUPS_PER_ROW = 8
# Float32 elements of one batch of clip-search grids in the torch code, by device type: on an accelerator large (0.5
# GiB per temporary: launch-bound there; CUDA runs the fused kernel instead), on a CPU within its caches (a batch that
# spills them is slower than one factor at a time).
CLIP_BATCH_ELEMENTS = {"cpu": 2**18}
CLIP_BATCH_ELEMENTS_ACCELERATOR = 2**27


def as_oi(layer: FakeQuantMixin, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor (e.g. a gradient) in (out, in) layout."""
    return tensor.t() if isinstance(layer, QATConv1D) else tensor


@lru_cache(maxsize=1024)
def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Cached: creating a small CUDA tensor from Python data copies from pageable memory, which waits for the GPU.
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


@lru_cache(maxsize=256)
def _ints(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)  # cached, as `_constant`


@lru_cache(maxsize=256)
def _bounds(bit_choices: tuple[int, ...], symmetric: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmin, qmax), (bits, 1, 1) float32, of the integer grids; cached (no small kernels per layer and call)."""
    bits = _constant(tuple(float(b) for b in bit_choices), device)
    if symmetric:
        return -torch.exp2(bits - 1), torch.exp2(bits - 1) - 1
    return torch.zeros_like(bits), torch.exp2(bits) - 1


@torch.no_grad()
def _grid_scales(w: torch.Tensor, bit_choices: tuple[int, ...], shrink: tuple[float, ...], group_size: int,
                 symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(scale, zero point or None (symmetric), qmin, qmax) of the min-max grids shrunk by ``shrink`` (one factor per
    bit width): (bits, out, groups) float32 scales and zero points, (bits, 1, 1) bounds. Scales and zero points are
    those of ``init_scales(..., "minmax")`` times the shrink; zero points are shrink-invariant."""
    out_features, in_features = w.shape
    grouped = w.reshape(1, out_features, in_features // group_size, group_size)  # extrema are exact in w's dtype
    shrink = _constant(tuple(float(c) for c in shrink), w.device)
    qmin, qmax = _bounds(tuple(bit_choices), symmetric, w.device)
    if symmetric:
        return (grouped.abs().amax(-1).float() * shrink / qmax).clamp_min(SCALE_EPS), None, qmin, qmax
    lo, hi = grouped.amin(-1).float().clamp(max=0), grouped.amax(-1).float().clamp(min=0)
    base = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
    zero = torch.clamp(torch.round(-lo / base), qmin, qmax)
    return (base * shrink).clamp_min(SCALE_EPS), zero, qmin, qmax


@torch.no_grad()
def _grid_weights(w: torch.Tensor, bit_choices: tuple[int, ...], shrink: tuple[float, ...], group_size: int,
                  symmetric: bool, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(bits, out, in) weights on the min-max grids shrunk by ``shrink`` (`_grid_scales`), in ``out_dtype`` (one
    rounding of the float32 values).

    All bit widths in one batched computation (a few kernels per layer, no host sync); on CUDA, one fused
    fake-quant pass per width (`hfqat.quant.fused_fake_quant`: the same fp32 operations, so the same weights,
    bar the sign of zeros), written in ``out_dtype`` directly.
    """
    scale, zero, qmin, qmax = _grid_scales(w, bit_choices, shrink, group_size, symmetric)
    zeros = [None] * len(bit_choices) if zero is None else list(zero)
    if fused_fake_quant.supports(w, scale[0], zeros[0], _ints(bit_choices[:1], w.device), group_size):
        parts = [fused_fake_quant.forward(w, s, z, _ints((b,), w.device), group_size, out_dtype)
                 for s, z, b in zip(scale, zeros, bit_choices)]
        return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)
    wg = w.reshape(1, w.shape[0], -1, group_size).float()
    scale, zero = scale.unsqueeze(-1), (torch.zeros_like(scale) if zero is None else zero).unsqueeze(-1)
    q = torch.clamp(torch.round(wg / scale) + zero, qmin.unsqueeze(-1), qmax.unsqueeze(-1))
    return ((q - zero) * scale).reshape(len(bit_choices), *w.shape).to(out_dtype)


def _grid_errors(w: torch.Tensor, bit_choices: tuple[int, ...], shrink: tuple[float, ...], group_size: int,
                 symmetric: bool) -> torch.Tensor:
    """(bits, out, in) squared errors of `_grid_weights`."""
    return (_grid_weights(w, bit_choices, shrink, group_size, symmetric) - w.float()).pow(2)


@torch.no_grad()
def clip_error_totals(layer: FakeQuantMixin, bit_choices: Iterable[int]) -> torch.Tensor | None:
    """(len(CLIP_GRID), bits) total squared quantization error of the layer's weight (`CLIP_GROUPS_PER_ROW` groups of
    each row) at each range shrink factor (on CUDA summed group by group: the same totals up to float rounding);
    None for layers with their own candidate quantizers (codebooks, `FakeQuantMixin.refit_candidates`: refitted
    here instead, they need no clip ratio)."""
    w, spec, choices = layer.weight_oi().detach(), layer.spec, tuple(bit_choices)
    if layer.refit_candidates(choices):
        return None
    groups = w.shape[1] // spec.group_size
    step = max(1, groups // CLIP_GROUPS_PER_ROW)
    w = w.reshape(w.shape[0], groups, spec.group_size)[:, ::step].reshape(w.shape[0], -1)
    if fused_group_errors.supports(w, spec.group_size):  # every (factor, width) of the grid in one launch
        widths, shrinks = choices * len(CLIP_GRID), tuple(c for c in CLIP_GRID for _ in choices)
        scale, zero, _, _ = _grid_scales(w, widths, shrinks, spec.group_size, spec.symmetric)
        sums = fused_group_errors.group_error_sums(w, scale, zero, _ints(widths, w.device),
                                                   _ints((0,) * len(widths), w.device), spec.group_size)
        return sums.sum((1, 2)).view(len(CLIP_GRID), len(choices))
    # Several shrink factors per batched grid (a few kernels per layer instead of a few per factor); each factor's
    # totals are still reduced over their own (bits, out, in) block, the reduction a single factor's grid gets, so
    # they are the same sums bit for bit.
    budget = CLIP_BATCH_ELEMENTS.get(w.device.type, CLIP_BATCH_ELEMENTS_ACCELERATOR)
    per_batch = max(1, budget // (len(choices) * w.numel()))
    totals = []
    for start in range(0, len(CLIP_GRID), per_batch):
        shrinks = CLIP_GRID[start:start + per_batch]
        errors = _grid_errors(w, choices * len(shrinks), tuple(c for c in shrinks for _ in choices), spec.group_size,
                              spec.symmetric)
        totals += [block.sum((1, 2)) for block in errors.view(len(shrinks), len(choices), *w.shape).unbind(0)]
    return torch.stack(totals)


def best_clips(totals: Mapping[str, torch.Tensor | None], bit_choices: tuple[int, ...]
                ) -> dict[str, dict[int, float]]:
    """name → {bits: the shrink factor of least total error} (1.0 where ``totals`` has None); one host sync."""
    searched = [name for name, t in totals.items() if t is not None]
    indices = dict(zip(searched, torch.stack([totals[name].argmin(0).to(totals[searched[0]].device)
                                              for name in searched]).tolist() if searched else []))
    return {name: {b: CLIP_GRID[i] for b, i in zip(bit_choices, indices[name])} if name in indices else
            {b: 1.0 for b in bit_choices} for name in totals}


def fit_clip_ratios(layer: FakeQuantMixin, bit_choices: Iterable[int]) -> dict[int, float]:
    """Per bit width, the range shrink factor (one per layer) minimising the layer's quantization MSE (1.0 for
    layers with their own candidate quantizers)."""
    return best_clips({"": clip_error_totals(layer, bit_choices)}, tuple(bit_choices))[""]


@torch.no_grad()
def quantization_errors(layer: FakeQuantMixin, bit_choices: Iterable[int], clip: Mapping[int, float],
                        current_bits: int | None = None) -> torch.Tensor:
    """(bits, out, in) per-element squared errors ``(Q_b(W) - W)²`` (float32), in `bit_choices` order.

    The layer's current bit width uses its actual quantizer (learned scales); the others the clipped grid.
    Pass ``current_bits`` when known: reading ``layer.bits`` waits for the GPU.
    """
    w, spec, choices = layer.weight_oi().detach(), layer.spec, tuple(bit_choices)
    errors = layer.candidate_errors(choices)  # the layer's own stand-ins (codebooks), else the clipped grid
    if errors is None:
        errors = _grid_errors(w, choices, tuple(clip.get(b, 1.0) for b in choices), spec.group_size, spec.symmetric)
    if layer.weight_row_bits is not None:  # each row's current width uses its actual quantizer
        actual = (layer.quantized_weight(exact=True).float() - w.float()).pow(2)
        for i, bits in enumerate(choices):
            errors[i] = torch.where((layer.weight_row_bits == bits).unsqueeze(1), actual, errors[i])
        return errors
    current = layer.bits if current_bits is None else current_bits
    if current in choices:
        errors[choices.index(current)] = (layer.quantized_weight(exact=True).float() - w.float()).pow(2)
    return errors


@torch.no_grad()
def weighted_error_sums(layer: FakeQuantMixin, bit_choices: Iterable[int], clip: Mapping[int, float],
                        current_bits: int, weight: torch.Tensor | None = None) -> torch.Tensor | None:
    """(bits, out, groups) float32 per-group sums of ``weight · (Q_b(W) - W)²`` (weight None: 1) for the quantizers
    of `quantization_errors`, in one fused pass (`hfqat.quant.fused_group_errors`: no (bits, out, in) tensor); None
    where that kernel does not apply (CPU, shards, transposed weights, per-row widths, layers with their own
    quantizer or stand-ins): `quantization_errors` there."""
    w, spec, choices, cls = layer.weight_oi().detach(), layer.spec, tuple(bit_choices), type(layer)
    if (layer.weight_row_bits is not None or cls.fake_quantize_weight is not FakeQuantMixin.fake_quantize_weight
            or cls.candidate_errors is not FakeQuantMixin.candidate_errors
            or not fused_group_errors.supports(w, spec.group_size, weight)):
        return None
    scale, zero, _, _ = _grid_scales(w, choices, tuple(clip.get(b, 1.0) for b in choices), spec.group_size,
                                     spec.symmetric)
    if current_bits in choices:  # the layer's actual quantizer, whose values are in the weight's dtype
        scale[choices.index(current_bits)] = layer.weight_scale
        if zero is not None:
            zero[choices.index(current_bits)] = layer.weight_zero_point
    rounded = _ints(tuple(int(b == current_bits) for b in choices), w.device)
    return fused_group_errors.group_error_sums(w, scale, zero, _ints(choices, w.device), rounded, spec.group_size,
                                               weight)


@torch.no_grad()
def candidate_weight(layer: FakeQuantMixin, bits: int, clip: Mapping[int, float], current_bits: int) -> torch.Tensor:
    """The (out, in) weight the layer would compute at ``bits``, in the weight's dtype: its actual quantizer at its
    current bits, else the stand-in `quantization_errors` measures (its own, e.g. a codebook, or the clipped grid)."""
    w = layer.weight_oi()
    if bits == current_bits and layer.weight_row_bits is None:
        return layer.quantized_weight(exact=True)
    own = layer.candidate_weight(bits)
    if own is None:
        own = _grid_weights(w, (bits,), (clip.get(bits, 1.0),), layer.spec.group_size, layer.spec.symmetric,
                            w.dtype)[0]
    if layer.weight_row_bits is not None:  # rows at that width already: their actual quantizer
        own = torch.where((layer.weight_row_bits == bits).unsqueeze(1), layer.quantized_weight(exact=True), own)
    return own.to(w.dtype)

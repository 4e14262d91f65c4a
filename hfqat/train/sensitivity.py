r"""Layer sensitivity: the predicted loss increase of each quantized layer at each candidate bit width.

Every estimator predicts, per layer ``l`` and bit choice ``b``, ``ΔL_l(b)`` — the training-loss increase
caused by quantizing that layer to ``b`` bits — and smooths it over time with an EMA. `hfqat.train.allocation`
then picks the bits. Estimators (``name`` → class in `ESTIMATORS`):

``fisher``      ``ΔL(b) = ½ Σ_i F_ii (Q_b(w_i) - w_i)²`` with the diagonal empirical Fisher ``F_ii ≈ g_i²``
                (squared gradient of the float weight, which it receives through the straight-through
                estimator). Observed at every optimizer step from gradients the step already computed: each
                step folds ``g²`` into a running EMA (one in-place pass, a buffer the size of the gradients);
                the quantization errors are weighed once, when the scores are read (`flush`). EMAs are
                linear, so this equals weighing every step's ``g²`` by the errors of the weights at the read.
``kfac``        the same ``½ Σ F_ij e_ij²`` with a per-token Fisher in Kronecker-factored diagonal form,
                ``F_ij ≈ Σ_t g_ti² · mean_t x_tj²`` (``g``: gradient w.r.t. the layer's output, ``x``: its input),
                from forward/backward hooks: squared per-token gradients rather than the squared *batch*
                gradient, which near a minimum reflects gradient noise more than curvature. Same cost class.
``hutchinson``  ``ΔL(b) = ½ (tr(H_l) / n_l) ‖Q_b(W) - W‖²`` (HAWQ-v2) with the Hessian trace estimated
                by Hutchinson's method, ``tr(H) ≈ E[vᵀHv]`` over Rademacher probes ``v``. Measured only at
                re-allocation time on the last training micro-batch: one forward, one backward with
                ``create_graph`` and one Hessian-vector product per probe (about 2 + 2·probes backward
                costs, and the memory of a double backward). Runs in eval mode, so dropout and gradient
                checkpointing are off for the probe; negative trace estimates (noise) count as 0.
``variance``    reverse water-filling for Gaussian weights: ``ΔL(b) = n_l σ_l² 2^{-2b}``, with ``σ_l²`` the
                mean within-group weight variance. Needs no data; also the prior for the very first
                allocation of every estimator (before any gradient has been seen).

``Q_b`` for the layer's current bits is its actual quantizer (learned scales); for other bits it is the
quantizer `set_bits` would start from, approximated cheaply by the min-max grid shrunk by a per-layer clip
ratio (`fit_clip_ratios`, refit at every re-allocation) so that low bit widths are not penalised for the
outliers a real clip search would cut off. On CUDA the clip search and the weighing of errors (Fisher, Hutchinson)
run through one fused kernel per layer (`hfqat.quant.fused_group_errors`: every width, or every width × shrink
factor, in one pass over the weight, no error tensor); elsewhere through the torch code below. Codebook layers
(`hfqat.quant.codebook`) provide their own stand-ins instead (k-means codebooks per bit width, refit at the same
moments: `FakeQuantMixin.refit_candidates` / `candidate_errors`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..distributed import all_reduce_mean_
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
LayerList = list[tuple[str, FakeQuantMixin]]


# -- quantization error per candidate bit width ---------------------------------------------------------------
def _as_oi(layer: FakeQuantMixin, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor (e.g. a gradient) in (out, in) layout."""
    return tensor.t() if isinstance(layer, QATConv1D) else tensor


@lru_cache(maxsize=1024)
def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Cached: creating a small CUDA tensor from Python data copies from pageable memory, which waits for the GPU.
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


@lru_cache(maxsize=64)
def _width(bits: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32, device=device)  # cached, as `_constant`


@lru_cache(maxsize=256)
def _ints(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)  # cached, as `_constant`


@torch.no_grad()
def _grid_scales(w: torch.Tensor, bit_choices: tuple[int, ...], shrink: tuple[float, ...], group_size: int,
                 symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(scale, zero point or None (symmetric), qmin, qmax) of the min-max grids shrunk by ``shrink`` (one factor per
    bit width): (bits, out, groups) float32 scales and zero points, (bits, 1, 1) bounds. Scales and zero points are
    those of ``init_scales(..., "minmax")`` times the shrink; zero points are shrink-invariant."""
    out_features, in_features = w.shape
    grouped = w.reshape(1, out_features, in_features // group_size, group_size)  # extrema are exact in w's dtype
    bits = _constant(tuple(float(b) for b in bit_choices), w.device)
    shrink = _constant(tuple(float(c) for c in shrink), w.device)
    if symmetric:
        qmin, qmax = -torch.exp2(bits - 1), torch.exp2(bits - 1) - 1
        return (grouped.abs().amax(-1).float() * shrink / qmax).clamp_min(SCALE_EPS), None, qmin, qmax
    qmin, qmax = torch.zeros_like(bits), torch.exp2(bits) - 1
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
    if fused_fake_quant.supports(w, scale[0], zeros[0], _width(bit_choices[0], w.device), group_size):
        parts = [fused_fake_quant.forward(w, s, z, _width(b, w.device), group_size, out_dtype)
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


def _best_clips(totals: Mapping[str, torch.Tensor | None], bit_choices: tuple[int, ...]
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
    return _best_clips({"": clip_error_totals(layer, bit_choices)}, tuple(bit_choices))[""]


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


def loss_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded training micro-batch as model kwargs that return the language-model loss (raw text: labels =
    inputs) without touching the KV cache."""
    inputs = {k: v for k, v in batch.items() if k not in ("num_items_in_batch", "return_dict")}
    inputs["use_cache"] = False
    if inputs.get("labels") is None:
        inputs["labels"] = inputs["input_ids"]
    return inputs


# -- estimators -----------------------------------------------------------------------------------------------
@dataclass
class SensitivityContext:
    """What an estimator may use at a measurement: the model, the last training micro-batch, the step."""

    model: nn.Module
    step: int
    batch: dict[str, Any] | None = None
    seed: int = 0


class SensitivityEstimator(ABC):
    """Template method: `update` keeps the EMAs and clip ratios; subclasses implement `_measure`.

    ``per_step``: measured at every optimizer step (needs that step's gradients) rather than only at
    re-allocation time. ``per_row``: predictions per output row, (bits, out) per layer, for layers with per-row
    widths (``bits_granularity="row"``); `scores` then sums them per layer and `row_scores` has them.
    ``runs_model``: the measurement runs the model's forward (it must then see the model as sharded training
    sees it, not per-layer local views).
    """

    name: ClassVar[str]
    per_step: ClassVar[bool] = False
    runs_model: ClassVar[bool] = False

    def __init__(self, bit_choices: Iterable[int], ema: float = 0.9, per_row: bool = False) -> None:
        self.bit_choices = tuple(sorted(bit_choices))
        self.ema = ema
        self.per_row = per_row
        # EMA of the predicted loss increase per bit choice, kept as float64 tensors on the layers' device so
        # that per-step updates never wait for the GPU; `scores` reads them out (one sync) when needed.
        self._ema: dict[str, torch.Tensor] = {}
        self.clip: dict[str, dict[int, float]] = {}  # per-layer clip ratios for off-grid bit widths
        self._bits: dict[str, int] = {}  # the layers' bits as of the last re-fit (read without a GPU sync)

    @property
    def scores(self) -> dict[str, dict[int, float]]:
        """layer name → {bits: EMA of the predicted loss increase} (plain floats)."""
        self.flush()
        if not self._ema:
            return {}
        values = torch.stack([v.reshape(len(self.bit_choices), -1).sum(1).cpu() for v in self._ema.values()]).tolist()
        return {name: dict(zip(self.bit_choices, row)) for name, row in zip(self._ema, values)}

    @scores.setter
    def scores(self, scores: Mapping[str, Mapping[int, float]]) -> None:
        self._ema = {name: torch.tensor([float(per_bits[b]) for b in self.bit_choices], dtype=torch.float64)
                     for name, per_bits in scores.items()}

    @property
    def row_scores(self) -> dict[str, torch.Tensor]:
        """layer name → (bits, out) float64 EMAs of the per-row predictions (``per_row`` estimators)."""
        self.flush()
        return {name: v.detach().cpu() for name, v in self._ema.items() if v.dim() == 2}

    @row_scores.setter
    def row_scores(self, scores: Mapping[str, torch.Tensor]) -> None:
        self._ema.update({name: v.to(torch.float64) for name, v in scores.items()})

    def refit_clip(self, layers: LayerList) -> None:
        """Refit the clip ratios; called at start and after every re-allocation (also notes the layers' bits)."""
        totals = {name: clip_error_totals(layer, self.bit_choices) for name, layer in layers}
        # Ranks holding row shards (FSDP2) add up to the whole layer's errors: the same choice as on one process.
        all_reduce_mean_(t for t in totals.values() if t is not None)
        self.clip = _best_clips(totals, self.bit_choices)
        self._bits = {name: layer.bits for name, layer in layers}

    def note_bits(self, bits: Mapping[str, int]) -> None:
        """Record the layers' new bits (after a re-allocation), so per-step measurements need no GPU read."""
        self._bits.update(bits)

    def _current_bits(self, name: str, layer: FakeQuantMixin) -> int:
        if name not in self._bits:  # e.g. after a resume, before the first re-fit
            self._bits[name] = layer.bits
        return self._bits[name]

    def _errors(self, name: str, layer: FakeQuantMixin) -> torch.Tensor:
        return quantization_errors(layer, self.bit_choices, self.clip.get(name, {}), self._current_bits(name, layer))

    def flush(self) -> None:
        """Fold observations kept aside into the EMAs (run it where they were observed: the same local view);
        every reader of the scores calls it first."""

    def attach(self, layers: LayerList) -> None:
        """Start collecting statistics during training (hooks); the default needs none."""

    def detach(self) -> None:
        """Stop collecting (remove hooks)."""

    def update(self, layers: LayerList, context: SensitivityContext) -> bool:
        """Measure and fold into the EMAs; False when nothing could be measured (e.g. no gradients)."""
        measured = self._measure(layers, context)
        if not measured:
            return False
        for name, values in measured.items():
            values = values.detach().to(torch.float64)
            old = self._ema.get(name)
            self._ema[name] = values if old is None else self.ema * old.to(values.device) + (1.0 - self.ema) * values
        return True

    @abstractmethod
    def _measure(self, layers: LayerList, context: SensitivityContext) -> dict[str, torch.Tensor]:
        """layer name → predicted loss increase per bit choice (a (bits,) tensor), for the layers measurable now."""

    def _weighted(self, layer: FakeQuantMixin, name: str, curvature: torch.Tensor | float) -> torch.Tensor:
        """½ Σ curvature · error² per bit choice (per row: (bits, out)); ``curvature``: weight-shaped, or scalar."""
        dims = (2,) if self.per_row else (1, 2)
        elementwise = isinstance(curvature, torch.Tensor) and curvature.dim() == 2
        sums = weighted_error_sums(layer, self.bit_choices, self.clip.get(name, {}), self._current_bits(name, layer),
                                   curvature if elementwise else None)
        if sums is None:
            return 0.5 * (self._errors(name, layer) * curvature).sum(dims, dtype=torch.float64)
        return 0.5 * sums.sum(dims, dtype=torch.float64) * (1.0 if elementwise else curvature)

    # -- state (JSON-friendly: plain floats, string keys restored to ints) ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "clip": self.clip}  # `scores` flushes first

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        def ints(d):
            return {name: {int(b): float(v) for b, v in per_bits.items()} for name, per_bits in d.items()}

        self.scores, self.clip = ints(state.get("scores", {})), ints(state.get("clip", {}))


ESTIMATORS: dict[str, type[SensitivityEstimator]] = {}


def register_estimator(cls: type[SensitivityEstimator]) -> type[SensitivityEstimator]:
    """Class decorator adding an estimator to `ESTIMATORS` under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, SensitivityEstimator)):
        raise TypeError(f"{cls!r} is not a SensitivityEstimator subclass")
    if cls.name in ESTIMATORS:
        raise ValueError(f"sensitivity estimator {cls.name!r} is already registered")
    ESTIMATORS[cls.name] = cls
    return cls


def make_estimator(name: str, bit_choices: Iterable[int], ema: float, per_row: bool = False) -> SensitivityEstimator:
    if name not in ESTIMATORS:
        raise ValueError(f"sensitivity={name!r} is invalid; allowed values: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](bit_choices, ema, per_row)


@register_estimator
class FisherEstimator(SensitivityEstimator):
    """Fisher-weighted quantization noise from the squared (accumulated) gradient of each float weight."""

    name = "fisher"
    per_step = True

    def __init__(self, bit_choices: Iterable[int], ema: float = 0.9, per_row: bool = False) -> None:
        super().__init__(bit_choices, ema, per_row)
        # layer name → (layer, the steps' g² weighted as the EMA will weigh them, steps since the last flush)
        self._window: dict[str, tuple[FakeQuantMixin, torch.Tensor, int]] = {}

    @torch.no_grad()
    def update(self, layers: LayerList, context: SensitivityContext) -> bool:
        """Fold this step's squared gradients into the window (no quantization error is computed per step)."""
        seen = False
        for name, layer in layers:
            grad = layer.weight.grad
            if grad is None:
                continue
            if name in self._window:
                _, squares, steps = self._window[name]
                squares.mul_(self.ema).addcmul_(grad, grad, value=1.0 - self.ema)
            else:
                squares, steps = torch.zeros_like(grad, dtype=torch.promote_types(grad.dtype, torch.float32)), 0
                # the EMA starts at its first observation (weight 1), as in `SensitivityEstimator.update`
                squares.addcmul_(grad, grad, value=1.0 if name not in self._ema else 1.0 - self.ema)
            self._window[name] = (layer, squares, steps + 1)
            seen = True
        return seen

    @torch.no_grad()
    def flush(self) -> None:
        # n steps of the EMA from `old`: ema^n · old + Σ_k (1 - ema) · ema^(n-1-k) · ½ Σ_i g_ki² e_i²
        window, self._window = self._window, {}
        for name, (layer, squares, steps) in window.items():
            value = self._weighted(layer, name, _as_oi(layer, squares))
            old = self._ema.get(name)
            self._ema[name] = value if old is None else self.ema ** steps * old.to(value.device) + value

    def _measure(self, layers, context):
        raise NotImplementedError("FisherEstimator folds gradients in `update` and weighs them in `flush`")


@register_estimator
class KFACEstimator(SensitivityEstimator):
    """Per-token Fisher in Kronecker-factored diagonal form, from the activations and output gradients.

    ``F_ij ≈ Σ_t g_ti² · mean_t x_tj²`` (``g``: gradient of the loss w.r.t. the layer output, ``x``: its input,
    over the tokens ``t`` of the step), so ``ΔL(b) = ½ Σ_ij F_ij e_ij²``. Unlike the squared *batch* gradient
    (``fisher``), which near a minimum measures gradient noise rather than curvature, this averages per-token
    squared gradients. Two vectors per layer per step (one reduction of the input and of the output
    gradient); no extra backward. Not for FSDP2-sharded weights (the rows of a shard are not known here).
    """

    name = "kfac"
    per_step = True

    def __init__(self, bit_choices: Iterable[int], ema: float = 0.9, per_row: bool = False) -> None:
        super().__init__(bit_choices, ema, per_row)
        self._handles: list = []
        self._out_sq: dict[str, torch.Tensor] = {}  # Σ_t g_t² per output feature
        self._in_sq: dict[str, torch.Tensor] = {}  # Σ_t x_t² per input feature
        self._tokens: dict[str, int] = {}

    def attach(self, layers: LayerList) -> None:
        self.detach()
        self._handles = [layer.register_forward_hook(partial(self._forward_hook, name)) for name, layer in layers]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._out_sq, self._in_sq, self._tokens = {}, {}, {}

    def _forward_hook(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # Only passes that will be back-propagated (not the teacher pass, eval, or a no-grad checkpoint pass).
        if not module.training or not output.requires_grad:
            return
        x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
        self._in_sq[name] = self._in_sq[name] + x.pow(2).sum(0) if name in self._in_sq else x.pow(2).sum(0)
        self._tokens[name] = self._tokens.get(name, 0) + x.shape[0]
        output.register_hook(partial(self._grad_hook, name))

    def _grad_hook(self, name: str, grad: torch.Tensor) -> None:
        g = grad.detach().float().reshape(-1, grad.shape[-1]).pow(2).sum(0)
        self._out_sq[name] = self._out_sq[name] + g if name in self._out_sq else g

    def _measure(self, layers, context):
        out = {}
        for name, layer in layers:
            if name not in self._out_sq:
                continue
            errors = self._errors(name, layer)
            if errors.shape[1:] != (self._out_sq[name].numel(), self._in_sq[name].numel()):
                raise ValueError("sensitivity='kfac' does not support sharded (FSDP2) weights; allowed there: "
                                 "'fisher', 'hutchinson', 'variance'")
            in_mean = self._in_sq[name] / self._tokens[name]
            equation = "o,boi,i->bo" if self.per_row else "o,boi,i->b"
            out[name] = 0.5 * torch.einsum(equation, self._out_sq[name], errors, in_mean).double()
        self._out_sq, self._in_sq, self._tokens = {}, {}, {}
        return out


@register_estimator
class HutchinsonEstimator(SensitivityEstimator):
    """Hessian-trace (Hutchinson) sensitivity on the stored micro-batch; see the module docstring for cost."""

    name = "hutchinson"
    runs_model = True
    probes: ClassVar[int] = 2

    def _measure(self, layers, context):
        if context.batch is None:
            return {}
        model, params = context.model, [layer.weight for _, layer in layers]
        if not all(p.requires_grad for p in params):
            return {}
        batch = loss_inputs(context.batch)
        was_training = model.training
        model.eval()  # deterministic probe: no dropout, no gradient checkpointing (needs double backward)
        try:
            # Fused attention kernels have no double backward: the math kernel has.
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                loss = model(**batch).loss
                grads = torch.autograd.grad(loss, params, create_graph=True)
                generator = torch.Generator(device=params[0].device).manual_seed(context.seed + context.step)
                traces = [torch.zeros((), dtype=torch.float64, device=p.device) for p in params]
                for _ in range(self.probes):
                    probes = [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(g.dtype) * 2 - 1
                              for p, g in zip(params, grads)]
                    hvps = torch.autograd.grad(grads, params, grad_outputs=probes, retain_graph=True)
                    for i, (v, hv) in enumerate(zip(probes, hvps)):
                        traces[i] += (v * hv).sum(dtype=torch.float64).detach() / self.probes
        finally:
            model.train(was_training)
        return {name: self._weighted(layer, name, trace.clamp_min(0.0) / layer.weight.numel())
                for (name, layer), trace in zip(layers, traces)}


@register_estimator
class VarianceEstimator(SensitivityEstimator):
    """Reverse water-filling: distortion ``n σ² 2^{-2b}`` of Gaussian weights (no data needed)."""

    name = "variance"

    @torch.no_grad()
    def _measure(self, layers, context):
        costs = {name: weight_variance_row_costs(layer, self.bit_choices) for name, layer in layers}
        return {name: c if self.per_row else c.sum(1) for name, c in costs.items()}


def gradient_row_costs(model: nn.Module, layers: LayerList, batches: Iterable[Mapping[str, Any]],
                       bit_choices: Iterable[int], clip: Mapping[str, Mapping[int, float]]) -> dict[str, torch.Tensor] | None:
    """(bits, out) float64 ``½ Σ_i F_i (Q_b(w_i) - w_i)²`` per output row, with the empirical Fisher ``F = Σ g²``
    summed over the loss gradients of ``batches`` (several small batches: the square of one large batch's gradient
    mostly cancels). Eval mode (no dropout, no distillation or statistics hooks); `torch.autograd.grad`, so no
    ``.grad`` is touched and no DDP hook fires. A first allocation with it starts from measured curvature rather
    than the weight-variance prior. None without batches or when a weight is frozen."""
    params, batches = [layer.weight for _, layer in layers], list(batches)
    if not batches or not all(p.requires_grad for p in params):
        return None
    choices = tuple(bit_choices)
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in batches:
                grads = torch.autograd.grad(model(**loss_inputs(batch)).loss, params)
                for f, g in zip(fisher, grads):
                    f += g.detach().float().pow(2)
    finally:
        model.train(was_training)
    return {name: 0.5 * (quantization_errors(layer, choices, clip.get(name, {})) * _as_oi(layer, f)).sum(
                2, dtype=torch.float64)
            for (name, layer), f in zip(layers, fisher)}


@torch.no_grad()
def weight_variance_row_costs(layer: FakeQuantMixin, bit_choices: Iterable[int]) -> torch.Tensor:
    """(bits, out) float64 ``n_r σ_r² 2^{-2b}`` per output row ``r``, with ``σ_r²`` the row's mean within-group
    weight variance and ``n_r`` its weight count."""
    w = layer.weight_oi().detach().float()
    variance = w.reshape(w.shape[0], -1, layer.spec.group_size).var(-1, unbiased=False).mean(-1).double()
    powers = torch.tensor([math.pow(2.0, -2 * b) for b in bit_choices], dtype=torch.float64, device=w.device)
    return w.shape[1] * powers.unsqueeze(1) * variance.unsqueeze(0)


def weight_variance_costs(layer: FakeQuantMixin, bit_choices: Iterable[int]) -> dict[int, float]:
    """{bits: n σ² 2^{-2b}} with σ² the mean within-group variance of the layer's weight (the sum of its rows')."""
    return dict(zip(bit_choices, weight_variance_row_costs(layer, bit_choices).sum(1).tolist()))

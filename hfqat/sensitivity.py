r"""Layer sensitivity: the predicted loss increase of each quantized layer at each candidate bit width.

Every estimator predicts, per layer ``l`` and bit choice ``b``, ``ΔL_l(b)`` — the training-loss increase
caused by quantizing that layer to ``b`` bits — and smooths it over time with an EMA. `hfqat.allocation`
then picks the bits. Estimators (``name`` → class in `ESTIMATORS`):

``fisher``      ``ΔL(b) = ½ Σ_i F_ii (Q_b(w_i) - w_i)²`` with the diagonal empirical Fisher ``F_ii ≈ g_i²``
                (squared gradient of the float weight, which it receives through the straight-through
                estimator). Observed at every optimizer step from gradients the step already computed:
                cost ≈ one quantize→dequantize pass over the weights per bit choice, no extra backward.
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
outliers a real clip search would cut off.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .layers import FakeQuantMixin, QATConv1D
from .primitives import MSE_SHRINK_GRID, dequantize, init_scales, quantize

CLIP_GRID = MSE_SHRINK_GRID[::4]  # per-layer clip search: a coarse grid is enough for a sensitivity estimate
LayerList = list[tuple[str, FakeQuantMixin]]


# -- quantization error per candidate bit width ---------------------------------------------------------------
def _as_oi(layer: FakeQuantMixin, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor (e.g. a gradient) in (out, in) layout."""
    return tensor.t() if isinstance(layer, QATConv1D) else tensor


@torch.no_grad()
def _grid_error(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: float) -> torch.Tensor:
    """Per-element squared error of the min-max grid shrunk by `clip` (zero points are shrink-invariant)."""
    scale, zero = init_scales(w, bits, group_size, symmetric, "minmax")
    scale = scale * clip
    return (dequantize(quantize(w, scale, zero, bits, group_size), scale, zero, group_size) - w.float()).pow(2)


@torch.no_grad()
def fit_clip_ratios(layer: FakeQuantMixin, bit_choices: Iterable[int]) -> dict[int, float]:
    """Per bit width, the range shrink factor (one per layer) minimising the layer's quantization MSE."""
    w, spec = layer.weight_oi().detach(), layer.spec
    ratios = {}
    for bits in bit_choices:
        errors = [float(_grid_error(w, bits, spec.group_size, spec.symmetric, c).sum()) for c in CLIP_GRID]
        ratios[bits] = CLIP_GRID[min(range(len(errors)), key=errors.__getitem__)]
    return ratios


@torch.no_grad()
def quantization_errors(layer: FakeQuantMixin, bit_choices: Iterable[int], clip: Mapping[int, float]
                        ) -> dict[int, torch.Tensor]:
    """bits → per-element squared error ``(Q_b(W) - W)²`` in (out, in) layout (float32)."""
    w, spec = layer.weight_oi().detach(), layer.spec
    errors = {}
    for bits in bit_choices:
        if bits == layer.bits:
            errors[bits] = (layer.quantized_weight(exact=True).float() - w.float()).pow(2)
        else:
            errors[bits] = _grid_error(w, bits, spec.group_size, spec.symmetric, clip.get(bits, 1.0))
    return errors


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
    re-allocation time.
    """

    name: ClassVar[str]
    per_step: ClassVar[bool] = False

    def __init__(self, bit_choices: Iterable[int], ema: float = 0.9) -> None:
        self.bit_choices = tuple(sorted(bit_choices))
        self.ema = ema
        self.scores: dict[str, dict[int, float]] = {}  # EMA of predicted loss increase
        self.clip: dict[str, dict[int, float]] = {}  # per-layer clip ratios for off-grid bit widths

    def refit_clip(self, layers: LayerList) -> None:
        self.clip = {name: fit_clip_ratios(layer, self.bit_choices) for name, layer in layers}

    def update(self, layers: LayerList, context: SensitivityContext) -> bool:
        """Measure and fold into the EMAs; False when nothing could be measured (e.g. no gradients)."""
        measured = self._measure(layers, context)
        if not measured:
            return False
        for name, values in measured.items():
            old = self.scores.get(name)
            self.scores[name] = dict(values) if old is None else {
                b: self.ema * old[b] + (1.0 - self.ema) * values[b] for b in self.bit_choices}
        return True

    @abstractmethod
    def _measure(self, layers: LayerList, context: SensitivityContext) -> dict[str, dict[int, float]]:
        """layer name → {bits: predicted loss increase} for the layers measurable now."""

    def _weighted(self, layer: FakeQuantMixin, name: str, curvature: torch.Tensor | float) -> dict[int, float]:
        errors = quantization_errors(layer, self.bit_choices, self.clip.get(name, {}))
        return {b: 0.5 * float((curvature * e).sum()) for b, e in errors.items()}

    # -- state (JSON-friendly: plain floats, string keys restored to ints) ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "clip": self.clip}

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


def make_estimator(name: str, bit_choices: Iterable[int], ema: float) -> SensitivityEstimator:
    if name not in ESTIMATORS:
        raise ValueError(f"sensitivity={name!r} is invalid; allowed values: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](bit_choices, ema)


@register_estimator
class FisherEstimator(SensitivityEstimator):
    """Fisher-weighted quantization noise from the squared (accumulated) gradient of each float weight."""

    name = "fisher"
    per_step = True

    def _measure(self, layers, context):
        out = {}
        for name, layer in layers:
            grad = layer.weight.grad
            if grad is None:
                continue
            out[name] = self._weighted(layer, name, _as_oi(layer, grad.detach()).float().pow(2))
        return out


@register_estimator
class HutchinsonEstimator(SensitivityEstimator):
    """Hessian-trace (Hutchinson) sensitivity on the stored micro-batch; see the module docstring for cost."""

    name = "hutchinson"
    probes: ClassVar[int] = 2

    def _measure(self, layers, context):
        if context.batch is None:
            return {}
        model, params = context.model, [layer.weight for _, layer in layers]
        if not all(p.requires_grad for p in params):
            return {}
        batch = {k: v for k, v in context.batch.items() if k not in ("num_items_in_batch", "return_dict")}
        batch["use_cache"] = False
        if batch.get("labels") is None:
            batch["labels"] = batch["input_ids"]  # raw text: language-model loss on the inputs
        was_training = model.training
        model.eval()  # deterministic probe: no dropout, no gradient checkpointing (needs double backward)
        try:
            # Fused attention kernels have no double backward: the math kernel has.
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                loss = model(**batch).loss
                grads = torch.autograd.grad(loss, params, create_graph=True)
                generator = torch.Generator(device=params[0].device).manual_seed(context.seed + context.step)
                traces = [0.0] * len(params)
                for _ in range(self.probes):
                    probes = [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(g.dtype) * 2 - 1
                              for p, g in zip(params, grads)]
                    hvps = torch.autograd.grad(grads, params, grad_outputs=probes, retain_graph=True)
                    for i, (v, hv) in enumerate(zip(probes, hvps)):
                        traces[i] += float((v * hv).sum()) / self.probes
        finally:
            model.train(was_training)
        return {name: self._weighted(layer, name, max(trace, 0.0) / layer.weight.numel())
                for (name, layer), trace in zip(layers, traces)}


@register_estimator
class VarianceEstimator(SensitivityEstimator):
    """Reverse water-filling: distortion ``n σ² 2^{-2b}`` of Gaussian weights (no data needed)."""

    name = "variance"

    @torch.no_grad()
    def _measure(self, layers, context):
        return {name: weight_variance_costs(layer, self.bit_choices) for name, layer in layers}


@torch.no_grad()
def weight_variance_costs(layer: FakeQuantMixin, bit_choices: Iterable[int]) -> dict[int, float]:
    """{bits: n σ² 2^{-2b}} with σ² the mean within-group variance of the layer's weight."""
    w = layer.weight_oi().detach().float()
    groups = w.reshape(w.shape[0], -1, layer.spec.group_size)
    variance = float(groups.var(-1, unbiased=False).mean())
    return {b: w.numel() * variance * math.pow(2.0, -2 * b) for b in bit_choices}

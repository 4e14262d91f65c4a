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

``Q_b``: the candidate quantizers of `hfqat.train.candidates` (the actual quantizer at the current bits, a
clipped min-max grid or a codebook stand-in otherwise).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..distributed import all_reduce_mean_
from ..quant.layers import FakeQuantMixin
from .candidates import as_oi, best_clips, clip_error_totals, quantization_errors, weighted_error_sums

LayerList = list[tuple[str, FakeQuantMixin]]


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
        self.clip = best_clips(totals, self.bit_choices)
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
            value = self._weighted(layer, name, as_oi(layer, squares))
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
    return {name: 0.5 * (quantization_errors(layer, choices, clip.get(name, {})) * as_oi(layer, f)).sum(
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

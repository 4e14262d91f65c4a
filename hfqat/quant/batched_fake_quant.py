"""Many small layers' weights fake-quantized in one fused pass per model forward (and one per backward).

Why: a fake-quant layer quantizes its weight in its own forward — one fused kernel launch, one autograd node, and the
same again in backward. On a small model that host work, not the math, is the step's cost: SmolLM2-135M on an H200
spent 24 ms of host time per forward in its 210 layers' fake quant for 1.2 ms of GPU work (bench/results/
h200_s15_qat_step.md). A weight does not depend on the batch, so every layer's quantized weight can be computed
before the forward reaches it: `BatchedWeights`, a forward pre-hook on the model, concatenates the weights of
consecutive small layers into buckets, and when the forward reaches a bucket's first layer, runs the exact quantizer
once for the whole bucket (`hfqat.quant.primitives.ste_forward`: per group the same arithmetic, so the values are bit
for bit those of the layer's own pass) and hands each layer its slice; the bucket's backward computes every layer's
weight, scale and zero-point gradients in one pass as well. Lazily, bucket by bucket: a no-grad forward (evaluation,
``generate``) holds one bucket's quantized weights at a time, not the model's.

Which layers: integer-grid layers (`QATLinear`) on CUDA running the exact quantizer (STE rounding with hard clamping,
or any rounding in eval mode), with a whole contiguous (out, in) weight of at most `MAX_LAYER_ELEMENTS` (a larger
layer's matmul dwarfs its launch, and a bucket copies its weights) and no forward swapped by a caller (the
distillation teacher, calibration). A bucket holds at most `BUCKET_ELEMENTS` weights: its backward waits for all its
layers' gradients and copies the bucket's weights and gradients. Off under torch.compile (inductor fuses the layer's
quantizer itself) and gradient checkpointing (the buckets' quantized weights would stay alive through the forward
instead of being recomputed). A layer that does not consume its slice (its weight computed another way, e.g. by a
LoRA adapter as ``Q(W + s·BA)``) is left out from then on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .layers import BATCHED_WEIGHT, FakeQuantMixin, QATLinear
from .primitives import ste_backward, ste_forward

MAX_LAYER_ELEMENTS = 1 << 22
BUCKET_ELEMENTS = 1 << 24
# Where host time per launch matters: on a CPU the math dominates and the bucket's copies would only add to it
# (tests add "cpu" to check the values and gradients against the layers' own passes).
DEVICES = ("cuda",)


class _BucketFakeQuant(torch.autograd.Function):
    """``ste_forward`` of the concatenation of a bucket's weights; outputs each layer's (out, in) quantized weight."""

    @staticmethod
    def forward(ctx, bucket: Bucket, bits: torch.Tensor, *tensors: torch.Tensor):
        ctx.bucket = bucket
        ctx.save_for_backward(bits, *tensors)
        w, scale, zero = bucket.flat(tensors)
        out = ste_forward(w, scale, zero, bits, bucket.group_size, w.dtype)
        return tuple(bucket.split(out))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        bucket: Bucket = ctx.bucket
        bits, *tensors = ctx.saved_tensors
        w, scale, zero = bucket.flat(tensors)
        grad = torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                          for g, t in zip(grads, tensors)]).view_as(w)
        grad_w, grad_s, grad_z = ste_backward(w, scale, zero, bits, bucket.group_size, grad)
        out = bucket.split(grad_w) + bucket.split_groups(grad_s)
        if grad_z is not None:
            out += bucket.split_groups(grad_z)
        return (None, None, *out)


class Bucket:
    """Consecutive layers sharing device, dtype, group size and grid kind, quantized as one (groups, size) tensor."""

    def __init__(self, layers: Sequence[FakeQuantMixin]) -> None:
        self.layers = list(layers)
        self.group_size = self.layers[0].spec.group_size
        self.shapes = [layer.weight.shape for layer in self.layers]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.has_zero = self.layers[0].weight_zero_point is not None
        self._bits: tuple[tuple, torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Weights, then scales, then zero points (asymmetric grids)."""
        params = [layer._parameters for layer in self.layers]
        out = [p["weight"] for p in params] + [p["weight_scale"] for p in params]
        return out + ([p["weight_zero_point"] for p in params] if self.has_zero else [])

    def flat(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weights as (groups, group_size), scales and zero points as (groups, 1)) of ``tensors`` (`tensors` order)."""
        n = len(self.layers)
        w = torch.cat([t.reshape(-1) for t in tensors[:n]]).view(-1, self.group_size)
        scale = torch.cat([t.reshape(-1) for t in tensors[n:2 * n]]).view(-1, 1)
        zero = torch.cat([t.reshape(-1) for t in tensors[2 * n:]]).view(-1, 1) if self.has_zero else None
        return w, scale, zero

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [part.view(shape) for part, shape in zip(flat.view(-1).split(self.sizes), self.shapes)]

    def split_groups(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-group values (scale or zero-point gradients) back into each layer's (out, in // group_size)."""
        shapes = [layer.weight_scale.shape for layer in self.layers]
        return [part.view(shape) for part, shape in zip(flat.view(-1).split([math.prod(s) for s in shapes]), shapes)]

    def quantize(self) -> None:
        """The bucket's pass: every layer still waiting for it gets (its quantized weight, `quant_versions`)."""
        tensors = self.tensors()
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            weights = _BucketFakeQuant.apply(self, self.bits(), *tensors)
        else:
            w, scale, zero = self.flat(tensors)
            weights = self.split(ste_forward(w, scale, zero, self.bits(), self.group_size, w.dtype))
        for layer, weight in zip(self.layers, weights):
            if layer.__dict__.get(BATCHED_WEIGHT) is self:
                layer.__dict__[BATCHED_WEIGHT] = (weight, layer.quant_versions())

    def bits(self) -> torch.Tensor:
        """(groups, 1, 1) int32: each group row's width (re-built only when a layer's widths changed or moved)."""
        versions = tuple((bits.data_ptr(), bits._version) for bits in (layer.quantizer_bits for layer in self.layers))
        if self._bits is None or self._bits[0] != versions:
            rows = []
            for layer, size in zip(self.layers, self.sizes):
                bits = layer.quantizer_bits.to(torch.int32)
                if bits.numel() == 1:  # one width for the layer
                    rows.append(bits.reshape(1).expand(size // self.group_size))
                else:  # one per output row
                    rows.append(bits.reshape(-1, 1).expand(-1, layer.weight.shape[1] // self.group_size).reshape(-1))
            self._bits = versions, torch.cat(rows).view(-1, 1, 1)
        return self._bits[1]


def eligible(layer: nn.Module) -> bool:
    """Whether ``layer``'s forward would run the exact integer quantizer on a small contiguous CUDA weight."""
    state = layer.__dict__
    if "forward" in state or state.get("_fit_pending") or type(layer).forward is not QATLinear.forward or (
            type(layer).fake_quantize_weight is not FakeQuantMixin.fake_quantize_weight):
        return False
    weight, spec = layer._parameters["weight"], layer.spec
    return (
        weight.device.type in DEVICES and type(weight) is nn.Parameter and weight.is_contiguous()
        and not hasattr(weight, "ds_id")  # ZeRO-3: partitioned, gathered by the layer's own hooks
        and weight.shape == (layer.out_features, layer.in_features)  # whole, not a shard of a flat parameter
        and weight.numel() <= MAX_LAYER_ELEMENTS
        and (not layer.training or not math.isfinite(layer.soft_sharpness)  # the exact quantizer, as in
             or "soft" not in (spec.rounding, spec.clamping))               # `hfqat.quant.primitives.fake_quantize`
    )


def plan_buckets(layers: Sequence[FakeQuantMixin]) -> list[Bucket]:
    """Consecutive ``layers`` cut into buckets of one kind, at most `BUCKET_ELEMENTS` weights each."""
    buckets, current, size, kind = [], [], 0, None
    for layer in layers:
        layer_kind = (layer.weight.device, layer.weight.dtype, layer.spec.group_size, layer.weight_zero_point is None,
                      layer.weight_scale.dtype)
        if current and (layer_kind != kind or size + layer.weight.numel() > BUCKET_ELEMENTS):
            buckets.append(Bucket(current))
            current, size = [], 0
        current.append(layer)
        size, kind = size + layer.weight.numel(), layer_kind
    if current:
        buckets.append(Bucket(current))
    return [bucket for bucket in buckets if len(bucket.layers) > 1]  # a single layer gains nothing


def _checkpointing(model: nn.Module) -> bool:
    # transformers renamed is_gradient_checkpointing to is_activation_checkpointing (5.2x); read whichever it has
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class BatchedWeights:
    """Forward pre-hook (and post-hook) on a model: computes its small layers' quantized weights bucket by bucket."""

    def __init__(self) -> None:
        self.left_out: set[int] = set()  # ids of layers that did not consume their slice
        self._plans: dict[tuple[int, ...], list[Bucket]] = {}
        self._active: list[Bucket] = []

    @classmethod
    def attach(cls, model: nn.Module) -> BatchedWeights:
        """The model's hook (attached once, whatever the number of conversions)."""
        if not isinstance(model.__dict__.get("_hfqat_batched_weights"), cls):
            hook = model.__dict__["_hfqat_batched_weights"] = cls()
            model.register_forward_pre_hook(hook.before)
            model.register_forward_hook(hook.after)
        return model.__dict__["_hfqat_batched_weights"]

    def before(self, model: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling() or _checkpointing(model):
            return
        layers = [m for m in model.modules() if isinstance(m, QATLinear) and id(m) not in self.left_out and eligible(m)]
        if not layers:  # e.g. the distillation teacher's pass, whose layers compute their float weights
            return
        key = tuple(id(layer) for layer in layers)
        if key not in self._plans:
            self._plans = {key: plan_buckets(layers)}  # one model, one live plan
        self._active = self._plans[key]
        for bucket in self._active:
            for layer in bucket.layers:  # the bucket's pass runs when its first layer needs its weight
                layer.__dict__[BATCHED_WEIGHT] = bucket

    def after(self, model: nn.Module, args: tuple, output) -> None:
        for bucket in self._active:
            for layer in bucket.layers:
                if isinstance(layer.__dict__.pop(BATCHED_WEIGHT, None), tuple):  # computed, never used
                    self.left_out.add(id(layer))
        self._active = []

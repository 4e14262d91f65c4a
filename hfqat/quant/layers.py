"""Fake-quantized layers: `QATLinear` (for `nn.Linear`) and `QATConv1D` (for GPT-2 style `Conv1D`).

Each keeps its float weight (the trainable master copy) and quantizes it on the fly in `forward`.
Quantization state lives in the state dict so it saves, reloads, shards and resumes like any weight:

- ``weight_bits``        int32 buffer, the layer's current bit width (re-allocation changes it in place); with
                         per-row widths, the widest row's
- ``weight_row_bits``    (out,) int8 buffer, one width per output row; only with ``bits_granularity="row"``
- ``weight_scale``       (out, in // group_size) parameter, trainable when ``learn_scales``
- ``weight_zero_point``  same shape, only for asymmetric grids

Bit changes keep the identity and shape of every parameter, so an optimizer built at train start keeps
working (no new param groups mid-run).

Deferred fit: a float checkpoint loaded on the CPU of a machine with a GPU is usually moved there next
(``.cuda()``, Trainer's ``model.to(device)``); fitting the scales first would run the clip search on the CPU (seconds
to minutes for a real model, far longer with several processes on one host). `defer_fit` marks the layer instead,
and the fit runs on whatever device the weight is on at the first of: a move or cast of the layer, a read of a
quantizer parameter (forward, LoRA, exports, inspection) or ``state_dict()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerQuantSpec
from .primitives import fake_quantize, fake_quantize_activations, fill_placeholder_scales, init_scales

# Parameters whose values the fit sets: reading one of them first runs a deferred fit.
FITTED_PARAMS = frozenset({"weight_scale", "weight_zero_point", "weight_codebook"})
# The __dict__ entry where `hfqat.quant.batched_fake_quant` leaves, for one forward, the layer's bucket (whose
# `quantize()` fills the entry) or its result: (quantized weight, `quant_versions` it was computed from).
BATCHED_WEIGHT = "_batched_weight"


class FakeQuantMixin:
    """Quantization state and numerics shared by the fake-quantized layer classes.

    Subclasses store their weight in their own layout and expose it as (out, in) via `weight_oi()`.
    """

    spec: LayerQuantSpec
    soft_sharpness: float
    _fit_pending: bool = False

    def _init_quant_state(self, spec: LayerQuantSpec, out_features: int, in_features: int, device=None) -> None:
        self.spec = spec
        # Annealed by hfqat.set_soft_sharpness; inf = exact quantizer. Only read when rounding/clamping is soft.
        self.soft_sharpness = math.inf if spec.rounding == spec.clamping == "hard" else 1.0
        self.register_buffer("weight_bits", torch.tensor(spec.bits, dtype=torch.int32, device=device))
        row_bits = torch.full((out_features,), spec.bits, dtype=torch.int8, device=device) if spec.row_bits else None
        self.register_buffer("weight_row_bits", row_bits)
        shape = (out_features, in_features // spec.group_size)
        self.weight_scale = nn.Parameter(
            torch.ones(shape, dtype=torch.float32, device=device), requires_grad=spec.learn_scales
        )
        if spec.symmetric:
            self.register_parameter("weight_zero_point", None)
        else:
            self.weight_zero_point = nn.Parameter(
                torch.zeros(shape, dtype=torch.float32, device=device), requires_grad=spec.learn_scales
            )
        self.register_state_dict_pre_hook(_fit_before_state_dict)

    # -- deferred fit -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def defer_fit(self) -> None:
        """Fit scales / zero points on first use instead of now (see the module docstring). Until then they hold
        placeholders (scale 1, zero point 0): a read that bypasses the fit (``model.named_parameters()``) sees
        finite values, not the uninitialised memory a meta-device load leaves."""
        fill_placeholder_scales(self._parameters["weight_scale"], self._parameters.get("weight_zero_point"))
        self.__dict__["_fit_pending"] = True

    def _run_pending_fit(self) -> None:
        if self.__dict__.get("_fit_pending") and not self.weight.is_meta:
            self.__dict__["_fit_pending"] = False
            self.reset_quant_params()

    def __getattr__(self, name: str):
        # nn.Module keeps parameters out of __dict__, so every read of one comes through here
        if name in FITTED_PARAMS and self.__dict__.get("_fit_pending"):
            self._run_pending_fit()
        return super().__getattr__(name)

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self._run_pending_fit()  # on the device (and dtype) the layer was just moved to
        return module

    # -- numerics -------------------------------------------------------------------------------------------
    def weight_oi(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def bits(self) -> int:
        """The layer's bit width (with per-row widths: the widest row's)."""
        return int(self.weight_bits)

    @property
    def rows_differ(self) -> bool:
        """Whether the layer's rows hold different widths (per-row layers only)."""
        return self.weight_row_bits is not None and bool((self.weight_row_bits != self.bits).any())

    @property
    def quantizer_bits(self) -> torch.Tensor:
        """The widths the quantizer applies: ``weight_bits``, or (out, 1, 1) per-row widths."""
        return self.weight_bits if self.weight_row_bits is None else self.weight_row_bits.view(-1, 1, 1)

    def quantized_weight(self, exact: bool = False) -> torch.Tensor:
        """The fake-quantized weight in (out, in) layout and the weight's dtype.

        Training uses the current soft sharpness; eval mode (or ``exact=True``) the exact quantizer.
        """
        w = self.weight_oi()
        sharpness = self.soft_sharpness if (self.training and not exact) else math.inf
        return self.fake_quantize_weight(w, self.weight_scale, self.weight_zero_point, sharpness, out_dtype=w.dtype)

    def fake_quantize_weight(self, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                             sharpness: float = math.inf, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This layer's quantizer (format, bits, group size, its other quantizer state) applied to any (out, in)
        weight with the given scale / zero point; differentiable. LoRA uses it for ``Q(W + B·A)``."""
        return fake_quantize(w, scale, zero_point, self.quantizer_bits, self.spec.group_size, self.spec.rounding,
                             self.spec.clamping, sharpness, out_dtype=out_dtype)

    # -- candidate bit widths (hooks for hfqat.train.sensitivity) ------------------------------------------------
    def refit_candidates(self, bit_choices: tuple[int, ...]) -> bool:
        """Refit this layer's own stand-ins for the quantizers ``set_bits(b)`` would build; False when it has none
        (the integer grid: sensitivity estimates them with clipped min-max grids)."""
        return False

    def candidate_errors(self, bit_choices: tuple[int, ...]) -> torch.Tensor | None:
        """(bits, out, in) squared errors of those stand-ins on the current weight, or None (no stand-ins)."""
        return None

    def candidate_weight(self, bits: int) -> torch.Tensor | None:
        """The (out, in) float32 weight this layer's stand-in quantizer for ``bits`` gives, or None (no stand-ins)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.activation_bits is not None:
            x = fake_quantize_activations(x, self.spec.activation_bits, self.spec.activation_format)
        weight = None if torch.compiler.is_compiling() else self._take_batched_weight()
        return F.linear(x, self.quantized_weight() if weight is None else weight, self.bias)

    def quant_versions(self) -> tuple[int, ...]:
        """Versions of the tensors the quantized weight is computed from (in-place updates bump them)."""
        # Read from the module's dicts, not as attributes: called twice per layer and forward (host time).
        params, buffers = self._parameters, self._buffers
        bits = buffers["weight_bits"] if buffers["weight_row_bits"] is None else buffers["weight_row_bits"]
        zero = params["weight_zero_point"]
        return (params["weight"]._version, params["weight_scale"]._version, bits._version,
                -1 if zero is None else zero._version)

    def _take_batched_weight(self) -> torch.Tensor | None:
        # Left by the model's bucketed pass for this forward; stale (None) if a tensor changed since.
        entry = self.__dict__.get(BATCHED_WEIGHT)
        if entry is None:
            return None
        if not isinstance(entry, tuple):  # the bucket waits for its first layer: this one
            entry.quantize()
        weight, versions = self.__dict__.pop(BATCHED_WEIGHT)
        return weight if versions == self.quant_versions() else None

    def quant_parameters(self) -> list[nn.Parameter]:
        """The quantizer's own trainable parameters (scales, zero points, codebook): what a bit change re-fits."""
        return [p for name, p in self.named_parameters(recurse=False) if name not in ("weight", "bias")]

    # -- state changes --------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_quant_params(self, rows: torch.Tensor | None = None) -> None:
        """(Re)initialise scales/zero points from the current float weight for the current bits (of ``rows``, a
        boolean (out,) mask, only; default all)."""
        w, spec = self.weight_oi(), self.spec
        bits = self.bits if self.weight_row_bits is None else self.weight_row_bits
        if rows is None:
            scale, zero = init_scales(w, bits, spec.group_size, spec.symmetric, spec.scale_init)
            self.weight_scale.copy_(scale)
            if self.weight_zero_point is not None:
                self.weight_zero_point.copy_(zero)
            return
        index = rows.nonzero().squeeze(1)
        if index.numel():
            row_bits = bits[index] if isinstance(bits, torch.Tensor) else bits
            scale, zero = init_scales(w[index], row_bits, spec.group_size, spec.symmetric, spec.scale_init)
            self.weight_scale[index] = scale.to(self.weight_scale.dtype)
            if self.weight_zero_point is not None:
                self.weight_zero_point[index] = zero.to(self.weight_zero_point.dtype)

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Move the layer (every row) to a new bit width; scales are re-fit in place for the new grid."""
        if bits == self.bits and (self.weight_row_bits is None or bool((self.weight_row_bits == bits).all())):
            return
        self.weight_bits.fill_(bits)
        if self.weight_row_bits is not None:
            self.weight_row_bits.fill_(bits)
        self.reset_quant_params()

    @torch.no_grad()
    def set_row_bits(self, row_bits: torch.Tensor) -> None:
        """One width per output row (``bits_granularity="row"`` layers); re-fits the scales of the rows that change,
        in place (parameters keep shape and identity)."""
        if self.weight_row_bits is None:
            raise ValueError("set_row_bits needs a layer with per-row widths; load the model with "
                             "QATConfig(bits_granularity='row')")
        row_bits = row_bits.to(self.weight_row_bits.device, torch.int8)
        if row_bits.shape != self.weight_row_bits.shape:
            raise ValueError(f"set_row_bits: row_bits has shape {tuple(row_bits.shape)}; allowed: "
                             f"{tuple(self.weight_row_bits.shape)} (one width per output row)")
        changed = row_bits != self.weight_row_bits
        self.weight_row_bits.copy_(row_bits)
        self.weight_bits.fill_(int(row_bits.max()))
        self.reset_quant_params(changed)

    def extra_repr(self) -> str:
        s = self.spec
        bits = "meta" if self.weight_bits.is_meta else self.bits
        if self.weight_row_bits is not None:
            bits = f"{bits} (per row)"
        return (f"{super().extra_repr()}, bits={bits}, group_size={s.group_size}, symmetric={s.symmetric}, "
                f"rounding={s.rounding}, clamping={s.clamping}, activation_bits={s.activation_bits}")


def _fit_before_state_dict(module: FakeQuantMixin, prefix: str, keep_vars: bool) -> None:
    module._run_pending_fit()


class QATLinear(FakeQuantMixin, nn.Linear):
    """`nn.Linear` whose weight is fake-quantized in `forward` (peft treats it as a Linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerQuantSpec,
                 device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quant_state(spec, out_features, in_features, device)

    def weight_oi(self) -> torch.Tensor:
        return self.weight

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: LayerQuantSpec) -> QATLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, spec,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    @torch.no_grad()
    def to_float(self) -> nn.Linear:
        """A plain `nn.Linear` holding the quantized weight (exactly what this layer computes in eval)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(self.quantized_weight(exact=True))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear


class QATConv1D(FakeQuantMixin, Conv1D):
    """transformers' `Conv1D` (weight stored (in, out), as in GPT-2 checkpoints) with fake-quantized weight."""

    def __init__(self, nf: int, nx: int, spec: LayerQuantSpec, device=None, dtype=None) -> None:
        Conv1D.__init__(self, nf, nx)
        self.to(device=device, dtype=dtype)
        self._init_quant_state(spec, nf, nx, device)

    @property
    def in_features(self) -> int:
        return self.nx

    @property
    def out_features(self) -> int:
        return self.nf

    def weight_oi(self) -> torch.Tensor:
        return self.weight.t()

    @classmethod
    def from_float(cls, conv: Conv1D, spec: LayerQuantSpec) -> QATConv1D:
        layer = cls(conv.nf, conv.nx, spec, device=conv.weight.device, dtype=conv.weight.dtype)
        layer.weight = conv.weight
        layer.bias = conv.bias
        return layer

    @torch.no_grad()
    def to_float(self) -> Conv1D:
        conv = Conv1D(self.nf, self.nx).to(device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(self.quantized_weight(exact=True).t())
        conv.bias.copy_(self.bias)
        return conv


QAT_LAYER_TYPES: tuple[type[FakeQuantMixin], ...] = (QATLinear, QATConv1D)

r"""Quantizer primitives: integer grids, scale initialisation and differentiable round/clamp.

Notation: a weight group ``w``, its scale ``s > 0``, integer zero point ``z``, ``b`` bits.

- symmetric:  ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``,  ``ŵ = q · s``
- asymmetric: ``q = clamp(round(w / s) + z, 0, 2^b - 1)``,        ``ŵ = (q - z) · s``
  (the stored zero point is a float parameter; ``z = round(zero_point)`` with a straight-through gradient,
  so the grid is always an integer grid that packs exactly.)

Rounding
    ``ste``:  forward ``round(x)``, backward identity. With ``ŵ = q · s`` autograd then yields the LSQ
    gradient for ``s``: ``round(x) - x`` inside the range and ``qmin``/``qmax`` where clamped.
    ``soft`` (sharpness ``α``): ``r_α(x) = ⌊x⌋ + 1/2 + tanh(α (x - ⌊x⌋ - 1/2)) / (2 tanh(α / 2))``.
    ``r_α`` is continuous and differentiable, tends to ``x`` as ``α → 0`` and to ``round(x)`` as ``α → ∞``.

Clamping
    ``hard``: ``clamp(x, lo, hi)``.
    ``soft`` (sharpness ``β``): ``c_β(x) = lo + softplus_β(x - lo) - softplus_β(x - hi)`` with
    ``softplus_β(u) = log(1 + e^{βu}) / β``; ``c_β → clamp`` as ``β → ∞``.

Training anneals ``α = β`` from a small value to ``∞`` (`hfqat.set_soft_sharpness`, driven by `QATCallback`).
At ``∞``, and always in eval mode, the exact quantizer runs, which is bit-for-bit what export packs:
``fake_quantize(...)`` equals ``dequantize(quantize(...))`` exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import fused_fake_quant

SCALE_EPS = 1e-10
MSE_SHRINK_GRID = torch.linspace(1.0, 0.35, 40).tolist()


class _RoundSTE(torch.autograd.Function):
    """round() whose gradient is the identity (exact forward, unlike ``x + (round(x) - x).detach()``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def soft_round(x: torch.Tensor, sharpness: float) -> torch.Tensor:
    floor = torch.floor(x).detach()
    frac = x - floor - 0.5
    return floor + 0.5 + torch.tanh(sharpness * frac) / (2.0 * math.tanh(sharpness / 2.0))


def soft_clamp(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, sharpness: float) -> torch.Tensor:
    return lo + F.softplus(x - lo, beta=sharpness) - F.softplus(x - hi, beta=sharpness)


def int_range(bits: torch.Tensor | int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmin, qmax) of the integer grid, as float tensors (no host sync when bits is a device tensor)."""
    bits = torch.as_tensor(bits, dtype=torch.float32)
    if symmetric:
        half = torch.exp2(bits - 1)
        return -half, half - 1
    return torch.zeros_like(bits), torch.exp2(bits) - 1


def effective_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale actually used: positive whatever the optimizer did to the parameter."""
    return scale.float().abs().clamp_min(SCALE_EPS)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = w.shape
    return w.float().reshape(out_features, in_features // group_size, group_size)


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: torch.Tensor | int,
    group_size: int,
) -> torch.Tensor:
    """Integer codes (as float32, shape of ``w``) of the exact quantizer; used by export and sensitivity."""
    qmin, qmax = int_range(bits, zero_point is None)
    x = _grouped(w, group_size) / effective_scale(scale).unsqueeze(-1)
    q = torch.round(x)
    if zero_point is not None:
        q = q + torch.round(zero_point.float()).unsqueeze(-1)
    return torch.clamp(q, qmin.to(q.device), qmax.to(q.device)).reshape(w.shape)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """float32 weights from integer codes: ``(q - z) · s`` per group."""
    qg = _grouped(q, group_size)
    if zero_point is not None:
        qg = qg - torch.round(zero_point.float()).unsqueeze(-1)
    return (qg * effective_scale(scale).unsqueeze(-1)).reshape(q.shape)


def ste_forward(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: torch.Tensor,
                group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The exact quantizer's value ``dequantize(quantize(w))`` in ``out_dtype``: one fused kernel where
    `hfqat.quant.fused_fake_quant` applies, the torch code otherwise."""
    if fused_fake_quant.supports(w, scale, zero_point, bits, group_size):
        return fused_fake_quant.forward(w, scale, zero_point, bits, group_size, out_dtype)
    return dequantize(quantize(w, scale, zero_point, bits, group_size), scale, zero_point, group_size).to(out_dtype)


def ste_backward(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: torch.Tensor,
                 group_size: int, grad: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad_w in w's dtype, grad_scale, grad_zero_point or None) of `ste_forward` (STE / LSQ), recomputing the
    codes from the inputs. Gradients (x = w/s, r = round(x) + z): ``∂ŵ/∂w = 1[qmin ≤ r ≤ qmax]``,
    ``∂ŵ/∂s = (q - z) - x·1[inside]`` (LSQ), ``∂ŵ/∂z = -s·1[outside]``."""
    if fused_fake_quant.supports(w, scale, zero_point, bits, group_size):
        return fused_fake_quant.backward(w, scale, zero_point, bits, group_size, grad)
    qmin, qmax = (v.to(w.device) for v in int_range(bits, zero_point is None))
    s = effective_scale(scale).unsqueeze(-1)
    x = _grouped(w, group_size) / s
    r = torch.round(x)
    z = torch.round(zero_point.float()).unsqueeze(-1) if zero_point is not None else None
    if z is not None:
        r = r + z
    inside = (r >= qmin) & (r <= qmax)
    g = _grouped(grad, group_size)
    grad_w = (g * inside).reshape(w.shape).to(w.dtype)
    q_minus_z = torch.clamp(r, qmin, qmax) - (z if z is not None else 0)
    ds = (g * (q_minus_z - torch.where(inside, x, 0.0))).sum(-1)
    # through effective_scale = |scale| clamped at SCALE_EPS
    grad_s = (ds * torch.sign(scale.float()) * (scale.float().abs() > SCALE_EPS)).to(scale.dtype)
    grad_z = (-(g * s) * ~inside).sum(-1).to(zero_point.dtype) if zero_point is not None else None
    return grad_w, grad_s, grad_z


class _FakeQuantSTE(torch.autograd.Function):
    """Fused exact quantize→dequantize with STE/LSQ gradients, for ``rounding="ste"``, ``clamping="hard"``.

    One graph node instead of ~10 elementwise ones; backward recomputes the codes from the saved inputs
    rather than keeping full-size intermediates alive (`ste_forward`, `ste_backward`).
    """

    @staticmethod
    def forward(ctx, w, scale, zero_point, bits, group_size, out_dtype):
        ctx.save_for_backward(w, scale, zero_point, bits)
        ctx.group_size = group_size
        return ste_forward(w, scale, zero_point, bits, group_size, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        w, scale, zero_point, bits = ctx.saved_tensors
        grad_w, grad_s, grad_z = ste_backward(w, scale, zero_point, bits, ctx.group_size, grad)
        return (grad_w if ctx.needs_input_grad[0] else None, grad_s if ctx.needs_input_grad[1] else None,
                grad_z if ctx.needs_input_grad[2] else None, None, None, None)


def fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: torch.Tensor | int,
    group_size: int,
    rounding: str = "ste",
    clamping: str = "hard",
    sharpness: float = math.inf,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Differentiable quantize→dequantize of ``w`` (out, in); returns ``out_dtype`` (float32) of the same shape.

    ``bits``: one width, or one per group as an (out, in // group_size, 1) tensor.

    With ``sharpness=inf`` (or ste/hard) the value equals ``dequantize(quantize(w, ...))`` exactly (computed
    in float32, then rounded once to ``out_dtype``). On CUDA that path runs as fused Triton kernels
    (`hfqat.quant.fused_fake_quant`).
    """
    if not (math.isfinite(sharpness) and (rounding == "soft" or clamping == "soft")):
        if not torch.compiler.is_compiling():
            bits = torch.as_tensor(bits, device=w.device)
            return _FakeQuantSTE.apply(w, scale, zero_point, bits, group_size, out_dtype)
        # Under torch.compile: the same quantizer as plain differentiable ops (STE round, hard clamp; autograd
        # then yields exactly the fused function's LSQ gradients), which inductor fuses itself.
        rounding, clamping = "ste", "hard"
    qmin, qmax = (v.to(w.device) for v in int_range(bits, zero_point is None))
    s = effective_scale(scale).unsqueeze(-1)
    x = _grouped(w, group_size) / s
    q = soft_round(x, sharpness) if rounding == "soft" else round_ste(x)
    z = None
    if zero_point is not None:
        z = round_ste(zero_point.float()).unsqueeze(-1)
        q = q + z
    q = soft_clamp(q, qmin, qmax, sharpness) if clamping == "soft" else torch.clamp(q, qmin, qmax)
    if z is not None:
        q = q - z
    return (q * s).reshape(w.shape).to(out_dtype)


@torch.no_grad()
def fill_placeholder_scales(scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
    """Scale 1, zero point 0: finite stand-ins for quantizer parameters whose fit has not run yet."""
    if not scale.is_meta:
        scale.fill_(1.0)
        if zero_point is not None:
            zero_point.zero_()


def init_scales(
    w: torch.Tensor, bits: int | torch.Tensor, group_size: int, symmetric: bool, method: str = "mse"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) for ``w`` (out, in), shape (out, in // group_size); ``bits``: one width, or one per
    row as an (out,) tensor.

    ``minmax`` covers each group's range; ``mse`` additionally searches a shrink factor of that range per
    group minimising the squared quantization error (clipping a few outliers usually lowers total error); ``range``
    divides the group's range by ``2^b - 1`` as torchao's ``choose_qparams`` does: for symmetric grids the range is
    ±max|w|, so the scale is max|w| / (qmax + 1/2) and only the largest positive weight clips, by half a step
    (asymmetric grids: ``minmax``).
    """
    wg = _grouped(w.detach(), group_size)
    if isinstance(bits, torch.Tensor) and bits.numel() > 1:
        bits = bits.to(wg.device).reshape(-1, 1, 1)
        qmin, qmax = (v.reshape(-1, 1) for v in int_range(bits, symmetric))  # (out, 1): per row
    else:
        qmin, qmax = (float(v) for v in int_range(bits, symmetric))
    # The group ranges once (every candidate scales them); the candidates' errors below are those of
    # `dequantize(quantize(...))` op for op (the same values) without its host-side bound tensors, whose copy to
    # the GPU waits for it at every candidate.
    if symmetric:
        amax = wg.abs().amax(-1)
    else:
        lo_range, hi_range = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)

    def candidate(shrink: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if symmetric:
            return (amax * shrink / qmax).clamp_min(SCALE_EPS), None
        lo, hi = lo_range * shrink, hi_range * shrink
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
        return scale, torch.clamp(torch.round(-lo / scale), qmin, qmax)

    if method == "range" and symmetric:
        return candidate(2 * qmax / (qmax - qmin))  # max|w| · shrink / qmax = 2 max|w| / (qmax - qmin)
    if method in ("minmax", "range"):
        return candidate(1.0)
    low, high = (v.unsqueeze(-1) if isinstance(v, torch.Tensor) else v for v in (qmin, qmax))

    def squared_error(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        s = scale.unsqueeze(-1)
        q = torch.round(wg / s)
        if zero is None:
            q = q.clamp_(low, high)
        else:
            z = zero.unsqueeze(-1)
            q = q.add_(z).clamp_(low, high).sub_(z)
        return q.mul_(s).sub_(wg).pow_(2).sum(-1)

    best_scale, best_zero = candidate(1.0)
    best_err = torch.full_like(best_scale, math.inf)
    for shrink in MSE_SHRINK_GRID:
        scale, zero = candidate(shrink)
        err = squared_error(scale, zero)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


# -- dynamic per-token activation quantizers: exactly what vLLM's W8A8 kernels do at serving time ----------------
# int8 (csrc/quantization/compressed_tensors/int8_quant_kernels.cu): scale = amax / 127 in fp32, codes
# round-half-even(x · (127 / amax)) saturated to int8, 0 for an all-zero token. FP8 (QuantFP8.forward_native and
# its CUDA twin): scale = max(amax / 448, 1 / (448 · 512)), codes = e4m3(clamp(x · (1 / scale), ±448)). A model
# trained with these sees at train time the very codes it is served with. The divisions by 127 / 448 are written as
# products with the fp32 reciprocal, which is what torch's CUDA division by a constant computes (CPU torch would
# divide exactly, sometimes one ulp apart): the scales are then the same bits on every device, and the same as
# the Triton quantizer's (`hfqat.export.kernels.triton_w8a8`). ``127 / amax`` is ``amax.reciprocal() * 127``
# everywhere (torch's ``__rtruediv__``).
INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
ACTIVATION_FORMATS = ("int", "fp8")


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 (..., 1) per-token scales) of vLLM's dynamic per-token int8 quantizer."""
    amax = x.detach().abs().amax(-1, keepdim=True).float()
    inverse = torch.where(amax > 0, INT8_MAX / amax, torch.zeros_like(amax))
    codes = torch.clamp(torch.round(x.detach().float() * inverse), -INT8_MAX - 1, INT8_MAX)
    return codes.to(torch.int8), amax * (1 / INT8_MAX)


def quantize_activations_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, fp32 (..., 1) per-token scales) of vLLM's dynamic per-token FP8 quantizer."""
    amax = x.detach().abs().amax(-1, keepdim=True).float()
    scale = (amax * (1 / FP8_MAX)).clamp_min(FP8_MIN_SCALE)
    codes = (x.detach().float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


class _ActivationSTE(torch.autograd.Function):
    """Forward: a dynamic per-token quantizer's dequantized output; backward: identity (straight through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str) -> torch.Tensor:
        codes, scale = (quantize_activations_fp8 if kind == "fp8" else quantize_activations_int8)(x)
        return (codes.float() * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quantize_activations(x: torch.Tensor, bits: int = 8, kind: str = "int") -> torch.Tensor:
    """Dynamic per-token symmetric fake quantization with a straight-through gradient: vLLM's int8 quantizer
    (``kind="int"``, 8 bits) or its FP8 e4m3 one (``kind="fp8"``), bit for bit (see `quantize_activations_int8`)."""
    if kind not in ACTIVATION_FORMATS:
        raise ValueError(f"kind={kind!r} is invalid; allowed values: {list(ACTIVATION_FORMATS)}")
    if kind == "int" and bits != 8:
        raise ValueError(f"bits={bits!r} is invalid for integer activations; allowed values: [8]")
    return _ActivationSTE.apply(x, kind)


def fake_quantize_fp8_weight(w: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32
                             ) -> torch.Tensor:
    """FP8 e4m3 fake quantization of an (out, in) weight with one scale per output channel, ``scale`` (out, 1):
    ``ŵ = e4m3(clamp(w / s, ±448)) · s`` (compressed-tensors' ``float-quantized`` codes). Straight-through for the
    cast, so autograd gives ``w`` the identity inside the range and ``s`` the LSQ gradient ``q - w / s``."""
    s = effective_scale(scale)
    x = torch.clamp(w.float() / s, -FP8_MAX, FP8_MAX)
    q = _CastSTE.apply(x)
    return (q * s).to(out_dtype)


class _CastSTE(torch.autograd.Function):
    """Round fp32 values to the nearest e4m3 value (exact forward, identity gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.to(FP8_DTYPE).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fp8_weight_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 codes `fake_quantize_fp8_weight` dequantizes (what the FP8 exports store)."""
    return torch.clamp(w.detach().float() / effective_scale(scale), -FP8_MAX, FP8_MAX).to(FP8_DTYPE)

r"""FP8 weights: ``QATConfig(weight_format="fp8")`` (e4m3, one scale per output channel).

Numerics (``s``: the channel's scale, trainable when ``learn_scales``)::

    q = e4m3(clamp(w / s, -448, 448))      (round to nearest even, `hfqat.quant.primitives.fake_quantize_fp8_weight`)
    ŵ = q · s

Initialisation ``s = amax(|w_row|) / 448`` (the row's largest weight lands on e4m3's largest value; no clip search:
e4m3's relative grid has no gain from clipping the way a uniform grid does). Gradients: straight through the cast
to ``w``, LSQ-style ``q - w / s`` to ``s``. With ``activation_bits=8`` the layer's inputs go through vLLM's dynamic
per-token FP8 quantizer (`hfqat.quant.primitives.quantize_activations_fp8`), so training sees the serving numerics.

An FP8 layer is always 8 bits wide: ``set_bits`` to any other width raises (bit allocation does not apply).
Export: compressed-tensors ``float-quantized`` (`hfqat.export.compressed_tensors`) and `save_packed`
(`hfqat.export.w8a8.PackedFP8Linear`, ``torch._scaled_mm`` on CUDA).
"""

from __future__ import annotations

import torch

from ..config import LayerQuantSpec
from .layers import FakeQuantMixin, QATConv1D, QATLinear
from .primitives import FP8_MAX, SCALE_EPS, fake_quantize_fp8_weight

WEIGHT_FORMAT = "fp8"
FP8_BITS = 8


class FP8Mixin(FakeQuantMixin):
    """Per-channel e4m3 fake quantization in place of the integer grid (same state layout: ``weight_scale`` is
    (out, 1), ``weight_bits`` is 8, no zero point)."""

    def _init_quant_state(self, spec: LayerQuantSpec, out_features: int, in_features: int, device=None) -> None:
        if spec.group_size != in_features or not spec.symmetric or spec.bits != FP8_BITS:
            raise ValueError(f"weight_format='fp8' layers are per channel, symmetric and 8-bit; got group_size="
                             f"{spec.group_size} (in_features={in_features}), symmetric={spec.symmetric}, "
                             f"bits={spec.bits}")
        super()._init_quant_state(spec, out_features, in_features, device)

    def fake_quantize_weight(self, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                             sharpness: float = float("inf"), out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fake_quantize_fp8_weight(w, scale, out_dtype)

    @torch.no_grad()
    def reset_quant_params(self, rows: torch.Tensor | None = None) -> None:
        scale = (self.weight_oi().detach().float().abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(SCALE_EPS)
        if rows is None:
            self.weight_scale.copy_(scale)
        else:
            self.weight_scale[rows] = scale[rows]

    def set_bits(self, bits: int) -> None:
        if bits != FP8_BITS:
            raise ValueError(f"set_bits({bits}) on an FP8 layer; allowed values: [{FP8_BITS}] (e4m3 weights have "
                             "one width)")


class FP8Linear(FP8Mixin, QATLinear):
    """`nn.Linear` with e4m3 fake-quantized weights."""


class FP8Conv1D(FP8Mixin, QATConv1D):
    """GPT-2 `Conv1D` with e4m3 fake-quantized weights."""

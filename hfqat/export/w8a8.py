"""`PackedFP8Linear`: the packed inference layer of FP8 weights (``QATConfig(weight_format="fp8")``).

Stored per layer: ``qweight``, the e4m3 bit patterns as 8-bit codes in the packing layout of every packed layer
(`hfqat.export.packing`), and ``scales`` fp32 (1, out), one per output channel; the weight is exactly
``e4m3(code) · scale``, the fake-quantized layer's. With ``activation_bits=8`` the activations go through vLLM's
dynamic per-token FP8 quantizer; on CUDA (sm89+, bf16) the matmul runs as ``torch._scaled_mm`` with row-wise scales
(`hfqat.export.kernels.w8a8`), elsewhere as the exact fp32 ``dequant`` fallback. (Integer W8A8 layers are plain
`PackedLinear` layers: 8-bit per channel with ``activation_bits=8``, run by the ``w8a8_triton`` / ``w8a8_int8``
backends.)
"""

from __future__ import annotations

from typing import Any

import torch

from ..quant.fp8 import FP8_BITS, WEIGHT_FORMAT
from ..quant.layers import FakeQuantMixin
from ..quant.primitives import FP8_DTYPE, effective_scale, fp8_weight_codes
from .kernels import FP8_AUTO_ORDER, FP8_BACKENDS
from .packed_layer import PackedLayer
from .packing import unpack


class PackedFP8Linear(PackedLayer):
    """Inference linear layer of e4m3 weights with per-channel fp32 scales; ``y = x · Wᵀ + b``."""

    weight_format = WEIGHT_FORMAT
    activation_format = "fp8"
    backends = FP8_BACKENDS
    auto_order = FP8_AUTO_ORDER

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = FP8_BITS,
                 group_size: int | None = None, activation_bits: int | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, FP8_BITS, in_features, activation_bits, device, dtype)
        self.register_buffer("scales", torch.empty(1, out_features, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_qat(cls, layer: FakeQuantMixin) -> PackedFP8Linear:
        w = layer.weight_oi()
        packed = cls(layer.in_features, layer.out_features, layer.bias is not None,
                     activation_bits=layer.spec.activation_bits, device=w.device,
                     dtype=layer.bias.dtype if layer.bias is not None else w.dtype)
        codes = fp8_weight_codes(w, layer.weight_scale).view(torch.uint8).to(torch.int32)
        packed._store(codes, layer.bias)
        packed.scales.copy_(effective_scale(layer.weight_scale).t())
        return packed

    def fp8_weight(self) -> torch.Tensor:
        """The (out, in) e4m3 weight codes."""
        codes = unpack(self.qweight, FP8_BITS, self.in_features)
        return codes.to(torch.uint8).view(FP8_DTYPE)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.fp8_weight().float() * self.scales.t()).to(dtype)

    def format_fields(self) -> dict[str, Any]:
        return {"weight_format": WEIGHT_FORMAT}

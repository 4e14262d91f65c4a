"""`PackedCodebookLinear`: the inference layer of a codebook-quantized linear (``weight_format="codebook"``).

Stores the centroid indices packed with `hfqat.export.packing` and the effective per-group tables; the
fake-quant weight of `hfqat.quant.codebook` is exactly ``codebook.gather(indices)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..quant.codebook import WEIGHT_FORMAT, CodebookMixin, kmeans_1d, nearest_centroid
from ..quant.primitives import _grouped, effective_scale
from .kernels import CODEBOOK_AUTO_ORDER, CODEBOOK_BACKENDS
from .packed_layer import PackedLayer, float_weight_oi
from .packing import unpack


# -- packed inference layer -------------------------------------------------------------------------------------
class PackedCodebookLinear(PackedLayer):
    """Inference layer of a codebook-quantized linear: packed indices + per-group fp32 tables; ``y = x·Wᵀ + b``.

    ``qweight``: int32 (in·bits/32 (padded), out), the `hfqat.export.packing` layout of the indices;
    ``codebook``: fp32 (out, in // group_size, 2^bits), ``W[n, k] = codebook[n, k // group_size, index[n, k]]``.
    The matmul backend comes from `CODEBOOK_BACKENDS` (see `PackedLayer`).
    """

    weight_format = WEIGHT_FORMAT
    backends = CODEBOOK_BACKENDS
    auto_order = CODEBOOK_AUTO_ORDER

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 activation_bits: int | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, bits, group_size, activation_bits, device, dtype)
        self.register_buffer("codebook", torch.empty(out_features, in_features // group_size, 1 << bits,
                                                     dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_qat(cls, layer: CodebookMixin) -> PackedCodebookLinear:
        """Pack a codebook layer: its exact assignments and its effective table ``s · C`` (the active slots)."""
        k = 1 << layer.bits
        # the same fp32 product the fake-quant forward forms element by element: s · C[a] == (s · C)[a]
        table = effective_scale(layer.weight_scale).unsqueeze(-1) * layer.weight_codebook.float()[..., :k]
        return cls._build(layer.codebook_indices(), table, layer.bias, layer.bits, layer.spec.group_size,
                          layer.spec.activation_bits, layer.weight.dtype)

    @classmethod
    @torch.no_grad()
    def from_float(cls, module: nn.Linear | Conv1D, bits: int, group_size: int,
                   sample_weight: torch.Tensor | None = None) -> PackedCodebookLinear:
        """Post-training k-means quantization of a float layer (``group_size=-1``: per channel), e.g. for benchmarks."""
        w, group_size = float_weight_oi(module, group_size)
        k = 1 << bits
        table = kmeans_1d(w.reshape(-1, group_size), k, sample_weight).view(w.shape[0], -1, k)
        indices = nearest_centroid(_grouped(w, group_size), table).reshape(w.shape)
        return cls._build(indices, table, module.bias, bits, group_size, None, w.dtype)

    @classmethod
    def _build(cls, indices: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, bits: int,
               group_size: int, activation_bits: int | None, dtype: torch.dtype) -> PackedCodebookLinear:
        out_features, in_features = indices.shape
        packed = cls(in_features, out_features, bias is not None, bits, group_size, activation_bits,
                     device=indices.device, dtype=bias.dtype if bias is not None else dtype)
        packed._store(indices, bias)
        packed.codebook.copy_(table)
        return packed

    def format_fields(self) -> dict[str, Any]:
        return {"weight_format": WEIGHT_FORMAT}

    def indices(self) -> torch.Tensor:
        """(out, in) int64 centroid indices."""
        return unpack(self.qweight, self.bits, self.in_features).long()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight: a gather from the tables (bit-identical to the fake-quant weight in fp32)."""
        idx = self.indices().view(self.out_features, -1, self.group_size)
        return self.codebook.gather(-1, idx).view(self.out_features, self.in_features).to(dtype)

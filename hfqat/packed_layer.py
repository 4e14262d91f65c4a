"""`PackedLayer`: what every packed inference layer shares, whatever its weight format.

A packed layer stores its weight as packed words (``qweight``) plus format-specific tables (integer scales and
zero points in `hfqat.export.PackedLinear`, centroid tables in `hfqat.codebook.PackedCodebookLinear`) and never
holds a float weight. Common to both: the bias, optional dynamic int8 activations, picking the matmul backend
on first use per (device, dtype) from the format's backend table (`hfqat.kernels`), the ``.weight`` alias of the
packed words, and `to_float`. Subclasses add their tensors, `dequantized_weight` and `config_entry`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .kernels import AUTO_ORDER, BACKENDS, BackendFactory, select_backend
from .packing import packed_rows
from .primitives import fake_quantize_activations


class PackedLayer(nn.Module):
    """Base of the packed inference layers: ``y = x · Wᵀ + b`` with ``W`` from packed words; see the module doc.

    ``backend`` names the matmul backend in use (set on the first forward); ``force_backend`` pins one.
    """

    backends: ClassVar[dict[str, BackendFactory]] = BACKENDS
    auto_order: ClassVar[tuple[str, ...]] = AUTO_ORDER

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 activation_bits: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if group_size < 1 or in_features % group_size:
            raise ValueError(f"group_size={group_size} must divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.activation_bits = bits, group_size, activation_bits
        self.register_buffer("qweight", torch.empty(packed_rows(in_features, bits), out_features, dtype=torch.int32,
                                                    device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.force_backend: str | None = None
        self.backend: str | None = None
        self._matmul = None
        self._prepared_key: tuple | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The packed int32 words (like bitsandbytes' packed ``weight``), for code that probes ``.weight``.

        transformers' weight init, for one, touches ``c_proj.weight`` of GPT-2 blocks by name.
        """
        return self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the packed words and tables encode."""
        raise NotImplementedError

    def config_entry(self) -> dict[str, Any]:
        """This layer's entry in ``QATConfig.packed_layers``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is not None:
            x = fake_quantize_activations(x, self.activation_bits)
        if self._prepared_key != (x.device, x.dtype, self.force_backend):
            self._prepare(x.device, x.dtype)
        return self._matmul(self, x)

    @torch.compiler.disable
    def _prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        self.backend, self._matmul = select_backend(self, device, dtype, self.force_backend,
                                                    backends=self.backends, order=self.auto_order)
        self._prepared_key = (device, dtype, self.force_backend)

    @torch.no_grad()
    def to_float(self) -> nn.Linear:
        """A plain `nn.Linear` computing the same function (in fp32 unless the bias says otherwise)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=dtype)
        linear.weight.copy_(self.dequantized_weight(dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

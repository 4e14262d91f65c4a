"""`PackedLayer`: what every packed inference layer shares, whatever its weight format.

A packed layer stores its weight as packed words (``qweight``) plus format-specific tables (integer scales and
zero points in `hfqat.export.packed.PackedLinear`, centroid tables in `hfqat.export.codebook.PackedCodebookLinear`) and never
holds a float weight. Common to both: the bias, optional dynamic int8 activations, picking the matmul backend
on first use per (device, dtype) from the format's backend table (`hfqat.export.kernels`), the ``.weight`` alias of the
packed words, `to_float`, the ``packed_layers`` entry and ``repr`` (around the subclass's `format_fields`), and
building an empty layer from a ``packed_layers`` entry (`from_entry`, before weight loading). Subclasses add their
tensors, `dequantized_weight`, `format_fields` and, where their constructor takes more, `entry_kwargs`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import QATConfig
from ..quant.primitives import fake_quantize_activations
from .kernels import AUTO_ORDER, BACKENDS, BackendFactory, select_backend
from .packing import LAYOUT, pack, packed_rows


def float_weight_oi(module: nn.Linear | Conv1D, group_size: int) -> tuple[torch.Tensor, int]:
    """A float layer's weight as (out, in) (GPT-2's ``Conv1D`` stores it transposed) and its group size
    (``-1``: the whole row, i.e. per channel), for the ``from_float`` constructors."""
    w = module.weight.t() if isinstance(module, Conv1D) else module.weight
    return w, w.shape[1] if group_size == -1 else group_size


class PackedLayer(nn.Module):
    """Base of the packed inference layers: ``y = x · Wᵀ + b`` with ``W`` from packed words; see the module doc.

    ``backend`` names the matmul backend in use (set on the first forward); ``force_backend`` pins one.
    """

    weight_format: ClassVar[str]  # the QATConfig.weight_format this class packs
    backends: ClassVar[dict[str, BackendFactory]] = BACKENDS
    auto_order: ClassVar[tuple[str, ...]] = AUTO_ORDER
    activation_format: ClassVar[str] = "int"  # the dynamic activation quantizer's format (with activation_bits)

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

    @classmethod
    def from_entry(cls, in_features: int, out_features: int, bias: bool, entry: dict[str, Any],
                   config: QATConfig, device=None, dtype=None) -> PackedLayer:
        """An empty layer for one ``QATConfig.packed_layers`` entry, to be filled by weight loading."""
        return cls(in_features, out_features, bias, int(entry["bits"]), int(entry["group_size"]),
                   activation_bits=config.activation_bits, device=device, dtype=dtype,
                   **cls.entry_kwargs(entry, config))

    @classmethod
    def entry_kwargs(cls, entry: dict[str, Any], config: QATConfig) -> dict[str, Any]:
        """The format's own constructor arguments, read from a ``packed_layers`` entry (none by default)."""
        return {}

    @torch.no_grad()
    def _store(self, codes: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Pack the (out, in) non-negative integer ``codes`` into ``qweight`` and copy the bias."""
        self.qweight.copy_(pack(codes.to(torch.int32), self.bits))
        if bias is not None:
            self.bias.copy_(bias)

    @property
    def weight(self) -> torch.Tensor:
        """The packed int32 words (like bitsandbytes' packed ``weight``), for code that probes ``.weight``.

        transformers' weight init, for one, touches ``c_proj.weight`` of GPT-2 blocks by name.
        """
        return self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the packed words and tables encode."""
        raise NotImplementedError

    def format_fields(self) -> dict[str, Any]:
        """What the format adds to the ``packed_layers`` entry (and the repr) besides bits and group size."""
        raise NotImplementedError

    def config_entry(self) -> dict[str, Any]:
        """This layer's entry in ``QATConfig.packed_layers``."""
        return {"bits": self.bits, "group_size": self.group_size, **self.format_fields(), "layout": LAYOUT,
                "in_features": self.in_features, "out_features": self.out_features}  # sizes: for model cards

    def extra_repr(self) -> str:
        fields = "".join(f", {key}={value}" for key, value in self.format_fields().items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}{fields}, activation_bits={self.activation_bits}, "
                f"backend={self.backend}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared_key != (x.device, x.dtype, self.force_backend):
            self._prepare(x.device, x.dtype)
        # W8A8 backends quantize the activations themselves (to real int8 / FP8 codes); the others see them
        # fake-quantized, with the same quantizer
        if self.activation_bits is not None and not getattr(self._matmul, "quantizes_input", False):
            x = fake_quantize_activations(x, self.activation_bits, self.activation_format)
        return self._matmul(self, x)

    @torch.compiler.disable
    def _prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        self.backend, self._matmul = select_backend(self, device, dtype, self.force_backend,
                                                    backends=self.backends, order=self.auto_order)
        self._prepared_key = (device, dtype, self.force_backend)

    def to_float(self) -> nn.Linear:
        """A plain `nn.Linear` computing the same function (in fp32 unless the bias says otherwise)."""
        return float_linear(self, self.qweight.device)


@torch.no_grad()
def float_linear(layer: nn.Module, device: torch.device) -> nn.Linear:
    """A plain `nn.Linear` holding a packed layer's ``dequantized_weight`` and bias (fp32 unless the bias is not)."""
    dtype = layer.bias.dtype if layer.bias is not None else torch.float32
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=device, dtype=dtype)
    linear.weight.copy_(layer.dequantized_weight(dtype))
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    return linear

"""Fake-quantized layers on llama.cpp's GGUF grids: `GGUFLinear` / `GGUFConv1D` (``weight_format="gguf"``).

The state is the integer layers' (``weight_bits``, ``weight_scale``, ``weight_zero_point``), read differently: the
scale and zero-point parameters are the GGUF sub-block scales and mins in slots of 16 weights
(`hfqat.quant.gguf_grids`), and ``weight_bits`` is the nominal width of the layer's current type
(``grid``: the configured type, or what re-allocation moved the layer to). ``bits_per_weight`` is its true storage
cost including scales, for bit budgets.
"""

from __future__ import annotations

import math

import torch

from .gguf_grids import (
    GGUF_GRIDS,
    GGUFCodes,
    GGUFGrid,
    fit_grid,
    gguf_codes,
    gguf_fake_quantize,
    grid_for_bits,
)
from .layers import FakeQuantMixin, QATConv1D, QATLinear


class GGUFMixin(FakeQuantMixin):
    """GGUF numerics on top of `FakeQuantMixin` (same bookkeeping and parameters, another quantizer)."""

    _grid_key: tuple | None = None
    _grid_value: GGUFGrid | None = None

    # -- the layer's type -----------------------------------------------------------------------------------
    @property
    def grid(self) -> GGUFGrid:
        """The GGUF type of the current ``weight_bits``. Cached on the buffer's storage and version counter, so a
        forward on an accelerator does not sync to read the width back."""
        bits = self.weight_bits
        key = (bits.device, bits.data_ptr(), bits._version)
        if self.__dict__.get("_grid_key") != key:
            self.__dict__["_grid_value"] = self.grid_for(int(bits))
            self.__dict__["_grid_key"] = key
        return self.__dict__["_grid_value"]

    def grid_for(self, bits: int) -> GGUFGrid:
        """The type ``set_bits(bits)`` gives this layer (ValueError when there is none for its in_features)."""
        return grid_for_bits(bits, GGUF_GRIDS[self.spec.gguf_type], self.in_features, self.spec.gguf_fallback)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight of the current type, scales and mins included (Q4_K: 4.5)."""
        return self.grid.bits_per_weight

    def candidate_bits_per_weight(self, bits: int) -> float:
        return self.grid_for(bits).bits_per_weight

    # -- numerics -------------------------------------------------------------------------------------------
    def fake_quantize_weight(self, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                             sharpness: float = math.inf, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's GGUF quantizer on any (out, in) weight with the given scale / min slots (always exact:
        ``sharpness`` does not apply)."""
        return gguf_fake_quantize(w, scale, zero_point, self.grid, out_dtype)

    @torch.no_grad()
    def gguf_codes(self) -> GGUFCodes:
        """The encoded blocks of the current weight (what `hfqat.export_gguf` packs)."""
        return gguf_codes(self.weight_oi(), self.weight_scale, self.weight_zero_point, self.grid)

    # -- state changes --------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_quant_params(self, rows: torch.Tensor | None = None) -> None:
        """Round-to-nearest fit (with a clip search per sub-block) of the scales and mins for the current type."""
        if rows is not None:
            raise ValueError("GGUF layers have one type per layer; allowed: rows=None")
        scale, zero = fit_grid(self.weight_oi(), self.grid)
        self.weight_scale.copy_(scale)
        self.weight_zero_point.copy_(zero)

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Move the layer to the GGUF type of nominal width ``bits`` (`GGUF_TYPE_FOR_BITS`); scales re-fit in place."""
        self.grid_for(bits)  # validates before anything changes
        if bits == self.bits:
            return
        self.weight_bits.fill_(bits)
        self.reset_quant_params()

    # -- candidate types (hfqat.train.sensitivity) ----------------------------------------------------------------
    def refit_candidates(self, bit_choices: tuple[int, ...]) -> bool:
        """Candidates are the round-to-nearest fits of each width's type, computed on demand (validated here)."""
        for b in bit_choices:
            self.grid_for(b)
        return True

    @torch.no_grad()
    def candidate_weight(self, bits: int) -> torch.Tensor:
        w = self.weight_oi().detach()
        grid = self.grid_for(bits)
        scale, zero = fit_grid(w, grid)
        return gguf_fake_quantize(w, scale, zero, grid)

    @torch.no_grad()
    def candidate_errors(self, bit_choices: tuple[int, ...]) -> torch.Tensor:
        w = self.weight_oi().detach().float()
        return torch.stack([(self.candidate_weight(b) - w).pow(2) for b in bit_choices])

    def extra_repr(self) -> str:
        base = super(FakeQuantMixin, self).extra_repr()  # nn.Linear / Conv1D's own
        kind = "meta" if self.weight_bits.is_meta else self.grid.name
        return f"{base}, weight_format=gguf, gguf_type={kind}, activation_bits={self.spec.activation_bits}"


class GGUFLinear(GGUFMixin, QATLinear):
    """`nn.Linear` whose weight is fake-quantized on a GGUF grid (a `QATLinear`: peft and the callback see it)."""


class GGUFConv1D(GGUFMixin, QATConv1D):
    """GPT-2 ``Conv1D`` on a GGUF grid."""

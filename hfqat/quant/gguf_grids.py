r"""llama.cpp's GGUF block formats as fake quantizers: ``QATConfig(weight_format="gguf", gguf_type="Q4_K")``.

Each type (`GGUF_GRIDS`) is described once by its block layout; the same description drives training numerics
(`gguf_fake_quantize`), the integer codes export writes (`gguf_codes`) and their byte packing (`pack_blocks`, the
inverse of the ``dequantize_blocks`` of the `gguf` package, which transformers and llama.cpp's gguf-py use).

Notation, per sub-block of ``sub_block`` weights ``w`` (its scale ``s``, its min ``m`` ≥ 0 for types with mins)::

    q = clamp(round((w + m) / s), q_lo, q_hi),     ŵ = s · q − m          (no min: m = 0)

and the scales and mins are the *encoded* ones, exactly as a GGUF file stores them:

- 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL): one fp16 scale (and fp16 min, stored as ``−m``) per block.
- K-quants (256-weight super-blocks): a fp16 super-scale ``D`` (and ``Dmin``) and one small integer code per
  sub-block: ``s = D · sc``, ``m = Dmin · mc``. Q4_K/Q5_K: 8 sub-blocks of 32, 6-bit ``sc, mc ∈ [0, 63]``; Q2_K: 16 of
  16, 4-bit ``sc, mc ∈ [0, 15]``, ``D = fp16(max s / 63 | 15)``; Q3_K: 16 of 16, signed 6-bit ``sc ∈ [−32, 31]``; Q6_K:
  16 of 16, int8 ``sc ∈ [−128, 127]``, ``D = fp16(−s_a / 32 | 128)`` with ``s_a`` the sub-scale of largest magnitude
  (llama.cpp's choice: it maps to the most negative code, the side with one more level).
- IQ4_NL: ``ŵ = d · k[q]`` with llama.cpp's 16 non-uniform levels ``k`` (the fallback of Q2_K/Q3_K, see below).

The float32 arithmetic is in the order gguf-py's dequantization uses (``(D·sc)·q − Dmin·mc``), so the fake-quant
weight equals the dequantized GGUF tensor bit for bit.

Training: the learned parameters are the sub-block scales ``weight_scale`` and mins ``weight_zero_point`` (the
min's slot; zero and unused for types without one), both (out, in / 16) — the finest sub-block of any type — so
that re-allocation between types keeps every parameter's shape; 32-weight sub-blocks read every other slot. The
super-scales are derived (``D`` from the largest sub-scale, as llama.cpp does); round, fp16 rounding and the integer
code rounding have straight-through gradients, clamps are hard, as in the integer format (LSQ-style gradients).

Bit widths: the allocator sees nominal bits; `grid_for_bits` maps them to types (2→Q2_K, 3→Q3_K, 4→Q4_K or the
layer's own 4-bit type, 5→Q5_K, 6→Q6_K, 8→Q8_0); ``GGUFGrid.bits_per_weight`` is the true storage cost including
scales (Q4_K 4.5, Q3_K 3.44, Q8_0 8.5). K-quants need in_features divisible by 256; llama.cpp then substitutes
another type (`hfqat.config.GGUF_LLAMA_CPP_FALLBACK`: Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, Q2_K/Q3_K→IQ4_NL); ``gguf_fallback="llama.cpp"``
does the same, the default "error" names the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import GGUF_TYPE_FOR_BITS, GGUF_TYPES, resolve_gguf_type
from .primitives import MSE_SHRINK_GRID, round_ste

SLOT = 16  # scale/min slot granularity: the smallest sub-block of any supported type
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGUFGrid:
    """One GGUF quantization type's block layout (see the module docstring)."""

    name: str
    bits: int  # nominal width: what the bit allocator and `bit_allocation` see
    block_size: int  # weights per stored block: 32, or 256 for K-quants
    sub_block: int  # weights sharing one scale (and min)
    q_lo: int
    q_hi: int
    has_min: bool
    code_lo: int | None = None  # K-quants: range of the integer sub-scale codes (mins use [0, code_hi])
    code_hi: int | None = None
    levels: tuple[int, ...] | None = None  # non-uniform grids (IQ4_NL): ŵ = d · levels[q]

    @property
    def is_k_quant(self) -> bool:
        return self.code_hi is not None

    @property
    def level_step(self) -> float:
        """Mean distance between adjacent levels in units of the block scale: 1 on uniform grids, 16 on IQ4_NL's.
        The learned scale slot is ``level_step · d``, the grid's step in weight units, so every type's scale has the
        magnitude (and Adam's fixed-size updates the relative speed) of a uniform grid's; with IQ4_NL's raw ``d``
        (1/16 of that) AdamW moved the scales ~16x faster relative to their size and 300 GPU steps diverged."""
        if self.levels is None:
            return 1.0
        return (self.levels[-1] - self.levels[0]) / (len(self.levels) - 1)

    @property
    def qtype(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.name]

    @property
    def type_size(self) -> int:
        """Bytes per block (gguf's ``GGML_QUANT_SIZES``)."""
        from gguf import GGML_QUANT_SIZES

        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight including scales and mins (what a bit budget should count)."""
        return self.type_size * 8 / self.block_size


GGUF_GRIDS: dict[str, GGUFGrid] = {g.name: g for g in (
    GGUFGrid("Q4_0", 4, 32, 32, -8, 7, False),
    GGUFGrid("Q4_1", 4, 32, 32, 0, 15, True),
    GGUFGrid("Q5_0", 5, 32, 32, -16, 15, False),
    GGUFGrid("Q5_1", 5, 32, 32, 0, 31, True),
    GGUFGrid("Q8_0", 8, 32, 32, -128, 127, False),
    GGUFGrid("IQ4_NL", 4, 32, 32, 0, 15, False, levels=IQ4_NL_LEVELS),
    GGUFGrid("Q2_K", 2, 256, 16, 0, 3, True, 0, 15),
    GGUFGrid("Q3_K", 3, 256, 16, -4, 3, False, -32, 31),
    GGUFGrid("Q4_K", 4, 256, 32, 0, 15, True, 0, 63),
    GGUFGrid("Q5_K", 5, 256, 32, 0, 31, True, 0, 63),
    GGUFGrid("Q6_K", 6, 256, 16, -32, 31, False, -128, 127),
)}
assert {n: (g.bits, g.block_size) for n, g in GGUF_GRIDS.items()} == GGUF_TYPES, "config.GGUF_TYPES out of sync"


def resolve_grid(name: str, in_features: int, fallback: str = "error", layer: str = "") -> GGUFGrid:
    """The grid a layer of ``in_features`` inputs uses for type ``name`` (`hfqat.config.resolve_gguf_type`)."""
    return GGUF_GRIDS[resolve_gguf_type(name, in_features, fallback, layer)]


def grid_for_bits(bits: int, own: GGUFGrid, in_features: int, fallback: str = "error") -> GGUFGrid:
    """The type a layer trained as ``own`` takes at a nominal width of ``bits`` (re-allocation)."""
    if bits == own.bits:
        return own
    if bits not in GGUF_TYPE_FOR_BITS:
        raise ValueError(f"bits={bits} has no GGUF type; allowed: {sorted(GGUF_TYPE_FOR_BITS)} ({GGUF_TYPE_FOR_BITS})")
    return resolve_grid(GGUF_TYPE_FOR_BITS[bits], in_features, fallback)


# -- straight-through primitives ---------------------------------------------------------------------------------
class _Fp16STE(torch.autograd.Function):
    """Round to the nearest fp16 value (kept as float32); identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.half().float()

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ValueSTE(torch.autograd.Function):
    """Forward: ``value`` (e.g. the nearest grid level of ``x``, computed without gradient); backward: identity to
    ``x``. With ŵ = d · value this gives d the LSQ-like gradient ``value − x``."""

    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return _Fp16STE.apply(x)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (sorted ascending) for every value; ties to the lower level."""
    mids = (levels[1:] + levels[:-1]) * 0.5
    return torch.searchsorted(mids, x.contiguous())


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, and 0 where b == 0 (an all-zero block); no inf/nan in either direction."""
    zero = b == 0
    return torch.where(zero, torch.zeros_like(a), a / torch.where(zero, torch.ones_like(b), b))


# -- the quantizer -----------------------------------------------------------------------------------------------
@dataclass
class GGUFCodes:
    """A layer's encoded GGUF state: everything a block stores, as float32 tensors (integers where integer).

    ``d``/``dmin``: (out, blocks) fp16 values of the block (super-)scales; ``sc``/``mc``: (out, sub-blocks) integer
    sub-scale / min codes (K-quants only); ``scale``/``min``: (out, sub-blocks) effective scale and min;
    ``q``: (out, in) integer codes (level indices for IQ4_NL).
    """

    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor | None
    mc: torch.Tensor | None
    scale: torch.Tensor
    min: torch.Tensor | None
    q: torch.Tensor


def slots_to_sub_blocks(slots: torch.Tensor, grid: GGUFGrid) -> torch.Tensor:
    """(out, in / 16) slots → (out, in / sub_block) values of the grid's sub-blocks (every other slot for 32)."""
    return slots[:, :: grid.sub_block // SLOT].float()


def sub_blocks_to_slots(values: torch.Tensor, grid: GGUFGrid) -> torch.Tensor:
    return values.repeat_interleave(grid.sub_block // SLOT, dim=1)


def _encode_k(values: torch.Tensor, grid: GGUFGrid, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(super-scale D (out, blocks), codes (out, subs), D·code (out, subs)) of K-quant sub-scales or mins."""
    out, subs = values.shape
    v = values.reshape(out, subs // (grid.block_size // grid.sub_block), -1)
    if signed:  # llama.cpp: the largest-magnitude sub-scale maps to the most negative code
        extreme = v.gather(-1, v.abs().argmax(-1, keepdim=True)).squeeze(-1)
        d, lo, hi = fp16_ste(extreme / grid.code_lo), grid.code_lo, grid.code_hi
    else:
        v = v.clamp_min(0.0)
        d, lo, hi = fp16_ste(v.amax(-1) / grid.code_hi), 0, grid.code_hi
    code = torch.clamp(round_ste(_safe_div(v, d.unsqueeze(-1))), lo, hi)
    return d, code.reshape(out, subs), (d.unsqueeze(-1) * code).reshape(out, subs)


def gguf_codes(w: torch.Tensor, scale_slots: torch.Tensor, min_slots: torch.Tensor | None,
               grid: GGUFGrid) -> GGUFCodes:
    """Encode weight ``w`` (out, in) on ``grid`` with the given scale/min slots; differentiable (STE)."""
    out, n_in = w.shape
    s = slots_to_sub_blocks(scale_slots, grid)
    m = slots_to_sub_blocks(min_slots, grid) if grid.has_min else None
    dmin = sc = mc = None
    if grid.is_k_quant:
        d, sc, s = _encode_k(s, grid, signed=grid.code_lo < 0)
        if m is not None:
            dmin, mc, m = _encode_k(m, grid, signed=False)
    else:
        s = d = fp16_ste(s / grid.level_step)  # level_step is 1 or 16: the division is exact
        if m is not None:
            m = -fp16_ste(-m)  # the block stores −m in fp16
            dmin = -m
    wg = w.float().reshape(out, -1, grid.sub_block)
    x = _safe_div(wg if m is None else wg + m.unsqueeze(-1), s.unsqueeze(-1))
    if grid.levels is not None:
        q = nearest_level(x.detach(), _levels(grid, w.device))
    else:
        q = torch.clamp(round_ste(x), grid.q_lo, grid.q_hi)
    return GGUFCodes(d, dmin, sc, mc, s, m, q.reshape(out, n_in))


def _levels(grid: GGUFGrid, device) -> torch.Tensor:
    return torch.tensor(grid.levels, dtype=torch.float32, device=device)


def gguf_fake_quantize(w: torch.Tensor, scale_slots: torch.Tensor, min_slots: torch.Tensor | None, grid: GGUFGrid,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Differentiable GGUF quantize→dequantize of ``w`` (out, in): exactly gguf-py's dequantization of the blocks
    `pack_blocks` writes from `gguf_codes` (float32 arithmetic in the same order)."""
    codes = gguf_codes(w, scale_slots, min_slots, grid)
    out = w.shape[0]
    s = codes.scale.unsqueeze(-1)
    if grid.levels is not None:
        x = _safe_div(w.float().reshape(out, -1, grid.sub_block), s)
        level = _levels(grid, w.device)[codes.q.reshape(x.shape)]
        wq = s * _ValueSTE.apply(x, level)
    else:
        wq = s * codes.q.reshape(out, -1, grid.sub_block)
        if codes.min is not None:
            wq = wq - codes.min.unsqueeze(-1)
    return wq.reshape(w.shape).to(out_dtype)


# -- initialisation: round-to-nearest with a clip search per sub-block ---------------------------------------------
@torch.no_grad()
def fit_grid(w: torch.Tensor, grid: GGUFGrid, shrink: tuple[float, ...] = tuple(MSE_SHRINK_GRID[:24:2])
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale slots, min slots), each (out, in / 16) float32: per sub-block, the min-max (or llama.cpp's signed
    max-magnitude) range shrunk by the factor in ``shrink`` with the least squared error (the stand-in for llama.cpp's
    ``make_qx_quants`` / ``make_qkx2_quants`` searches; the super-block encoding is applied afterwards)."""
    out = w.shape[0]
    wg = w.detach().float().reshape(out, -1, grid.sub_block)
    best_err = best_s = best_m = None
    if grid.has_min:
        lo, hi = wg.amin(-1), wg.amax(-1)
        if grid.is_k_quant:
            lo = lo.clamp_max(0.0)  # K-quant mins are stored ≥ 0 (a block min above zero is lowered to zero)
    else:
        extreme = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    levels = _levels(grid, w.device) if grid.levels is not None else None
    for c in shrink:
        if grid.has_min:
            s, m = c * (hi - lo) / grid.q_hi, -c * lo
        else:
            s, m = c * extreme / (grid.levels[0] if levels is not None else grid.q_lo), torch.zeros_like(extreme)
        x = _safe_div(wg + m.unsqueeze(-1), s.unsqueeze(-1))
        q = levels[nearest_level(x, levels)] if levels is not None else x.round().clamp(grid.q_lo, grid.q_hi)
        err = (s.unsqueeze(-1) * q - m.unsqueeze(-1) - wg).pow(2).sum(-1)
        if best_err is None:
            best_err, best_s, best_m = err, s, m
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    return sub_blocks_to_slots(best_s * grid.level_step, grid), sub_blocks_to_slots(best_m, grid)


# -- byte packing (the inverse of gguf-py's dequantize_blocks) -----------------------------------------------------
def _pack(codes: np.ndarray, parts: int, length: int, width: int) -> np.ndarray:
    """Pack codes laid out as (blocks, groups, parts, length) into bytes (blocks, groups·length): code [g, p, i] goes
    to bits p·width.. of byte g·length + i (the layout of every K-quant and legacy quant field)."""
    n = codes.shape[0]
    c = codes.reshape(n, -1, parts, length).astype(np.uint16) & ((1 << width) - 1)
    shifts = (np.arange(parts, dtype=np.uint16) * width).reshape(1, 1, parts, 1)
    return np.bitwise_or.reduce(c << shifts, axis=2).astype(np.uint8).reshape(n, -1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _k_scale_bytes(sc: np.ndarray, mc: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins (gguf-py's ``Q4_K.get_scale_min`` inverted)."""
    sc, mc = sc.astype(np.uint8), mc.astype(np.uint8)
    low = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    mid = (mc[:, :4] & 0x3F) | ((mc[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((mc[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=1)


def pack_blocks(codes: GGUFCodes, grid: GGUFGrid) -> np.ndarray:
    """(out, in / block_size · type_size) uint8: the GGUF tensor data of a layer's codes, row-major like ggml."""
    out, n_in = codes.q.shape
    nb = out * n_in // grid.block_size
    q = codes.q.detach().cpu().numpy().astype(np.int64).reshape(nb, grid.block_size)
    d = codes.d.detach().cpu().numpy().reshape(nb)
    u = (q - grid.q_lo).astype(np.uint8) if grid.levels is None else q.astype(np.uint8)
    name = grid.name
    if not grid.is_k_quant:
        parts = [_f16_bytes(d)]
        if grid.has_min:
            parts.append(_f16_bytes(codes.dmin.detach().cpu().numpy().reshape(nb)))
        if name == "Q8_0":
            parts.append(q.astype(np.int8).view(np.uint8))
        elif grid.q_hi - grid.q_lo == 31:  # Q5_0 / Q5_1: 4 low bits as nibbles, the fifth in a 32-bit mask
            high = np.packbits((u >> 4).astype(np.uint8), axis=1, bitorder="little")  # bit e of a LE uint32
            parts += [high, _pack(u & 0x0F, 2, 16, 4)]
        else:
            parts.append(_pack(u, 2, 16, 4))
        blocks = np.concatenate(parts, axis=1)
    else:
        per = grid.block_size // grid.sub_block
        sc = codes.sc.detach().cpu().numpy().astype(np.int64).reshape(nb, per)
        mc = codes.mc.detach().cpu().numpy().astype(np.int64).reshape(nb, per) if grid.has_min else None
        dmin = _f16_bytes(codes.dmin.detach().cpu().numpy().reshape(nb)) if grid.has_min else None
        if name == "Q2_K":
            scales = (sc | (mc << 4)).astype(np.uint8)
            blocks = np.concatenate([scales, _pack(u, 4, 32, 2), _f16_bytes(d), dmin], axis=1)
        elif name == "Q3_K":
            s6 = (sc - grid.code_lo).astype(np.uint8)
            scales = np.concatenate([_pack(s6 & 0x0F, 2, 8, 4), _pack(s6 >> 4, 4, 4, 2)], axis=1)
            blocks = np.concatenate([_pack(u >> 2, 8, 32, 1), _pack(u & 3, 4, 32, 2), scales, _f16_bytes(d)], axis=1)
        elif name == "Q4_K":
            blocks = np.concatenate([_f16_bytes(d), dmin, _k_scale_bytes(sc, mc), _pack(u, 2, 32, 4)], axis=1)
        elif name == "Q5_K":
            blocks = np.concatenate([_f16_bytes(d), dmin, _k_scale_bytes(sc, mc), _pack(u >> 4, 8, 32, 1),
                                     _pack(u & 0x0F, 2, 32, 4)], axis=1)
        elif name == "Q6_K":
            blocks = np.concatenate([_pack(u & 0x0F, 2, 64, 4), _pack(u >> 4, 4, 32, 2),
                                     sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)
        else:  # pragma: no cover - GGUF_GRIDS and this dispatch list the same K types
            raise ValueError(f"no packer for {name}")
    assert blocks.shape[1] == grid.type_size, (name, blocks.shape)
    return blocks.reshape(out, -1)


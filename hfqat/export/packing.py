r"""Bit packing of integer weight codes into int32 words (pure torch, vectorised).

Layout ("planes-k32", version 1), for a weight of shape (out_features N, in_features K) with unsigned codes
``u`` in ``[0, 2^bits)``:

- K is padded with zero codes to a multiple of 32, ``KP``; the codes of 32 consecutive input features form a
  *super row* that is stored in exactly ``bits`` int32 words, so every bit width is dense (3 bits take 3 bits).
- ``bits`` is split into power-of-two *planes*, largest first (3 → 2+1, 5 → 4+1, 6 → 4+2, 7 → 4+2+1; 2, 4, 8 are
  a single plane). The first plane holds the lowest bits of each code, the next plane the following bits.
- A plane of width ``p`` holds ``32 / p`` codes per word and takes ``KP · p / 32`` rows; element ``k`` sits in
  row ``k // (32/p)`` of its plane at bit ``(k % (32/p)) · p``. Planes are stacked along dim 0, so the packed
  tensor is ``(KP · bits / 32, N)`` int32: packed along K, contiguous along N. (A single 4-bit plane is the
  familiar GPTQ ``qweight`` order: row k // 8, shift 4 · (k % 8).)

Why planes: 3-bit codes pack without waste (no 10-codes-per-word padding) and a kernel extracts any element
with one shift and one mask per plane, using the same code path as the power-of-two widths. Why K-packed and
N-contiguous: a decode GEMV reads whole words once, coalesced across output channels.
"""

from __future__ import annotations

import torch

LAYOUT = "planes-k32-v1"
SUPER_ROW = 32  # input features per group of `bits` words
PACKABLE_BITS = tuple(range(1, 9))


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths of a bit width, largest first (lowest code bits in the first plane)."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; allowed values: {list(PACKABLE_BITS)}")
    return tuple(p for p in (8, 4, 2, 1) if bits & p)


def padded_in_features(in_features: int) -> int:
    return -(-in_features // SUPER_ROW) * SUPER_ROW


def packed_rows(in_features: int, bits: int) -> int:
    """Rows of the packed int32 tensor of a layer with `in_features` inputs."""
    return padded_in_features(in_features) * bits // SUPER_ROW


def code_offset(bits: int, symmetric: bool) -> int:
    """Added to signed symmetric codes to make them unsigned (0 for asymmetric codes, already unsigned)."""
    return 1 << (bits - 1) if symmetric else 0


def pack(codes: torch.Tensor, bits: int, chunk_rows: int = 2048) -> torch.Tensor:
    """Pack unsigned integer codes (N, K), values in [0, 2^bits), into the (rows, N) int32 layout above.

    Works on any device; rows of N are processed in chunks of `chunk_rows` to bound the int64 temporaries.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    kp = padded_in_features(k)
    out = torch.empty(n, packed_rows(k, bits), dtype=torch.int32, device=codes.device)
    for start in range(0, n, chunk_rows):
        u = codes[start:start + chunk_rows].to(torch.int64)
        u = torch.nn.functional.pad(u, (0, kp - k))
        words, low = [], 0
        for p in planes(bits):
            per_word = 32 // p
            shifts = torch.arange(per_word, device=u.device, dtype=torch.int64) * p
            v = ((u >> low) & ((1 << p) - 1)).view(u.shape[0], kp // per_word, per_word)
            words.append((v << shifts).sum(-1))  # distinct bit fields: the sum is an OR
            low += p
        w = torch.cat(words, dim=1)
        out[start:start + chunk_rows] = torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)
    return out.t().contiguous()


def unpack_kn(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack` in the packed orientation: unsigned codes (in_features, N) as int32.

    Works on the contiguous (rows, N) words directly (a transposed read would stride through memory).
    """
    kp = padded_in_features(in_features)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != packed_rows(in_features, bits):
        raise ValueError(
            f"packed must be int32 of shape ({packed_rows(in_features, bits)}, out_features) for bits={bits}, "
            f"in_features={in_features}; got {packed.dtype} {tuple(packed.shape)}"
        )
    n = packed.shape[1]
    codes = None
    row, low = 0, 0
    for p in planes(bits):
        per_word = 32 // p
        rows = kp * p // SUPER_ROW
        shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32).view(1, per_word, 1) * p
        # arithmetic shift drags the sign bit along; the mask keeps only the p bits of the field
        v = ((packed[row:row + rows].unsqueeze(1) >> shifts) & ((1 << p) - 1)).view(kp, n)
        codes = v if codes is None else codes | (v << low)
        row += rows
        low += p
    return codes[:in_features]


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: (rows, N) int32 → unsigned codes (N, in_features) as int32."""
    return unpack_kn(packed, bits, in_features).t().contiguous()


def packed_nbytes(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of one packed layer as `hfqat.export.packed.PackedLinear` stores it: codes + fp32 scales (+ int16 zeros)."""
    groups = in_features // group_size
    codes = packed_rows(in_features, bits) * out_features * 4
    scales = groups * out_features * 4
    zeros = 0 if symmetric else groups * out_features * 2
    return codes + scales + zeros

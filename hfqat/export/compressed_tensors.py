"""compressed-tensors export (what vLLM serves): `export_compressed_tensors`, driven by the scheme table `CT_SCHEMES`.

Every hfqat layer kind that compressed-tensors (>= 0.18, dense packing) can describe is written in its format:

- integer weights of 2-8 bits, symmetric or asymmetric (with zero points), group-wise or per channel, weight-only:
  ``pack-quantized`` (``weight_packed`` int32, 32 codes in exactly ``bits`` words, ``weight_scale``,
  ``weight_zero_point`` packed along the output dimension, ``weight_shape``);
- 8-bit symmetric per-channel integer weights with ``activation_bits=8``: ``int-quantized`` W8A8 (int8 ``weight``,
  per-channel ``weight_scale``, dynamic per-token int8 activations);
- FP8 (``weight_format="fp8"``): ``float-quantized`` (e4m3 ``weight``, per-channel ``weight_scale``; with
  ``activation_bits=8`` dynamic per-token FP8 activations).

Layers of different schemes (mixed widths) go into one ``config_group`` each. Codes and scales are hfqat's own, so a
decompressed layer holds the fake-quantized weight (scales rounded to the weight dtype for ``pack-quantized``; the
W8A8 / FP8 schemes keep fp32 scales, as vLLM applies them). compressed-tensors stores signed codes: our unsigned
asymmetric codes and zero points are shifted by ``2^(bits-1)``, which leaves ``(q - z) · s`` unchanged.

Refused, with the layer names, before anything is written: codebook and GPT-2 ``Conv1D`` layers, per-row mixed
widths (no compressed-tensors form: use `save_packed`, or allocate whole layers with the tie option), activation
quantization next to weights other than 8-bit symmetric per channel or FP8, and models whose vLLM-fused shards
(q/k/v, gate/up: `hfqat.train.allocation.tied_groups`) differ in scheme.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_directory
from ..quant.layers import FakeQuantMixin, QATConv1D
from ..quant.experts import qat_experts
from ..quant.modeling import qat_layers
from ..quant.primitives import effective_scale, fp8_weight_codes, quantize
from ..train.allocation import tied_groups
from .checkpoint import _check_plain_model, _write_checkpoint


@dataclass(frozen=True)
class CTScheme:
    """One family of hfqat layers and the compressed-tensors format it exports to."""

    name: str
    weight_format: str  # QATConfig.weight_format
    bits: tuple[int, ...]
    symmetric: tuple[bool, ...]
    group_wise: bool  # group strategy allowed (else per channel only)
    activations: str | None  # None (weight-only), "int" or "fp8": dynamic per-token 8-bit
    ct_format: str
    engines: dict[int, str]  # bits -> serving engines (where they differ by width); see `engines_for`

    def matches(self, layer: FakeQuantMixin) -> bool:
        activations = None if layer.spec.activation_bits is None else layer.spec.activation_format
        per_channel = layer.spec.group_size == layer.in_features
        return (layer.spec.weight_format == self.weight_format and layer.bits in self.bits
                and layer.spec.symmetric in self.symmetric and activations == self.activations
                and (self.group_wise or per_channel))

    def engines_for(self, bits: int) -> str:
        return self.engines[bits]


_TRANSFORMERS = "transformers (compressed-tensors)"
_VLLM_INT = "vLLM (Marlin / Machete), " + _TRANSFORMERS
_VLLM_NEW = _TRANSFORMERS + "; vLLM releases whose WNA16 scheme lists the width"
# compressed-tensors 0.20.1 allocates unpacked zero points when transformers builds the empty model (a bug; repro in
# tests/test_compressed_tensors.py), so transformers cannot load asymmetric pack-quantized folders until it is fixed
_TRANSFORMERS_ASYM = "transformers after a compressed-tensors fix (0.20.1 zero-point bug)"
# compressed-tensors' own forward scales int8 activations by amax/127.5, vLLM by amax/127 (what hfqat trains with)
_TRANSFORMERS_INT8 = "transformers (compressed-tensors: int8 activation scale amax/127.5, not vLLM's amax/127)"

# What export_compressed_tensors writes; the README's export table is generated from this (hfqat.export.capabilities).
CT_SCHEMES: tuple[CTScheme, ...] = (
    CTScheme("WnA16 symmetric", "int", (2, 3, 4, 5, 6, 7, 8), (True,), True, None, "pack-quantized",
             {b: _VLLM_INT if b in (4, 8) else _VLLM_NEW for b in range(2, 9)}),
    CTScheme("WnA16 asymmetric", "int", (2, 3, 4, 5, 6, 7, 8), (False,), True, None, "pack-quantized",
             {b: "vLLM (Marlin / Machete); " + _TRANSFORMERS_ASYM if b in (4, 8) else _TRANSFORMERS_ASYM
              for b in range(2, 9)}),
    CTScheme("W8A8 int8", "int", (8,), (True,), False, "int", "int-quantized",
             {8: "vLLM (CUTLASS int8 scaled_mm); " + _TRANSFORMERS_INT8}),
    CTScheme("FP8 W8A8", "fp8", (8,), (True,), False, "fp8", "float-quantized",
             {8: "vLLM (CUTLASS FP8 scaled_mm), " + _TRANSFORMERS}),
    CTScheme("FP8 W8A16", "fp8", (8,), (True,), False, None, "float-quantized",
             {8: "vLLM (FP8 Marlin), " + _TRANSFORMERS}),
)


def ct_scheme(layer: FakeQuantMixin) -> CTScheme | None:
    """The `CT_SCHEMES` entry a fake-quantized layer exports with, or None."""
    return next((s for s in CT_SCHEMES if s.matches(layer)), None)


def _refusal(name: str, layer: FakeQuantMixin) -> str | None:
    """Why `layer` has no compressed-tensors form, or None."""
    spec = layer.spec
    if isinstance(layer, QATConv1D):
        return f"{name}: it is a GPT-2 Conv1D layer (compressed-tensors targets nn.Linear)"
    if layer.rows_differ:
        return (f"{name}: its rows have different bit widths (bits_granularity='row'); compressed-tensors has no "
                "per-row mixed form")
    if spec.weight_format == "codebook":
        return f"{name}: it is a codebook (weight clustering) layer, not an integer or FP8 grid"
    if ct_scheme(layer) is None:
        if spec.activation_bits is not None:
            return (f"{name}: {layer.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} weights with "
                    f"group_size={spec.group_size} and {spec.activation_bits}-bit activations; W8A8 needs 8-bit "
                    "symmetric per-channel weights (or weight_format='fp8')")
        return f"{name}: {layer.bits}-bit weights with group_size={spec.group_size} match no compressed-tensors scheme"
    if layer.weight_zero_point is not None:
        zero = torch.round(layer.weight_zero_point.detach().float())
        if bool((zero < 0).any() or (zero > (1 << layer.bits) - 1).any()):
            return (f"{name}: its zero points left the {layer.bits}-bit grid [0, {(1 << layer.bits) - 1}], which "
                    "compressed-tensors stores them in")
    return None


def _quantization_args(layer: FakeQuantMixin, scheme: CTScheme) -> dict[str, Any]:
    spec = layer.spec
    per_channel = spec.group_size == layer.in_features
    weights = {
        "num_bits": layer.bits, "type": "float" if scheme.weight_format == "fp8" else "int",
        "symmetric": spec.symmetric, "dynamic": False, "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else spec.group_size, "block_structure": None, "actorder": None,
        "observer": "minmax", "observer_kwargs": {},
    }
    activations = None
    if scheme.activations is not None:
        activations = {
            "num_bits": 8, "type": "float" if scheme.activations == "fp8" else "int", "symmetric": True,
            "dynamic": True, "strategy": "token", "group_size": None, "block_structure": None, "actorder": None,
            "observer": None, "observer_kwargs": {},
        }
    return {"weights": weights, "input_activations": activations, "output_activations": None,
            "format": scheme.ct_format}


def _ct_config(schemes: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any]:
    by_scheme: dict[str, list[str]] = {}
    keys = {}
    for name, scheme in schemes.items():
        key = json.dumps(scheme, sort_keys=True)
        keys[key] = scheme
        by_scheme.setdefault(key, []).append(name)
    single = len(by_scheme) == 1
    groups = {
        f"group_{i}": {"targets": ["Linear"] if single else [f"re:^{re.escape(n)}$" for n in names], **keys[key]}
        for i, (key, names) in enumerate(by_scheme.items())
    }
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
        "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
    }


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense int32 packing of unsigned codes (rows, K) in [0, 2^bits): code ``k`` of a row starts
    at bit ``k · bits`` of the row's bit stream (little-endian words, a code may straddle two words), K padded with
    zeros to a multiple of 32, ceil(K · bits / 32) words per row."""
    rows, k = codes.shape
    u = torch.nn.functional.pad(codes.to(torch.int64), (0, -k % 32)).view(rows, -1, 32)
    start = torch.arange(32, dtype=torch.int64, device=codes.device) * bits
    word, shift = start // 32, start % 32
    low = (u << shift) & 0xFFFFFFFF
    out = torch.zeros(rows, u.shape[1], bits, dtype=torch.int64, device=codes.device)
    out.index_add_(2, word, low)  # distinct bit fields: the sum is an OR
    spill = shift + bits > 32
    if bool(spill.any()):
        out.index_add_(2, word[spill] + 1, u[..., spill] >> (32 - shift[spill]))
    out = out.view(rows, -1)[:, :-(-k * bits // 32)]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32).contiguous()


def _layer_tensors(layer: FakeQuantMixin, scheme: CTScheme) -> dict[str, torch.Tensor]:
    w = layer.weight_oi()
    if scheme.weight_format == "fp8":
        return {"weight": fp8_weight_codes(w, layer.weight_scale),
                "weight_scale": effective_scale(layer.weight_scale)}
    codes = quantize(w, layer.weight_scale, layer.weight_zero_point, layer.weight_bits, layer.spec.group_size)
    codes = codes.to(torch.int32)
    if scheme.ct_format == "int-quantized":
        return {"weight": codes.to(torch.int8), "weight_scale": effective_scale(layer.weight_scale)}
    offset = 1 << (layer.bits - 1)
    unsigned = codes + offset if layer.weight_zero_point is None else codes
    tensors = {
        "weight_packed": pack_dense(unsigned, layer.bits),
        "weight_scale": effective_scale(layer.weight_scale).to(w.dtype),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if layer.weight_zero_point is not None:  # packed along the output dimension, as compressed-tensors does
        zero = torch.round(layer.weight_zero_point.detach().float()).to(torch.int32)
        tensors["weight_zero_point"] = pack_dense(zero.t(), layer.bits).t().contiguous()
    return tensors


def _check_fused(schemes: dict[str, dict[str, Any]], model: nn.Module) -> None:
    mismatched = []
    for group in tied_groups(model):
        kinds = {json.dumps(schemes[name], sort_keys=True) for name in group if name in schemes}
        if len(kinds) > 1:
            widths = ", ".join(f"{name}: {schemes[name]['weights']['num_bits']}-bit" for name in group)
            mismatched.append(f"({widths})")
    if mismatched:
        raise ValueError(
            "vLLM fuses q/k/v and gate/up into one layer each, whose shards must share one quantization scheme; "
            f"these differ: {'; '.join(mismatched)}. Allocate with the shards tied "
            "(hfqat.train.allocation.allocate_tied_bits / tied_groups; tie_bits to widen a given map), or export "
            "with hfqat.save_packed"
        )


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` in compressed-tensors format (what vLLM serves), atomically; see the module doc for the schemes.

    Raises a `ValueError` naming every layer that has no compressed-tensors form (or whose fused shards differ)
    before anything is written.
    """
    _check_plain_model(model)
    experts = [name for name, _ in qat_experts(model)]
    if experts:  # would be written as float tensors: refuse rather than drop their quantization
        raise ValueError(f"export_compressed_tensors does not write fused MoE experts yet ({experts[0]!r} and "
                         f"{len(experts) - 1} more); export this model with hfqat.save_packed")
    layers = list(qat_layers(model))
    if not layers:
        raise ValueError("model has no hfqat fake-quantized layers to export")
    reasons = [r for r in (_refusal(name, layer) for name, layer in layers) if r is not None]
    if reasons:
        raise ValueError(
            "cannot export to compressed-tensors: " + "; ".join(reasons) + ". Export these with hfqat.save_packed "
            "(every hfqat format); per-row widths: allocate whole layers (bits_granularity='layer') with the fused "
            "shards tied (hfqat.train.allocation.allocate_tied_bits)"
        )
    chosen = {name: ct_scheme(layer) for name, layer in layers}
    schemes = {name: _quantization_args(layer, chosen[name]) for name, layer in layers}
    _check_fused(schemes, model)
    names = set(chosen)
    owned = {f"{name}.{suffix}" for name in names for suffix in ("weight", "weight_scale", "weight_zero_point",
                                                                  "weight_bits", "weight_row_bits")}
    state = {name: t for name, t in model.state_dict().items() if name not in owned}
    for name, layer in layers:
        state.update({f"{name}.{key}": t for key, t in _layer_tensors(layer, chosen[name]).items()})
    ignore = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name not in names]
    config = copy.deepcopy(model.config)
    config.quantization_config = _ct_config(schemes, ignore)
    with atomic_directory(path) as tmp:
        _write_checkpoint(tmp, model, state, config, tokenizer)
    return Path(path)

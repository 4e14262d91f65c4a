"""compressed-tensors ``pack-quantized`` export (what vLLM serves): `export_compressed_tensors`.

Symmetric 4- and 8-bit weight-only layers (group-wise or per channel), which transformers
(``compressed-tensors>=0.9``, extra ``hfqat[vllm]``) and vLLM load. vLLM's pack-quantized path has no 2/3-bit (or
5-7-bit) and no asymmetric (zero-point) variant that hfqat's grid maps onto, and no GPT-2 ``Conv1D``: such a model
raises a `ValueError` naming the first offending layer before anything is written; export those with `save_packed`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant.layers import FakeQuantMixin, QATConv1D
from ..quant.experts import qat_experts
from ..quant.modeling import qat_layers
from ..quant.primitives import effective_scale, quantize
from .checkpoint import _check_plain_model, _write_checkpoint, atomic_directory
from .packing import code_offset, pack

CT_BITS = (4, 8)


def _ct_check(name: str, layer: FakeQuantMixin) -> None:
    reasons = []
    if layer.spec.weight_format != "int":
        reasons.append(f"it is a {layer.spec.weight_format} (weight clustering) layer, not an integer grid")
    if isinstance(layer, QATConv1D):
        reasons.append("it is a GPT-2 Conv1D layer (only nn.Linear layers are exported)")
    if layer.bits not in CT_BITS:
        reasons.append(f"it has {layer.bits}-bit weights")
    if layer.rows_differ:
        reasons.append("its rows have different bit widths")
    if layer.weight_zero_point is not None:
        reasons.append("it is asymmetric (has a zero point)")
    if layer.spec.activation_bits is not None:
        reasons.append(f"it fake-quantizes activations to {layer.spec.activation_bits} bits")
    if layer.in_features % 32:
        reasons.append(f"in_features={layer.in_features} is not a multiple of 32")
    if reasons:
        raise ValueError(
            f"layer {name!r} cannot be exported to compressed-tensors pack-quantized: {'; '.join(reasons)}. "
            "vLLM / compressed-tensors pack-quantized supports only symmetric 4- and 8-bit weight-only "
            "quantization (group or per channel) here; use hfqat.save_packed for other layers"
        )


def _ct_scheme(layer: FakeQuantMixin) -> dict[str, Any]:
    per_channel = layer.spec.group_size == layer.in_features
    return {
        "num_bits": layer.bits, "type": "int", "symmetric": True, "dynamic": False,
        "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else layer.spec.group_size,
        "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {},
    }


def _ct_config(schemes: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any]:
    by_scheme: dict[str, list[str]] = {}
    keys = {}
    for name, scheme in schemes.items():
        key = json.dumps(scheme, sort_keys=True)
        keys[key] = scheme
        by_scheme.setdefault(key, []).append(name)
    single = len(by_scheme) == 1
    groups = {
        f"group_{i}": {
            "targets": ["Linear"] if single else [f"re:^{re.escape(n)}$" for n in names],
            "weights": keys[key], "input_activations": None, "output_activations": None,
            "format": "pack-quantized",
        }
        for i, (key, names) in enumerate(by_scheme.items())
    }
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {},
    }


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` in compressed-tensors ``pack-quantized`` format (what vLLM serves), atomically.

    Every fake-quantized layer must be a symmetric 4- or 8-bit `nn.Linear` (group or per channel, weights only);
    otherwise a `ValueError` names the first offending layer. Codes and scales are hfqat's own (scales in the
    layer's weight dtype), so the loaded model computes what the fake-quantized one does.
    """
    _check_plain_model(model)
    experts = [name for name, _ in qat_experts(model)]
    if experts:  # would be written as float tensors: refuse rather than drop their quantization
        raise ValueError(f"export_compressed_tensors does not write fused MoE experts yet ({experts[0]!r} and "
                         f"{len(experts) - 1} more); export this model with hfqat.save_packed")
    layers = list(qat_layers(model))
    if not layers:
        raise ValueError("model has no hfqat fake-quantized layers to export")
    for name, layer in layers:
        _ct_check(name, layer)
    names = {name for name, _ in layers}
    owned = {f"{name}.{suffix}" for name in names for suffix in ("weight", "weight_scale", "weight_zero_point",
                                                                  "weight_bits", "weight_row_bits")}
    state = {name: t for name, t in model.state_dict().items() if name not in owned}
    for name, layer in layers:
        w = layer.weight_oi()
        codes = quantize(w, layer.weight_scale, None, layer.weight_bits, layer.spec.group_size).to(torch.int32)
        words = -(-layer.in_features * layer.bits // 32)
        # a single plane of our layout is exactly compressed-tensors' int32 packing, transposed
        state[f"{name}.weight_packed"] = pack(codes + code_offset(layer.bits, True), layer.bits).t()[:, :words]
        state[f"{name}.weight_scale"] = effective_scale(layer.weight_scale).to(w.dtype)
        state[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
    ignore = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name not in names]
    config = copy.deepcopy(model.config)
    config.quantization_config = _ct_config({name: _ct_scheme(layer) for name, layer in layers}, ignore)
    with atomic_directory(path) as tmp:
        _write_checkpoint(tmp, model, state, config, tokenizer)
    return Path(path)

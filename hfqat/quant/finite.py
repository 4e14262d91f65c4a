"""Non-finite (NaN / inf) weights, found at conversion instead of as NaN scales, NaN logits and a NaN loss later.

A fake-quantized layer fitted to a weight holding a NaN gets NaN scales, and every output of the model turns NaN.
`QATConfig.non_finite` says what happens to such layers: "error" (default) raises naming every such layer (or fused
expert parameter) and its count of NaN and inf; "skip" turns them back into plain float layers (expert parameters:
their quantizer is dropped) so the rest of the model trains, records them in ``config.modules_to_not_convert`` (so a
saved checkpoint reloads them as float) and logs them by name.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import QATConfig
from ..distributed import local_tensor
from .experts import drop_quantizer, qat_experts
from .layers import QAT_LAYER_TYPES, FakeQuantMixin, QATConv1D

logger = logging.getLogger(__name__)


def non_finite_counts(tensor: torch.Tensor | None) -> tuple[int, int]:
    """(number of NaN, number of ±inf) in this process's part of `tensor` (0, 0 for meta or missing tensors)."""
    if tensor is None or tensor.is_meta:
        return 0, 0
    t = local_tensor(tensor.detach())
    if t.numel() == 0 or not t.is_floating_point() or bool(torch.isfinite(t).all()):  # one pass when all is well
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def describe_counts(nan: int, inf: int) -> str:
    return f"{nan} NaN and {inf} inf"


FLOAT_TENSORS = ("weight", "bias")
QUANT_PARAMS = ("weight_scale", "weight_zero_point", "weight_codebook")


def non_finite_layers(layers, attrs: tuple[str, ...] = FLOAT_TENSORS) -> dict[str, tuple[int, int]]:
    """{name: (nan, inf)} of the (name, layer) pairs whose tensors `attrs` are not all finite."""
    found = {}
    for name, layer in layers:
        counts = [non_finite_counts(getattr(layer, attr, None)) for attr in attrs]
        nan, inf = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if nan or inf:
            found[name] = (nan, inf)
    return found


def _float_twin(layer: FakeQuantMixin) -> nn.Module:
    """A plain layer holding the same weight and bias Parameters (not the quantized weight: nothing was fitted)."""
    with torch.device("meta"):
        plain = Conv1D(layer.nf, layer.nx) if isinstance(layer, QATConv1D) else nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight = layer.weight
    plain.bias = layer.bias
    return plain


def check_finite_weights(model: nn.Module, config: QATConfig, quant_params: bool = False) -> list[str]:
    """Apply ``config.non_finite`` to the fake-quantized layers whose loaded weights (and, with `quant_params`, loaded
    scales / zero points / codebooks) are not finite; returns the names turned back into float layers ("skip"),
    raises a `ValueError` naming them ("error")."""
    attrs = FLOAT_TENSORS + (QUANT_PARAMS if quant_params else ())
    bad = non_finite_layers(((n, m) for n, m in model.named_modules() if isinstance(m, QAT_LAYER_TYPES)), attrs)
    bad_experts = _non_finite_experts(model, quant_params)
    bad.update(bad_experts)
    if not bad:
        return []
    listing = "; ".join(f"{name}: {describe_counts(*counts)}" for name, counts in bad.items())
    if config.non_finite == "error":
        raise ValueError(f"non-finite weights in {len(bad)} layer(s) to be quantized ({listing}); fix the checkpoint, "
                         "or pass QATConfig(non_finite='skip') to keep these layers in full precision")
    for name in bad:
        if name in bad_experts:
            module_name, param = name.rsplit(".", 1)
            drop_quantizer(model.get_submodule(module_name), param)
        else:
            model.set_submodule(name, _float_twin(model.get_submodule(name)))
    config.modules_to_not_convert = list(dict.fromkeys([*(config.modules_to_not_convert or []), *bad]))
    logger.warning("hfqat: non_finite='skip': kept in full precision, not quantized (non-finite weights): %s", listing)
    return list(bad)


def _non_finite_experts(model: nn.Module, quant_params: bool) -> dict[str, tuple[int, int]]:
    """{"<experts module>.<parameter>": (nan, inf)} of fake-quantized expert parameters that are not all finite."""
    found = {}
    for name, module in qat_experts(model):
        for param, quantizer in module.quantizers.items():
            tensors = [module._parameters[param]]
            if quant_params:
                tensors += [quantizer.weight_scale, quantizer.weight_zero_point]
            counts = [non_finite_counts(t) for t in tensors]
            nan, inf = sum(c[0] for c in counts), sum(c[1] for c in counts)
            if nan or inf:
                found[f"{name}.{param}"] = (nan, inf)
    return found

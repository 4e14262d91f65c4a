"""Model surgery and inspection: swap float layers for fake-quantized ones, read and set their state.

Policy (what to convert) lives in the transformers quantizer (`hfqat.integrations.transformers`); this module only does
the swapping, so it also works on a model that is already loaded (`quantize_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import QATConfig
from ..distributed import full_numel
from .batched_fake_quant import BatchedWeights
from .codebook import CodebookConv1D, CodebookLinear
from .finite import check_finite_weights
from .fp8 import FP8Conv1D, FP8Linear
from .gguf_layers import GGUFConv1D, GGUFLinear
from .coverage import has_own_forward, is_router, parent_of, warn_if_float
from .experts import expert_param_layouts, expert_unit_widths, qat_experts, replace_experts_with_qat
from .layers import QAT_LAYER_TYPES, FakeQuantMixin, QATConv1D, QATLinear
from .selection import is_skipped, layer_bits_matches, skip_list, skip_matches, warn_unmatched

logger = logging.getLogger(__name__)

# weight_format -> (class for nn.Linear, class for Conv1D); the codebook classes subclass the int ones
LAYER_CLASSES: dict[str, tuple[type[QATLinear], type[QATConv1D]]] = {
    "int": (QATLinear, QATConv1D),
    "codebook": (CodebookLinear, CodebookConv1D),
    "fp8": (FP8Linear, FP8Conv1D),
    "gguf": (GGUFLinear, GGUFConv1D),
}


def replace_with_qat_layers(model: nn.Module, config: QATConfig, modules_to_not_convert: list[str]) -> list[str]:
    """Replace every `nn.Linear` / `Conv1D` not skipped with its fake-quantized twin; returns converted names.

    Weights are moved, not copied (meta tensors stay meta until transformers loads them). Raises a
    `ValueError` naming the layer when the config cannot apply to it (e.g. a group size that does not divide).
    """
    converted, ragged = [], []
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantMixin) or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if is_skipped(name, modules_to_not_convert):
            continue
        if _keep_router_float(model, name, module, config):
            continue
        in_features = module.in_features if isinstance(module, nn.Linear) else module.nx
        spec = config.spec_for(name, in_features)
        if spec.group_size != config.group_size and config.group_size not in (-1, in_features) and (
                spec.weight_format != "gguf"):  # GGUF layers' blocks come from their type, not group_size
            ragged.append(f"{name} (in_features={in_features} -> group_size={spec.group_size})")
        linear_cls, conv1d_cls = LAYER_CLASSES[spec.weight_format]
        layer_cls = linear_cls if isinstance(module, nn.Linear) else conv1d_cls
        model.set_submodule(name, layer_cls.from_float(module, spec))
        converted.append(name)
    if ragged:
        logger.warning("hfqat: group_size=%d does not divide these layers; used instead: %s",
                       config.group_size, "; ".join(ragged))
    converted += replace_experts_with_qat(model, config, lambda n: is_skipped(n, modules_to_not_convert))
    BatchedWeights.attach(model)  # small layers' weights quantized in buckets, not one launch per layer
    if not converted:
        logger.warning("hfqat: no linear layer was converted (all skipped by modules_to_not_convert?)")
    _warn_unmatched_patterns(model, config, converted)
    return converted


def _warn_unmatched_patterns(model: nn.Module, config: QATConfig, converted: list[str]) -> None:
    """A skip entry that names no module, or a layer_bits key that selects no converted layer, is a typo."""
    names = [name for name, _ in model.named_modules() if name]
    names += [f"{name}.{param}" for name, module in model.named_modules() for param in expert_param_layouts(module)]
    warn_unmatched("modules_to_not_convert", config.modules_to_not_convert or [], names, skip_matches)
    if converted:
        warn_unmatched("layer_bits", config.layer_bits or {}, converted, layer_bits_matches)


def _keep_router_float(model: nn.Module, name: str, module: nn.Module, config: QATConfig) -> bool:
    """Routers stay float unless ``layer_bits`` names them; a linear subclass with its own forward is never swapped
    (its output is not a linear map: llama4's / phimoe's routers return (scores, indices))."""
    if has_own_forward(module):
        return True
    asked = any(name == key or name.endswith("." + key) for key in (config.layer_bits or {}))
    return not asked and is_router(name, module, parent_of(model, name))


def qat_layers(model: nn.Module) -> Iterator[tuple[str, FakeQuantMixin]]:
    """(name, layer) for every fake-quantized layer of `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QAT_LAYER_TYPES):
            yield name, module


def bit_allocation(model: nn.Module) -> dict[str, int | float]:
    """Module name → current weight bits of every fake-quantized layer (with per-row widths,
    ``bits_granularity="row"``: the mean over the layer's rows; ``layer.weight_row_bits`` has each row's), then
    every expert of the converted experts modules as ``<experts module>[<expert>]`` (`expert_unit_widths`)."""
    layers = {name: layer_average_bits(layer) for name, layer in qat_layers(model)}
    return layers | {unit: width for unit, (width, _) in expert_unit_widths(model).items()}


def layer_average_bits(layer: FakeQuantMixin) -> int | float:
    """The layer's bits, or its rows' mean width for per-row layers."""
    if layer.weight_row_bits is None:
        return layer.bits
    return float(layer.weight_row_bits.float().mean())


def average_bits(model: nn.Module) -> float:
    """Parameter-weighted average weight bits over the fake-quantized layers and experts."""
    layers = [layer for _, layer in qat_layers(model)]
    experts = expert_unit_widths(model).values()
    numel = sum(full_numel(layer.weight) for layer in layers) + sum(n for _, n in experts)
    total = sum(layer_average_bits(layer) * full_numel(layer.weight) for layer in layers)
    return (total + sum(width * n for width, n in experts)) / max(numel, 1)


@torch.no_grad()
def init_quant_params(model: nn.Module, defer: bool = False) -> None:
    """Fit every layer's scales/zero points to its (loaded) float weight; bits reset to the spec's.

    ``defer=True``: the fit runs on each layer's first use, on the device it is then on (`FakeQuantMixin.defer_fit`).
    """
    for _, layer in qat_layers(model):
        layer.weight_bits.fill_(layer.spec.bits)
        if layer.weight_row_bits is not None:
            layer.weight_row_bits.fill_(layer.spec.bits)
        if defer:
            layer.defer_fit()
        else:
            layer.reset_quant_params()
    for _, experts in qat_experts(model):
        experts.init_quant_state(defer)
    warn_if_float(model)


def fit_belongs_on_accelerator(model: nn.Module) -> bool:
    """Whether to defer the fit of a just-loaded model: its weights are on the CPU of a single process that has a
    GPU, which the model most likely moves to next. Sharded (multi-process) runs fit at once: FSDP2 / ZeRO-3 shard the
    parameters before the first forward, and a fit then would write into gathered copies, not the shards."""
    if not torch.cuda.is_available() or torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    return all(layer.weight.device.type == "cpu" for _, layer in qat_layers(model))


def set_soft_sharpness(model: nn.Module, sharpness: float) -> None:
    """Set the annealing sharpness of soft rounding/clamping (``float('inf')`` = exact quantizer)."""
    for _, layer in qat_layers(model):
        if layer.spec.rounding == "soft" or layer.spec.clamping == "soft":
            layer.soft_sharpness = float(sharpness)
    for _, experts in qat_experts(model):
        for q in experts.quantizers.values():
            if q.spec.rounding == "soft" or q.spec.clamping == "soft":
                q.soft_sharpness = float(sharpness)


def quantize_model(model: nn.Module, config: QATConfig, modules_to_not_convert: list[str] | None = None) -> list[str]:
    """Convert an already-loaded model in place (outside `from_pretrained`) and fit its quant params.

    Kept float: `modules_to_not_convert` when given, else the output head plus ``config.modules_to_not_convert``.
    """
    skip = modules_to_not_convert if modules_to_not_convert is not None else skip_list(
        ["lm_head"], config.modules_to_not_convert, config.layer_bits)
    converted = replace_with_qat_layers(model, config, skip)
    check_finite_weights(model, config)
    init_quant_params(model)
    return converted

"""What a conversion quantized and what it left float: `coverage(model)`, the warning after conversion, and the
router policy (which layers are routers and stay float by default).

Counted ("matrix weights" of the decoder): the weights of every linear layer (``nn.Linear`` and subclasses, GPT-2
``Conv1D``) and every other parameter of two or more dimensions — fused expert tensors included — except those
*excluded*, which are reported apart with the reason:

- ``embedding``  ``nn.Embedding`` tables (token / position embeddings)
- ``head``       the output head (``model.get_output_embeddings()``), float by default (``modules_to_not_convert``)
- ``router``     MoE routers: modules named ``*.gate`` / ``*.router`` / ``*.gating`` holding an (E, H) matrix, router
                 classes (name contains "Router" or "Gate"), and ``nn.Linear`` subclasses with their own ``forward``
                 named that way (llama4's ``Llama4Router``, phimoe's ``PhimoeTopKRouter``): a few hundred weights each,
                 kept float like the ``e_score_correction_bias`` buffers
- ``conv``       ``nn.Conv*`` kernels (mamba / linear-attention short convolutions, vision stems)
- ``norm``       parameters of norm modules (per-expert norm vectors included)
- ``bias``       2-D bias tensors (per-expert biases: gpt_oss ``*_proj_bias``, ``e_score_correction_bias``)

A module inside a router (e.g. ergo's ``gate.linear``) is a router too.

``quantized_fraction`` = quantized / (quantized + float) over the counted weights. Packed layers (a ``save_packed``
reload: packed ``qweight`` codes, no float weight) count as quantized with their in × out weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..distributed import full_numel
from .experts import ExpertQuantizer, QATExpertsMixin
from .layers import FakeQuantMixin

logger = logging.getLogger(__name__)

ROUTER_NAMES = ("gate", "router", "gating", "moe_gate")
FLOAT_WARNING_FRACTION = 0.03  # warn after conversion when more of the matrix weights than this stay float
NAMES_IN_WARNING = 8


def has_own_forward(module: nn.Module) -> bool:
    """A ``nn.Linear`` subclass that overrides ``forward`` (its output is not ``x @ W.T + b``: swapping it for a
    fake-quantized linear changes what it returns, e.g. a router returning (scores, indices))."""
    return isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward


def is_router(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """Whether ``module`` (at ``name``, child of ``parent``) is an MoE router: a router class (name contains
    "Router", or ends in "Gate"), or a module named like one (``ROUTER_NAMES``) beside the block's experts (so a
    dense model's ``gate`` projection is not taken for one)."""
    last = name.rsplit(".", 1)[-1].lower()
    cls = type(module).__name__.lower()
    if "router" in cls or (cls.endswith("gate") and "expert" not in cls):
        return True
    return last in ROUTER_NAMES and parent is not None and any("expert" in child for child, _ in
                                                               parent.named_children())


def parent_of(model: nn.Module, name: str) -> nn.Module | None:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else (model if name else None)


def _kind(name: str, module: nn.Module, parent: nn.Module | None, head: nn.Module | None) -> str | None:
    """Why a module's weights are excluded from the count, or None (counted)."""
    if module is head:
        return "head"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if "norm" in type(module).__name__.lower() or "norm" in name.rsplit(".", 1)[-1].lower():
        return "norm"
    if is_router(name, module, parent) and not isinstance(module, FakeQuantMixin):
        return "router"
    return None


def coverage(model: nn.Module) -> dict[str, Any]:
    """The share of the model's matrix weights that is fake-quantized, and what stays float.

    Returns ``{"quantized_fraction": float, "quantized_params": int, "float_params": {name: numel},
    "excluded": {name: {"numel": int, "reason": str}}}`` (see the module docstring for what counts and why).
    Parameter names are state-dict names (an expert tensor: ``...experts.gate_up_proj``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantized, float_params, excluded, routers = 0, {}, {}, []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "qweight", None), torch.Tensor) and hasattr(module, "out_features"):
            quantized += module.in_features * module.out_features  # a packed layer (hfqat.export): its codes
            continue
        own = dict(module.named_parameters(recurse=False))
        kind = _kind(name, module, parent_of(model, name), head)
        if kind == "router":
            routers.append(name + ".")
        elif any(name.startswith(r) for r in routers):
            kind = "router"
        if not own:
            continue
        if isinstance(module, FakeQuantMixin):
            quantized += full_numel(module.weight)
            continue
        if isinstance(module, ExpertQuantizer) or "lora_" in name:
            continue  # quantizer state and adapters are not model weights
        experts = module.quantizers if isinstance(module, QATExpertsMixin) else {}
        for pname, p in own.items():
            if p.ndim < 2:
                continue
            full = f"{name}.{pname}" if name else pname
            if pname in experts:
                quantized += full_numel(p)
            elif kind is not None or "bias" in pname:
                excluded[full] = {"numel": full_numel(p), "reason": kind or "bias"}
            elif isinstance(module, (nn.Linear, Conv1D)) and pname != "weight":
                continue  # e.g. a LoRA-style extra matrix of a linear subclass is counted with its owner below
            else:
                float_params[full] = full_numel(p)
    total = quantized + sum(float_params.values())
    return {"quantized_fraction": quantized / total if total else 0.0, "quantized_params": quantized,
            "float_params": float_params, "excluded": excluded}


def warn_if_float(model: nn.Module, threshold: float = FLOAT_WARNING_FRACTION) -> dict[str, Any]:
    """Log a warning naming the largest weights left float when their share exceeds ``threshold``; returns the
    report of `coverage`."""
    report = coverage(model)
    float_params = report["float_params"]
    total = report["quantized_params"] + sum(float_params.values())
    if total and 1 - report["quantized_fraction"] > threshold:
        largest = sorted(float_params.items(), key=lambda kv: -kv[1])
        names = ", ".join(f"{n} ({v:,})" for n, v in largest[:NAMES_IN_WARNING])
        more = f" and {len(largest) - NAMES_IN_WARNING} more" if len(largest) > NAMES_IN_WARNING else ""
        logger.warning("hfqat: %.1f%% of the matrix weights stay float (quantized %.1f%%): %s%s; see "
                       "hfqat.coverage(model)", 100 * (1 - report["quantized_fraction"]),
                       100 * report["quantized_fraction"], names, more)
    return report

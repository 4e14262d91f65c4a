"""A whole copy of a sharded model on rank 0, for exports under FSDP2 / ZeRO-3 (`unsharded_model`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..distributed import gather_full_state_dict, is_main_process, is_sharded
from ..quant.layers import FakeQuantMixin


def _original_class(model: nn.Module) -> type[nn.Module]:
    # fully_shard swaps the class for a generated subclass "FSDP<Name>"; its first non-FSDP base is the original.
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))


def _without_zero3_init() -> contextlib.AbstractContextManager:
    # While a ZeRO-3 config is live, transformers builds models inside deepspeed.zero.Init, which partitions
    # parameters across ranks: a collective that hangs when rank 0 alone builds a copy. transformers' own flag
    # for "zero.Init is already active" makes it build a plain model.
    try:
        from transformers.modeling_utils import set_zero3_state
    except ImportError:
        return contextlib.nullcontext()
    return set_zero3_state()


def empty_copy(model: nn.Module) -> nn.Module:
    """A meta-device model of ``model``'s original class and config, with the same hfqat layers (specs included);
    built by this process alone (no zero.Init, no FSDP)."""
    cls = _original_class(model) if any(isinstance(p, DTensor) for p in model.parameters()) else type(model)
    with torch.device("meta"), _without_zero3_init():
        copy = cls._from_config(model.config)
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantMixin):
            copy.set_submodule(name, type(module).from_float(copy.get_submodule(name), module.spec))
    return copy


@torch.no_grad()
def unsharded_model(model: nn.Module) -> nn.Module | None:
    """A plain CPU copy of a sharded `transformers` model on the main process (``None`` elsewhere); a collective.

    The copy has the same classes (hfqat fake-quant layers with their specs), config and values; for the
    unsharded (DDP / single-process) case it is ``model`` itself. Used by ``save_packed`` under FSDP2 / ZeRO-3.
    """
    if not is_sharded(model):
        return model if is_main_process() else None
    state = gather_full_state_dict(model)
    if not is_main_process():
        return None
    copy = empty_copy(model)
    copy.to_empty(device="cpu")
    missing, unexpected = copy.load_state_dict(state, strict=False)
    # Non-persistent buffers (e.g. rotary inv_freq, a codebook's k-means importance, which the fresh copy may not
    # have at all) are not in the state dict: take them from the model (FSDP2 and ZeRO-3 leave buffers whole).
    for key, buffer in model.named_buffers():
        if key not in state:
            owner, _, name = key.rpartition(".")
            setattr(copy.get_submodule(owner), name, buffer.detach().cpu().clone())
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()
    missing = [k for k in missing if k not in dict(model.named_buffers())]
    if missing or unexpected:
        raise RuntimeError(f"unsharded_model: state dict mismatch; missing {missing[:5]}, unexpected {unexpected[:5]}")
    return copy.eval()

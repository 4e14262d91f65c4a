"""Writing an export folder's files (tied tensors stored once); `hfqat.atomic.atomic_directory` makes it atomic."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"


def _check_plain_model(model: nn.Module) -> None:
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        raise ValueError("model is a peft model with unmerged adapters; export model.merge_and_unload() instead")


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later aliases of tied tensors (safetensors stores each storage once; transformers re-ties on load)."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _write_checkpoint(tmp: Path, model: nn.Module, state: dict[str, torch.Tensor], config, tokenizer) -> None:
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in _dedupe_shared(state).items()}
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    if getattr(config, "dtype", None) is None and getattr(model, "dtype", None) is not None:
        # recorded, so that dtype="auto" loaders take it from here instead of reading the weights file first
        config.dtype = model.dtype
    config.save_pretrained(tmp)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)

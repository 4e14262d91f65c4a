"""The distillation of one run: its teacher — ``"snapshot"``, a model, a path or None (`hfqat.train.distillation`), with
the snapshot of a resumed run read from the checkpoint it resumes (so it distills from the same train-start weights)
— the `DistillationHook` that runs it on the model's training forwards, and the losses it logs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..quant.modeling import qat_layers
from ..distributed import mean_across_ranks
from .arguments import CallbackArguments
from .distillation import DistillationHook, SnapshotTeacher, Teacher, build_teacher, teacher_dtype
from .state_store import CheckpointStore, read_safetensors


def attach_distillation(settings: CallbackArguments, model: nn.Module, store: CheckpointStore, grad_accum: int = 1,
                        loss_in_trainer: bool = False) -> DistillationHook:
    """The run's `DistillationHook` (teacher from ``settings``, `run_teacher`), attached to ``model``. Without a
    teacher it only records the task loss and the last batch."""
    teacher = None
    if settings.teacher is not None:
        dtype = teacher_dtype(settings.teacher_dtype)
        teacher = run_teacher(settings.teacher, model, settings.replicate_teacher, store, dtype,
                              settings.teacher_cuda_graph)
    hook = DistillationHook(teacher, settings.distill_weight, settings.temperature, grad_accum,
                            loss_in_trainer=loss_in_trainer)
    hook.attach(model)
    return hook


def logged_losses(hook: DistillationHook, steps: int, world_size: int = 1, tokens_across_ranks: bool = False
                  ) -> dict[str, float]:
    """``task_loss`` / ``distill_loss`` recorded since the last call, per optimizer step (``steps`` of them), as global
    values the way Trainer logs its own loss (collective: every rank logs). ``tokens_across_ranks``: Trainer's
    ``average_tokens_across_devices``."""
    sums = mean_across_ranks({"logs": hook.pop_sums()}).get("logs", {})
    # Trainer's own rule for a global item count (then each rank's value is a part of one global mean).
    if hook.saw_item_counts and tokens_across_ranks and world_size > 1:
        sums = {key: value * world_size for key, value in sums.items()}
    return {key: value / steps for key, value in sums.items()}


def run_teacher(teacher: Any, model: nn.Module, replicate: bool, store: CheckpointStore,
                dtype: torch.dtype | None = None, cuda_graph: bool = False) -> Teacher | None:
    """`build_teacher`, except that a resumed run's snapshot comes from ``store``'s resumed checkpoint when it holds
    one (a damaged or mismatched file raises a `ValueError` naming it)."""
    if isinstance(teacher, str) and teacher == "snapshot" and store.resumed is not None:
        path = store.teacher_file()
        if path is not None:
            return load_snapshot(model, path, replicate, dtype, cuda_graph)
    return build_teacher(teacher, model, replicate, dtype, cuda_graph)


def load_snapshot(model: nn.Module, path: str, replicate: bool = False,
                  dtype: torch.dtype | None = None, cuda_graph: bool = False) -> SnapshotTeacher:
    """The snapshot teacher saved at ``path``, checked against the model's quantized layers."""
    tensors = read_safetensors(path, "snapshot teacher")
    for name, layer in qat_layers(model):
        saved, own = tensors.get(f"{name}.weight"), layer.weight_oi()
        if saved is None or (not hasattr(layer.weight, "ds_id") and saved.shape != own.shape):  # ZeRO-3: partitions
            found = "no weight" if saved is None else f"shape {tuple(saved.shape)}"
            raise ValueError(f"QATCallback: the snapshot teacher {path!r} does not fit this model: {name} has "
                             f"{found}, allowed shape {tuple(own.shape)}; resume with the model that was trained")
    return SnapshotTeacher(model, tensors, replicate, dtype, cuda_graph)

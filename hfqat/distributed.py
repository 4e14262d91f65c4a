"""Distributed training support: the few collective steps hfqat needs on top of accelerate's engines.

hfqat does not shard anything itself: accelerate's FSDP2 (``fully_shard``: every parameter becomes a DTensor
sharded on dim 0, scales included), DeepSpeed ZeRO-3 (parameters partitioned, gathered around each forward) or
DDP (replicated) do. What they leave to hfqat:

- **one allocation on every rank.** Sensitivities measured from local batches differ between ranks; they are
  averaged (`mean_across_ranks`) and the allocation chosen from them is broadcast from rank 0
  (`broadcast_object`), so every rank applies exactly the same bits (re-fitting scales is then the same
  deterministic function of the same weights everywhere).
- **whole tensors where a step needs them.** `full_tensor` gathers a DTensor (FSDP2) for a computation that
  is not elementwise; `zero3_gathered` gathers ZeRO-3 partitions (write-back from rank 0) around in-place
  updates such as ``set_bits``. Plain tensors pass through both unchanged.
- **one writer.** `is_main_process` gates files (plots, histories); `gather_full_state_dict` and
  `unsharded_model` collect a sharded model's full weights on rank 0 (to CPU) for ``save_packed``.
- **a clean end.** `end_process_group` destroys the process group before the interpreter shuts down.

All collectives must be called by every rank in the same order; every function here is a no-op (or the
identity) when ``torch.distributed`` is not initialised, so single-process code paths stay unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.4
    DTensor = ()  # isinstance(x, ()) is always False


# -- process group ------------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the process that writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def end_process_group() -> None:
    """Destroy the process group at the end of a distributed run, as PyTorch asks: a process that leaves it to
    interpreter shutdown can abort there ("terminate called without an active exception", pytorch#190489)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo (CPU tests) CPU tensors.
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- reductions ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Average each tensor over ranks, in place (one flat all-reduce); returns the tensors."""
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    device = _collective_device()
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].reshape(t.shape).to(t.dtype))
        offset += t.numel()
    return tensors


def mean_across_ranks(values: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
    """``{name: {key: float}}`` averaged over the ranks that have each entry (e.g. per-layer sensitivities).

    Gathered as Python objects, so ranks may hold different (e.g. not yet measured) entries without hanging.
    """
    if not is_distributed():
        return {name: dict(per_key) for name, per_key in values.items()}
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, {name: dict(per_key) for name, per_key in values.items()})
    names = list(dict.fromkeys(name for part in gathered for name in part))
    out: dict[str, dict[int, float]] = {}
    for name in names:
        parts = [part[name] for part in gathered if name in part]
        out[name] = {key: sum(float(p[key]) for p in parts) / len(parts) for key in parts[0]}
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank (any picklable value)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# -- whole tensors --------------------------------------------------------------------------------------------------
def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is an FSDP2 DTensor or a DeepSpeed ZeRO-3 partition."""
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def full_numel(t: torch.Tensor) -> int:
    """Element count of the whole tensor: a ZeRO-3 partitioned parameter's own ``numel()`` is 0 outside forward."""
    return int(getattr(t, "ds_numel", t.numel()))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered if ``t`` is a DTensor (a collective: call on every rank), else ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2: rows ``[r·⌈n/world⌉, …)`` of dim 0), else ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a full tensor, same on every rank) sharded like the DTensor ``like``; else ``t`` itself."""
    if isinstance(like, DTensor) and not isinstance(t, DTensor):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t, like.device_mesh, like.placements, src_data_rank=None)
    return t


def _rows_local(t: torch.Tensor) -> bool:
    # dim 0 sharded (FSDP2) or replicated (HSDP's other mesh dim): the local tensor is whole rows of `t`
    return isinstance(t, DTensor) and all(p.is_replicate() or p.is_shard(0) for p in t.placements)


@contextlib.contextmanager
def local_view(modules: Iterable[nn.Module], gather_zero3: bool = True) -> Iterator[None]:
    """Per-layer statistics and in-place updates (``set_bits``) on this rank's share, fast, outside forward.

    - FSDP2: each module whose fake-quant tensors are all row-sharded (a `QATLinear`: weight (out, in) and
      scales (out, in/g) are cut at the same rows) temporarily holds its *local rows* as plain Parameters
      (same storage, so in-place updates land in the shard; local gradients attached). Everything the
      quantizer does is per group, i.e. per row, so a re-fit on the rows is exactly the re-fit of the whole
      tensor restricted to them, without DTensor dispatch (~10x slower for many small ops) or collectives.
      Whole buffers of the weight's shape (e.g. a codebook's k-means importance) are cut at the same rows.
      Sums over a layer become this rank's partial sums (`mean_across_ranks` then averages them).
      Other modules (e.g. GPT-2 ``Conv1D``, stored transposed) keep their DTensors (correct, slower).
    - ZeRO-3 (``gather_zero3``): the modules' partitions are gathered for the block (all at once: the whole
      set of modules in memory on every rank); rank 0's values are written back.
    - otherwise: nothing changes.

    Do not run the model's forward inside the block.
    """
    modules = list(modules)
    params = [p for m in modules for p in m.parameters(recurse=False)]
    if gather_zero3 and any(hasattr(p, "ds_id") for p in params):
        quantizer_params = [p for m in modules if hasattr(m, "quant_parameters") for p in m.quant_parameters()]
        with zero3_gathered(params, modify=True, masters=quantizer_params):
            yield
        return
    swapped = []
    for module in modules:
        own = dict(module.named_parameters(recurse=False))
        views = [module.weight_oi()] if hasattr(module, "weight_oi") else []
        if not own or not all(_rows_local(t) for t in list(own.values()) + views):
            continue
        for name, param in own.items():
            local = nn.Parameter(param.to_local(), requires_grad=param.requires_grad)
            if param.grad is not None:
                local.grad = param.grad.to_local()
            module._parameters[name] = local
            swapped.append((module._parameters, name, param))
        weight = own.get("weight")
        for name, buffer in list(module._buffers.items()):
            if weight is not None and buffer is not None and buffer.shape == weight.shape:
                module._buffers[name] = shard_like(buffer, weight).to_local()
                swapped.append((module._buffers, name, buffer))
    try:
        yield
    finally:
        for store, name, tensor in swapped:
            store[name] = tensor


@contextlib.contextmanager
def zero3_gathered(params: Iterable[torch.Tensor | None], modify: bool = False,
                   masters: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Gather DeepSpeed ZeRO-3 partitions of ``params`` for the block (a collective); no-op for other tensors.

    ``modify=True`` writes rank 0's values back into every rank's partition on exit (use it around in-place
    updates such as ``layer.set_bits``; every rank computes the same values anyway, rank 0's win).
    ``masters``: those of ``params`` the block may change that the optimizer must see too. ZeRO-3's optimizer
    keeps its own fp32 copy of each partition and copies it over the parameter after every step, so an in-place
    update that does not reach it is undone by the next step (and checkpoints keep the old values); the ones
    that changed (on rank 0) are written there.
    """
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    masters = [p for p in masters if hasattr(p, "ds_id")] if modify else []
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        before = [p.detach().clone() for p in masters]
        yield
        changed = [i for i, (p, b) in enumerate(zip(masters, before)) if not torch.equal(p, b)]
        changed = broadcast_object(changed) if masters else []
    from deepspeed.utils import safe_set_local_fp32_param

    for i in changed:
        param = masters[i]
        if getattr(param, "_z3_optimizer", None) is not None and param.requires_grad:
            safe_set_local_fp32_param(param, param.ds_tensor)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU on the main process, ``{}`` elsewhere. A collective.

    FSDP2 via ``torch.distributed.checkpoint``'s full-state-dict API; ZeRO-3 by gathering one module at a time
    (peak extra GPU memory: one module); replicated models (DDP, single process) via ``state_dict()``.
    """
    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Only rank 0 copies the gathered tensors to CPU, i.e. waits for them: the other ranks return with their
        # NCCL all-gathers still queued, and one that exits right away can leave rank 0 waiting forever (seen on
        # 2 GPUs after `hfqat train`). The barrier completes only after every earlier collective has.
        barrier()
        return state
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        state: dict[str, torch.Tensor] = {}
        for prefix, module in model.named_modules():
            with zero3_gathered(module.parameters(recurse=False)):
                if is_main_process():
                    for name, t in list(module.named_parameters(recurse=False)) + list(
                            module.named_buffers(recurse=False)):
                        if name not in module._non_persistent_buffers_set:
                            state[f"{prefix}.{name}" if prefix else name] = t.detach().cpu().clone()
        return state
    if not is_main_process():
        return {}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}

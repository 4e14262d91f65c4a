r"""Knowledge distillation from the full-precision teacher, injected into a stock `transformers.Trainer`.

Mechanism
    A `TrainerCallback` cannot change the loss Trainer optimises, but Trainer optimises whatever the
    model returns as ``outputs["loss"]``. `DistillationHook` therefore registers a *forward hook* (with
    kwargs) on the model at train start. On every training-mode forward it runs the teacher on the same
    inputs under ``torch.no_grad()`` and returns the model output with ``loss`` replaced by::

        loss = (1 - α) · task_loss + α · T² · KL(teacher_T ‖ student_T)      (labels present)
        loss = T² · KL(teacher_T ‖ student_T)                                (no labels: pure distillation)

    A hook rather than a replaced ``forward``: it survives accelerate's forward wrappers (autocast, fp32
    output conversion) and their removal, composes with peft, and is removed cleanly at train end.
    In eval mode the hook does nothing, so ``eval_loss`` stays the plain task loss.

Normalisation (gradient accumulation)
    When Trainer passes ``num_items_in_batch`` (models that accept loss kwargs, labels present), the task
    loss is ``Σ token CE / num_items_in_batch`` over the *whole accumulated batch*; the KL term uses the
    same divisor, so both add up correctly over micro-batches. Otherwise both are per-micro-batch means and
    Trainer divides by the accumulation steps. Positions are excluded from the KL exactly where the causal
    LM loss excludes them: the prediction at position t counts iff ``labels[t+1] != -100``, and never where
    ``attention_mask[t] == 0``.

Gradient checkpointing is unaffected: the hook runs outside the checkpointed blocks, and the teacher pass
runs without grad.

Trainers that compute the loss themselves
    A ``compute_loss_func`` (stock Trainer) or trl's ``SFTTrainer`` (a fused LM head that never materialises the
    logits) ignore ``outputs["loss"]``. For them `DistillationHook.compute_loss` is the trainer's
    ``compute_loss_func`` (`QATCallback.make_compute_loss_func`): the hook then only runs the teacher, and the
    function mixes ``(1 - α) · CE + α · KD`` from the logits and the labels the trainer kept (the model saw none).
    The hook refuses trl's fused-head forward otherwise, rather than silently train without distillation.
    Label smoothing still bypasses the distillation loss.

Teachers
    `SnapshotTeacher` (default): the student itself with every quantized layer computing
    ``F.linear(x, W0, b0)`` from a detached copy of its float weight and bias taken at train start — the
    only extra memory is one copy of the quantized layers' float weights. Embeddings, norms and the output
    head are *shared* with the student (they are not quantized; if they are trained, the teacher follows
    them, so the distillation signal isolates the quantization error of the linear layers). For a fully
    independent frozen teacher pass a model or a path (`ModelTeacher`), which may live on another device
    or in another dtype.

    Precision (`teacher_dtype`): by default the teacher computes like the student. ``"bfloat16"`` stores the snapshot
    in bf16 and runs the teacher pass under bf16 autocast: for a float32 student that halves the snapshot's memory
    and cut the teacher's GPU time from 47 to 10 ms per step on SmolLM2 (H200), at the same perplexity after QAT;
    but that model's step waits on the host, and autocast's casts added host time: its steps got no faster (11 %
    slower in bench_qat_real, bench/results/h200_s14_qat_real.md), so it is not the default.

    Host time (`teacher_cuda_graph`): the teacher pass can be replayed as a CUDA graph (`hfqat.train.teacher_graph`),
    which removes its host work; opt-in, as it did not speed up the SmolLM2 Trainer step it was measured on.

    Under FSDP2 the snapshot is sharded like the weights it copies and the teacher pass gathers it one layer at a
    time; ``replicate=True`` gathers it once instead and keeps a whole copy on every rank (no gathers per step,
    at the cost of the quantized layers' full weights per rank). Under ZeRO-3 and DDP it is always whole.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from ..distributed import (
    full_tensor,
    is_main_process,
    local_tensor,
    shard_like,
    zero3_gathered,
)
from ..quant.experts import expert_tensors, float_experts
from ..quant.modeling import qat_layers
from . import fused_kl
from .teacher_graph import TeacherGraphs

IGNORE_INDEX = -100
# Inputs that only concern the loss; the teacher is run without them.
LOSS_KWARGS = ("labels", "num_items_in_batch", "shift_labels", "return_dict")
FUSED_HEAD_KWARG = "fused_lm_head"  # trl's SFTTrainer: its loss comes from per-token log-probs, not outputs.loss


# fp32 elements of one chunk of rows in the KL pass: bounds its temporaries (a few of this size) whatever the vocab
KL_CHUNK_ELEMENTS = 1 << 25


class _ChunkedKL(torch.autograd.Function):
    """``Σ_r w_r · KL(softmax(t_r/T) ‖ softmax(s_r/T))`` over the rows of (rows, vocab) logits, chunk by chunk.

    Why: the plain expression materialises fp32 copies of both logit tensors, both log-softmaxes and the elementwise
    KL (for 8 x 2048 tokens and a 32k vocabulary, ~2 GB each) and walks them again in backward. Here each chunk is
    upcast, reduced and differentiated in one pass: ``∂/∂s_r = w_r · (softmax(s_r/T) - softmax(t_r/T)) / T``, stored
    in the student's dtype; backward only scales it. On CUDA one Triton program per row does the same in two reads of
    each row (`hfqat.train.fused_kl`).
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, temperature: float):
        rows, vocab = student.shape
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        if fused_kl.supports(student, teacher):
            total = fused_kl.kl_rows(student, teacher, weight, temperature, grad).sum()
            ctx.save_for_backward(grad)
            return total
        chunk = max(1, KL_CHUNK_ELEMENTS // vocab)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, rows, chunk):
            rows_ = slice(start, start + chunk)
            log_s = F.log_softmax(student[rows_].float() / temperature, -1)
            log_t = F.log_softmax(teacher[rows_, :vocab].float() / temperature, -1)
            p_t = log_t.exp()
            w = weight[rows_].float()
            total += (w * (p_t * (log_t - log_s)).sum(-1)).sum()
            if grad is not None:
                grad[rows_] = ((log_s.exp() - p_t) * (w / temperature).unsqueeze(-1)).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` summed over counted positions, divided like the task loss.

    Counted positions: the causal-LM ones (``labels`` shifted left != -100) that are not padding.
    Divisor: ``num_items_in_batch`` when given, else the number of counted positions.
    """
    batch, seq = student_logits.shape[:2]
    valid = torch.ones(batch, seq, dtype=torch.bool, device=student_logits.device)
    if labels is not None:
        valid = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False).to(valid.device)
    if attention_mask is not None and attention_mask.dim() == 2:
        valid = valid & attention_mask.to(valid.device).bool()
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] < vocab:
        raise ValueError(f"teacher vocabulary ({teacher_logits.shape[-1]}) is smaller than the student's ({vocab})")
    teacher = teacher_logits.to(student_logits.device).reshape(batch * seq, -1)
    kl = _ChunkedKL.apply(student_logits.reshape(batch * seq, vocab), teacher, valid.reshape(-1), temperature)
    divisor = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp_min(1)
    return temperature**2 * kl / divisor


# -- teachers ---------------------------------------------------------------------------------------------------
class Teacher(ABC):
    @abstractmethod
    def logits(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Teacher logits for the student's forward inputs (no grad)."""


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if torch.is_tensor(value) else value


def _model_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _graphs_apply(tensors: Iterable[torch.Tensor]) -> bool:
    # CUDA graphs need every tensor whole, on the GPU and at a fixed address: not FSDP2 shards (DTensor, gathered per
    # layer) or ZeRO-3 partitions (gathered into fresh memory each forward).
    return all(t.is_cuda and type(t) in (torch.Tensor, nn.Parameter) and not hasattr(t, "ds_id") for t in tensors)


class ModelTeacher(Teacher):
    """A separate frozen model (any device/dtype); inputs are moved to it, logits come back as they are (with
    ``cuda_graph``, from a CUDA graph replay where the batch allows: `hfqat.train.teacher_graph`)."""

    def __init__(self, model: nn.Module, cuda_graph: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        graphs = cuda_graph and _graphs_apply(_model_tensors(model))
        self.graphs = TeacherGraphs(self._forward, partial(_model_tensors, model)) if graphs else None

    def _forward(self, kwargs: dict[str, Any]) -> torch.Tensor:
        return self.model(**kwargs).logits

    @torch.no_grad()
    def logits(self, args, kwargs):
        args = tuple(_to(a, self.device) for a in args)
        kwargs = {k: _to(v, self.device) for k, v in kwargs.items()}
        if self.graphs is not None and not args:
            return self.graphs(kwargs)
        return self.model(*args, **kwargs).logits


def _float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Under FSDP2 the snapshot is sharded like the weights it copies: gather it per layer (`full_tensor`).
    weight, bias = full_tensor(weight), None if bias is None else full_tensor(bias)
    if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts both to the autocast dtype
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight, bias)


def teacher_dtype(setting: str) -> torch.dtype | None:
    """The dtype the teacher computes in for ``QATCallback(teacher_dtype=setting)``; None: the student's own."""
    return None if setting == "model" else getattr(torch, setting)


class SnapshotTeacher(Teacher):
    """The student with its quantized layers swapped, for the teacher pass only, to their train-start floats.

    ``dtype``: the snapshot is stored in it and the teacher pass runs under autocast to it (None: the weights' own
    dtype, no autocast); ``QATCallback(teacher_dtype="bfloat16")`` gives a float32 student a bf16 teacher this way.
    ``cuda_graph``: replay the pass as a CUDA graph where the batch and the model allow (`hfqat.train.teacher_graph`).
    """

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor] | None = None,
                 replicate: bool = False, dtype: torch.dtype | None = None, cuda_graph: bool = False) -> None:
        self.model = model
        self.dtype = dtype
        self.layers = dict(qat_layers(model))
        self.replicate = replicate
        if tensors is None:
            tensors = {}
            for name, layer in self.layers.items():
                with zero3_gathered(layer.parameters(recurse=False)):  # ZeRO-3: a replicated full copy
                    tensors[f"{name}.weight"] = layer.weight_oi().detach().clone().contiguous()
                    if layer.bias is not None:
                        tensors[f"{name}.bias"] = layer.bias.detach().clone()
            tensors.update(expert_tensors(model))  # fused MoE experts: their train-start floats too
        missing = [n for n in self.layers if f"{n}.weight" not in tensors]
        if missing:
            raise ValueError(f"teacher snapshot lacks the weights of layers {missing[:3]}...")
        self.tensors = {k: self._placed(k, v) for k, v in tensors.items()}
        experts = any(k.rsplit(".", 1)[0] not in self.layers for k in self.tensors)  # MoE routing: read on the host
        graphs = cuda_graph and not experts and _graphs_apply(self._read_tensors())
        self.graphs = TeacherGraphs(self._forward, self._read_tensors) if graphs else None

    def _read_tensors(self) -> Iterator[torch.Tensor]:
        yield from _model_tensors(self.model)
        yield from self.tensors.values()

    def _placed(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        # On the layer's device; under FSDP2 sharded like the layer's own tensor, or whole if replicated.
        dtype = self.dtype or tensor.dtype
        if key.rsplit(".", 1)[0] not in self.layers:  # a fused expert tensor
            return tensor.to(self.model.get_parameter(key).device, dtype)
        layer = self.layers[key.rsplit(".", 1)[0]]
        like = layer.weight_oi() if key.endswith(".weight") else layer.bias
        if self.replicate:
            return full_tensor(tensor).to(like.device, dtype)  # a collective for a sharded copy
        return shard_like(tensor.to(like.device, dtype), like)

    @contextmanager
    def _float_layers(self) -> Iterator[None]:
        # An instance attribute `forward` shadows the class method for this pass only.
        for name, layer in self.layers.items():
            layer.forward = partial(_float_linear, weight=self.tensors[f"{name}.weight"],
                                    bias=self.tensors.get(f"{name}.bias"))
        was_training = self.model.training
        self.model.eval()  # deterministic teacher (no dropout); also skips gradient checkpointing
        experts = {k: v for k, v in self.tensors.items() if k.rsplit(".", 1)[0] not in self.layers}
        try:
            with float_experts(self.model, experts) if experts else nullcontext():
                yield
        finally:
            self.model.train(was_training)
            for layer in self.layers.values():
                del layer.forward

    def _autocast(self):
        if self.dtype is None:
            return nullcontext()
        # No cache of cast weights: a CUDA graph capture must record its own casts (`hfqat.train.teacher_graph`).
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.dtype, cache_enabled=False)

    def _forward(self, kwargs: dict[str, Any], args: tuple = ()) -> torch.Tensor:
        with self._float_layers(), self._autocast():
            return self.model(*args, **kwargs).logits

    @torch.no_grad()
    def logits(self, args, kwargs):
        if self.graphs is not None and not args:
            return self.graphs(kwargs)
        return self._forward(kwargs, args)

    def nbytes(self) -> int:
        """Bytes this rank holds (its shards of a sharded snapshot)."""
        return sum(local_tensor(t).numel() * t.element_size() for t in self.tensors.values())

    def save(self, path: str | os.PathLike) -> None:
        """Write the snapshot as safetensors, atomically; under FSDP2 every rank calls it and rank 0 writes."""
        tensors = {}
        for key, value in self.tensors.items():
            value = full_tensor(value)  # a collective for sharded snapshots
            if is_main_process():
                tensors[key] = value.detach().cpu().contiguous()
        if is_main_process():
            tmp = f"{path}.tmp"
            save_file(tensors, tmp)
            os.replace(tmp, path)

    @classmethod
    def load(cls, model: nn.Module, path: str | os.PathLike, replicate: bool = False,
             dtype: torch.dtype | None = None, cuda_graph: bool = False) -> SnapshotTeacher:
        return cls(model, load_file(str(path)), replicate, dtype, cuda_graph)


def build_teacher(teacher: Any, student: nn.Module, replicate: bool = False,
                  dtype: torch.dtype | None = None, cuda_graph: bool = False) -> Teacher | None:
    """"snapshot" → `SnapshotTeacher` (``replicate``: whole on every rank under FSDP2); a model → `ModelTeacher`,
    as it is; a path → loaded in ``dtype`` (None: the student's) on the student's device; None → None.
    ``cuda_graph``: the teacher pass replays as a CUDA graph where it can (`hfqat.train.teacher_graph`)."""
    if teacher is None:
        return None
    if isinstance(teacher, str) and teacher == "snapshot":
        return SnapshotTeacher(student, replicate=replicate, dtype=dtype, cuda_graph=cuda_graph)
    if isinstance(teacher, nn.Module):
        return ModelTeacher(teacher, cuda_graph)
    from transformers import AutoModelForCausalLM

    param = next(student.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(os.fspath(teacher), dtype=dtype or param.dtype)
    return ModelTeacher(loaded.to(param.device), cuda_graph)


# -- the hook ---------------------------------------------------------------------------------------------------
class DistillationHook:
    """Forward hook mixing the distillation term into the training loss; keeps running loss statistics.

    With ``teacher=None`` it leaves the loss alone and only records the last batch and the task loss.

    ``grad_accum``: Trainer's accumulation steps, to report per-micro-batch means on the same scale as
    Trainer's own ``loss`` when the loss is not normalised by ``num_items_in_batch``.
    """

    def __init__(self, teacher: Teacher | None, distill_weight: float, temperature: float, grad_accum: int = 1,
                 loss_in_trainer: bool = False) -> None:
        self.teacher = teacher
        self.alpha = distill_weight
        self.temperature = temperature
        self.grad_accum = grad_accum
        self.last_batch: dict[str, Any] | None = None  # for estimators that need a batch (Hutchinson)
        self._handle = None
        self._busy = False
        self._sums: dict[str, torch.Tensor] = {}
        # Trainer passed the batch's item count: losses are sums over this rank's tokens divided by that count,
        # which Trainer takes across all ranks (`average_tokens_across_devices`), so ranks' values add up.
        self.saw_item_counts = False
        # The trainer computes the loss (`compute_loss`): the hook only keeps the teacher's logits for it.
        self.loss_in_trainer = loss_in_trainer
        self._teacher_outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def attach(self, model: nn.Module) -> None:
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # Eager under torch.compile (Trainer's `torch_compile=True`): the teacher pass swaps the layers' forward for
    # its duration, a side effect dynamo cannot replay; the student's forward stays compiled.
    @torch.compiler.disable
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not module.training or self._busy or not torch.is_grad_enabled():
            return None
        if kwargs.get(FUSED_HEAD_KWARG) and self.teacher is not None and not self.loss_in_trainer:
            raise ValueError("this trainer computes its loss from a fused LM head (trl's SFTTrainer) and ignores the "
                             "model's loss, so distillation would be skipped: use hfqat.integrations.trl.QATSFTTrainer, or pass "
                             "compute_loss_func=callback.make_compute_loss_func() to the trainer")
        self.last_batch = dict(kwargs)
        num_items = kwargs.get("num_items_in_batch")
        scale = self._micro_batch_scale(num_items)
        task = output.get("loss")
        if task is not None:
            self._add("task_loss", task.detach() * scale)
        if self.teacher is None:
            return None
        self._busy = True
        try:
            teacher_kwargs = {k: v for k, v in kwargs.items() if k not in LOSS_KWARGS}
            teacher_kwargs["use_cache"] = False
            teacher_logits = self.teacher.logits(args, teacher_kwargs)
        finally:
            self._busy = False
        if self.loss_in_trainer:
            self._teacher_outputs = (teacher_logits, kwargs.get("attention_mask"))
            return None
        kd = distillation_loss(output["logits"], teacher_logits, self.temperature, kwargs.get("labels"),
                               kwargs.get("attention_mask"), num_items)
        loss = self._mixed(task, kd, scale)
        return type(output)(**{"loss": loss, **{k: v for k, v in output.items() if k != "loss"}})

    def compute_loss(self, outputs: Any, labels: torch.Tensor | None,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """A trainer's ``compute_loss_func``: ``(1 - α) · causal-LM CE + α · KD`` from ``outputs.logits`` and the
        labels the trainer kept, normalised like Trainer's own loss (by ``num_items_in_batch`` when given)."""
        if labels is None:
            raise ValueError("compute_loss_func got labels=None: the dataset needs labels (for pure distillation "
                             "without labels, do not pass compute_loss_func)")
        logits = outputs["logits"]
        task = ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
        if not torch.is_grad_enabled():  # evaluation (Trainer's prediction step): the task loss, not recorded
            return task
        # Trainer treats a compute_loss_func's loss as normalised over the whole accumulated batch.
        scale = self._micro_batch_scale(num_items_in_batch)
        self._add("task_loss", task.detach() * scale)
        loss = task
        if self._teacher_outputs is not None:
            teacher_logits, attention_mask = self._teacher_outputs
            self._teacher_outputs = None
            kd = distillation_loss(logits, teacher_logits, self.temperature, labels, attention_mask, num_items_in_batch)
            loss = self._mixed(task, kd, scale)
        return loss * scale

    def _micro_batch_scale(self, num_items: torch.Tensor | int | None) -> float:
        """A micro-batch's weight on the scale of Trainer's logged loss: 1 when its losses are already divided by the
        global item count, else 1 / accumulation steps. Records which case it saw (`saw_item_counts`, read when
        the logged parts are reduced across ranks)."""
        self.saw_item_counts = num_items is not None
        return 1.0 if num_items is not None else 1.0 / self.grad_accum

    def _mixed(self, task: torch.Tensor | None, kd: torch.Tensor, scale: float) -> torch.Tensor:
        """``(1 - α) · task + α · kd`` (``kd`` alone without a task loss); records the distillation part."""
        self._add("distill_loss", kd.detach() * scale)
        return kd if task is None else (1.0 - self.alpha) * task + self.alpha * kd

    def _add(self, key: str, value: torch.Tensor) -> None:
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def pop_sums(self) -> dict[str, float]:
        """The accumulated contributions since the last call (to be divided by the optimizer steps)."""
        sums, self._sums = {k: float(v) for k, v in self._sums.items()}, {}
        return sums

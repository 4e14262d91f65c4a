"""Measured calibration of the predicted sensitivities: what the loss really does when a kind of layer is quantized.

The estimators of `hfqat.train.sensitivity` predict each layer's loss increase with a quadratic model (½ Σ F e²). It
is cheap and ranks the layers of one kind well (which blocks), but its error differs between bit widths (a
2-bit grid is no small perturbation: the quadratic model underestimates it) and between kinds of layer (the
diagonal Fisher sees v_proj and down_proj differently from how the loss reacts to them). Allocations built on
the raw predictions sent whole MLPs to 2 bits and lost to uniform bits at the same size.

`measure_kinds` therefore measures, on a calibration batch with the model in eval mode, the real loss
increase ``ΔL(k, b)`` when every layer of kind ``k`` (same module name up to the block index, e.g.
``model.layers.*.mlp.down_proj``) computes with its ``b``-bit quantizer and all other layers with their float
weights; `calibrate` rescales the predictions of kind ``k`` at ``b`` bits to sum to it::

    cost_l(b) = pred_l(b) · ΔL(k, b) / Σ_{l ∈ k} pred_l(b)

so the quadratic model still decides within a kind, the measurement between kinds and bit widths.

The ``b``-bit quantizer is the layer's own (learned scales) at its current bits and the stand-in the estimators
use otherwise (`hfqat.train.candidates.candidate_weight`). The learned quantizer has adapted during training, so the
current widths look cheap next to untrained stand-ins: an inertia that keeps trained layers where they are.
Stand-ins at every width instead measured worse (SmolLM2, average 3.5 bits, `bench/bench_qat_quality.py`: 17.08
vs 15.33 perplexity).

The calibration batch is `leading_batch`, the training set's first examples holding `MAX_TOKENS` tokens: the
same rows at every re-allocation, whatever the batch size, on every rank (1 and N GPUs measure alike) and after
a resume, so successive measurements differ only by what training changed; taking them from the dataset, not
the data loader, leaves the shuffling RNG untouched. Datasets that cannot be indexed (streams) use the last
training micro-batch instead. The same batch calibrates the weight-variance prior for the first allocation when
the configured bits break the budget (before any gradient).

Cost per re-allocation: ``kinds × bit choices + 1`` forward passes without backward (a Llama has 7 kinds) over
at most `MAX_TOKENS` tokens of the batch, each building its kind's candidate weights (one fused fake-quant pass per
layer on CUDA, written in the weight's dtype: `hfqat.train.candidates.candidate_weight`). Not smoothed over time: each re-allocation measures afresh, so a
resumed run measures the same batch again and takes the same decisions.

Experts of MoE models (`measure_expert_kinds`): an expert kind is an experts module up to the block index
(``model.layers.*.mlp.experts``, `expert_kind`). Its measurement runs the experts through `float_experts` with the
tensors they would compute at ``b`` bits (an expert's own quantizer at its current width, else the min-max grid that
their Fisher cost uses) and every other expert and layer in float; ``calibrate(..., kind_of=expert_kind)`` then
rescales each expert's predicted cost as a layer's is. One more forward per expert kind and bit choice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.experts import float_experts, qat_experts
from ..quant.layers import FakeQuantMixin
from .candidates import _grid_weights, candidate_weight
from .sensitivity import loss_inputs

LayerList = list[tuple[str, FakeQuantMixin]]
MAX_TOKENS = 2048  # rows of the batch measured (at least one): enough for a paired difference, cheap on a CPU
_BLOCK_INDEX = re.compile(r"\.\d+(?=\.|$)")


def layer_kind(name: str) -> str:
    """The layer's name with block indices replaced by ``*``.

    ``model.layers.3.mlp.up_proj`` → ``model.layers.*.mlp.up_proj``
    """
    return _BLOCK_INDEX.sub(".*", name)


def _linear_at(layer: FakeQuantMixin, name: str, bits: int | None, clip: Mapping[str, Mapping[int, float]],
               current: Mapping[str, int], x: torch.Tensor) -> torch.Tensor:
    # Weight-only effect: activations stay in float, as in the snapshot teacher's float pass.
    weight = layer.weight_oi() if bits is None else candidate_weight(layer, bits, clip.get(name, {}), current[name])
    return F.linear(x, weight.to(x.dtype), layer.bias)


def _compute_at(layers: LayerList, bits: int | None, clip: Mapping[str, Mapping[int, float]],
                current: Mapping[str, int]) -> None:
    # An instance attribute ``forward`` shadows the class's (LoRA wrappers defer to it too); the replacement
    # weight is built inside each layer's forward, so never more than one extra weight is alive.
    for name, layer in layers:
        layer.forward = partial(_linear_at, layer, name, bits, clip, current)


@torch.no_grad()
def measure_kinds(model: nn.Module, layers: LayerList, batch: Mapping[str, Any], bit_choices: Iterable[int],
                  clip: Mapping[str, Mapping[int, float]], current: Mapping[str, int]) -> dict[str, dict[int, float]]:
    """kind → {bits: loss increase (≥ 0) over all-float weights when that kind's layers use ``bits``}."""
    inputs, bit_choices = split_rows(loss_inputs(batch))[0], tuple(bit_choices)
    kinds: dict[str, LayerList] = {}
    for name, layer in layers:
        kinds.setdefault(layer_kind(name), []).append((name, layer))
    was_training = model.training
    model.eval()  # no dropout; the distillation and statistics hooks only act on training forwards
    try:
        _compute_at(layers, None, clip, current)
        base = model(**inputs).loss.float()
        measured = {}
        for kind, members in kinds.items():
            increases = []
            for bits in bit_choices:
                _compute_at(members, bits, clip, current)
                increases.append(model(**inputs).loss.float() - base)
            _compute_at(members, None, clip, current)
            measured[kind] = torch.stack(increases).clamp_min(0.0)
    finally:
        model.train(was_training)
        for _, layer in layers:
            vars(layer).pop("forward", None)  # back to the class's forward
    values = torch.stack(list(measured.values())).tolist()  # one host sync
    return {kind: dict(zip(bit_choices, row)) for kind, row in zip(measured, values)}


def leading_batch(dataloader: Any, device: torch.device, max_tokens: int = MAX_TOKENS) -> dict[str, Any] | None:
    """The first examples of ``dataloader``'s (map-style) dataset — as many as hold ``max_tokens`` tokens (by their
    ``input_ids``; one batch when examples carry none) — collated as training collates them, on ``device``. The
    same rows whatever the batch size or world size. None when there is no such dataset (e.g. an iterable one)."""
    dataset, collate = getattr(dataloader, "dataset", None), getattr(dataloader, "collate_fn", None)
    if collate is None:
        return None
    # accelerate's prepared loaders keep the batch size in the batch sampler (`batch_size` is None)
    batch_size = getattr(dataloader, "batch_size", None) or getattr(getattr(dataloader, "batch_sampler", None),
                                                                    "batch_size", None) or 1
    try:
        count = len(dataset)
        examples = [dataset[0]] if count else []
        ids = examples[0].get("input_ids") if examples and isinstance(examples[0], Mapping) else None
        if ids is None:  # length unknown before collation: one training batch
            examples += [dataset[i] for i in range(1, min(count, batch_size))]
        else:
            tokens = len(ids)
            while tokens < max_tokens and len(examples) < count:
                examples.append(dataset[len(examples)])
                tokens += len(examples[-1]["input_ids"])
    except (TypeError, NotImplementedError, KeyError, IndexError):
        return None
    if not examples:
        return None
    batch = collate(examples)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def split_rows(batch: Mapping[str, Any], max_tokens: int = MAX_TOKENS) -> list[dict[str, Any]]:
    """``batch`` cut along its rows into pieces of at most ``max_tokens`` tokens (at least one row each)."""
    rows = batch["input_ids"].shape[0]
    step = max(1, max_tokens // batch["input_ids"].shape[-1])
    return [{k: v[i:i + step] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
            for i in range(0, rows, step)]


def calibrate(scores: Mapping[str, Mapping[int, float]], measured: Mapping[str, Mapping[int, float]],
              numels: Mapping[str, int], kind_of: Callable[[str], str] = layer_kind) -> dict[str, dict[int, float]]:
    """Per-layer predictions rescaled so each kind's total at each bit width equals its measured loss increase.

    A kind whose predictions sum to 0 at some width (e.g. no gradient reached it) shares the measurement by
    weight count. Layers of kinds that were not measured, or whose measurements are all 0 (no signal: quantizing
    them did not raise this batch's loss at any width), keep their predictions. ``kind_of``: `expert_kind` for
    expert units.
    """
    members: dict[str, list[str]] = {}
    for name in scores:
        members.setdefault(kind_of(name), []).append(name)
    out = {name: dict(per_bits) for name, per_bits in scores.items()}
    for kind, names in members.items():
        if not any(value > 0 for value in measured.get(kind, {}).values()):
            continue
        for bits, target in measured[kind].items():
            predicted = sum(scores[n][bits] for n in names)
            for n in names:
                share = scores[n][bits] / predicted if predicted > 0 else numels[n] / sum(numels[m] for m in names)
                out[n][bits] = target * share
    return out


def expert_kind(unit: str) -> str:
    """The kind of an expert unit: its experts module's name with block indices as ``*`` and no expert index.

    ``model.layers.3.mlp.experts[5]`` → ``model.layers.*.mlp.experts``
    """
    return layer_kind(unit.rpartition("[")[0])


@torch.no_grad()
def _expert_candidates(module: Any, bits: int) -> dict[str, torch.Tensor]:
    """{param: tensor} the experts would compute with at ``bits``: an expert's own quantizer where it has those bits,
    else the min-max grid (the stand-in `hfqat.train.expert_allocation.ExpertSensitivity` costs)."""
    out = {}
    for name, q in module.quantizers.items():
        w = module._parameters[name]
        rows = q.rows(w)
        grid = _grid_weights(rows, (bits,), (1.0,), q.spec.group_size, q.spec.symmetric)[0]
        own = (q.weight_bits == bits).repeat_interleave(q.layout.out_features).unsqueeze(1).to(rows.device)
        exact = q.rows(q.fake_quantize(w, exact=True)).float()
        out[name] = q.stored(torch.where(own, exact, grid).to(w.dtype))
    return out


@torch.no_grad()
def measure_expert_kinds(model: nn.Module, layers: LayerList, batch: Mapping[str, Any], bit_choices: Iterable[int],
                         clip: Mapping[str, Mapping[int, float]], current: Mapping[str, int]
                         ) -> dict[str, dict[int, float]]:
    """`measure_kinds` for the experts of MoE models: expert kind (`expert_kind`) → {bits: loss increase (≥ 0) over
    all-float weights (layers and experts) when that kind's experts compute at ``bits``}; {} without experts."""
    experts = list(qat_experts(model))
    if not experts:
        return {}
    inputs, bit_choices = split_rows(loss_inputs(batch))[0], tuple(bit_choices)
    float_tensors = {f"{name}.{p}": module._parameters[p] for name, module in experts for p in module.quantizers}
    kinds: dict[str, list[tuple[str, Any]]] = {}
    for name, module in experts:
        kinds.setdefault(layer_kind(name), []).append((name, module))
    was_training = model.training
    model.eval()
    try:
        _compute_at(layers, None, clip, current)  # the linear layers in float, as in `measure_kinds`' baseline
        with float_experts(model, float_tensors):
            base = model(**inputs).loss.float()
        measured = {}
        for kind, members in kinds.items():
            increases = []
            for bits in bit_choices:
                tensors = dict(float_tensors)
                for name, module in members:
                    tensors.update({f"{name}.{p}": t for p, t in _expert_candidates(module, bits).items()})
                with float_experts(model, tensors):
                    increases.append(model(**inputs).loss.float() - base)
            measured[kind] = torch.stack(increases).clamp_min(0.0)
    finally:
        model.train(was_training)
        for _, layer in layers:
            vars(layer).pop("forward", None)
    values = torch.stack(list(measured.values())).tolist()
    return {kind: dict(zip(bit_choices, row)) for kind, row in zip(measured, values)}


"""Export: real packed low-bit checkpoints (`save_packed`), their inference layer (`PackedLinear`), and the
compressed-tensors ``pack-quantized`` format that vLLM serves (`export_compressed_tensors`).

Numerics are those of `hfqat.quant.primitives`: codes ``q = quantize(w, scale, zero_point, bits, group_size)``,
weights ``(q - round(zero_point)) · effective_scale(scale)``. The effective (positive, clamped) fp32 scales are
stored, so a reloaded `PackedLinear` rebuilds bit for bit the weight the fake-quantized layer computed with.

Packed checkpoint, per quantized layer ``<name>`` (layout `hfqat.export.packing.LAYOUT`, see `hfqat.export.packing`):

- ``<name>.qweight``  int32 (in_features·bits/32, out_features), unsigned codes (symmetric codes + 2^(bits-1))
- ``<name>.scales``   fp32 (in_features/group_size, out_features)
- ``<name>.zeros``    int16, same shape, the integer zero points (asymmetric grids only)
- ``<name>.bias``     as in the float model

Layers with per-row widths (``bits_granularity="row"``) whose rows differ are written as `PackedRowsLinear`: one such
set per width under ``<name>.parts.<i>.`` (widths ascending, no bias), ``<name>.output_order`` (int32, (out,): each
output row's position in the parts' concatenated outputs) and ``<name>.bias``; their entry adds ``row_bits`` =
{bits: rows}.

Codebook layers (``weight_format="codebook"``, `hfqat.quant.codebook`) are written as `PackedCodebookLinear`:
``<name>.qweight`` (the centroid indices, same layout) and ``<name>.codebook`` (fp32 (out_features,
in_features/group_size, 2^bits) tables), bias as above; their ``packed_layers`` entry has ``weight_format: "codebook"``.

``config.json`` carries a `QATConfig` with ``checkpoint_format="packed"`` and ``packed_layers`` = {name: bits,
group_size, symmetric, layout, in_features, out_features[, weight_format][, row_bits]} (the sizes let a model card
weigh layers without the model); `hfqat.integrations.transformers` calls `replace_with_packed_layers` before transformers
loads the weights, so ``AutoModelForCausalLM.from_pretrained(path)`` (after ``import hfqat``) rebuilds it.
Each reloaded layer picks its matmul kernel on first use (`hfqat.export.kernels`; see `PackedLinear.backend`).

compressed-tensors / vLLM: `hfqat.export.compressed_tensors.export_compressed_tensors` (its `CT_SCHEMES`).
W8A8: a layer with ``activation_bits=8`` keeps it in its entry's config; reloaded 8-bit per-channel integer layers run
real int8 GEMMs (backends ``w8a8_triton`` / ``w8a8_int8``) and FP8 layers (`hfqat.export.w8a8.PackedFP8Linear`)
``torch._scaled_mm``.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..atomic import atomic_directory
from ..config import QATConfig
from ..distributed import barrier, is_sharded
from ..quant.experts import qat_experts
from ..quant.finite import FLOAT_TENSORS, QUANT_PARAMS, describe_counts, non_finite_layers
from ..quant.layers import FakeQuantMixin
from ..quant.modeling import qat_layers
from ..quant.primitives import (
    effective_scale,
    fake_quantize_activations,
    init_scales,
    quantize,
)
from .checkpoint import _check_plain_model, _write_checkpoint
from .codebook import PackedCodebookLinear
from .packed_layer import PackedLayer, float_linear, float_weight_oi
from .packing import LAYOUT, code_offset, unpack_kn
from .unshard import unsharded_model
from .w8a8 import PackedFP8Linear

WEIGHTS_NAME = "model.safetensors"
ZERO_DTYPE = torch.int16
# Written in place of every packed layer's float ``<name>.weight``: a tensor of the wrong shape, so that a loader
# without hfqat's quantizer (no ``import hfqat``, or ``quantization_config`` removed from config.json) stops with a
# size-mismatch error instead of bringing the model up with random linear weights. The extra key's name says why.
GUARD_SHAPE = (0,)
GUARD_KEY = "hfqat_packed_checkpoint.load_after_import_hfqat"


def guard_keys_pattern(packed_names: list[str], tensor_keys: list[str] = ()) -> str:
    """The checkpoint keys of the guard tensors, for the loader with hfqat to ignore (nothing else ignored):
    ``<name>.weight`` of packed layers, and the full ``tensor_keys`` (packed experts' ``<experts>.<param>``)."""
    return "^(" + "|".join([re.escape(GUARD_KEY), *(re.escape(n) + r"\.weight" for n in packed_names),
                            *(re.escape(k) for k in tensor_keys)]) + ")$"


def expert_guard_keys(name: str, entry: dict[str, Any]) -> list[str]:
    """Guard keys of a packed experts entry: one per float expert tensor it replaces."""
    return [f"{name}.{param}" for param in entry.get("experts", {})]


class PackedLinear(PackedLayer):
    """Inference linear layer holding packed integer codes (never a float weight); ``y = x · Wᵀ + b``.

    Replaces both `nn.Linear` and GPT-2's `Conv1D` (same function, the weight layout is ours). ``scales`` (fp32) and
    ``zeros`` (int16, asymmetric only) are (in // group_size, out). The matmul backend is picked per layer on the
    first call for each (device, dtype) — see `hfqat.export.kernels` and `PackedLayer`; `set_backend(model, name)` pins one.
    """

    weight_format = "int"

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 symmetric: bool, activation_bits: int | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, bits, group_size, activation_bits, device, dtype)
        self.symmetric = symmetric
        groups = in_features // group_size
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float32, device=device))
        self.register_buffer("zeros", None if symmetric else torch.empty(groups, out_features, dtype=ZERO_DTYPE,
                                                                         device=device))

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_qat(cls, layer: FakeQuantMixin) -> PackedLinear:
        """Pack a fake-quantized layer: same codes, same effective scales, same zero points."""
        w = layer.weight_oi()
        codes = quantize(w, layer.weight_scale, layer.weight_zero_point, layer.weight_bits, layer.spec.group_size)
        return cls._from_codes(codes, effective_scale(layer.weight_scale), layer.weight_zero_point, layer.bias,
                               layer.bits, layer.spec.group_size, layer.spec.activation_bits, w.dtype)

    @classmethod
    @torch.no_grad()
    def from_float(cls, module: nn.Linear | Conv1D, bits: int, group_size: int, symmetric: bool = True,
                   scale_init: str = "mse") -> PackedLinear:
        """Post-training quantization of a float layer (`group_size=-1`: per channel), e.g. for benchmarks."""
        w, group_size = float_weight_oi(module, group_size)
        scale, zero = init_scales(w, bits, group_size, symmetric, scale_init)
        codes = quantize(w, scale, zero, bits, group_size)
        return cls._from_codes(codes, effective_scale(scale), zero, module.bias, bits, group_size, None, w.dtype)

    @classmethod
    def _from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    bias: torch.Tensor | None, bits: int, group_size: int, activation_bits: int | None,
                    dtype: torch.dtype) -> PackedLinear:
        out_features, in_features = codes.shape
        symmetric = zero_point is None
        layer = cls(in_features, out_features, bias is not None, bits, group_size, symmetric, activation_bits,
                    device=codes.device, dtype=bias.dtype if bias is not None else dtype)
        layer._store(codes.to(torch.int32) + code_offset(bits, symmetric), bias)
        layer.scales.copy_(scale.float().t())
        if zero_point is not None:
            zeros = torch.round(zero_point.float())
            if zeros.abs().max() > torch.iinfo(ZERO_DTYPE).max:
                raise ValueError(f"zero points beyond the {ZERO_DTYPE} range cannot be packed")
            layer.zeros.copy_(zeros.t().to(ZERO_DTYPE))
        return layer

    # -- numerics -------------------------------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float weight, exactly ``primitives.dequantize`` of the stored codes (fp32 math)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        codes = unpack_kn(self.qweight, self.bits, k).view(k // g, g, n)  # built in the packed orientation
        zero = code_offset(self.bits, True) if self.zeros is None else self.zeros.to(torch.int32).unsqueeze(1)
        w = (codes - zero).float() * self.scales.unsqueeze(1)
        return w.view(k, n).t().contiguous().to(dtype)

    def format_fields(self) -> dict[str, Any]:
        return {"symmetric": self.symmetric}

    @classmethod
    def entry_kwargs(cls, entry: dict[str, Any], config: QATConfig) -> dict[str, Any]:
        return {"symmetric": bool(entry.get("symmetric", config.symmetric))}


class PackedRowsLinear(nn.Module):
    """A layer with per-row widths (``bits_granularity="row"``), packed: one bias-free `PackedLinear` per width
    holding that width's rows (``parts``, widths ascending), and ``output_order`` (int32, (out,)): where each output
    row lies in the parts' concatenated outputs. Stored size: Σ_b rows_b · in · b bits plus scales; every part is a
    plain packed matrix, so the kernels run it as any other."""

    weight_format = "int"

    def __init__(self, in_features: int, out_features: int, bias: bool, row_counts: dict[int, int], group_size: int,
                 symmetric: bool, activation_bits: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if sum(row_counts.values()) != out_features:
            raise ValueError(f"row_bits {row_counts} must count out_features={out_features} rows")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.activation_bits = group_size, symmetric, activation_bits
        self.parts = nn.ModuleList(PackedLinear(in_features, n, False, b, group_size, symmetric, device=device,
                                                dtype=dtype) for b, n in sorted(row_counts.items()))
        self.register_buffer("output_order", torch.empty(out_features, dtype=torch.int32, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.force_backend: str | None = None  # "parts": each width block on its own (set_backend sets it)
        self.backend: str | None = None
        self._matmul = None
        self._prepared_key: tuple | None = None

    @property
    def bits(self) -> int:
        return max(part.bits for part in self.parts)

    @property
    def weight(self) -> torch.Tensor:
        """The first part's packed words, for code that probes ``.weight`` (see `PackedLayer.weight`)."""
        return self.parts[0].qweight

    @classmethod
    @torch.no_grad()
    def from_qat(cls, layer: FakeQuantMixin) -> PackedRowsLinear:
        w, row_bits = layer.weight_oi(), layer.weight_row_bits.long()
        codes = quantize(w, layer.weight_scale, layer.weight_zero_point, layer.quantizer_bits, layer.spec.group_size)
        scale, zero = effective_scale(layer.weight_scale), layer.weight_zero_point
        widths = row_bits.unique().tolist()
        rows = {b: (row_bits == b).nonzero().squeeze(1) for b in widths}
        packed = cls(layer.in_features, layer.out_features, layer.bias is not None,
                     {b: len(r) for b, r in rows.items()}, layer.spec.group_size, zero is None,
                     layer.spec.activation_bits, device=w.device, dtype=layer.bias.dtype if layer.bias is not None
                     else w.dtype)
        packed.parts = nn.ModuleList(  # the empty parts __init__ made, replaced by filled ones
            PackedLinear._from_codes(codes[r], scale[r], None if zero is None else zero[r], None, b,
                                     layer.spec.group_size, None, w.dtype) for b, r in rows.items())
        packed.output_order.copy_(torch.argsort(torch.cat([rows[b] for b in widths])).to(torch.int32))
        if layer.bias is not None:
            packed.bias.copy_(layer.bias)
        return packed

    @classmethod
    @torch.no_grad()
    def from_float(cls, module: nn.Linear | Conv1D, row_bits: torch.Tensor, group_size: int,
                   symmetric: bool = True, scale_init: str = "mse") -> PackedRowsLinear:
        """Post-training quantization of a float layer with one width per output row (`row_bits`, (out,)),
        e.g. for benchmarks; each width's rows as `PackedLinear.from_float` packs them."""
        w, group_size = float_weight_oi(module, group_size)
        row_bits = row_bits.to(w.device).long()
        widths = row_bits.unique().tolist()
        rows = {b: (row_bits == b).nonzero().squeeze(1) for b in widths}
        bias = module.bias
        packed = cls(w.shape[1], w.shape[0], bias is not None, {b: len(r) for b, r in rows.items()}, group_size,
                     symmetric, device=w.device, dtype=w.dtype)
        part_layer = nn.Linear(w.shape[1], 1, bias=False, device="meta")
        parts = []
        for b in widths:
            part_layer.weight = nn.Parameter(w[rows[b]], requires_grad=False)
            parts.append(PackedLinear.from_float(part_layer, b, group_size, symmetric, scale_init))
        packed.parts = nn.ModuleList(parts)
        packed.output_order.copy_(torch.argsort(torch.cat([rows[b] for b in widths])).to(torch.int32))
        if bias is not None:
            packed.bias.copy_(bias)
        return packed

    @classmethod
    def from_entry(cls, in_features: int, out_features: int, bias: bool, entry: dict[str, Any],
                   config: QATConfig, device=None, dtype=None) -> PackedRowsLinear:
        return cls(in_features, out_features, bias, {int(b): int(n) for b, n in entry["row_bits"].items()},
                   int(entry["group_size"]), bool(entry.get("symmetric", config.symmetric)), config.activation_bits,
                   device=device, dtype=dtype)

    def config_entry(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "layout": LAYOUT,
                "in_features": self.in_features, "out_features": self.out_features,
                "row_bits": {str(part.bits): part.out_features for part in self.parts}}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([part.dequantized_weight(dtype) for part in self.parts])[self.output_order.long()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is not None:
            x = fake_quantize_activations(x, self.activation_bits)
        if self._prepared_key != (x.device, x.dtype, self.force_backend):
            self._prepare(x.device, x.dtype)
        return self._matmul(self, x)

    @torch.compiler.disable
    def _prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """CUDA: ``triton_rows``, every width block in one launch with the output order applied by the kernel's
        stores (`hfqat.export.kernels.triton_lowbit.rows_backend`). Elsewhere, or with a backend forced (it then
        applies to the parts): each part on its own backend, then concatenation and reordering (``parts``)."""
        fused = None
        if self.force_backend in (None, "triton", "triton_rows") and device.type == "cuda":
            try:
                from .kernels import triton_lowbit
            except ImportError:  # triton missing or too old
                triton_lowbit = None
            fused = triton_lowbit and triton_lowbit.rows_backend(self, device, dtype)
        if fused is not None:
            self.backend, self._matmul = "triton_rows", fused
        else:
            for part in self.parts:
                part._prepare(device, dtype)
            self.backend, self._matmul = "parts", _parts_matmul
        self._prepared_key = (device, dtype, self.force_backend)

    def to_float(self) -> nn.Linear:
        return float_linear(self, self.output_order.device)

    def extra_repr(self) -> str:
        rows = ", ".join(f"{part.bits}-bit: {part.out_features}" for part in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, rows=({rows})"


def _parts_matmul(layer: PackedRowsLinear, x: torch.Tensor) -> torch.Tensor:
    y = torch.cat([part(x) for part in layer.parts], -1).index_select(-1, layer.output_order)
    return y + layer.bias if layer.bias is not None else y


def packed_class(layer: FakeQuantMixin) -> type[PackedLayer | PackedRowsLinear]:
    """The packed class a fake-quantized layer exports to (per-row widths that differ: `PackedRowsLinear`)."""
    if layer.rows_differ:
        return PackedRowsLinear
    return PACKED_CLASSES[layer.spec.weight_format]


# weight_format -> packed inference class (each has from_qat(layer), from_entry(...) and config_entry())
PACKED_CLASSES: dict[str, type[PackedLayer]] = {cls.weight_format: cls for cls in (PackedLinear, PackedCodebookLinear,
                                                                                  PackedFP8Linear)}
PACKED_TYPES = tuple(PACKED_CLASSES.values())


def packed_modules(model: nn.Module) -> Iterator[tuple[str, PackedLinear | PackedCodebookLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, PACKED_TYPES):
            yield name, module


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Pin every packed layer to `backend` (a name from `hfqat.export.kernels.BACKENDS`), or None for auto.

    A per-row layer (`PackedRowsLinear`) runs its fused ``triton_rows`` path for None and "triton", and otherwise
    passes `backend` to each of its width blocks. Layers already set up are set up again now, on the device and
    for the activation dtype they ran with, so that a ``torch.compile`` or CUDA-graph capture that follows sees no
    set-up (as after `prepare_backends`)."""
    layers = [layer for _, layer in packed_modules(model)] + [layer for _, layer in rows_modules(model)]
    for layer in layers:
        layer.force_backend = backend
    for layer in layers:
        if layer._prepared_key is not None:
            device, dtype, _ = layer._prepared_key
            layer._prepare(device, dtype)


def rows_modules(model: nn.Module) -> Iterator[tuple[str, PackedRowsLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, PackedRowsLinear):
            yield name, module


def prepare_backends(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Pick (and set up) every packed layer's backend now, for activations of `dtype` (default: the model's).

    Do this before ``torch.compile`` or CUDA-graph capture so that neither sees the one-time set-up. Packed experts
    (`hfqat.export.packed_experts`) get their decode stacks, listed under the experts module's name; their per-expert
    matrices run through no backend of their own.
    """
    from .packed_experts import packed_experts

    chosen = {}
    experts = packed_experts(model)
    inside = tuple(f"{name}.packed." for name, _ in experts)
    layers = [(name, layer, layer.qweight.device) for name, layer in packed_modules(model)
              if not name.startswith(inside)]
    layers += [(name, layer, layer.output_order.device) for name, layer in rows_modules(model)]
    default = getattr(model, "dtype", torch.float32)
    for name, layer, device in layers:
        act_dtype = dtype or (layer.bias.dtype if layer.bias is not None else default)
        if layer._prepared_key != (device, act_dtype, layer.force_backend):  # set up already: keep it
            layer._prepare(device, act_dtype)
        chosen[name] = layer.backend
    for name, module in experts:
        key = (module.packed[next(iter(module.layouts))][0].qweight.device, dtype or default)
        if module.has_grouped_decode() and module._decode_key != key:
            module.prepare_decode(*key)
        chosen[name] = module.decode_backend
    return chosen


@torch.no_grad()
def pin_fastest_backends(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                         candidates: tuple[str, ...] = ("tinygemm", "triton", "gemlite"),
                         tokens: int = 1) -> dict[tuple, dict[str, float]]:
    """CUDA: time each applicable backend of `candidates` on every distinct integer packed-layer signature (in,
    out, bits, group size, symmetry) at `tokens` rows, as CUDA-graph replays, and pin the fastest on all layers of
    that signature. Returns {signature: {backend: microseconds}}. Numerics differ by backend only in float
    rounding (`hfqat.export.kernels`); per-row layers keep their fused path."""
    from triton.testing import do_bench_cudagraph

    timings: dict[tuple, dict[str, float]] = {}
    for _, layer in packed_modules(model):
        if not isinstance(layer, PackedLinear) or layer.qweight.device.type != "cuda":
            continue
        device = layer.qweight.device
        key = (layer.in_features, layer.out_features, layer.bits, layer.group_size, layer.zeros is None)
        if key not in timings:
            x = torch.randn(tokens, layer.in_features, device=device, dtype=dtype)
            timings[key] = {}
            for name in candidates:
                if layer.backends[name](layer, device, dtype) is None:
                    continue
                layer.force_backend = name
                layer._prepare(device, dtype)
                layer(x)  # compile / autotune outside the graph
                seconds = do_bench_cudagraph(lambda layer=layer, x=x: layer(x), rep=20, return_mode="median") / 1e3
                timings[key][name] = seconds * 1e6
        layer.force_backend = min(timings[key], key=timings[key].get) if timings[key] else None
        layer._prepare(device, dtype)
    return timings


def backends_in_use(model: nn.Module) -> dict[str, str | None]:
    """Packed layer name → backend it ran with last (None before its first forward). A per-row layer on its
    fused path is listed by its own name (``triton_rows``), its width blocks then stay unused (None)."""
    fused = {name for name, layer in rows_modules(model) if layer.backend == "triton_rows"}
    used = {name: layer.backend for name, layer in packed_modules(model)
            if name.rsplit(".parts.", 1)[0] not in fused}
    return used | {name: "triton_rows" for name in fused}


def replace_with_packed_layers(model: nn.Module, config: QATConfig) -> list[str]:
    """Swap the layers listed in ``config.packed_layers`` for empty packed layers of their weight format (before
    weight loading)."""
    replaced = []
    for name, entry in (config.packed_layers or {}).items():
        layout = entry.get("layout", LAYOUT)
        if layout != LAYOUT:
            raise ValueError(f"packed layer {name!r} has layout {layout!r}; this hfqat reads {LAYOUT!r} only")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint lists packed layer {name!r}, which this model does not have") from None
        if "experts" in entry:  # a fused experts module (hfqat.export.packed_experts)
            from .packed_experts import replace_with_packed_experts

            replace_with_packed_experts(module, entry, config)
            replaced.append(name)
            continue
        if isinstance(module, nn.Linear):
            in_features, out_features = module.in_features, module.out_features
        elif isinstance(module, Conv1D):
            in_features, out_features = module.nx, module.nf
        else:
            raise ValueError(f"packed layer {name!r} is a {type(module).__name__}; expected nn.Linear or Conv1D")
        weight_format = entry.get("weight_format", "int")
        if weight_format not in PACKED_CLASSES:
            raise ValueError(f"packed layer {name!r} has weight_format {weight_format!r}; this hfqat reads "
                             f"{list(PACKED_CLASSES)}")
        cls = PackedRowsLinear if "row_bits" in entry else PACKED_CLASSES[weight_format]
        packed = cls.from_entry(in_features, out_features, module.bias is not None, entry, config,
                                device=module.weight.device, dtype=module.weight.dtype)
        model.set_submodule(name, packed)
        replaced.append(name)
    return replaced


# -- writing ------------------------------------------------------------------------------------------------
def _base_qat_config(model: nn.Module, layers: list[tuple[str, FakeQuantMixin]]) -> QATConfig:
    qc = getattr(model.config, "quantization_config", None)
    if isinstance(qc, dict):
        qc = QATConfig.from_dict(qc)
    if isinstance(qc, QATConfig):
        return copy.deepcopy(qc)
    spec = layers[0][1].spec
    return QATConfig(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                     activation_bits=spec.activation_bits)


def _untie_if_packed(config, model: nn.Module, packed: set[str]) -> None:
    """A packed layer whose float weight was tied (e.g. a quantized lm_head) can no longer share it."""
    shared = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        shared.setdefault((tensor.device, tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    for names in shared.values():
        if len(names) > 1 and any(n.rsplit(".", 1)[0] in packed for n in names):
            for cfg in (config, getattr(config, "text_config", None)):
                if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                    cfg.tie_word_embeddings = False


@torch.no_grad()
def save_packed(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` (with hfqat fake-quantized layers) as a packed low-bit checkpoint at `path`, atomically.

    Every fake-quantized layer is stored as packed integer codes + fp32 scales (+ int16 zero points) at its
    current bit width (mixed widths as the allocation left them); codebook layers as packed centroid indices + fp32
    tables (`hfqat.export.codebook.PackedCodebookLinear`); all other weights as they are. Files:
    ``model.safetensors``, ``config.json`` (with the packed `QATConfig`), ``generation_config.json`` and the
    tokenizer files when given. Returns the path.
    """
    _check_plain_model(model)
    if is_sharded(model):  # FSDP2 / ZeRO-3: every rank calls this; rank 0 packs a gathered full copy
        full = unsharded_model(model)
        if full is not None:
            save_packed(full, path, tokenizer)
        barrier()
        return Path(path)
    from .packed_experts import pack_experts

    layers = list(qat_layers(model))
    experts = list(qat_experts(model))
    if not layers and not experts:
        raise ValueError("model has no hfqat fake-quantized layers; load it with quantization_config=QATConfig(...) "
                         "or convert it with hfqat.quantize_model first")
    gguf = [name for name, layer in layers if layer.spec.weight_format == "gguf"]
    if gguf:  # their blocks are llama.cpp's, not hfqat's packed integer layout
        raise ValueError(f"save_packed: layers {gguf[:3]}{'...' if len(gguf) > 3 else ''} are on GGUF grids "
                         "(weight_format='gguf'); export them with hfqat.export_gguf")
    bad = non_finite_layers(layers, FLOAT_TENSORS + QUANT_PARAMS)
    if bad:  # NaN codes would be out of range; NaN scales would pack but make every output NaN
        listing = "; ".join(f"{name}: {describe_counts(*counts)}" for name, counts in bad.items())
        raise ValueError(f"cannot pack non-finite weights or scales ({listing}); the training diverged or the "
                         "checkpoint is damaged: export an earlier checkpoint")
    owned = {f"{name}.{suffix}" for name, _ in layers
             for suffix in ("weight", "weight_scale", "weight_zero_point", "weight_bits", "weight_row_bits",
                              "weight_codebook", "bias")}
    state = {name: t for name, t in model.state_dict().items() if name not in owned}
    packed_layers: dict[str, dict[str, Any]] = {}
    state[GUARD_KEY] = torch.empty(GUARD_SHAPE, dtype=torch.int8)
    for name, module in experts:
        expert_state, packed_layers[name], replaced = pack_experts(module)
        for key in replaced:
            state.pop(f"{name}.{key}", None)
        state.update({f"{name}.{key}": t for key, t in expert_state.items()})
        state.update({key: torch.empty(GUARD_SHAPE, dtype=torch.int8) for key in expert_guard_keys(
            name, packed_layers[name])})  # in place of the float expert tensors, as for layers below
    for name, layer in layers:
        packed = packed_class(layer).from_qat(layer)
        state.update({f"{name}.{key}": t for key, t in packed.state_dict().items()})
        state[f"{name}.weight"] = torch.empty(GUARD_SHAPE, dtype=torch.int8)
        packed_layers[name] = packed.config_entry()
    qconfig = _base_qat_config(model, layers)
    qconfig.checkpoint_format = "packed"
    qconfig.packed_layers = packed_layers
    config = copy.deepcopy(model.config)
    config.quantization_config = qconfig
    _untie_if_packed(config, model, set(packed_layers))
    with atomic_directory(path) as tmp:
        _write_checkpoint(tmp, model, state, config, tokenizer)
    return Path(path)

"""Packed Mixture-of-Experts weights: every expert of a fused expert tensor as its own packed matrix.

`save_packed` writes a converted experts module (`hfqat.quant.experts.QATExpertsMixin`) ``<experts>`` as, for each
quantized parameter ``<p>`` and expert ``e``, one `PackedLinear` (same codes, scales and zero points the fake quantizer
used, at that expert's width — widths may differ per expert) under ``<experts>.packed.<p>.<e>.`` (``qweight``,
``scales``[, ``zeros``]); the float tensor ``<p>`` is not written. Other parameters of the module (gpt_oss' per-expert
biases) are written as they are. Its ``packed_layers`` entry is ``{"experts": {<p>: {"bits": [per expert],
"group_size", "symmetric", "num_experts", "out_features", "in_features", "transposed"}}, "layout"}``.

On reload the module becomes `PackedExpertsMixin` over its own class. Forward, on the packed codes:

- decode (at most `DECODE_PAIRS` token-expert pairs, e.g. batch-1 generation with top-k routing): the grouped low-bit
  GEMV over the routed pairs (`hfqat.export.kernels.experts`: the expert ids stay on the device, one launch per
  width on GPU) for the first projection, the class's own gate (``_apply_gate``) or activation, biases, the grouped
  GEMV again for ``down_proj``, post-expert norm and the routing-weight sum — the math of transformers' ``batched_mm``
  path with no float expert weight ever built and no host sync, so ``torch.compile(fullgraph=True)`` and CUDA graphs
  (``generate(cache_implementation="static")``) take it. The experts are stacked per width on the first forward
  (`prepare_decode`, also run by `hfqat.export.packed.prepare_backends`), their per-expert buffers then views;
- otherwise (prefill, or a class without transformers' standard experts signature): the routed experts only are
  dequantized into the stored 3-D layout (unrouted ones stay zero: no implementation reads them) and the class's own
  forward runs on them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import QATConfig
from ..quant.experts import ExpertParamLayout, QATExpertsMixin
from ..quant.primitives import effective_scale, quantize
from .kernels.experts import ExpertStacks, dequantized_kn
from .packed import PackedLinear
from .packing import LAYOUT

DECODE_PAIRS = 8  # token-expert pairs up to which the grouped GEMV decode path runs


def _layout_entry(layout: ExpertParamLayout) -> dict[str, Any]:
    return {"num_experts": layout.num_experts, "out_features": layout.out_features,
            "in_features": layout.in_features, "transposed": layout.transposed}


@torch.no_grad()
def pack_experts(module: QATExpertsMixin) -> tuple[dict[str, torch.Tensor], dict[str, Any], set[str]]:
    """(state of the packed matrices, keyed relative to the module; its ``packed_layers`` entry; the module's own
    state keys the packed state replaces)."""
    module.run_pending_fit()
    state, params, replaced = {}, {}, {"routed_tokens"}
    for name, q in module.quantizers.items():
        lay, spec = q.layout, q.spec
        rows = q.rows(module._parameters[name]).view(lay.num_experts, lay.out_features, lay.in_features)
        zero = q.weight_zero_point
        for e in range(lay.num_experts):
            bits = int(q.weight_bits[e])
            z = None if zero is None else zero[e]
            codes = quantize(rows[e], q.weight_scale[e], z, bits, spec.group_size)
            packed = PackedLinear._from_codes(codes, effective_scale(q.weight_scale[e]), z, None, bits,
                                              spec.group_size, None, rows.dtype)
            state.update({f"packed.{name}.{e}.{k}": t for k, t in packed.state_dict().items()})
        params[name] = {"bits": q.weight_bits.tolist(), "group_size": spec.group_size, "symmetric": spec.symmetric,
                        **_layout_entry(lay)}
        replaced |= {name, *(f"quantizers.{name}.{k}" for k in q.state_dict())}
    return state, {"experts": params, "layout": LAYOUT}, replaced


class PackedExpertsMixin:
    """Mixed into a copy of an experts class whose expert tensors are held packed (see the module docstring)."""

    packed: nn.ModuleDict
    layouts: dict[str, ExpertParamLayout]

    def __getattr__(self, name: str):
        # The float expert tensors are gone; code that probes them outside forward (transformers' weight init) gets
        # an empty tensor to act on, forward gets the dequantized one (set in __dict__, found before this hook).
        layouts = self.__dict__.get("layouts", {})
        if name in layouts:
            return torch.empty(0)
        return super().__getattr__(name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        top_k_index = kwargs.get("top_k_index", args[0] if args else None)
        top_k_weights = kwargs.get("top_k_weights", args[1] if len(args) > 1 else None)
        standard = isinstance(top_k_index, torch.Tensor) and not top_k_index.is_floating_point()
        grouped = standard and self.has_grouped_decode()
        if grouped and self._decode_key != (hidden_states.device, hidden_states.dtype):
            # on any forward, so that generate's eager prefill sets up what its compiled decode steps run
            self.prepare_decode(hidden_states.device, hidden_states.dtype)
        if grouped and top_k_index.numel() <= DECODE_PAIRS:
            return self._decode(hidden_states, top_k_index, top_k_weights)
        routed = top_k_index.unique().tolist() if standard else None
        dense = {name: self.dequantized(name, routed, hidden_states.dtype) for name in self.layouts}
        self.__dict__.update(dense)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            for name in dense:
                self.__dict__.pop(name, None)

    @property
    def _first_projection(self) -> str:
        """The experts' input projection: fused gate/up, or up alone (classes without a gate, e.g. nemotron_h)."""
        return "gate_up_proj" if self.has_gate else "up_proj"

    def has_grouped_decode(self) -> bool:
        """Whether the class has transformers' standard experts signature and both projections are packed."""
        if not hasattr(self, "has_gate"):
            return False
        return all(n in self.layouts for n in (self._first_projection, "down_proj"))

    def dequantized(self, name: str, experts: list[int] | None, dtype: torch.dtype) -> torch.Tensor:
        """The stored-layout float tensor of ``name``: the listed experts (default all) dequantized, others zero."""
        lay, parts = self.layouts[name], self.packed[name]
        shape = (lay.num_experts, lay.in_features, lay.out_features) if lay.transposed else (
            lay.num_experts, lay.out_features, lay.in_features)
        w = torch.zeros(shape, dtype=dtype, device=parts[0].qweight.device)
        for e in range(lay.num_experts) if experts is None else [e for e in experts if e < lay.num_experts]:
            kn = dequantized_kn(parts[e], dtype)
            w[e] = kn if lay.transposed else kn.t()
        return w

    @property
    def decode_backend(self) -> str | None:
        """The grouped GEMV's backend (`ExpertStacks.backend`), None before the first decode or `prepare_decode`."""
        return next(iter(self.decode_stacks.values())).backend if len(self.decode_stacks) else None

    @torch.compiler.disable
    def prepare_decode(self, device: torch.device, dtype: torch.dtype) -> None:
        """Stack the experts for the decode path's grouped GEMV (before torch.compile or a CUDA-graph capture)."""
        first = self._first_projection
        self.decode_stacks = nn.ModuleDict({name: ExpertStacks(list(self.packed[name]), dtype, DECODE_PAIRS)
                                            for name in (first, "down_proj")})
        self._decode_key = (device, dtype)

    def _decode(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        first = self._first_projection
        tokens, slots = top_k_index.shape
        ids = top_k_index.reshape(-1)
        sentinel = ids >= self.layouts[first].num_experts  # expert-parallel: the grouped GEMV gives them zeros
        safe_ids = ids.masked_fill(sentinel, 0) if self.has_bias else None
        h = self.decode_stacks[first](hidden_states, top_k_index).view(tokens * slots, -1)
        if self.has_bias:
            h = h + getattr(self, f"{first}_bias")[safe_ids]
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = self.decode_stacks["down_proj"](h, ids.view(-1, 1)).view(tokens * slots, -1)
        if self.has_bias:
            y = y + self.down_proj_bias[safe_ids]
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        weights = top_k_weights.reshape(-1, 1).masked_fill(sentinel.view(-1, 1), 0)
        out = (y * weights).float().view(tokens, slots, -1).sum(1)
        return out.to(hidden_states.dtype)


_PACKED_CLASSES: dict[type, type] = {}


def packed_experts_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _PACKED_CLASSES:
        _PACKED_CLASSES[cls] = type(f"Packed{cls.__name__}", (PackedExpertsMixin, cls), {"__module__": __name__})
    return _PACKED_CLASSES[cls]


def replace_with_packed_experts(module: nn.Module, entry: dict[str, Any], config: QATConfig) -> nn.Module:
    """Turn a float (meta) experts module into its packed twin for one ``packed_layers`` entry, before loading."""
    layouts, packed = {}, nn.ModuleDict()
    for name, spec in entry["experts"].items():
        param = module._parameters.pop(name, None)
        if param is None:
            raise ValueError(f"the checkpoint lists packed expert tensor {name!r}, which {type(module).__name__} "
                             f"does not have")
        lay = ExpertParamLayout(int(spec["num_experts"]), int(spec["out_features"]), int(spec["in_features"]),
                                bool(spec["transposed"]))
        layouts[name] = lay
        packed[name] = nn.ModuleList(
            PackedLinear(lay.in_features, lay.out_features, False, int(b), int(spec["group_size"]),
                         bool(spec["symmetric"]), device=param.device, dtype=param.dtype) for b in spec["bits"])
    module.__class__ = packed_experts_class(type(module))
    module.__dict__["layouts"] = layouts
    module.packed = packed
    module.decode_stacks = nn.ModuleDict()  # filled by prepare_decode
    module._decode_key = None
    return module


@torch.no_grad()
def restore_float_packed(module: PackedExpertsMixin, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn a packed experts module back into its original class holding the dequantized float tensors."""
    dtype = dtype or module.packed[next(iter(module.layouts))][0].scales.dtype
    dense = {name: module.dequantized(name, None, dtype) for name in module.layouts}
    del module.packed, module.decode_stacks
    for key in ("layouts", "_decode_key"):
        module.__dict__.pop(key)
    module.__class__ = type(module).__mro__[2]  # (Packed<cls>, PackedExpertsMixin, cls, ...)
    for name, w in dense.items():
        module._parameters[name] = nn.Parameter(w, requires_grad=False)
    return module


def packed_experts(model: nn.Module) -> list[tuple[str, PackedExpertsMixin]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PackedExpertsMixin)]

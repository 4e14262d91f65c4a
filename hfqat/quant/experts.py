"""Fake-quantized Mixture-of-Experts weights: transformers' fused expert tensors, quantized per expert.

transformers stores the experts of an MoE block as a few 3-D parameters of one module (mostly ``gate_up_proj``
(E, 2I, H) and ``down_proj`` (E, H, I); transposed (E, in, out) in gpt_oss / llama4 / aria), and runs them through one batched path (``@use_experts_implementation``: grouped_mm, batched_mm, eager).
hfqat keeps that path: a converted experts module keeps its class (a subclass is swapped in, `QATExpertsMixin`) and
its float parameters (same state-dict names, so float checkpoints load as they are); its forward computes each fake-
quantized 3-D weight once and lets the model's own experts forward read it in place of the float one. No Python loop
over experts is added, whatever implementation the config selects.

Quantization state per expert parameter ``<p>`` lives in ``<experts>.quantizers.<p>`` (`ExpertQuantizer`):

- ``weight_bits``        (E,) int32, one width per expert (re-allocation treats an expert as a unit)
- ``weight_scale``       (E, out, in // group_size) fp32: per expert, per output channel, groups along its input dim
- ``weight_zero_point``  same shape, asymmetric grids only

and ``<experts>.routed_tokens`` (E,) fp32 counts the tokens routed to each expert in training forwards (routing
frequency for sensitivity estimates; reset by whoever reads it). Numerics are `hfqat.quant.primitives`' on the
(E·out, in) row view of each tensor, so export packs exactly what training computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import LayerQuantSpec, QATConfig
from .primitives import fake_quantize, fill_placeholder_scales, init_scales


@dataclass(frozen=True)
class ExpertParamLayout:
    """How one expert parameter is stored: ``num_experts`` matrices, each (out, in) or, ``transposed``, (in, out)."""

    num_experts: int
    out_features: int
    in_features: int
    transposed: bool = False


# Experts classes that store (E, in, out) without transformers' ``is_transposed`` flag.
TRANSPOSED_CLASSES = frozenset({"Llama4TextExperts"})
# Not converted (so `hfqat.coverage` reports them float): DBRX's ``DbrxExpertGLU`` holds flat (E·F, H) matrices that its
# *parent* reads and slices before calling it, so a substitution inside the module's own forward would not be seen.


def expert_param_layouts(module: nn.Module) -> dict[str, ExpertParamLayout]:
    """{parameter name: layout} of the expert matrices of ``module``, or {} when it is no experts module.

    An experts module is one whose class name says "Expert" and that holds 3-D parameters, which its own forward
    reads; biases (``*_bias``) and norms (2-D per-expert vectors) are not matrices and stay float.
    """
    cls_name = type(module).__name__
    if "expert" not in cls_name.lower() or isinstance(module, nn.Linear):
        return {}
    transposed = cls_name in TRANSPOSED_CLASSES or bool(getattr(module, "is_transposed", False))
    layouts = {}
    for name, p in module.named_parameters(recurse=False):
        if p.ndim != 3:
            continue
        experts, rows, cols = p.shape
        out_features, in_features = (cols, rows) if transposed else (rows, cols)
        layouts[name] = ExpertParamLayout(experts, out_features, in_features, transposed)
    return layouts


class ExpertQuantizer(nn.Module):
    """Quantizer state and numerics of one expert parameter (all its experts); see the module docstring."""

    def __init__(self, spec: LayerQuantSpec, layout: ExpertParamLayout, device=None) -> None:
        super().__init__()
        self.spec, self.layout = spec, layout
        self.soft_sharpness = math.inf if spec.rounding == spec.clamping == "hard" else 1.0
        e, out, groups = layout.num_experts, layout.out_features, layout.in_features // spec.group_size
        self.register_buffer("weight_bits", torch.full((e,), spec.bits, dtype=torch.int32, device=device))
        self.weight_scale = nn.Parameter(torch.ones(e, out, groups, dtype=torch.float32, device=device),
                                         requires_grad=spec.learn_scales)
        if spec.symmetric:
            self.register_parameter("weight_zero_point", None)
        else:
            self.weight_zero_point = nn.Parameter(torch.zeros(e, out, groups, dtype=torch.float32, device=device),
                                                  requires_grad=spec.learn_scales)
        self._uniform_key: tuple | None = None
        self._uniform_bits: int | None = None

    # -- layout ---------------------------------------------------------------------------------------------
    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """The stored tensor as (E·out, in): every expert's output channels stacked (a view unless transposed)."""
        lay = self.layout
        if lay.transposed:
            w = w.transpose(1, 2)
        return w.reshape(lay.num_experts * lay.out_features, lay.in_features)

    def stored(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of `rows`: (E·out, in) back to the stored layout."""
        lay = self.layout
        w = rows.view(lay.num_experts, lay.out_features, lay.in_features)
        return w.transpose(1, 2) if lay.transposed else w

    # -- bits -----------------------------------------------------------------------------------------------
    def uniform_bits(self) -> int | None:
        """The one width all experts share, or None; cached on the buffer's version (no host sync per forward)."""
        key = (self.weight_bits.data_ptr(), self.weight_bits._version)
        if key != self._uniform_key:
            bits = self.weight_bits
            self._uniform_bits = int(bits[0]) if bool((bits == bits[0]).all()) else None
            self._uniform_key = key
        return self._uniform_bits

    def row_bits(self) -> torch.Tensor:
        """(E·out,) width of every row of the row view."""
        return self.weight_bits.repeat_interleave(self.layout.out_features)

    def quantizer_bits(self) -> torch.Tensor:
        """What `fake_quantize` takes: the shared width (fused kernels apply), or (E·out, 1, 1) per-row widths."""
        uniform = self.uniform_bits()
        if uniform is not None:
            return self.weight_bits[0]
        return self.row_bits().view(-1, 1, 1)

    # -- numerics -------------------------------------------------------------------------------------------
    def flat_scale(self) -> torch.Tensor:
        return self.weight_scale.view(-1, self.weight_scale.shape[-1])

    def flat_zero_point(self) -> torch.Tensor | None:
        zp = self.weight_zero_point
        return None if zp is None else zp.view(-1, zp.shape[-1])

    def fake_quantize(self, w: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """The fake-quantized tensor in ``w``'s layout and dtype (differentiable in ``w`` and the quantizer)."""
        sharpness = self.soft_sharpness if (self.training and not exact) else math.inf
        spec = self.spec
        rows = fake_quantize(self.rows(w), self.flat_scale(), self.flat_zero_point(), self.quantizer_bits(),
                             spec.group_size, spec.rounding, spec.clamping, sharpness, out_dtype=w.dtype)
        return self.stored(rows)

    @torch.no_grad()
    def reset(self, w: torch.Tensor, experts: torch.Tensor | None = None) -> None:
        """(Re)fit scales / zero points to ``w`` for the current bits, of ``experts`` (an (E,) bool mask) only."""
        spec, out = self.spec, self.layout.out_features
        rows, bits = self.rows(w), self.row_bits()
        index = None
        if experts is not None:
            index = experts.to(bits.device).repeat_interleave(out).nonzero().squeeze(1)
            if not index.numel():
                return
            rows, bits = rows[index], bits[index]
        scale, zero = init_scales(rows, bits, spec.group_size, spec.symmetric, spec.scale_init)
        flat_s, flat_z = self.flat_scale(), self.flat_zero_point()
        if index is None:
            flat_s.copy_(scale)
        else:
            flat_s[index] = scale.to(flat_s.dtype)
        if flat_z is not None:
            if index is None:
                flat_z.copy_(zero)
            else:
                flat_z[index] = zero.to(flat_z.dtype)

    @torch.no_grad()
    def set_bits(self, w: torch.Tensor, bits: int | Sequence[int] | torch.Tensor) -> None:
        """One width for every expert (an int) or one per expert ((E,) values); re-fits the experts that change."""
        bits = torch.as_tensor(bits, dtype=torch.int32).to(self.weight_bits.device).expand(self.layout.num_experts)
        bad = [b for b in bits.unique().tolist() if b not in range(2, 9)]
        if bad:
            raise ValueError(f"set_bits: bits={bad} invalid; allowed values: integers 2..8")
        changed = bits != self.weight_bits
        if bool(changed.any()):
            self.weight_bits.copy_(bits)
            self.reset(w, changed)

    def extra_repr(self) -> str:
        lay, s = self.layout, self.spec
        bits = "meta" if self.weight_bits.is_meta else sorted(set(self.weight_bits.tolist()))
        return (f"experts={lay.num_experts}, out={lay.out_features}, in={lay.in_features}, "
                f"transposed={lay.transposed}, bits={bits}, group_size={s.group_size}, symmetric={s.symmetric}")


class _QuantizeParametrization(nn.Module):
    """The quantizer as the last step of a parametrization (LoRA on experts: Q(W + s·B·A)). Holds the quantizer
    outside its module tree (it is registered under ``quantizers`` already)."""

    def __init__(self, quantizer: ExpertQuantizer) -> None:
        super().__init__()
        self.__dict__["quantizer"] = quantizer

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantizer.fake_quantize(w)


class QATExpertsMixin:
    """Mixed into a copy of an experts class: its forward runs the class's own forward on fake-quantized weights.

    The fake-quantized tensors are put in the instance ``__dict__`` for the duration of the forward, where attribute
    lookup finds them before `nn.Module.__getattr__` reaches the float parameters; so ``self.gate_up_proj`` inside
    transformers' experts implementations (grouped_mm, batched_mm, eager) reads the quantized weight, computed once
    per forward. Parameters, state-dict names and gradients to the float master weights are unchanged.
    """

    quantizers: nn.ModuleDict
    routed_tokens: torch.Tensor
    _fit_pending: bool = False

    def forward(self, *args, **kwargs):
        self.run_pending_fit()
        if self.training and torch.is_grad_enabled():
            self._count_routing(args, kwargs)
        # A tensor peft's LoRA (``target_parameters``) parametrizes for this forward reads W + s·B·A through a property:
        # the quantizer joins that parametrization (last), so the experts compute Q(W + s·B·A) and a merge is exact.
        parametrized = [name for name in self.quantizers if parametrize.is_parametrized(self, name)]
        teacher = self.__dict__.get("_float_tensors")  # a distillation teacher pass: float weights, no quantizer
        if teacher is not None:
            parametrized = []
        quantized = teacher or {name: q.fake_quantize(self._parameters[name]) for name, q in self.quantizers.items()
                                if name not in parametrized}
        for name in parametrized:
            parametrize.register_parametrization(self, name, _QuantizeParametrization(self.quantizers[name]),
                                                 unsafe=True)
        self.__dict__.update(quantized)
        try:
            return super().forward(*args, **kwargs)
        finally:
            for name in quantized:
                self.__dict__.pop(name, None)
            for name in parametrized:
                del self.parametrizations[name][-1]

    @torch.no_grad()
    def _count_routing(self, args: tuple, kwargs: dict) -> None:
        index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        if isinstance(index, torch.Tensor) and not index.is_floating_point():
            n = self.routed_tokens.numel()
            index = index.flatten().clamp(0, n)  # index n: an expert-parallel "dropped" slot
            # scatter, not bincount: bincount on CUDA reads the maximum back to the host (a sync per layer)
            counts = torch.zeros(n + 1, dtype=self.routed_tokens.dtype, device=index.device)
            counts.index_add_(0, index, torch.ones_like(index, dtype=counts.dtype))
            self.routed_tokens += counts[:n].to(self.routed_tokens.device)

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def num_experts_quantized(self) -> int:
        return next(iter(self.quantizers.values())).layout.num_experts

    def expert_bits(self) -> dict[str, list[int]]:
        """{parameter: per-expert widths}."""
        return {name: q.weight_bits.tolist() for name, q in self.quantizers.items()}

    def set_expert_bits(self, bits: int | Sequence[int] | torch.Tensor, params: Sequence[str] | None = None) -> None:
        """Set the width of every expert (an int) or of each expert ((E,) values) for ``params`` (default: all the
        module's quantized parameters: an expert moves as one unit); scales of the changed experts are re-fit."""
        for name in params or list(self.quantizers):
            if name not in self.quantizers:
                raise ValueError(f"set_expert_bits: params has {name!r}; allowed values: {list(self.quantizers)}")
            self.quantizers[name].set_bits(self._parameters[name], bits)

    def expert_numel(self) -> int:
        """Weights of one expert over the quantized parameters (what one expert unit costs per bit)."""
        return sum(q.layout.out_features * q.layout.in_features for q in self.quantizers.values())

    @torch.no_grad()
    def init_quant_state(self, defer: bool = False) -> None:
        """Bits back to the spec's, routing counts to zero, scales fitted to the weights (now or on first use)."""
        for q in self.quantizers.values():
            q.weight_bits.fill_(q.spec.bits)
        self.routed_tokens.zero_()
        if defer:
            self.defer_fit()
        else:
            self.reset_quant_params()

    @torch.no_grad()
    def reset_quant_params(self) -> None:
        for name, q in self.quantizers.items():
            q.reset(self._parameters[name])

    @torch.no_grad()
    def defer_fit(self) -> None:
        """Fit on first use, on the device the weights are then on (as `FakeQuantMixin.defer_fit`, with its
        placeholders until then)."""
        for q in self.quantizers.values():
            fill_placeholder_scales(q.weight_scale, q.weight_zero_point)
        self.__dict__["_fit_pending"] = True

    def run_pending_fit(self) -> None:
        if self.__dict__.get("_fit_pending") and not any(p.is_meta for p in self._parameters.values()):
            self.__dict__["_fit_pending"] = False
            self.reset_quant_params()

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self.run_pending_fit()
        return module

    @torch.no_grad()
    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        """{parameter: exact fake-quantized tensor} (what eval forwards compute)."""
        self.run_pending_fit()
        return {name: q.fake_quantize(self._parameters[name], exact=True) for name, q in self.quantizers.items()}


@contextmanager
def float_experts(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, experts modules compute with the given float tensors ({``<module>.<param>``: tensor}, e.g. a
    train-start snapshot for the distillation teacher) instead of their fake-quantized weights."""
    modules = list(qat_experts(model))
    for name, module in modules:
        module.__dict__["_float_tensors"] = {p: tensors[f"{name}.{p}"] for p in module.quantizers}
    try:
        yield
    finally:
        for _, module in modules:
            module.__dict__.pop("_float_tensors", None)


def expert_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{``<module>.<param>``: detached copy of the float master tensor} of every quantized expert tensor."""
    return {f"{name}.{p}": module._parameters[p].detach().clone() for name, module in qat_experts(model)
            for p in module.quantizers}


_QAT_CLASSES: dict[type, type] = {}


def qat_experts_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The (cached) subclass ``QAT<cls>`` of an experts class with `QATExpertsMixin` in front."""
    if cls not in _QAT_CLASSES:
        _QAT_CLASSES[cls] = type(f"QAT{cls.__name__}", (QATExpertsMixin, cls), {"__module__": __name__})
    return _QAT_CLASSES[cls]


def _fit_before_state_dict(module: QATExpertsMixin, prefix: str, keep_vars: bool) -> None:
    module.run_pending_fit()


def convert_experts(module: nn.Module, layouts: dict[str, ExpertParamLayout],
                    specs: dict[str, LayerQuantSpec]) -> QATExpertsMixin:
    """Turn ``module`` into its QAT subclass in place (same object, same parameters); adds the quantizers."""
    device = next(iter(module.parameters())).device
    module.__class__ = qat_experts_class(type(module))
    module.quantizers = nn.ModuleDict({name: ExpertQuantizer(specs[name], lay, device) for name, lay in
                                       layouts.items()})
    num_experts = next(iter(layouts.values())).num_experts
    module.register_buffer("routed_tokens", torch.zeros(num_experts, dtype=torch.float32, device=device))
    module.register_state_dict_pre_hook(_fit_before_state_dict)
    return module


def replace_experts_with_qat(model: nn.Module, config: QATConfig, is_skipped) -> list[str]:
    """Convert every experts module of ``model`` not skipped (``is_skipped(name)``); returns ``<module>.<param>``
    names converted. Group sizes follow ``config`` per parameter (``QATConfig.spec_for`` on that name)."""
    converted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QATExpertsMixin):
            continue
        layouts = {p: lay for p, lay in expert_param_layouts(module).items()
                   if not is_skipped(f"{name}.{p}") and not is_skipped(name)}
        if not layouts:
            continue
        specs = {p: config.spec_for(f"{name}.{p}", lay.in_features) for p, lay in layouts.items()}
        convert_experts(module, layouts, specs)
        converted += [f"{name}.{p}" for p in layouts]
    return converted


def qat_experts(model: nn.Module) -> Iterator[tuple[str, QATExpertsMixin]]:
    """(name, module) of every converted experts module, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QATExpertsMixin):
            yield name, module


@torch.no_grad()
def restore_float(module: QATExpertsMixin, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn a converted experts module back into its original class holding the exact quantized weights."""
    quantized = module.quantized_tensors()
    original = type(module).__mro__[2]  # (QAT<cls>, QATExpertsMixin, cls, ...)
    del module.quantizers
    del module.routed_tokens
    module.__class__ = original
    for name, w in quantized.items():
        param = module._parameters[name]
        module._parameters[name] = nn.Parameter(w.to(dtype or param.dtype), requires_grad=param.requires_grad)
    return module


def drop_quantizer(module: QATExpertsMixin, param: str) -> nn.Module:
    """Leave expert parameter `param` float (its quantizer removed, nothing fitted); with no quantizer left the module
    is its original class again. For parameters that cannot be quantized (non-finite weights)."""
    del module.quantizers[param]
    if len(module.quantizers):
        return module
    for key, hook in list(module._state_dict_pre_hooks.items()):
        if hook is _fit_before_state_dict:
            del module._state_dict_pre_hooks[key]
    del module.quantizers
    del module.routed_tokens
    module.__dict__.pop("_fit_pending", None)
    module.__class__ = type(module).__mro__[2]  # (QAT<cls>, QATExpertsMixin, cls, ...)
    return module


def expert_unit_name(module_name: str, expert: int) -> str:
    """The name of expert ``expert`` of the experts module ``module_name`` as one allocation unit (``...experts[3]``)."""
    return f"{module_name}[{expert}]"


def expert_unit_widths(model: nn.Module) -> dict[str, tuple[int | float, int]]:
    """{unit name: (width, weight count)} of every expert of every converted experts module, in module order. The width
    is the weight-count-weighted mean over the expert's quantized tensors (one int when they agree, as the
    allocation sets them)."""
    out: dict[str, tuple[int | float, int]] = {}
    for name, module in qat_experts(model):
        sizes = {p: q.layout.out_features * q.layout.in_features for p, q in module.quantizers.items()}
        numel = sum(sizes.values())
        widths = {p: q.weight_bits.tolist() for p, q in module.quantizers.items()}
        for e in range(module.num_experts_quantized):
            per_tensor = {widths[p][e] for p in widths}
            width = per_tensor.pop() if len(per_tensor) == 1 else sum(widths[p][e] * sizes[p] for p in sizes) / numel
            out[expert_unit_name(name, e)] = (width, numel)
    return out

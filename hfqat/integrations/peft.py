r"""LoRA on fake-quantized layers, trained *inside* the quantizer so that merging is exact.

Formulation
    peft's stock LoRA layer computes ``Q(W)·x + s·B·A·x`` but merges as ``W ← W + s·B·A``; the merged layer then
    computes ``Q(W + s·B·A)·x``, a different function (the update is re-rounded onto the grid), so the model trained is
    not the model exported. `QATLoraLinear` instead computes

        ``y = x · Q(W + s·B·A ; scale·f, zero_point + o)ᵀ + b``

    i.e. the low-rank update joins the float master weight *before* fake quantization. `merge` writes exactly the
    tensors the forward builds (``W + s·B·A``, ``scale·f``, ``zero_point + o``; one shared function, `_fold`) into the
    base `QATLinear`, so the merged fake-quant model — and `hfqat.save_packed` of it — computes bit-for-bit what the
    adapter model computed. Gradients reach ``A`` and ``B`` through the straight-through estimator of ``Q``
    (inside the clamp range ``∂L/∂(s·B·A) = ∂L/∂Ŵ``); the frozen ``W`` never gets a gradient or optimizer state.

Scales
    Each adapter owns a multiplicative factor ``f`` (init 1) per scale group and, for asymmetric grids, an additive
    zero-point offset ``o`` (init 0). They train with the adapter when the base layer learns scales
    (``QATConfig.learn_scales``; override with ``apply_lora(..., train_scales=...)`` or `set_train_scales`) and are
    saved in the adapter file. Scales are *not* re-fitted at merge: re-fitting to ``W + s·B·A`` would move the grid
    the adapter was trained against and break the exact-merge guarantee; training ``f`` is how they adapt instead. A
    relative factor (not a copied scale) stays meaningful when bit re-allocation re-fits the base scales in place
    (`set_bits`), and is well conditioned for Adam (scales themselves are ~1e-3).

Alternative considered: QA-LoRA (Xu et al., 2023) pools the input per quantization group so that ``B·A`` is constant
within a group and merges into the zero points, leaving the integer codes of ``W`` untouched — it works on an already
packed base, but the update is only a rank-limited per-group shift and needs asymmetric grids. QAT keeps float masters
anyway, so we keep full LoRA expressivity and get exactness by quantizing after adding.

Memory
    `_LinearRecomputedWeight` saves only the layer input between forward and backward; ``Q(W + s·B·A)`` and its
    weight-sized intermediates are rebuilt in backward (one extra element-wise pass, no extra matmul).

With `QATCallback`
    The adapter computation runs as the base layer's forward, so hooks on the quantized layers see it (K-FAC
    sensitivity works) and the callback's float teacher pass, which swaps the base layers' forward, bypasses the
    adapters (teacher = train-start float weights). Re-allocation (`set_bits`) re-fits the base scales; the
    adapters' factors keep multiplying them. The ``fisher`` estimator reads weight gradients, which frozen LoRA
    base weights do not have: use ``sensitivity="kfac"`` (or "variance") for LoRA runs.

Usage (plain peft; importing this module — or ``hfqat`` — registers the dispatch)::

    peft_model = get_peft_model(qat_model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    ...train...
    peft_model.save_pretrained(adapter_dir)                 # adapter only
    PeftModel.from_pretrained(fresh_qat_model, adapter_dir)  # reloads onto a QAT base, same logits
    merged = peft_model.merge_and_unload()                   # QATLinear layers again
    hfqat.save_packed(merged, out_dir)

Not supported (clear errors): LoRA variants (DoRA, aLoRA, ...) and mixed-adapter batches (``adapter_names=``);
``lora_dropout`` is ignored with a warning (the adapter acts on the weight, not on the input).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..quant.layers import FakeQuantMixin
from ..quant.primitives import fake_quantize_activations

_QuantTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class _LinearRecomputedWeight(torch.autograd.Function):
    """``F.linear(x, build_weight(), bias)`` saving only ``x``; backward rebuilds the weight (like checkpointing).

    ``params`` are the tensors ``build_weight`` reads; those that require grad get one through autograd on the rebuilt
    graph. The weight is built under the sharpness captured in ``build_weight``, so forward and backward agree.
    """

    @staticmethod
    def forward(ctx, x, bias, build_weight, *params):
        device = x.device.type
        # The backward rebuilds the weight under the forward's autocast state (its B·A matmul runs in that dtype).
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.build_weight = build_weight
        ctx.params = params
        ctx.save_for_backward(x)
        return F.linear(x, build_weight(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        device, autocast_dtype, autocast_enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast_enabled):
            weight = ctx.build_weight()
        # Under autocast the forward's matmul ran in the autocast dtype, which grad_out carries: so does the backward.
        dtype = grad_out.dtype
        grad_x = grad_out @ weight.detach().to(dtype) if needs[0] else None
        grad_bias = grad_out.flatten(0, -2).sum(0) if needs[1] else None
        trainable = [p for p, need in zip(ctx.params, needs[3:]) if need]
        grads = iter(())
        if trainable:
            grad_weight = grad_out.flatten(0, -2).t() @ x.flatten(0, -2).to(dtype)
            grads = iter(torch.autograd.grad(weight, trainable, grad_weight.to(weight.dtype), allow_unused=True))
        return (grad_x, grad_bias, None, *(next(grads) if need else None for need in needs[3:]))


class QATLoraLinear(LoraLinear):
    """peft LoRA layer for hfqat's fake-quantized layers: ``Q(W + s·B·A)`` in forward, the same tensors on merge.

    Wraps `QATLinear` and `QATConv1D` (``fan_in_fan_out``). Adds per-adapter ``lora_scale_factor`` and (asymmetric
    grids) ``lora_zero_point_offset``, trainable when ``train_scales``.
    """

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_scale_factor", "lora_zero_point_offset")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, is_target_conv_1d_layer: bool = False, **kwargs) -> None:
        # Mirrors peft's Linear.__init__, creating our adapter containers before the first update_layer.
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.lora_scale_factor = nn.ParameterDict()
        self.lora_zero_point_offset = nn.ParameterDict()
        self.train_scales: bool = self.get_base_layer().spec.learn_scales
        self.fan_in_fan_out = config.fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    @property
    def lora_variants(self):
        # DoRA & co. transform the weight outside the quantizer; peft rejects them with "unsupported variant".
        return {(): None}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        base = self.get_base_layer()
        if config.lora_bias and base.bias is None:
            raise ValueError(f"LoraConfig.lora_bias=True needs a bias on the base layer {kwargs.get('target_name', '')!r}; "
                             "allowed: lora_bias=False for bias-free layers")
        if config.lora_dropout:
            warnings.warn(f"LoraConfig.lora_dropout={config.lora_dropout} is ignored on hfqat layers: the adapter "
                          "is added to the weight before quantization, so there is no adapter input to drop")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.lora_scale_factor[adapter_name] = nn.Parameter(torch.ones_like(base.weight_scale, dtype=torch.float32))
        if base.weight_zero_point is not None:
            self.lora_zero_point_offset[adapter_name] = nn.Parameter(
                torch.zeros_like(base.weight_zero_point, dtype=torch.float32))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if not self.train_scales:
            for param in self._scale_params():
                param.requires_grad_(False)

    def _scale_params(self) -> Iterator[nn.Parameter]:
        yield from self.lora_scale_factor.values()
        yield from self.lora_zero_point_offset.values()

    # -- numerics: one definition of "base + adapter", shared by forward and merge -----------------------------
    def _fold(self, adapter: str, tensors: _QuantTensors) -> _QuantTensors:
        """(weight, scale, zero_point, bias) with ``adapter`` folded in, in the base layer's storage layout."""
        weight, scale, zero, bias = tensors
        weight = (weight + self.get_delta_weight(adapter)).to(weight.dtype)
        scale = scale * self.lora_scale_factor[adapter]
        if zero is not None:
            zero = zero + self.lora_zero_point_offset[adapter]
        return weight, scale, zero, self._fold_bias(adapter, bias)

    def _fold_bias(self, adapter: str, bias: torch.Tensor | None) -> torch.Tensor | None:
        return bias + self.lora_B[adapter].bias * self.scaling[adapter] if self.lora_bias[adapter] else bias

    def _folded(self, adapters: list[str]) -> _QuantTensors:
        base = self.get_base_layer()
        tensors = (base.weight, base.weight_scale, base.weight_zero_point, base.bias)
        for adapter in adapters:
            tensors = self._fold(adapter, tensors)
        return tensors

    def _quantized_weight(self, adapters: list[str], sharpness: float) -> torch.Tensor:
        """``Q(W + Σ s·B·A)`` in (out, in) layout, as the merged base layer would compute it."""
        base = self.get_base_layer()
        weight, scale, zero, _ = self._folded(adapters)
        weight = weight.t() if self.fan_in_fan_out else weight
        # The base layer's own quantizer (integer grid or codebook), fed the folded tensors.
        return base.fake_quantize_weight(weight, scale, zero, sharpness).to(weight.dtype)

    def _trainable_inputs(self, adapters: list[str]) -> list[torch.Tensor]:
        base = self.get_base_layer()
        tensors = [base.weight, base.weight_scale, base.weight_zero_point]
        for adapter in adapters:
            tensors += [self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.lora_scale_factor[adapter],
                        self.lora_zero_point_offset.get(adapter)]
        return [t for t in tensors if t is not None]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError("adapter_names=... (mixed-adapter batches) is not supported on hfqat LoRA layers; "
                             "allowed: one set of active adapters (PeftModel.set_adapter)")
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters and self.merged:
            self.unmerge()
        base = self.get_base_layer()
        # A `forward` set on the base instance means a caller swapped its computation for one pass (QATCallback's
        # float teacher does): that wins, as it would on a plain QAT model.
        if self.disable_adapters or self.merged or not adapters or "forward" in vars(base):
            return self.base_layer(x)
        # Run as the base layer's forward, so hooks registered on the quantized layer (e.g. hfqat.train.sensitivity's
        # K-FAC statistics) observe the computation that replaces it.
        base.forward = functools.partial(self._adapter_forward, adapters)
        try:
            return self.base_layer(x)
        finally:
            del base.forward

    def _adapter_forward(self, adapters: list[str], x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if base.spec.activation_bits is not None:
            x = fake_quantize_activations(x, base.spec.activation_bits, base.spec.activation_format)
        # Sharpness as the merged layer would use it: annealed in training, exact in eval.
        sharpness = base.soft_sharpness if self.training else math.inf
        build_weight: Callable[[], torch.Tensor] = functools.partial(self._quantized_weight, adapters, sharpness)
        bias = functools.reduce(lambda b, a: self._fold_bias(a, b), adapters, base.bias)
        return _LinearRecomputedWeight.apply(x, bias, build_weight, *self._trainable_inputs(adapters))

    # -- merge / unmerge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write ``W + s·B·A``, ``scale·f`` (and ``zero_point + o``, bias) into the base layer; no scale re-fit."""
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            current = (base.weight, base.weight_scale, base.weight_zero_point, base.bias)
            folded = self._fold(adapter, current)
            if safe_merge and not all(torch.isfinite(t).all() for t in folded if t is not None):
                raise ValueError(f"NaNs/infs detected in the merged weights; the adapter {adapter!r} seems broken")
            for target, value in zip(current, folded):
                if target is not None:
                    target.copy_(value)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what `merge` added (float round-off aside, as in peft)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            base.weight.sub_(self.get_delta_weight(adapter).to(base.weight.dtype))
            base.weight_scale.div_(self.lora_scale_factor[adapter])
            if base.weight_zero_point is not None:
                base.weight_zero_point.sub_(self.lora_zero_point_offset[adapter])
            if self.lora_bias[adapter]:
                base.bias.sub_(self.lora_B[adapter].bias * self.scaling[adapter])

    def __repr__(self) -> str:
        return "hfqat." + super().__repr__()


# -- dispatch -------------------------------------------------------------------------------------------------
def dispatch_qat(target: nn.Module, adapter_name: str, lora_config: LoraConfig, **kwargs) -> QATLoraLinear | None:
    """peft dispatcher: a `QATLoraLinear` for hfqat fake-quant layers, else ``None`` (peft's chain continues).

    A mapping the user registered with ``LoraConfig._register_custom_module`` for these layers takes precedence.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, FakeQuantMixin) or kwargs.get("parameter_name") is not None:
        return None
    custom = getattr(lora_config, "_custom_modules", None) or {}
    if any(isinstance(base, key) for key in custom):
        return None
    is_conv1d = isinstance(base, Conv1D)
    if lora_config.fan_in_fan_out != is_conv1d:
        # As peft's dispatch_default: the layout is a property of the layer, not a choice.
        warnings.warn(f"LoraConfig.fan_in_fan_out={lora_config.fan_in_fan_out} does not match the "
                      f"{type(base).__name__} layout; setting it to {is_conv1d}")
        lora_config.fan_in_fan_out = is_conv1d
    return QATLoraLinear(target, adapter_name, config=lora_config, is_target_conv_1d_layer=is_conv1d, **kwargs)


def register() -> None:
    """Make peft build `QATLoraLinear` for hfqat layers, whatever `LoraConfig` it is given; idempotent.

    peft 0.21 has no global dispatcher registry, and ``LoraConfig._register_custom_module`` lives on one config
    instance — lost when ``PeftModel.from_pretrained`` re-reads ``adapter_config.json``. So `dispatch_qat` is put in
    front of ``LoraModel._create_new_module`` once (re-registering, e.g. after a module reload, replaces it).
    """
    current = LoraModel.__dict__["_create_new_module"].__func__
    original = getattr(current, "_hfqat_original", current)

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        module = dispatch_qat(target, adapter_name, lora_config, **kwargs)
        return module if module is not None else original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._hfqat_original = original
    LoraModel._create_new_module = staticmethod(_create_new_module)


def set_train_scales(model: nn.Module, train: bool) -> None:
    """Whether the adapters' scale factors / zero-point offsets train (active adapters; frozen ones stay frozen)."""
    for module in model.modules():
        if isinstance(module, QATLoraLinear):
            module.train_scales = train
            for adapter in module.active_adapters:
                trainable = train and module.lora_A[adapter].weight.requires_grad
                for params in (module.lora_scale_factor, module.lora_zero_point_offset):
                    if adapter in params:
                        params[adapter].requires_grad_(trainable)


def apply_lora(model: nn.Module, config: LoraConfig, *, train_scales: bool | None = None,
               adapter_name: str = "default") -> PeftModel:
    """`get_peft_model` for an hfqat model: LoRA inside the quantizer; ``train_scales=None`` keeps learn_scales.

    Raises `ValueError` if no fake-quantized layer was targeted (the adapters would not be quantization-aware).
    """
    register()
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if not any(isinstance(m, QATLoraLinear) for m in peft_model.modules()):
        raise ValueError(f"LoraConfig.target_modules={config.target_modules!r} matched no hfqat fake-quantized "
                         "layer; allowed: names of converted linear layers (see hfqat.bit_allocation(model))")
    if train_scales is not None:
        set_train_scales(peft_model, train_scales)
    return peft_model


register()

r"""Weight clustering (codebook) quantization: ``QATConfig(weight_format="codebook")``.

Every output channel (``group_size=-1``) or group of ``group_size`` inputs owns a codebook of ``2^bits`` float
centroids; each weight is replaced by its group's nearest centroid. Non-uniform levels follow the weight
distribution (dense near zero, sparse in the tails), which keeps more quality than a uniform grid at 3 bits and
below. Numerics, per group (``s``: per-group gain, ``C``: centroids, ``w``: float master weights)::

    a_i = argmin_k |w_i / s - C_k|         (k < 2^bits: only the first 2^bits slots are active)
    ŵ_i = s · C[a_i]

Initialisation: 1-D k-means per group (`kmeans_1d`: Lloyd iterations from quantile init, vectorised over all
groups of a layer), optionally weighted per weight as in SqueezeLLM (``sample_weight``, e.g. the diagonal Fisher
``g²`` from `fisher_diagonal`); ``s = 1``. The centroids are in weight units.

Training: ``weight_codebook`` (centroids) and ``weight_scale`` (gain) are parameters (trainable when
``learn_scales``); assignments are recomputed in every forward (no gradient). Gradients: straight-through to the
float weight (``∂ŵ/∂w = 1``); to the centroids the scatter-add of ``s · ∂L/∂ŵ`` over the entries assigned to each
centroid; to the gain ``Σ ∂L/∂ŵ · C[a]``. The gain is redundant with the centroids but gives codebook layers the
same ``weight_scale`` handle as integer layers: LoRA's per-group scale factor (`hfqat.integrations.peft`) multiplies it, and
code that reads ``layer.weight_scale`` keeps working. Soft rounding/clamping does not apply (config error).
LoRA: the adapter computes ``Q(W + s·B·A)`` through the base layer's `fake_quantize_weight`, i.e. with the
base codebook (frozen by peft like every base parameter; the adapter's scale factor trains the gain), and merging
writes exactly those tensors, so the merged (and packed) model equals the adapter model.

Shapes stay fixed for re-allocation: ``weight_codebook`` is (out, in // group_size, 2^codebook_max_bits) from the
start (default 8 bits: 256 slots; the unused slots are masked, never assigned). ``set_bits(b)`` re-runs k-means in
place, so the optimizer keeps its parameters. Memory: the codebook adds 2^codebook_max_bits / group_size of the
weight's element count (per channel on SmolLM2 at 8 bits: 17-44%; at codebook_max_bits=4: 1-3%), plus its Adam
state; lower ``QATConfig.codebook_max_bits`` for group-wise codebooks.

Sensitivity (`hfqat.train.sensitivity`): a codebook layer's stand-in for ``Q_b`` at bit widths other than its current
one is the k-means codebook of ``b`` bits fitted at the last re-fit (`refit_candidates`, at train start and after
every re-allocation), applied to the current weight (`candidate_errors`).

Export: `PackedCodebookLinear` stores the indices packed with `hfqat.export.packing` (``qweight``, bits per weight) and the
effective table ``codebook = s · C[:, :, :2^bits]`` (fp32, (out, groups, 2^bits)); the fake-quant weight is
exactly ``codebook.gather(indices)``, so a reloaded model computes the same logits. Matmul backends
(`CODEBOOK_BACKENDS`): ``triton_lut`` (CUDA: indices unpacked in registers, looked up in the layer's L1-resident
table, `hfqat.export.kernels.triton_lut`) and ``dequant`` (anywhere: gather-dequantize + matmul, exact).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerQuantSpec
from .layers import FakeQuantMixin, QATConv1D, QATLinear
from .primitives import SCALE_EPS, _grouped, effective_scale

KMEANS_ITERS = 30  # Lloyd from quantiles: most rows are at their fixed point by then, the rest within ~1e-3
WEIGHT_FORMAT = "codebook"


# -- 1-D k-means and nearest-centroid assignment ---------------------------------------------------------------
def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (int64, shape of ``x``) of the nearest centroid for every value of ``x`` (..., n).

    ``centroids`` (..., k) has the same leading dims, in any order; ``+inf`` entries are never chosen. Sorted
    centroids + a binary search over the midpoints: O(n log k) time and no (n, k) distance matrix. A value exactly
    on a midpoint goes to the smaller centroid.
    """
    ordered, order = centroids.sort(dim=-1)
    mids = (ordered[..., 1:] + ordered[..., :-1]) * 0.5  # inf + finite = inf: masked slots sort last, never hit
    pos = torch.searchsorted(mids.contiguous(), x.contiguous())
    return order.gather(-1, pos)


@torch.no_grad()
def kmeans_1d(x: torch.Tensor, k: int, sample_weight: torch.Tensor | None = None,
              iters: int = KMEANS_ITERS) -> torch.Tensor:
    """``k`` centroids per row of ``x`` (rows, n), sorted ascending, as float32 (rows, k).

    Lloyd iterations from quantile initialisation (the values at quantiles (i + 1/2)/k), all rows at once;
    ``sample_weight`` (shape of ``x``, ≥ 0) weights each value's pull on its centroid (SqueezeLLM's sensitivity-
    weighted k-means). In 1-D every cluster is an interval of the sorted values, so after one sort an iteration
    costs O(k log n) per row: the cluster boundaries are binary searches of the centroid midpoints, the cluster
    sums differences of float64 prefix sums. Ties go to the smaller centroid, as in `nearest_centroid`. A centroid
    that loses all its values keeps its position. Stops once no boundary moves (an exact Lloyd fixed point) or
    after ``iters`` iterations.
    """
    rows, n = x.shape
    xs, order = x.float().sort(dim=-1)
    if sample_weight is None:
        h = torch.ones_like(xs, dtype=torch.float64)
    else:
        h = sample_weight.reshape(rows, n).gather(-1, order).double()
        h = h / h.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)  # per-row scale is irrelevant
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=x.device)
    sum_hx = torch.cat([zero, (h * xs.double()).cumsum(-1)], dim=-1)  # (rows, n + 1) prefix sums
    sum_h = torch.cat([zero, h.cumsum(-1)], dim=-1)
    pos = ((torch.arange(k, device=x.device, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1)
    centroids = xs[:, pos]
    bounds = None
    for _ in range(iters):
        mids = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
        # cluster j holds the values in (mid_{j-1}, mid_j]: its end is the count of values <= mid_j
        ends = torch.searchsorted(xs, mids.contiguous(), right=True)
        new_bounds = torch.cat([torch.zeros_like(ends[:, :1]), ends, torch.full_like(ends[:, :1], n)], dim=-1)
        if bounds is not None and torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds
        weight = sum_h.gather(-1, bounds[:, 1:]) - sum_h.gather(-1, bounds[:, :-1])
        total = sum_hx.gather(-1, bounds[:, 1:]) - sum_hx.gather(-1, bounds[:, :-1])
        means = (total / weight.clamp_min(torch.finfo(torch.float64).tiny)).float()
        centroids = torch.where(weight > 0, means, centroids).sort(dim=-1).values
    return centroids


def _active(codebook: torch.Tensor, bits: torch.Tensor | int) -> torch.Tensor:
    """float32 codebook with the slots beyond 2^bits set to +inf (no host sync when bits is a device tensor)."""
    slots = torch.arange(codebook.shape[-1], device=codebook.device)
    limit = torch.exp2(torch.as_tensor(bits, device=codebook.device, dtype=torch.float32))
    return torch.where(slots < limit, codebook.float(), math.inf)


def codebook_indices(w: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor, bits: torch.Tensor | int,
                     group_size: int) -> torch.Tensor:
    """(out, in // group_size, group_size) int64 assignments of the exact codebook quantizer (export, tests)."""
    x = _grouped(w.detach(), group_size) / effective_scale(scale.detach()).unsqueeze(-1)
    return nearest_centroid(x, _active(codebook.detach(), bits))


class _CodebookSTE(torch.autograd.Function):
    """``ŵ = s · C[a]`` with a = nearest active centroid; STE to ``w``, scatter-add to ``C``, ``Σ g·C[a]`` to ``s``.

    Saves the assignments as uint8 (≤ 256 slots): one byte per weight between forward and backward.
    """

    @staticmethod
    def forward(ctx, w, scale, codebook, bits, group_size, out_dtype):
        idx = codebook_indices(w, scale, codebook, bits, group_size)
        s = effective_scale(scale).unsqueeze(-1)
        wq = (s * codebook.float().gather(-1, idx)).reshape(w.shape)
        ctx.save_for_backward(scale, codebook, idx.to(torch.uint8) if codebook.shape[-1] <= 256 else idx)
        ctx.w_meta = (w.shape, w.dtype)
        ctx.group_size = group_size
        return wq.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        scale, codebook, idx = ctx.saved_tensors
        shape, dtype = ctx.w_meta
        grad_w = grad_s = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_w = grad.reshape(shape).to(dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g = _grouped(grad, ctx.group_size)
            idx = idx.long()
            if ctx.needs_input_grad[2]:
                s = effective_scale(scale).unsqueeze(-1)
                grad_c = torch.zeros_like(codebook, dtype=torch.float32).scatter_add_(-1, idx, g * s)
                grad_c = grad_c.to(codebook.dtype)
            if ctx.needs_input_grad[1]:
                ds = (g * codebook.float().gather(-1, idx)).sum(-1)
                # through effective_scale = |scale| clamped at SCALE_EPS
                grad_s = (ds * torch.sign(scale.float()) * (scale.float().abs() > SCALE_EPS)).to(scale.dtype)
        return grad_w, grad_s, grad_c, None, None, None


def codebook_fake_quantize(w: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor, bits: torch.Tensor | int,
                           group_size: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Differentiable codebook quantize→dequantize of ``w`` (out, in); exactly what `PackedCodebookLinear` computes."""
    bits = torch.as_tensor(bits, device=w.device)
    return _CodebookSTE.apply(w, scale, codebook, bits, group_size, out_dtype)


# -- layers -----------------------------------------------------------------------------------------------------
class CodebookMixin(FakeQuantMixin):
    """Codebook quantizer state and numerics on top of `FakeQuantMixin` (same bookkeeping, other quantizer).

    Adds ``weight_codebook`` (out, in // group_size, 2^codebook_max_bits) and the optional non-persistent buffer
    ``kmeans_weight`` (the per-weight importance used by every k-means refit; `fit_codebooks` sets it).
    ``weight_scale`` is the per-group gain (init 1); ``weight_zero_point`` is always None.
    """

    def _init_quant_state(self, spec: LayerQuantSpec, out_features: int, in_features: int, device=None) -> None:
        super()._init_quant_state(spec, out_features, in_features, device)
        self.register_parameter("weight_zero_point", None)  # a codebook has no zero point, whatever `symmetric` says
        slots = 1 << spec.codebook_max_bits
        self.weight_codebook = nn.Parameter(
            torch.zeros(out_features, in_features // spec.group_size, slots, dtype=torch.float32, device=device),
            requires_grad=spec.learn_scales)
        self.register_buffer("kmeans_weight", None, persistent=False)
        self._candidates: dict[int, torch.Tensor] = {}

    # -- numerics -------------------------------------------------------------------------------------------
    def fake_quantize_weight(self, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                             sharpness: float = math.inf, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The codebook quantizer on any (out, in) weight with the given gain (``zero_point``/``sharpness`` unused:
        nearest-centroid assignment is always exact)."""
        return codebook_fake_quantize(w, scale, self.weight_codebook, self.weight_bits, self.spec.group_size,
                                      out_dtype)

    @torch.no_grad()
    def codebook_indices(self) -> torch.Tensor:
        """(out, in) int64 centroid index of every weight under the exact quantizer (what export packs)."""
        w = self.weight_oi()
        return codebook_indices(w, self.weight_scale, self.weight_codebook, self.weight_bits,
                                self.spec.group_size).reshape(w.shape)

    def _kmeans(self, bits: int, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        """(out, groups, 2^bits) k-means centroids of the current float weight (gain 1)."""
        w = self.weight_oi().detach()
        rows = w.numel() // self.spec.group_size
        h = sample_weight if sample_weight is not None else self.kmeans_weight
        h = None if h is None else h.reshape(rows, self.spec.group_size)
        centroids = kmeans_1d(w.reshape(rows, self.spec.group_size), 1 << bits, h)
        return centroids.view(w.shape[0], -1, 1 << bits)

    # -- state changes --------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_quant_params(self, sample_weight: torch.Tensor | None = None) -> None:
        """Gain 1 and k-means centroids of the current weight for the current bits (weighted by ``sample_weight``,
        (out, in), else by ``kmeans_weight`` when set); unused slots are zeroed."""
        k = 1 << self.bits
        self.weight_scale.fill_(1.0)
        self.weight_codebook.zero_()
        self.weight_codebook[..., :k] = self._kmeans(self.bits, sample_weight)

    @torch.no_grad()
    def set_bits(self, bits: int, sample_weight: torch.Tensor | None = None) -> None:
        """New bit width: k-means re-run in place (same parameter objects and shapes)."""
        if bits > self.spec.codebook_max_bits:
            raise ValueError(f"bits={bits} exceeds QATConfig.codebook_max_bits={self.spec.codebook_max_bits} of this "
                             f"codebook layer; allowed: 2..{self.spec.codebook_max_bits} (raise codebook_max_bits)")
        if bits == self.bits and sample_weight is None:
            return
        self.weight_bits.fill_(bits)
        self.reset_quant_params(sample_weight)

    # -- candidate bit widths (hfqat.train.sensitivity) -----------------------------------------------------------
    @torch.no_grad()
    def refit_candidates(self, bit_choices: tuple[int, ...]) -> bool:
        """k-means codebooks of every candidate width on the current weight: what ``set_bits(b)`` would start from."""
        too_wide = [b for b in bit_choices if b > self.spec.codebook_max_bits]
        if too_wide:
            raise ValueError(f"bit choices {too_wide} exceed QATConfig.codebook_max_bits={self.spec.codebook_max_bits} "
                             "of the codebook layers; allowed: bit_choices <= codebook_max_bits (e.g. "
                             f"QATCallback(bit_choices=...) or a larger codebook_max_bits)")
        self._candidates = {b: self._kmeans(b) for b in bit_choices}
        return True

    @torch.no_grad()
    def candidate_errors(self, bit_choices: tuple[int, ...]) -> torch.Tensor:
        """(bits, out, in) squared errors of the candidate codebooks on the current weight (refit when missing)."""
        if any(b not in self._candidates for b in bit_choices):
            self.refit_candidates(bit_choices)
        w = self.weight_oi().detach()
        return torch.stack([(self.candidate_weight(b) - w).pow(2) for b in bit_choices])

    @torch.no_grad()
    def candidate_weight(self, bits: int) -> torch.Tensor:
        """(out, in) current weight on the candidate ``bits``-bit codebook (refit when missing)."""
        if bits not in self._candidates:
            self.refit_candidates(tuple(sorted({*self._candidates, bits})))
        w = self.weight_oi().detach()
        x, centroids = _grouped(w, self.spec.group_size), self._candidates[bits]
        if centroids.shape[0] != w.shape[0]:
            # Fitted on this rank's rows (FSDP2 local view) but asked inside a forward, where ``w`` is the whole
            # weight: k-means is per group and deterministic, so the whole weight's fit is the ranks' fits side by side.
            centroids = self._kmeans(bits)
        return centroids.gather(-1, nearest_centroid(x, centroids)).reshape(w.shape)

    def extra_repr(self) -> str:
        s = self.spec
        bits = "meta" if self.weight_bits.is_meta else self.bits
        base = super(FakeQuantMixin, self).extra_repr()  # nn.Linear / Conv1D's own
        return (f"{base}, weight_format=codebook, bits={bits}, group_size={s.group_size}, "
                f"codebook_slots={1 << s.codebook_max_bits}, activation_bits={s.activation_bits}")


class CodebookLinear(CodebookMixin, QATLinear):
    """`nn.Linear` with a codebook-quantized weight (a `QATLinear`, so peft, export and the callback see it)."""


class CodebookConv1D(CodebookMixin, QATConv1D):
    """GPT-2 ``Conv1D`` with a codebook-quantized weight."""


# -- calibration helpers ----------------------------------------------------------------------------------------
def fisher_diagonal(model: nn.Module, batches: Iterable[torch.Tensor],
                    names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``mean_batches g²`` of each linear layer's weight, in (out, in) layout.

    Runs forward + backward with the language-model loss on every batch of input ids (the model's own weights,
    float or fake-quantized: QAT layers pass gradients to their float weights). ``names`` limits the layers
    (default: every ``nn.Linear``/``Conv1D`` whose weight requires grad). Gradients are cleared afterwards.
    """
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, Conv1D)) and m.weight.requires_grad}
    if names is not None:
        modules = {name: modules[name] for name in names}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the gradients of the model as it is
    try:
        for ids in batches:
            ids = ids.to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            for name, m in modules.items():
                g = m.weight.grad.detach().float()
                g = g.t() if isinstance(m, Conv1D) else g
                sums[name] = sums[name] + g.pow(2) if name in sums else g.pow(2)
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: s / max(count, 1) for name, s in sums.items()}


@torch.no_grad()
def fit_codebooks(model: nn.Module, sample_weights: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """(Re)fit every codebook layer's centroids by k-means; with ``sample_weights`` ({layer name: (out, in)
    importance}, e.g. `fisher_diagonal`) weighted as in SqueezeLLM. The weights are kept on the layer
    (``kmeans_weight``) so later re-fits (``set_bits`` during re-allocation) use them too. Returns the layers fitted.
    """
    fitted = []
    for name, module in model.named_modules():
        if not isinstance(module, CodebookMixin):
            continue
        h = (sample_weights or {}).get(name)
        if h is not None:
            module.kmeans_weight = h.to(device=module.weight.device, dtype=torch.float32)
        module.reset_quant_params()
        fitted.append(name)
    return fitted

"""Post-training quantization baselines on hfqat models: round-to-nearest and GPTQ.

Both use the layers' own grid (bits, group size, scales, zero points), so a PTQ model is an ordinary hfqat
model: it evaluates, trains further, and packs like a QAT one.

- RTN: the scales fitted when the model was loaded with a `QATConfig` (MSE clip search by default); weights
  are rounded to the nearest grid point by the fake quantizer. Nothing to run: `rtn` only re-fits.
- GPTQ (Frantar et al., 2022): per layer, with ``H = 2·XᵀX`` from calibration inputs, quantize the columns of W
  one at a time and spread each column's rounding error over the not-yet-quantized columns through the
  Cholesky factor of ``H⁻¹`` (lazy block updates). Scales stay those of the RTN fit (static groups); codebook
  layers round to the nearest centroid of their fitted codebooks. The quantized weights are written back on the
  grid, so the fake quantizer reproduces them exactly.
  Hessians come from one pass of the model as loaded (all layers at once, not layer-sequential).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .codebook import CodebookMixin
from .layers import FakeQuantMixin
from .modeling import init_quant_params, qat_layers
from .primitives import effective_scale, int_range


def rtn(model: nn.Module) -> nn.Module:
    """Round-to-nearest: (re)fit every layer's scales to its float weight."""
    init_quant_params(model)
    return model


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``2·XᵀX / n`` of every fake-quantized layer's inputs over the calibration batches (input ids)."""
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0].detach().flatten(0, -2).float()
            h = hessians.setdefault(name, torch.zeros(x.shape[1], x.shape[1], device=x.device))
            n = counts.get(name, 0)
            h.mul_(n / (n + x.shape[0])).addmm_(x.t(), x, alpha=2.0 / (n + x.shape[0]))
            counts[name] = n + x.shape[0]
        return accumulate

    for name, layer in qat_layers(model):
        handles.append(layer.register_forward_pre_hook(hook(name)))
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(ids.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _column_grid(layer: FakeQuantMixin) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``grid(col, j)``: column ``j`` of the (out, in) weight rounded onto the layer's grid — its integer grid, or
    for codebook layers the nearest of the group's active centroids (GPTQ needs nothing else from the format)."""
    group = layer.spec.group_size
    scale = effective_scale(layer.weight_scale.float())
    if isinstance(layer, CodebookMixin):
        centroids = layer.weight_codebook.float()[..., :1 << layer.bits]

        def nearest(col: torch.Tensor, j: int) -> torch.Tensor:
            s, table = scale[:, j // group], centroids[:, j // group]
            index = (col.unsqueeze(1) / s.unsqueeze(1) - table).abs().argmin(1, keepdim=True)
            return table.gather(1, index).squeeze(1) * s

        return nearest
    zero = torch.round(layer.weight_zero_point.float()) if layer.weight_zero_point is not None else None
    # one width per layer, or per row (then (out,) bounds, as `col` is a column over the rows)
    bits = layer.bits if layer.weight_row_bits is None else layer.weight_row_bits.float()
    qmin, qmax = (v.to(scale.device) for v in int_range(bits, zero is None))

    def rounded(col: torch.Tensor, j: int) -> torch.Tensor:
        s = scale[:, j // group]
        z = zero[:, j // group] if zero is not None else 0.0
        return (torch.clamp(torch.round(col / s) + z, qmin, qmax) - z) * s

    return rounded


@torch.no_grad()
def gptq_layer(layer: FakeQuantMixin, hessian: torch.Tensor, percdamp: float = 0.01, block_size: int = 128) -> None:
    """Quantize one layer's weight in place with GPTQ error compensation on the layer's current grid."""
    w = layer.weight_oi().detach().float().clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    grid = _column_grid(layer)
    n_cols = w.shape[1]
    for start in range(0, n_cols, block_size):
        end = min(start + block_size, n_cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            q = grid(block[:, i], start + i)
            err = (block[:, i] - q) / hblock[i, i]
            block[:, i:] -= err.unsqueeze(1) @ hblock[i, i:].unsqueeze(0)
            block[:, i] = q
            errors[:, i] = err
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
    target = layer.weight_oi()
    target.copy_(w.to(target.dtype))


def gptq(model: nn.Module, batches: Iterable[torch.Tensor], percdamp: float = 0.01) -> nn.Module:
    """GPTQ over every fake-quantized layer of `model`, Hessians from `batches` of input ids."""
    hessians = collect_hessians(model, batches)
    for name, layer in tqdm(list(qat_layers(model)), desc="GPTQ"):
        if name in hessians:
            gptq_layer(layer, hessians[name], percdamp)
    return model

"""Optimizer updates measured in grid steps: narrower rows move faster.

Adam moves every weight by about the learning rate per step, whatever its gradient's size, while the step of a
quantization grid doubles with each bit removed. A learning rate tuned for the config's bits therefore moves a
3-bit row across half as many grid points as a 4-bit row, and mixed-precision rows below the config's width
barely re-round during a short QAT run. `GridStepUpdates` multiplies, after each optimizer step, the update of
every row narrower than the config's ``bits`` (weight and scale) by ``2^(power · (config bits − width))``.
``power=1`` keeps the update constant in grid steps; SmolLM2 at 3.5 average bits trained best with ``power=2``
(see `QATCallback.grid_lr_power`).

Rows at or above the config's bits are left alone, so a uniform model costs nothing. Works with any optimizer
that updates the model's parameters in place (plain torch optimizers, DDP, FSDP2); not with optimizers that
hold their own master copy of the weights (DeepSpeed), which overwrite the change at their next step.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)


class GridStepUpdates:
    """Multiplies the optimizer update of narrow rows; call `before_step` / `after_step` around ``optimizer.step``
    and `refresh` whenever widths change (the only call that reads them: no device sync per step).

    Memory: between the two calls, a copy of the weight and scale of each layer that holds a narrow row.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], power: float, reference_bits: int) -> None:
        """``reference_bits``: the width the learning rate suits (the config's ``bits``, not a layer override)."""
        self.layers = [layer for _, layer in layers if layer.spec.weight_format == "int"]
        self.power, self.reference_bits = power, reference_bits
        self._plan: list[tuple[nn.Parameter, torch.Tensor | float]] = []  # (parameter, its update factor − 1)
        self._before: list[torch.Tensor] = []
        self.refresh()

    @classmethod
    def for_run(cls, layers: list[tuple[str, nn.Module]], power: float, reference_bits: int,
                deepspeed: bool = False) -> GridStepUpdates | None:
        """The updates of a run, or None: off (``power`` 0) or without effect (``deepspeed``: its optimizer keeps its
        own master weights; warned)."""
        if power <= 0:
            return None
        if deepspeed:
            logger.warning("QATCallback: grid_lr_power has no effect under DeepSpeed (its optimizer keeps its "
                           "own master weights); narrow rows train at the plain learning rate.")
            return None
        return cls(layers, power, reference_bits)

    def row_factors(self, layer: nn.Module) -> torch.Tensor | None:
        """(out,) update factor of each output row (or a scalar for one width per layer); None where all are 1."""
        bits = layer.weight_bits if layer.weight_row_bits is None else layer.weight_row_bits
        narrower = (self.reference_bits - bits.float()).clamp_min(0)
        if not bool(narrower.any()):
            return None
        return torch.exp2(self.power * narrower)

    def refresh(self) -> None:
        """Re-read every layer's widths."""
        self._plan = []
        for layer in self.layers if self.power else []:
            factors = self.row_factors(layer)
            if factors is not None:
                self._plan += [(p, self._shaped(layer, p, factors) - 1)
                               for p in (layer.weight, layer.weight_scale) if p.requires_grad]

    @torch.no_grad()
    def before_step(self) -> None:
        self._before = [param.detach().clone() for param, _ in self._plan]

    @torch.no_grad()
    def after_step(self) -> None:
        for (param, extra), old in zip(self._plan, self._before):
            param.add_((param - old) * extra)
        self._before = []

    @staticmethod
    def _shaped(layer: nn.Module, param: torch.Tensor, factors: torch.Tensor) -> torch.Tensor | float:
        # one factor per output row: rows are dim 0 of the scale and of an (out, in) weight, dim 1 of Conv1D's
        if factors.dim() == 0:
            return float(factors)  # a Python number: FSDP2's sharded parameters take no plain tensors
        transposed = param is layer.weight and isinstance(layer, Conv1D)
        return factors.view(1, -1) if transposed else factors.view(-1, 1)

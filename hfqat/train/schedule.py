"""`Schedule`: at which optimizer steps a QAT run measures, re-allocates, anneals and freezes, from step and max_steps.

Steps count optimizer steps as Trainer's ``global_step`` does (the first step is 1). With re-allocation every ``N``
steps up to ``freeze_step = ⌊freeze_after · max_steps⌋``:

- re-allocation at every multiple of ``N`` up to and including ``freeze_step``;
- per-step sensitivities (estimators that read each step's gradients) only in the last `MEASURED_FRACTION` of each
  interval: the steps the next allocation reads, so the other steps run at plain QAT cost;
- soft rounding/clamping sharpness geometric from ``soft_anneal[0]`` to ``soft_anneal[1]`` until ``freeze_step``,
  then ``inf`` (the last steps train the exact quantizer that export packs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MEASURED_FRACTION = 0.25  # of each re-allocation interval, at its end, in which per-step sensitivities are observed


@dataclass(frozen=True)
class Schedule:
    """``reallocate_every``: 0 = never re-allocate; ``soft_anneal``: (start, end) sharpness or None."""

    reallocate_every: int
    freeze_step: int
    soft_anneal: tuple[float, float] | None = None

    @classmethod
    def for_run(cls, reallocate_every: int, freeze_after: float, max_steps: int,
                soft_anneal: tuple[float, float] | None = None) -> Schedule:
        return cls(reallocate_every, math.floor(freeze_after * max_steps), soft_anneal)

    def reallocates(self, step: int) -> bool:
        """Whether the allocation is re-chosen at the end of ``step``."""
        return self.reallocate_every > 0 and step % self.reallocate_every == 0 and step <= self.freeze_step

    def measures(self, step: int) -> bool:
        """Whether per-step sensitivities are observed at ``step`` (the last `MEASURED_FRACTION` of its interval)."""
        if self.reallocate_every <= 0:
            return False
        window = max(1, math.ceil(self.reallocate_every * MEASURED_FRACTION))
        return step <= self.freeze_step and (-step) % self.reallocate_every < window

    def frozen(self, step: int) -> bool:
        """Whether the bits are final after ``step`` (statistics are no longer needed)."""
        return step >= self.freeze_step

    def sharpness(self, step: int) -> float | None:
        """Soft rounding/clamping sharpness for ``step``; None when annealing is off."""
        if self.soft_anneal is None:
            return None
        start, end = self.soft_anneal
        progress = step / self.freeze_step if self.freeze_step > 0 else 1.0
        return math.inf if progress >= 1.0 else start * (end / start) ** progress

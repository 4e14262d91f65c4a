"""`AllocationHistory`: every allocation of a run (step, bits, average, predicted and measured loss increase) and the
files written from it at train end (``bit_allocation_history.json``, ``bit_allocation.png``, ``loss_curves.png``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .allocation import weighted_average_bits

HISTORY_FILE = "bit_allocation_history.json"


class AllocationHistory:
    """``entries``: one JSON-friendly dict per allocation, in order (what a checkpoint stores and restores)."""

    def __init__(self, entries: list[dict[str, Any]] | None = None) -> None:
        self.entries: list[dict[str, Any]] = entries if entries is not None else []

    def record(self, step: int, bits: Mapping[str, int], numels: Mapping[str, int], predicted: float | None,
               measured: Mapping[str, Mapping[int, float]] | None = None) -> None:
        """Append an allocation; ``predicted``: its total predicted loss increase (None for the first one)."""
        if measured is not None:  # JSON keys, as the history reads back from a checkpoint
            measured = {kind: {str(b): v for b, v in per_bits.items()} for kind, per_bits in measured.items()}
        self.entries.append({"step": step, "bits": dict(bits), "average_bits": weighted_average_bits(bits, numels),
                             "predicted_loss_increase": predicted, "measured_kind_loss_increase": measured})

    def write(self, output_dir: str | os.PathLike, summary: Mapping[str, Any],
              log_history: list[dict[str, Any]] | None = None, plots: bool = True) -> None:
        """Write the JSON record (``summary`` plus the entries, atomically) and, with ``plots``, the figures (the
        loss curves from Trainer's ``log_history``)."""
        from .plots import plot_bit_allocation, plot_loss_curves

        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, HISTORY_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({**summary, "history": self.entries}, f, indent=1)
        os.replace(path + ".tmp", path)
        if plots:
            if self.entries:
                plot_bit_allocation(self.entries, os.path.join(output_dir, "bit_allocation.png"))
            plot_loss_curves(log_history or [], os.path.join(output_dir, "loss_curves.png"))

"""Training figures written by `QATCallback` at train end (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    tmp = f"{os.fspath(path)}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_bit_allocation(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Heatmap layer × re-allocation step → bits, from `QATCallback.history`."""
    plt = _pyplot()
    import numpy as np

    layers = list(history[0]["bits"])
    grid = np.array([[entry["bits"][name] for entry in history] for name in layers], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(history) + 3), max(3.0, 0.12 * len(layers) + 1.5)))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(range(len(history)), [str(entry["step"]) for entry in history], rotation=90, fontsize=7)
    tick_every = max(1, len(layers) // 40)
    ax.set_yticks(range(0, len(layers), tick_every), layers[::tick_every], fontsize=6)
    ax.set_xlabel("step")
    ax.set_title("weight bits per layer (avg: " + ", ".join(f"{e['average_bits']:.2f}" for e in history[-3:]) + ")")
    fig.colorbar(image, ax=ax, label="bits")
    _save(fig, path)
    plt.close(fig)


def plot_loss_curves(log_history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Total, task and distillation loss (and eval loss if any) against the step, from Trainer's log history."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "total"), ("task_loss", "task"), ("distill_loss", "distill"),
                       ("eval_loss", "eval (task)")):
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)

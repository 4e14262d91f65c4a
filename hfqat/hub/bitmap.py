"""The bit map picture on every model card: weight bits of each layer, from the model's own allocation.

Drawn from the card's layer rows (`hfqat.hub.card`: the QAT or packed model's layers, or the export's config), so it
needs no training history: a hand-written ``layer_bits`` mix or a PTQ model gets one as well as a `QATCallback` run.
Layers named ``<prefix>.<block index>.<sub-layer>`` (every transformers decoder) form a heatmap of block × sub-layer;
other names one row. Per-row widths show as the layer's mean width (its rows weighted equally).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..train.plots import _pyplot, _save

BIT_MAP_NAME = "bit_map.png"
_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<block>\d+)\.(?P<sub>.+)$")
ANNOTATE_MAX_CELLS = 400  # write each cell's width into it up to this size


def layer_mean_bits(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Layer name → mean bits over its card rows (one row per width of a per-row layer, weighted by weights)."""
    total: dict[str, list[float]] = {}
    for row in rows:
        weight = row.get("params") or 1
        acc = total.setdefault(row["name"], [0.0, 0.0])
        acc[0] += row["bits"] * weight
        acc[1] += weight
    return {name: bits / weight for name, (bits, weight) in total.items()}


def plot_bit_map(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Draw the bit map of the card rows ``[{name, bits, params}]`` to `path` (PNG); returns the path."""
    import numpy as np

    plt = _pyplot()
    bits = layer_mean_bits(rows)
    blocks, subs = [], []
    cells: dict[tuple[str, str], float] = {}
    for name, value in bits.items():
        match = _BLOCK.match(name)
        block, sub = (f"{match['prefix']}.{match['block']}", match["sub"]) if match else ("", name)
        blocks += [block] if block not in blocks else []
        subs += [sub] if sub not in subs else []
        cells[(sub, block)] = value
    grid = np.full((len(subs), len(blocks)), np.nan)
    for (sub, block), value in cells.items():
        grid[subs.index(sub), blocks.index(block)] = value
    fig, ax = plt.subplots(figsize=(min(16.0, max(4.0, 0.35 * len(blocks) + 2.5)), max(2.5, 0.35 * len(subs) + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap="viridis",
                      vmin=min(bits.values()), vmax=max(max(bits.values()), min(bits.values()) + 1e-6))
    labels = [b.rsplit(".", 1)[-1] for b in blocks]
    tick_every = max(1, len(blocks) // 40)
    ax.set_xticks(range(0, len(blocks), tick_every), labels[::tick_every], fontsize=7)
    ax.set_yticks(range(len(subs)), subs, fontsize=7)
    ax.set_xlabel("block" if any(blocks) else "")
    if grid.size <= ANNOTATE_MAX_CELLS:
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:g}" if value == int(value) else f"{value:.2f}", ha="center", va="center",
                        fontsize=6, color="white" if value < (np.nanmin(grid) + np.nanmax(grid)) / 2 else "black")
    ax.set_title(title or "weight bits per layer")
    fig.colorbar(image, ax=ax, label="bits")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path

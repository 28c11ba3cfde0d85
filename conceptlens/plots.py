"""Matplotlib figures for results and reports (headless: the Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["similarity_heatmap"]


def similarity_heatmap(
    matrix: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    row_depths: Sequence[float],
    column_depths: Sequence[float],
    title: str,
    path: Path,
    ridge_pairs: Sequence[dict[str, Any]] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Path:
    """Draw a layer × layer similarity matrix with both axes ordered by relative depth.

    Cells are placed at their layers' relative depths (a non-uniform grid), so a ridge near the
    diagonal means similar semantics at similar relative depth. Undefined cells are grey; the
    ridge (best match per row) is marked with dots.
    """
    row_order = np.argsort(row_depths, kind="stable")
    column_order = np.argsort(column_depths, kind="stable")
    data = np.ma.masked_invalid(np.asarray(matrix, dtype=float)[np.ix_(row_order, column_order)])
    row_edges = _edges(np.asarray(row_depths)[row_order])
    column_edges = _edges(np.asarray(column_depths)[column_order])
    size = (2.5 + 0.45 * len(columns), 2.0 + 0.4 * len(rows))
    figure, axes = plt.subplots(figsize=(max(size[0], 5.5), max(size[1], 4.5)), dpi=110)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#d0d0d0")
    mesh = axes.pcolormesh(column_edges, row_edges, data, cmap=cmap, vmin=value_range[0], vmax=value_range[1], shading="flat")
    figure.colorbar(mesh, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(np.asarray(column_depths)[column_order], [f"{columns[i]}\n{column_depths[i]:.2f}" for i in column_order], rotation=60, ha="right", fontsize=7)
    axes.set_yticks(np.asarray(row_depths)[row_order], [f"{rows[i]} {row_depths[i]:.2f}" for i in row_order], fontsize=7)
    axes.set_xlabel("relative depth (columns)")
    axes.set_ylabel("relative depth (rows)")
    axes.plot([0, 1], [0, 1], color="white", linewidth=0.8, linestyle="--", alpha=0.7)
    if ridge_pairs:
        axes.scatter([p["depth_b"] for p in ridge_pairs], [p["depth_a"] for p in ridge_pairs], s=18, color="#ff5a36", zorder=3, label="best match per row")
        axes.legend(loc="lower right", fontsize=7, framealpha=0.8)
    axes.set_title(title, fontsize=10)
    axes.set_xlim(column_edges[0], column_edges[-1])
    axes.set_ylim(row_edges[0], row_edges[-1])
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _edges(depths: np.ndarray) -> np.ndarray:
    """Cell edges halfway between neighbouring depths (a single layer spans [−0.5, 0.5])."""
    if len(depths) == 1:
        return np.array([depths[0] - 0.5, depths[0] + 0.5])
    middle = (depths[1:] + depths[:-1]) / 2
    first = depths[0] - (middle[0] - depths[0])
    last = depths[-1] + (depths[-1] - middle[-1])
    return np.concatenate([[first], middle, [last]])

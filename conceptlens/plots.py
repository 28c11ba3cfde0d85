"""Matplotlib figures for results and reports (headless: the Agg backend, PNG files)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["overlay_concept_maps", "overlay_layout", "similarity_heatmap"]


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
    # about the width a report shows it at (two per row), so that 8-pt labels stay ≥ 7 pt there
    size = (2.9 + 0.45 * len(columns), 2.4 + 0.4 * len(rows))
    figure, axes = plt.subplots(figsize=(max(size[0], 5.2), max(size[1], 4.6)), dpi=110, layout="constrained")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
    mesh = axes.pcolormesh(column_edges, row_edges, data, cmap=cmap, vmin=value_range[0], vmax=value_range[1], shading="flat")
    bar = figure.colorbar(mesh, ax=axes, fraction=0.046, pad=0.04)
    bar.ax.tick_params(labelsize=8)
    axes.set_xticks(np.asarray(column_depths)[column_order], [f"{columns[i]}\n{column_depths[i]:.2f}" for i in column_order],
                    rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    axes.set_yticks(np.asarray(row_depths)[row_order], [f"{rows[i]} {row_depths[i]:.2f}" for i in row_order], fontsize=8)
    axes.tick_params(labelsize=8)
    axes.set_xlabel("relative depth (columns)", fontsize=9)
    axes.set_ylabel("relative depth (rows)", fontsize=9)
    axes.plot([0, 1], [0, 1], color="white", linewidth=0.8, linestyle="--", alpha=0.7)
    if ridge_pairs:
        axes.scatter([p["depth_b"] for p in ridge_pairs], [p["depth_a"] for p in ridge_pairs], s=18, color="#ff5a36", zorder=3, label="best match per row")
        axes.legend(loc="lower right", fontsize=7.5, framealpha=0.8)
    title_size = 9.5
    figure.suptitle(_wrap_title(title, figure.get_figwidth() * 72 - 12, title_size), fontsize=title_size, linespacing=1.25)
    axes.set_xlim(column_edges[0], column_edges[-1])
    axes.set_ylim(row_edges[0], row_edges[-1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight", pad_inches=0.08)
    plt.close(figure)
    return path


def _text_width(text: str, size: float) -> float:
    """Width of ``text`` in points at font ``size`` (the default font)."""
    from matplotlib.textpath import TextPath

    return float(TextPath((0, 0), text, size=size).get_extents().width) if text else 0.0


def _wrap_title(title: str, width: float, size: float) -> str:
    """Break each line of ``title`` so that it fits ``width`` points: first after its commas, then between words.

    Lines are packed greedily from the left; a single word wider than ``width`` stays whole.
    """
    lines = []
    for line in title.split("\n"):
        if _text_width(line, size) <= width:
            lines.append(line)
            continue
        segments = [part.strip() for part in line.split(", ")]
        pieces = [f"{part}," if i < len(segments) - 1 else part for i, part in enumerate(segments)]
        current = ""
        for piece in pieces:
            candidate = f"{current} {piece}" if current else piece
            if _text_width(candidate, size) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            current = ""
            for word in piece.split(" "):  # a segment too wide on its own: break between words
                candidate = f"{current} {word}" if current else word
                if current and _text_width(candidate, size) > width:
                    lines.append(current)
                    current = word
                else:
                    current = candidate
        if current:
            lines.append(current)
    return "\n".join(lines)


def _edges(depths: np.ndarray) -> np.ndarray:
    """Cell edges halfway between neighbouring depths (a single layer spans [−0.5, 0.5])."""
    if len(depths) == 1:
        return np.array([depths[0] - 0.5, depths[0] + 0.5])
    middle = (depths[1:] + depths[:-1]) / 2
    first = depths[0] - (middle[0] - depths[0])
    last = depths[-1] + (depths[-1] - middle[-1])
    return np.concatenate([[first], middle, [last]])


# ---------------------------------------------------------------------------------------------
# concept maps over an image

#: Pixel layout of :func:`overlay_concept_maps` (at ``OVERLAY_DPI``): every panel is
#: ``panel`` pixels wide and ``PANEL_TITLE_PX + map height + PANEL_COLORBAR_PX`` high, the map
#: ``panel − 2·PANEL_MARGIN_PX`` wide (its height follows the image's aspect ratio, at most
#: ``OVERLAY_MAX_ASPECT`` times its width); the figure adds ``FIGURE_TITLE_PX`` on top.
OVERLAY_DPI = 100
PANEL_TITLE_PX = 34
PANEL_COLORBAR_PX = 30
PANEL_MARGIN_PX = 8
FIGURE_TITLE_PX = 30
OVERLAY_MAX_ASPECT = 1.5
_OVERLAY_COLORMAPS = {"probability": "viridis", "ncav": "viridis", "gradient×cav": "RdBu_r"}


def overlay_layout(image_size: tuple[int, int], n_panels: int, columns: int = 4, panel: int = 240) -> dict[str, int]:
    """Pixel sizes of an :func:`overlay_concept_maps` figure: columns, rows, map and figure sizes."""
    height, width = image_size
    columns = max(1, min(int(columns), n_panels))
    rows = math.ceil(n_panels / columns)
    map_width = panel - 2 * PANEL_MARGIN_PX
    map_height = max(1, round(min(map_width * height / width, OVERLAY_MAX_ASPECT * map_width)))
    cell_height = PANEL_TITLE_PX + map_height + PANEL_COLORBAR_PX
    return {
        "columns": columns,
        "rows": rows,
        "map_width": map_width,
        "map_height": map_height,
        "cell_height": cell_height,
        "width": columns * panel,
        "height": FIGURE_TITLE_PX + rows * cell_height,
    }


def overlay_concept_maps(
    image: np.ndarray,
    maps: Any,
    path: str | Path,
    *,
    columns: int = 4,
    top: int | None = None,
    title: str | None = None,
    alpha: float = 0.5,
    panel: int = 240,
) -> Path:
    """Draw an image and its concept maps overlaid, one panel per concept, into a PNG.

    The first panel shows the image; the others overlay one map each on a grey copy of it (so that
    the image's own colours do not mix with the colour scale).

    Parameters
    ----------
    image : ndarray
        uint8 ``(H, W, 3)``: the image the maps were computed on.
    maps : conceptlens.attribution.maps.ImageConceptMaps
        Its ``kind`` picks the colour scale: probabilities on a fixed [0, 1] sequential scale,
        NCAV coefficients on a sequential scale from 0 to each map's maximum, gradient × CAV
        sensitivities on a diverging scale symmetric around 0 (± each map's largest magnitude).
        Maps of another size than the image are stretched over it.
    path : path
        The PNG to write (atomically: a temporary file, then a rename).
    columns : int
        Panels per row (the image is the first panel).
    top : int, optional
        Keep only the ``top`` concepts with the largest mean (absolute mean for gradient × CAV
        maps), in decreasing order; default all, in the maps' order.
    title : str, optional
        Figure title; default layer, method and kind (and the target for gradient maps).
    alpha : float
        Opacity of the maps over the image; gradient × CAV maps fade to transparent at 0 (their
        opacity grows with ``sqrt(|value| / largest)`` up to ``min(1, 1.6·alpha)``), so that the
        image stays visible where the sensitivity is small.
    panel : int
        Panel width in pixels (see :func:`overlay_layout` for the whole figure's size).

    Returns
    -------
    Path
    """
    from matplotlib import colors

    from conceptlens.concepts.store.atomic import atomic_write_bytes

    picture = np.asarray(image)
    values = maps.maps.detach().float().cpu().numpy()
    order = _overlay_order(values, maps.kind, top)
    layout = overlay_layout(picture.shape[:2], len(order) + 1, columns, panel)
    figure = plt.figure(figsize=(layout["width"] / OVERLAY_DPI, layout["height"] / OVERLAY_DPI), dpi=OVERLAY_DPI)
    figure.text(0.5, 1 - (FIGURE_TITLE_PX / 2) / layout["height"], title or _overlay_title(maps), ha="center", va="center", fontsize=9)
    grey = picture[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # under the maps
    extent = (-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5)
    cmap = matplotlib.colormaps[_OVERLAY_COLORMAPS.get(maps.kind, "viridis")]
    for slot, index in enumerate([None, *order]):
        map_axes, colorbar_axes, title_y = _overlay_panel_axes(figure, layout, slot, panel)
        map_axes.set_axis_off()
        if index is None:
            map_axes.imshow(picture, extent=extent, interpolation="bilinear")
            figure.text(*title_y, f"image {picture.shape[0]}×{picture.shape[1]}", ha="center", va="center", fontsize=8)
            continue
        map_axes.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=extent, interpolation="bilinear")
        low, high = _overlay_range(values[index], maps.kind)
        norm = colors.Normalize(vmin=low, vmax=high)
        shown = map_axes.imshow(values[index], cmap=cmap, norm=norm, alpha=_overlay_alpha(values[index], maps.kind, high, alpha), extent=extent, interpolation="bilinear")
        figure.text(*title_y, _panel_title(maps, index), ha="center", va="center", fontsize=8, linespacing=1.1)
        bar = figure.colorbar(shown, cax=colorbar_axes, orientation="horizontal")
        bar.solids.set_alpha(1.0)
        bar.set_ticks([low, (low + high) / 2, high])
        bar.ax.tick_params(labelsize=6, length=2, pad=1)
        bar.ax.set_xticklabels([_short_number(v) for v in (low, (low + high) / 2, high)])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=OVERLAY_DPI)
    plt.close(figure)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _overlay_order(values: np.ndarray, kind: str, top: int | None) -> list[int]:
    if top is None:
        return list(range(values.shape[0]))
    strength = np.abs(values).mean(axis=(1, 2)) if kind == "gradient×cav" else values.mean(axis=(1, 2))
    return [int(i) for i in np.argsort(-strength, kind="stable")[: max(0, int(top))]]


def _overlay_range(values: np.ndarray, kind: str) -> tuple[float, float]:
    if kind == "probability":
        return 0.0, 1.0
    largest = float(np.abs(values).max()) if values.size else 0.0
    largest = largest if largest > 0 else 1.0
    return (-largest, largest) if kind == "gradient×cav" else (0.0, largest)


def _overlay_alpha(values: np.ndarray, kind: str, largest: float, alpha: float) -> float | np.ndarray:
    """Constant opacity, except for diverging maps: there it grows with |value| (0 is transparent)."""
    if kind != "gradient×cav":
        return alpha
    return np.clip(np.abs(values) / largest, 0.0, 1.0) ** 0.5 * min(1.0, 1.6 * alpha)


def _overlay_panel_axes(figure: Any, layout: dict[str, int], slot: int, panel: int) -> tuple[Any, Any, tuple[float, float]]:
    """Map axes, colorbar axes and the title position of panel ``slot``, placed in pixels."""
    width, height = layout["width"], layout["height"]
    row, column = divmod(slot, layout["columns"])
    top = FIGURE_TITLE_PX + row * layout["cell_height"]  # pixels from the figure's top
    left = column * panel + PANEL_MARGIN_PX
    map_top = top + PANEL_TITLE_PX
    map_axes = figure.add_axes(
        (left / width, 1 - (map_top + layout["map_height"]) / height, layout["map_width"] / width, layout["map_height"] / height)
    )
    bar_top = map_top + layout["map_height"] + 5
    colorbar_axes = figure.add_axes((
        (left + 0.15 * layout["map_width"]) / width, 1 - (bar_top + 7) / height, 0.7 * layout["map_width"] / width, 7 / height,
    ))
    if slot == 0:
        colorbar_axes.set_axis_off()
    title_position = ((left + layout["map_width"] / 2) / width, 1 - (top + PANEL_TITLE_PX / 2) / height)
    return map_axes, colorbar_axes, title_position


def _panel_title(maps: Any, index: int) -> str:
    name = _shorten(str(maps.concepts[index]))
    label = str(maps.labels[index])
    first = f"{name} → {_shorten(label, 14)}" if maps.kind == "ncav" and label != maps.concepts[index] else name
    score = float(maps.scores[index]) if getattr(maps, "scores", None) is not None else float(maps.maps[index].mean())
    second = {"probability": f"mean p {score:.2f}", "ncav": f"mean {_short_number(score)}", "gradient×cav": f"S = {_short_number(score)}"}
    return f"{first}\n{second.get(maps.kind, _short_number(score))}"


def _overlay_title(maps: Any) -> str:
    text = f"{maps.layer} · {maps.method} · {maps.kind}"
    if getattr(maps, "target", None):
        text += f" · target {maps.target}"
        if getattr(maps, "target_value", None) is not None:
            text += f" = {maps.target_value:.3g}"
    return text


def _shorten(text: str, width: int = 26) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short_number(value: float) -> str:
    return f"{value:.2g}" if value != 0 else "0"

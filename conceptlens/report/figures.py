"""Every figure conceptlens draws, with matplotlib's Agg renderer and no pyplot state.

Result figures written as PNG files: :func:`similarity_heatmap` (a comparison's layer × layer
matrix, depth-ordered) and :func:`overlay_concept_maps` (concept maps over one image). The report's
figures, returned as :class:`~matplotlib.figure.Figure` for :class:`FigureSink` to turn into PNG
bytes: :func:`probe_figure`, :func:`segmentation_figure`, :func:`concept_examples_figure`,
:func:`ncav_figure`, :func:`flow_figure` and :func:`tcav_figure`, coloured by :func:`concept_palette`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

from conceptlens.concepts.store.atomic import atomic_write_bytes
from conceptlens.report.formatting import METHOD_NAMES, STATISTIC_NAMES, f2, number
from conceptlens.report.results import (
    Comparison,
    ExamplesMeta,
    NCAVLabel,
    ProbeResults,
    RidgePair,
    TCAVRow,
)

__all__ = [
    "CONTROL_STYLES", "DISTINCT_COLORS", "DPI", "MAX_CONCEPT_EXAMPLES", "MAX_EXAMPLE_CONCEPTS", "MAX_PROBE_LINES", "STYLE", "FigureSink", "compact_png",
    "concept_color", "concept_examples_figure", "concept_palette", "flow_figure", "ncav_figure", "overlay_concept_maps", "overlay_layout", "probe_controls_figure", "probe_figure", "segmentation_figure",
    "similarity_heatmap", "tcav_figure",
]

#: Resolution of the report's figures (PNG, dots per inch).
DPI = 110
#: matplotlib settings the report draws under.
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
         "svg.hashsalt": "conceptlens", "axes.spines.top": False, "axes.spines.right": False}
#: At most this many concepts are drawn per segmentation example (the largest ones).
MAX_EXAMPLE_CONCEPTS = 4
#: More concepts than this: the probe-quality figure is a concept × layer grid instead of lines.
MAX_PROBE_LINES = 12
#: Up to this many concepts get clearly distinct colours (see :func:`concept_palette`).
DISTINCT_COLORS = 18
#: At most this many example images per model in a concept's own segmentation figure.
MAX_CONCEPT_EXAMPLES = 3


# ---------------------------------------------------------------------------------------------
# layer × layer similarity


def similarity_heatmap(
    matrix: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    row_depths: Sequence[float],
    column_depths: Sequence[float],
    title: str,
    path: Path,
    ridge_pairs: Sequence[RidgePair] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    hatched: np.ndarray | None = None,
) -> Path:
    """Draw a layer × layer similarity matrix with both axes ordered by relative depth.

    Cells are placed at their layers' relative depths (a non-uniform grid), so a ridge near the
    diagonal means similar semantics at similar relative depth. Undefined cells are grey; the
    ridge (best match per row, ``ridge_pairs``) is marked with dots; cells where ``hatched`` (a bool
    matrix like ``matrix``) is true are hatched (not significant). The PNG goes to ``path``.
    """
    row_order = np.argsort(row_depths, kind="stable")
    column_order = np.argsort(column_depths, kind="stable")
    data = np.ma.masked_invalid(np.asarray(matrix, dtype=float)[np.ix_(row_order, column_order)])
    row_edges = _edges(np.asarray(row_depths)[row_order])
    column_edges = _edges(np.asarray(column_depths)[column_order])
    # about the width a report shows it at (two per row), so that 8-pt labels stay ≥ 7 pt there
    size = (2.9 + 0.45 * len(columns), 2.4 + 0.4 * len(rows))
    figure = Figure(figsize=(max(size[0], 5.2), max(size[1], 4.6)), dpi=110, layout="constrained")
    axes = figure.add_subplot()
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
    if hatched is not None:
        marks = np.ma.masked_where(~np.asarray(hatched, dtype=bool)[np.ix_(row_order, column_order)], np.ones(data.shape))
        axes.pcolor(column_edges, row_edges, marks, hatch="///", alpha=0.0, shading="flat", edgecolor="white", linewidth=0.0)
        axes.add_artist(axes.legend(handles=[Patch(facecolor="#888", hatch="///", edgecolor="white", label="not significant")],
                                    loc="upper left", fontsize=7.5, framealpha=0.8))
    if ridge_pairs:
        axes.scatter([p.depth_b for p in ridge_pairs], [p.depth_a for p in ridge_pairs], s=18, color="#ff5a36", zorder=3, label="best match per row")
        axes.legend(loc="lower right", fontsize=7.5, framealpha=0.8)
    title_size = 9.5
    figure.suptitle(_wrap_title(title, figure.get_figwidth() * 72 - 12, title_size), fontsize=title_size, linespacing=1.25)
    axes.set_xlim(column_edges[0], column_edges[-1])
    axes.set_ylim(row_edges[0], row_edges[-1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight", pad_inches=0.08)
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
    picture = np.asarray(image)
    values = maps.maps.detach().float().cpu().numpy()
    order = _overlay_order(values, maps.kind, top)
    layout = overlay_layout(picture.shape[:2], len(order) + 1, columns, panel)
    figure = Figure(figsize=(layout["width"] / OVERLAY_DPI, layout["height"] / OVERLAY_DPI), dpi=OVERLAY_DPI)
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
        norm = Normalize(vmin=low, vmax=high)
        shown = map_axes.imshow(values[index], cmap=cmap, norm=norm, alpha=_overlay_alpha(values[index], maps.kind, high, alpha), extent=extent, interpolation="bilinear")
        figure.text(*title_y, _panel_title(maps, index), ha="center", va="center", fontsize=8, linespacing=1.1)
        bar = figure.colorbar(shown, cax=colorbar_axes, orientation="horizontal")
        bar.solids.set_alpha(1.0)
        bar.set_ticks([low, (low + high) / 2, high])
        bar.ax.tick_params(labelsize=6, length=2, pad=1)
        bar.ax.set_xticklabels([_short_number(v) for v in (low, (low + high) / 2, high)])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=OVERLAY_DPI)
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


# ---------------------------------------------------------------------------------------------
# report figures


class FigureSink:
    """Turns figures into PNG bytes (deterministic: no software tag), optionally also saving them.

    Parameters
    ----------
    folder : Path, optional
        Also write every figure to ``<folder>/<nn>_<name>.png``, numbered in drawing order.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.count = 0

    def png(self, figure: Figure, name: str) -> bytes:
        """The PNG bytes of ``figure`` at :data:`DPI`, trimmed to its content, on white, in 256 colours (:func:`compact_png`)."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.12, facecolor="white", metadata={"Software": None})
        data = compact_png(buffer.getvalue())
        if self.folder is not None:
            self.count += 1
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
            atomic_write_bytes(self.folder / f"{self.count:02d}_{safe}.png", data)
        return data


def compact_png(data: bytes) -> bytes:
    """``data`` (a PNG) re-encoded with a 256-colour palette (median cut, no dithering), when that is smaller.

    Figures of lines, flat colours and small image patches look the same and take about a third of
    the bytes, which keeps a report with many figures light. Deterministic: the same input gives
    the same bytes.
    """
    with Image.open(io.BytesIO(data)) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", optimize=True)
    smaller = buffer.getvalue()
    return smaller if len(smaller) < len(data) else data


def concept_palette(names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One RGBA colour per concept name, in order (see :func:`_concept_colors`; golden-ratio hues beyond)."""
    table = _concept_colors()
    return {name: table[i] if i < len(table) else matplotlib.colormaps["hsv"]((i * 0.618034) % 1.0) for i, name in enumerate(names)}


def _concept_colors() -> list[tuple[float, ...]]:
    """Concept colours in order: tab10's hues first, then tab20's light variants, then tab20b / tab20c.

    Greys are left out (the segmentation overlays are drawn on a grey image), so the first
    :data:`DISTINCT_COLORS` concepts get clearly different colours, neighbours in the list included.
    """
    tab10, tab20 = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20"]
    table = [tab10(i) for i in range(10) if i != 7]
    table += [tab20(2 * i + 1) for i in range(10) if i != 7]
    table += [matplotlib.colormaps["tab20b"](i) for i in range(20)]
    table += [matplotlib.colormaps["tab20c"](i) for i in range(16)]
    return table


def concept_color(colors: Mapping[str, Any], concept: str) -> Any:
    """``concept``'s colour in ``colors``; grey for a concept without one."""
    return colors.get(concept, (0.45, 0.45, 0.45, 1.0))


def probe_figure(probe: ProbeResults, model: str, concepts: Sequence[str], colors: Mapping[str, Any]) -> Figure | None:
    """Test set IoU of every concept over the layers' relative depths (a grid beyond :data:`MAX_PROBE_LINES`).

    None when no concept has a set IoU.
    """
    curves = {c: probe.curve(c) for c in concepts}
    curves = {c: v for c, v in curves.items() if any(math.isfinite(x) for x in v[2])}
    if not curves:
        return None
    layers, depths, _ = next(iter(curves.values()))
    if len(curves) > MAX_PROBE_LINES:
        return _probe_heatmap(curves, model, layers, depths)
    figure = Figure(figsize=(max(5.0, 1.2 + 1.1 * len(layers)), 3.4))
    axes = figure.add_subplot()
    for concept, (_, x, y) in curves.items():
        axes.plot(x, y, marker="o", markersize=4, linewidth=1.6, color=concept_color(colors, concept), label=concept)
        i = int(np.nanargmax(y))
        axes.plot([x[i]], [y[i]], marker="*", markersize=13, color=concept_color(colors, concept), markeredgecolor="black", markeredgewidth=0.7, linestyle="none", zorder=4)
    axes.set_xticks(depths, [f"{name}\n{d:.2f}" for name, d in zip(layers, depths)], rotation=30, ha="right", rotation_mode="anchor")
    axes.set_xlabel("layer (relative depth)")
    axes.set_ylabel("test set IoU")
    axes.set_ylim(0, 1.02)
    span = (max(depths) - min(depths)) or 1.0
    axes.set_xlim(min(depths) - 0.05 * span, max(depths) + 0.05 * span)
    axes.grid(axis="y", color="#e4e4e4", linewidth=0.7)
    handles, labels = axes.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="*", markersize=11, color="#888", markeredgecolor="black", linestyle="none"))
    labels.append("best layer")
    axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="concept")
    axes.set_title(f"{model}: Net2Vec probe quality per layer")
    return figure


#: Line styles of the probe controls in :func:`probe_controls_figure`.
CONTROL_STYLES = {"random_weights": ("random-weights model", "--"), "permuted_masks": ("permuted masks", ":")}


def probe_controls_figure(probe: ProbeResults, model: str, concepts: Sequence[str], colors: Mapping[str, Any], columns: int = 4) -> Figure | None:
    """Per concept, the trained probe's test set IoU across depth beside its controls' (small multiples).

    Solid: the probe; dashed: the same probe on a random-weights model; dotted: on masks permuted
    across images. A filled marker is a layer where the concept counts as encoded. None when the
    probe file has no controls.
    """
    panels = []
    for concept in concepts:
        layers, depths, ious = probe.curve(concept)
        entries = [(probe.metrics.get(layer, {}).get(concept) or {}) for layer in layers]
        controls = {kind: [number(((e.get("controls") or {}).get(kind) or {}).get("set_iou")) for e in entries] for kind in CONTROL_STYLES}
        if any(math.isfinite(v) for values in controls.values() for v in values):
            panels.append((concept, depths, ious, controls, [e.get("encoded") is True for e in entries]))
    if not panels:
        return None
    columns = min(columns, len(panels))
    n_rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(1.2 + 2.2 * columns, 0.6 + 1.9 * n_rows), layout="constrained")
    grid = figure.subplots(n_rows, columns, squeeze=False, sharex=True, sharey=True)
    for index, (concept, depths, ious, controls, encoded) in enumerate(panels):
        axes = grid[index // columns][index % columns]
        color = concept_color(colors, concept)
        axes.plot(depths, ious, color=color, linewidth=1.6, label="trained")
        for x, y, filled in zip(depths, ious, encoded):
            axes.plot([x], [y], marker="o", markersize=4.5, color=color, markerfacecolor=color if filled else "white", linestyle="none")
        for kind, (label, style) in CONTROL_STYLES.items():
            if any(math.isfinite(v) for v in controls[kind]):
                axes.plot(depths, controls[kind], color="#555", linestyle=style, linewidth=1.2, label=label)
        axes.set_title(concept, fontsize=9)
        axes.set_ylim(0, 1.02)
        axes.grid(axis="y", color="#e4e4e4", linewidth=0.7)
    for index in range(len(panels), n_rows * columns):
        grid[index // columns][index % columns].set_visible(False)
    handles = [Line2D([], [], color="#333", linewidth=1.6, marker="o", markersize=4.5, label="trained (filled: encoded)")]
    handles += [Line2D([], [], color="#555", linestyle=style, linewidth=1.2, label=label) for label, style in CONTROL_STYLES.values()]
    for index in range(len(panels)):
        if index + columns >= len(panels):  # no panel below: this one shows the x axis
            grid[index // columns][index % columns].set_xlabel("relative depth", fontsize=8)
    figure.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)  # below: the title keeps the top
    figure.supylabel("test set IoU", fontsize=9)
    figure.suptitle(f"{model}: probe vs controls across depth", fontsize=10)
    return figure


def _probe_heatmap(curves: dict[str, tuple[list[str], list[float], list[float]]], model: str, layers: Sequence[str], depths: Sequence[float]) -> Figure:
    """Many concepts: a concept × layer grid of set IoU instead of one line per concept."""
    concepts = list(curves)
    values = np.array([curves[c][2] for c in concepts], dtype=float)
    # constrained layout makes room for the rotated layer names below and the legend above
    figure = Figure(figsize=(max(4.8, 2.8 + 0.9 * len(layers)), 2.3 + 0.22 * len(concepts)), layout="constrained")
    axes = figure.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    best = [int(np.nanargmax(row)) if np.isfinite(row).any() else -1 for row in values]
    rows = [i for i, j in enumerate(best) if j >= 0]
    axes.scatter([best[i] for i in rows], rows, marker="*", s=60, color="white", edgecolors="black", linewidths=0.5, label="best layer")
    axes.set_xticks(range(len(layers)), [f"{name}\n{d:.2f}" for name, d in zip(layers, depths)], rotation=30, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(len(concepts)), concepts, fontsize=8)
    axes.set_xlabel("layer (relative depth)")
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.colorbar(image, ax=axes, fraction=0.05, pad=0.03, label="test set IoU")
    axes.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, fontsize=8)
    axes.set_title(f"{model}: Net2Vec probe quality per layer", pad=18)
    return figure


def _draw_masks(axes: Any, image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[Any], alpha: float, grey: bool = False) -> None:
    """Filled masks (largest first, so small ones stay on top) with a solid outline each.

    ``grey`` shows the image as lightened greyscale, so that the mask colours stand out.
    """
    height, width = image.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    if grey:
        luminance = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        axes.imshow(90 + 0.6 * luminance, cmap="gray", vmin=0, vmax=255, extent=extent, interpolation="nearest")
    else:
        axes.imshow(image, extent=extent, interpolation="nearest")
    for mask, color in sorted(zip(masks, colors), key=lambda mc: -float(mc[0].sum())):
        layer = np.zeros((*mask.shape, 4))
        layer[mask] = (*color[:3], alpha)
        axes.imshow(layer, extent=extent, interpolation="nearest")
        if mask.any() and not mask.all():
            axes.contour(np.linspace(0, width - 1, mask.shape[1]), np.linspace(0, height - 1, mask.shape[0]), mask.astype(float), levels=[0.5], colors=[color], linewidths=1.3)
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_xticks([])
    axes.set_yticks([])


def segmentation_figure(meta: ExamplesMeta, tensors: Mapping[str, np.ndarray], model: str, colors: Mapping[str, Any]) -> Figure | None:
    """Per example: the image, the true masks and the predicted ones (p > 0.5), at each concept's best layer.

    None without example images.
    """
    concepts = list(meta.concepts)
    count = meta.n_examples if meta.n_examples is not None else len(meta.ids)
    rows = [i for i in range(int(count)) if f"image_{i}" in tensors]
    if not rows:
        return None
    first = tensors[f"image_{rows[0]}"]
    aspect = first.shape[0] / max(1, first.shape[1])
    # laid out in inches, so the margins do not grow with the number of rows
    panel, gap, legend = 2.6, 0.12, 2.3  # panel width, gap between panels, legend column
    suptitle, title, row_gap = 0.4, 0.3, 0.12  # figure title, panel titles, space between rows
    panel_height = panel * min(aspect, 1.5)
    width = 3 * panel + 2 * gap + legend
    height = suptitle + len(rows) * (title + panel_height) + (len(rows) - 1) * row_gap + 0.05
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(len(rows), 3, left=0.0, right=(3 * panel + 2 * gap) / width, top=1 - (suptitle + title) / height,
                               bottom=0.05 / height, wspace=gap / panel, hspace=(title + row_gap) / panel_height)
    ids = meta.ids
    for row, i in enumerate(rows):
        image = np.asarray(tensors[f"image_{i}"], dtype=np.uint8)
        truth = np.asarray(tensors.get(f"truth_{i}", np.zeros((len(concepts), *image.shape[:2])))) > 0
        pred = np.asarray(tensors.get(f"pred_{i}", np.zeros(truth.shape, dtype=np.float32)), dtype=np.float32)
        areas = truth.reshape(truth.shape[0], -1).sum(1)
        shown = [k for k in np.argsort(-areas, kind="stable") if areas[k] > 0][:MAX_EXAMPLE_CONCEPTS]
        if len(colors) <= DISTINCT_COLORS:
            shown_colors = [concept_color(colors, concepts[k]) for k in shown]
        else:  # too many concepts for distinct global colours: distinct colours within the image
            shown_colors = [matplotlib.colormaps["tab10"](j) for j in range(len(shown))]
        panels = [figure.add_subplot(grid[row, c]) for c in range(3)]
        _draw_masks(panels[0], image, [], [], 0.0)
        _draw_masks(panels[1], image, [truth[k] for k in shown], shown_colors, 0.55, grey=True)
        _draw_masks(panels[2], image, [pred[k] > 0.5 for k in shown], shown_colors, 0.55, grey=True)
        label = ids[i] if i < len(ids) else f"example {i}"
        for axes, text in zip(panels, (f"image · {label}", "ground truth", "predicted (p > 0.5)")):
            axes.set_title(text, fontsize=9)
        handles = []
        for k, color in zip(shown, shown_colors):
            union = np.logical_or(truth[k], pred[k] > 0.5).sum()
            iou = np.logical_and(truth[k], pred[k] > 0.5).sum() / union if union else math.nan
            layer = meta.best_layers.get(concepts[k], "")
            handles.append(Patch(facecolor=color, edgecolor=color, label=f"{concepts[k]}  IoU {f2(iou)}\n  at {layer}" if layer else f"{concepts[k]}  IoU {f2(iou)}"))
        if handles:
            panels[2].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.03, 1.0), frameon=False, fontsize=8, handlelength=1.2, labelspacing=0.7)
        else:
            panels[2].text(1.05, 0.5, "no concept\nin this image", transform=panels[2].transAxes, va="center", fontsize=8, color="#666")
    figure.suptitle(f"{model}: concept segmentation at each concept's best layer", y=1 - 0.06 / height, va="top", fontsize=10)
    return figure


def concept_examples_figure(examples: Mapping[str, tuple[ExamplesMeta, Mapping[str, np.ndarray]]], concept: str, color: Any) -> Figure | None:
    """One concept's segmentation on example test images: per model a row of up to :data:`MAX_CONCEPT_EXAMPLES` images
    that show it, the ground truth filled in ``color`` and the prediction (p > 0.5) outlined in black.

    ``examples`` maps a model to its examples' metadata and tensors. None when no example shows the concept.
    """
    rows = []
    for model, (meta, tensors) in examples.items():
        if concept not in meta.concepts:
            continue
        k = list(meta.concepts).index(concept)
        shown = []
        for i in range(int(meta.n_examples if meta.n_examples is not None else len(meta.ids))):
            truth = tensors.get(f"truth_{i}")
            if f"image_{i}" in tensors and truth is not None and k < truth.shape[0] and truth[k].any():
                shown.append(i)
        if shown:
            rows.append((model, meta, tensors, k, shown[:MAX_CONCEPT_EXAMPLES]))
    if not rows:
        return None
    panel, label = 1.55, 1.0
    figure = Figure(figsize=(label + MAX_CONCEPT_EXAMPLES * panel, 0.35 + len(rows) * (panel + 0.3)))
    grid = figure.add_gridspec(len(rows), MAX_CONCEPT_EXAMPLES, left=label / (label + MAX_CONCEPT_EXAMPLES * panel), right=1.0, top=1 - 0.35 / figure.get_figheight(),
                               bottom=0.0, wspace=0.06, hspace=0.3)
    for row, (model, meta, tensors, k, shown) in enumerate(rows):
        for column, i in enumerate(shown):
            axes = figure.add_subplot(grid[row, column])
            image = np.asarray(tensors[f"image_{i}"], dtype=np.uint8)
            truth = np.asarray(tensors[f"truth_{i}"][k]) > 0
            pred = np.asarray(tensors.get(f"pred_{i}", np.zeros((k + 1, *truth.shape)))[k], dtype=np.float32) > 0.5
            _draw_masks(axes, image, [truth], [color], 0.5, grey=True)
            if pred.any() and not pred.all():
                height, width = image.shape[:2]
                axes.contour(np.linspace(0, width - 1, pred.shape[1]), np.linspace(0, height - 1, pred.shape[0]), pred.astype(float), levels=[0.5],
                             colors=["black"], linewidths=1.1, linestyles="--")
            union = np.logical_or(truth, pred).sum()
            iou = np.logical_and(truth, pred).sum() / union if union else math.nan
            ident = meta.ids[i] if i < len(meta.ids) else f"example {i}"
            axes.set_title(f"{ident} · IoU {f2(iou)}", fontsize=8)
            if column == 0:
                layer = meta.best_layers.get(concept, "")
                axes.text(-0.08, 0.5, f"{model}\n{layer}" if layer else model, transform=axes.transAxes, ha="right", va="center", fontsize=8.5)
    handles = [Patch(facecolor=color, alpha=0.6, edgecolor=color, label="ground truth"),
               Line2D([], [], color="black", linestyle="--", linewidth=1.1, label="predicted (p > 0.5)")]
    figure.legend(handles=handles, loc="upper center", ncols=2, frameon=False, fontsize=8, bbox_to_anchor=(0.5, 1.0))
    return figure


def ncav_figure(patches: np.ndarray, ncavs: Sequence[NCAVLabel], model: str, layer: str, matched: Sequence[bool] | None = None,
                heat: np.ndarray | None = None) -> Figure:
    """One row per NCAV: its label and its top patches ``patches`` (k, p, s, s, 3), large.

    ``matched[j]``: whether NCAV j's match counts (see :func:`conceptlens.report.findings.ncav_match_counts`);
    an NCAV whose match does not count reads "unmatched" (with its best overlap, dimmed). ``heat``
    (k, p, s, s) uint8, where the NCAV fires on each patch (0–255, its peak over the patches = 255):
    the patch is dimmed where the map is weak and the half-peak level is outlined.
    """
    k, p = patches.shape[0], patches.shape[1]
    cell, label_width, title_height = 1.2, 2.1, 0.5
    width, height = label_width + p * cell, title_height + k * cell
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(k, p, left=label_width / width, right=1.0, bottom=0.0, top=1 - title_height / height, wspace=0.06, hspace=0.06)
    for row in range(k):
        info = ncavs[row] if row < len(ncavs) else NCAVLabel()
        name = info.name if info.name is not None else f"ncav_{row}"
        counts = bool(info.label) if matched is None or row >= len(matched) else matched[row]
        for column in range(p):
            axes = figure.add_subplot(grid[row, column])
            picture = np.asarray(patches[row, column], dtype=np.float32)
            weight = None if heat is None else np.asarray(heat[row, column], dtype=np.float32) / 255.0
            if weight is not None:
                picture = picture * (0.3 + 0.7 * weight[..., None])
            axes.imshow(np.clip(picture, 0, 255).astype(np.uint8), interpolation="bilinear")
            if weight is not None and weight.max() > 0.5 > weight.min():
                axes.contour(weight, levels=[0.5], colors=["#ffd400"], linewidths=1.0)
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_visible(True)
                spine.set_color("#bbbbbb")
            if column == 0:
                _ncav_label(axes, name, info, counts)
    what = "where the NCAV fires outlined" if heat is not None else "patches centred where the NCAV peaks"
    figure.suptitle(f"{model} · {layer}: top {p} patches per NCAV ({what})", fontsize=10, y=1 - 0.12 / height, va="top")
    return figure


def _ncav_label(axes: Any, name: str, info: NCAVLabel, counts: bool) -> None:
    """An NCAV's row label left of its first patch: its concept (and IoU) or "unmatched" (and its best overlap, dimmed)."""
    if counts:
        axes.text(-0.1, 0.5, f"{name} → {info.label}\nset IoU {f2(info.set_iou)}", transform=axes.transAxes, ha="right", va="center", fontsize=9)
        return
    axes.text(-0.1, 0.58, f"{name} · unmatched", transform=axes.transAxes, ha="right", va="center", fontsize=9, style="italic", color="#555")
    if info.label:
        axes.text(-0.1, 0.3, f"best overlap {info.label} {f2(info.set_iou)}", transform=axes.transAxes, ha="right", va="center", fontsize=7.5, color="#888")


def flow_figure(models: Sequence[str], compare: Mapping[str, Comparison]) -> Figure | None:
    """Per model, the similarity of each probed layer to the next deeper one, per method and CKA.

    None when no comparison has a within-model block of two layers or more.
    """
    models = [m for m in models if _flow_series(compare, m)]
    if not models:
        return None
    widths = [max(2.0, 0.9 * max(len(next(iter(_flow_series(compare, m).values()))[0]), 2)) for m in models]
    figure = Figure(figsize=(sum(widths) + 2.2, 3.2))
    grid = figure.add_gridspec(1, len(models), width_ratios=widths, wspace=0.25)
    styles = {"net2vec": ("#1f77b4", "-", "o"), "nmf": ("#d62728", "-", "s"), "cka": ("#7f7f7f", "--", "^")}
    for index, model in enumerate(models):
        axes = figure.add_subplot(grid[0, index], sharey=figure.axes[0] if index else None)
        series = _flow_series(compare, model)
        for key, (labels, values) in series.items():
            color, style, marker = styles.get(key, ("#2ca02c", "-", "D"))
            name = "linear CKA (pooled)" if key == "cka" else METHOD_NAMES.get(key, key)
            axes.plot(range(len(values)), values, color=color, linestyle=style, marker=marker, markersize=5, linewidth=1.6, label=name)
        labels = next(iter(series.values()))[0]
        axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", rotation_mode="anchor", fontsize=7.5)
        axes.set_xlim(-0.4, len(labels) - 0.6)
        axes.set_ylim(0, 1.03)
        axes.grid(axis="y", color="#e4e4e4", linewidth=0.7)
        axes.set_title(model)
        if index == 0:
            axes.set_ylabel("similarity to the next layer")
        else:
            axes.tick_params(labelleft=False)
    figure.axes[-1].legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), frameon=False)
    return figure


def _flow_series(compare: Mapping[str, Comparison], model: str) -> dict[str, tuple[list[str], list[float]]]:
    """Per method (and CKA), the similarity of each layer to the next deeper one within ``model``."""
    series: dict[str, tuple[list[str], list[float]]] = {}
    for method, comparison in compare.items():
        depth_of = comparison.depth_of()
        for block in comparison.blocks:
            if block.a != model or block.b != model or len(block.rows) < 2:
                continue
            ranks = block.depth_ranks(depth_of)
            order = sorted(range(len(ranks)), key=lambda i: ranks[i])
            labels = [f"{block.rows[i]} → {block.rows[j]}" for i, j in pairwise(order)]
            series[method] = (labels, [number(block.similarity[i][j]) for i, j in pairwise(order)])
            if "cka" not in series and block.cka_pooled:
                series["cka"] = (labels, [number(block.cka_pooled[i][j]) for i, j in pairwise(order)])
    if "cka" in series:
        series["cka"] = series.pop("cka")
    return series


def tcav_figure(records: Sequence[TCAVRow], target: str, statistic: str, colors: Mapping[str, Any], test: str = "") -> Figure:
    """Horizontal bars of one target's TCAV scores, grouped by layer, with CI, null mean and significance stars.

    ``test`` is appended to the "significant" legend entry (the test and its threshold).
    """
    layers = list(dict.fromkeys(r.layer for r in records))
    rows: list[tuple[str, TCAVRow | None]] = []
    for layer in layers:
        rows.append((layer, None))
        rows += [(r.concept, r) for r in records if r.layer == layer]
    bounded = statistic in ("sign_count", "magnitude")
    neutral = 0.5 if statistic == "sign_count" else 0.0  # the score of a concept with no influence
    figure = Figure(figsize=(6.0, 0.8 + 0.3 * len(rows)))
    axes = figure.add_subplot()
    ys = np.arange(len(rows))[::-1]
    top = 0.0
    for y, (label, record) in zip(ys, rows):
        if record is None:
            continue
        mean, null = number(record.mean), number(record.null_mean)
        low, high = number(record.ci_low), number(record.ci_high)
        # the bar spans score − null (a score at the null draws no bar); faded unless significant
        base = null if math.isfinite(null) else neutral
        color = concept_color(colors, record.concept)
        axes.barh(y, mean - base, left=base, height=0.7, color=color, alpha=0.85 if record.significant else 0.25,
                  edgecolor=color, linewidth=0.8)
        if math.isfinite(low) and math.isfinite(high):
            axes.errorbar(mean, y, xerr=[[max(0.0, mean - low)], [max(0.0, high - mean)]], fmt="none", ecolor="#222", elinewidth=1.1, capsize=3)
        if math.isfinite(null):
            axes.vlines(null, y - 0.42, y + 0.42, colors="black", linewidth=2.2)
        edge = np.nanmax([mean, high, null, 0.0])
        top = max(top, edge)
        spread = number(record.run_std)
        if math.isfinite(spread):
            axes.plot([mean - spread, mean + spread], [y - 0.25, y - 0.25], color="#8a2be2", linewidth=2.4, solid_capstyle="butt")
        if record.significant:
            mark = "*" if record.robust is not False else "(*)"
            axes.text(edge + (0.015 if bounded else 0.02 * max(abs(edge), 1e-12)), y, mark + ("R" if record.robust else ""), va="center", ha="left",
                      fontsize=14 if mark == "*" else 11, fontweight="bold")
    axes.set_yticks(ys, [label for label, _ in rows])
    for tick, (_, record) in zip(axes.get_yticklabels(), rows):
        if record is None:
            tick.set_fontweight("bold")
    if bounded:
        axes.set_xlim(0, 1.08)
    axes.axvline(neutral, color="#cccccc", linewidth=0.8, zorder=0)
    axes.set_ylim(-0.6, len(rows) - 0.4)
    axes.set_xlabel(f"{STATISTIC_NAMES.get(statistic, statistic)} score (mean over runs; bars start at the null)")
    axes.grid(axis="x", color="#eeeeee", linewidth=0.7)
    axes.set_axisbelow(True)
    handles = [
        Patch(facecolor="#888888", alpha=0.85, label="score − null, significant"),
        Patch(facecolor="#888888", alpha=0.25, edgecolor="#888888", label="score − null, not significant"),
        Line2D([], [], color="black", marker="|", markersize=12, markeredgewidth=2.2, linestyle="none", label="null mean (random CAVs)"),
        Line2D([], [], color="#222", marker="|", markersize=6, linewidth=1.1, label="bootstrap CI"),
        Line2D([], [], color="none", marker="$*$", markersize=9, markerfacecolor="black", markeredgecolor="black", label=f"significant{test}"),
    ]
    if any(math.isfinite(number(r.run_std)) for r in records):
        handles.insert(2, Line2D([], [], color="#8a2be2", linewidth=2.4, label="± sd across CAV runs"))
    if any(r.robust is not None for r in records):
        handles += [Line2D([], [], color="none", marker="$*R$", markersize=13, markerfacecolor="black", markeredgecolor="black",
                           label="significant in every variant (robust)"),
                    Line2D([], [], color="none", marker="$(*)$", markersize=13, markerfacecolor="black", markeredgecolor="black",
                           label="significant here, not in every variant")]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    axes.set_title(f"target {target}")
    return figure



"""Small inline SVG charts for the report: light, crisp at any zoom, and each point's exact values on hover.

:func:`depth_chart` draws lines of values over relative depth (0 to 1) on a 0 to 1 scale, one
:class:`Series` per line; every point carries a ``<title>`` (its tooltip).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from conceptlens.report.html import escape

__all__ = ["Point", "Series", "depth_chart"]

_WIDTH, _HEIGHT = 460, 250
_LEFT, _RIGHT, _TOP, _BOTTOM = 46, 14, 12, 40
_DASHES = {"solid": "", "dashed": "6 4", "dotted": "2 3"}


@dataclass(frozen=True)
class Point:
    """A point at relative ``depth`` with ``value`` (NaN: a gap), its tooltip, and whether it is filled and highlighted."""

    depth: float
    value: float
    tooltip: str
    filled: bool = True
    highlight: bool = False


@dataclass(frozen=True)
class Series:
    """One line: its legend name, colour (``#rrggbb``), ``style`` (``solid``, ``dashed`` or ``dotted``) and points."""

    name: str
    color: str
    points: Sequence[Point] = field(default_factory=tuple)
    style: str = "solid"


def depth_chart(series: Sequence[Series], label: str, y_label: str = "test set IoU", legend: Sequence[Series] | None = None) -> str:
    """An SVG line chart of ``series`` over relative depth, with axes, grid and a legend below it.

    Parameters
    ----------
    series : sequence of Series
        The lines, drawn in order (later on top).
    label : str
        What the chart shows, for screen readers (``aria-label``).
    y_label : str
        The y axis title.
    legend : sequence of Series, optional
        The legend's entries (name, colour, line style; their points are ignored); default one per series.

    Returns
    -------
    str
        ``<svg>`` markup followed by an HTML legend; deterministic (fixed number formats).
    """
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def x(depth: float) -> str:
        return f"{_LEFT + plot_w * min(max(depth, 0.0), 1.0):.1f}"

    def y(value: float) -> str:
        return f"{_TOP + plot_h * (1 - min(max(value, 0.0), 1.0)):.1f}"

    parts = [f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" height="{_HEIGHT}" role="img" aria-label="{escape(label)}">']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(tick)}" y2="{y(tick)}" stroke="#e4e4e4" stroke-width="1"></line>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y(tick)}" font-size="11" text-anchor="end" dominant-baseline="middle" fill="#555">{tick:.2f}</text>')
        parts.append(f'<text x="{x(tick)}" y="{_TOP + plot_h + 15}" font-size="11" text-anchor="middle" fill="#555">{tick:.2f}</text>')
    parts.append(f'<line x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="#888"></line>')
    parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" stroke="#888"></line>')
    parts.append(f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_HEIGHT - 6}" font-size="11.5" text-anchor="middle" fill="#333">relative depth</text>')
    parts.append(f'<text transform="translate(13 {_TOP + plot_h / 2:.1f}) rotate(-90)" font-size="11.5" text-anchor="middle" fill="#333">{escape(y_label)}</text>')
    for line in series:
        dash = _DASHES.get(line.style, "")
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        width = "2" if line.style == "solid" else "1.4"
        for run in _runs(line.points):
            if len(run) > 1:
                coords = " ".join(f"{x(p.depth)},{y(p.value)}" for p in run)
                parts.append(f'<polyline points="{coords}" fill="none" stroke="{line.color}" stroke-width="{width}"{dash_attr}></polyline>')
        for point in line.points:
            if not math.isfinite(point.value):
                continue
            radius = 6 if point.highlight else 4 if line.style == "solid" else 3
            fill = line.color if point.filled else "#fff"
            stroke = "#000" if point.highlight else line.color
            parts.append(f'<circle class="pt" cx="{x(point.depth)}" cy="{y(point.value)}" r="{radius}" fill="{fill}" stroke="{stroke}" stroke-width="1.2">'
                         f"<title>{escape(point.tooltip)}</title></circle>")
    parts.append("</svg>")
    legend = "".join(f'<span class="legend-item"><svg width="26" height="10" aria-hidden="true"><line x1="1" x2="25" y1="5" y2="5" stroke="{s.color}" '
                     f'stroke-width="2"{_dash_attr(s.style)}></line></svg> {escape(s.name)}</span>' for s in (series if legend is None else legend))
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _dash_attr(style: str) -> str:
    dash = _DASHES.get(style, "")
    return f' stroke-dasharray="{dash}"' if dash else ""


def _runs(points: Sequence[Point]) -> list[list[Point]]:
    """The points split at missing values, each run in depth order."""
    runs: list[list[Point]] = [[]]
    for point in sorted(points, key=lambda p: p.depth):
        if math.isfinite(point.value):
            runs[-1].append(point)
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]

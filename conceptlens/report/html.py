"""HTML building blocks of the report: escaping, figures, tables, notes and the page around the sections.

The page is one file with the inline style sheet and script of :mod:`conceptlens.report.assets`
and no external resource; figures are embedded as ``data:image/png;base64`` URIs. Everything reads
(and prints) without the script; it only adds sorting, filtering and the one-concept-at-a-time view.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from conceptlens.report.assets import CSS, SCRIPT
from conceptlens.report.formatting import f2, number

__all__ = ["NOT_RUN", "Cell", "caption", "escape", "figure", "key_values", "missing", "num", "page", "table"]

#: The note of a section whose inputs the run did not produce.
NOT_RUN = "Not run in this configuration"


def escape(text: Any) -> str:
    """``str(text)`` with ``& < > " '`` escaped, for element text and attribute values."""
    return html.escape(str(text), quote=True)


@dataclass(frozen=True)
class Cell:
    """A table cell: its HTML, the value it sorts by (``data-sort``) and its hover text (``title``).

    A table cell given as a plain string is its HTML, sorted by its text, without hover text.
    """

    html: str
    sort: str | float | None = None
    title: str | None = None

    def attributes(self) -> str:
        """The cell's ``data-sort`` and ``title`` attributes (with a leading space), escaped."""
        out = ""
        if self.sort is not None:
            out += f' data-sort="{escape(_sort_text(self.sort))}"'
        if self.title:
            out += f' title="{escape(self.title)}"'
        return out


def _sort_text(value: str | float) -> str:
    if isinstance(value, str):
        return value
    value = number(value)
    return "" if math.isnan(value) else repr(value)


def num(value: Any, text: Callable[[Any], str] = f2, what: str = "") -> Cell:
    """A numeric cell: ``text(value)`` shown, the exact value on hover (after ``what``) and as the sort key."""
    exact = number(value)
    if math.isnan(exact):
        return Cell(escape(text(value)), sort="")
    return Cell(escape(text(value)), sort=exact, title=f"{what}{' = ' if what else ''}{exact:.6g}")


def figure(data: bytes, alt: str, caption_html: str = "", anchor: str | None = None) -> str:
    """A ``<figure>`` with the PNG ``data`` inline and an optional caption (already HTML) and ``id``."""
    caption_part = f"<figcaption>{caption_html}</figcaption>" if caption_html else ""
    ident = f' id="{escape(anchor)}"' if anchor else ""
    return f"<figure{ident}>{_img(data, alt)}{caption_part}</figure>"


def _img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{escape(alt)}">'


def missing(what: str) -> str:
    """The "not run in this configuration" note, saying which input is missing."""
    return f'<p class="missing">{NOT_RUN} ({escape(what)}).</p>'


def caption(text: str) -> str:
    """An explanatory paragraph (``text`` is HTML)."""
    return f'<p class="caption">{text}</p>'


def table(header: Sequence[str], rows: Iterable[Sequence[str | Cell]], numeric: Sequence[int] = (), row_class: Callable[[int], str] | None = None,
          head_html: str | None = None, *, sortable: bool = False, filterable: bool = False) -> str:
    """A scrollable table: ``header`` texts (escaped) or ``head_html``; cells are HTML or :class:`Cell`, ``numeric`` columns right-aligned.

    ``row_class(i)`` gives row i a CSS class (empty: none). ``sortable``: a click on a header cell
    of the last header row sorts the rows (by each cell's sort value); ``filterable``: a filter box
    above the table hides the rows that do not contain its words. Both need the page's script and
    change nothing without it.
    """
    head = head_html or "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"
    body = []
    for index, row in enumerate(rows):
        cells = "".join(_cell(c, i in numeric) for i, c in enumerate(row))
        css = row_class(index) if row_class else ""
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    classes = " ".join(name for name, on in (("sortable", sortable), ("filterable", filterable)) if on)
    opening = f'<table class="{classes}">' if classes else "<table>"
    return f'<div class="table-wrap">{opening}\n<thead>{head}</thead>\n<tbody>\n' + "\n".join(body) + "\n</tbody></table></div>"


def _cell(cell: str | Cell, numeric: bool) -> str:
    css = ' class="num"' if numeric else ""
    if isinstance(cell, Cell):
        return f"<td{css}{cell.attributes()}>{cell.html}</td>"
    return f"<td{css}>{cell}</td>"


def key_values(title: str, pairs: Sequence[tuple[str, str]]) -> str:
    """A titled two-column table of (key text, value HTML) pairs."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<div class="kv"><h3>{escape(title)}</h3><table>{rows}</table></div>'


def page(title: str, subtitle_html: str, sections: Sequence[tuple[str, str, str]], footer_html: str) -> str:
    """The whole page: header, table of contents and ``sections`` as (id, heading, body HTML), then the footer and the script."""
    toc = "\n".join(f'<li><a href="#{sid}">{escape(heading)}</a></li>' for sid, heading, _ in sections)
    body = "\n".join(f'<section id="{sid}">\n<h2>{escape(heading)}</h2>\n{html_body}\n</section>' for sid, heading, html_body in sections)
    return _PAGE.format(title=escape(title), style=CSS, heading=escape(title), subtitle=subtitle_html, toc=toc, sections=body, footer=footer_html,
                        script=SCRIPT)


# ---------------------------------------------------------------------------------------------
# page

_PAGE = """<!DOCTYPE html>
<html lang="en" class="no-js">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{style}
</style>
</head>
<body>
<header>
<h1>{heading}</h1>
<p>{subtitle}</p>
</header>
<div class="layout">
<nav class="toc">
<h2>Contents</h2>
<ol>
{toc}
</ol>
</nav>
<main>
{sections}
</main>
</div>
<footer>{footer}</footer>
<script>
{script}
</script>
</body>
</html>
"""

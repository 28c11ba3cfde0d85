"""HTML building blocks of the report: escaping, figures, tables, notes and the page around the sections.

The page is one file with inline CSS and no script or external resource; figures are embedded as
``data:image/png;base64`` URIs.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["NOT_RUN", "caption", "escape", "figure", "key_values", "missing", "page", "table"]

#: The note of a section whose inputs the run did not produce.
NOT_RUN = "Not run in this configuration"


def escape(text: Any) -> str:
    """``str(text)`` with ``& < > " '`` escaped, for element text and attribute values."""
    return html.escape(str(text), quote=True)


def figure(data: bytes, alt: str, caption_html: str = "") -> str:
    """A ``<figure>`` with the PNG ``data`` inline and an optional caption (already HTML)."""
    caption_part = f"<figcaption>{caption_html}</figcaption>" if caption_html else ""
    return f"<figure>{_img(data, alt)}{caption_part}</figure>"


def _img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{escape(alt)}">'


def missing(what: str) -> str:
    """The "not run in this configuration" note, saying which input is missing."""
    return f'<p class="missing">{NOT_RUN} ({escape(what)}).</p>'


def caption(text: str) -> str:
    """An explanatory paragraph (``text`` is HTML)."""
    return f'<p class="caption">{text}</p>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (), row_class: Callable[[int], str] | None = None,
          head_html: str | None = None) -> str:
    """A scrollable table: ``header`` texts (escaped) or ``head_html``; cells are HTML, ``numeric`` columns right-aligned.

    ``row_class(i)`` gives row i a CSS class (empty: none).
    """
    head = head_html or "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        css = row_class(index) if row_class else ""
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return f'<div class="table-wrap"><table>\n<thead>{head}</thead>\n<tbody>\n' + "\n".join(body) + "\n</tbody></table></div>"


def key_values(title: str, pairs: Sequence[tuple[str, str]]) -> str:
    """A titled two-column table of (key text, value HTML) pairs."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<div class="kv"><h3>{escape(title)}</h3><table>{rows}</table></div>'


def page(title: str, subtitle_html: str, sections: Sequence[tuple[str, str, str]], footer_html: str) -> str:
    """The whole page: header, table of contents and ``sections`` as (id, heading, body HTML), then the footer."""
    toc = "\n".join(f'<li><a href="#{sid}">{escape(heading)}</a></li>' for sid, heading, _ in sections)
    body = "\n".join(f'<section id="{sid}">\n<h2>{escape(heading)}</h2>\n{html_body}\n</section>' for sid, heading, html_body in sections)
    return _PAGE.format(title=escape(title), style=_CSS, heading=escape(title), subtitle=subtitle_html, toc=toc, sections=body, footer=footer_html)


# ---------------------------------------------------------------------------------------------
# page

_CSS = """
:root { --fg:#1d232a; --dim:#66707a; --line:#d5d9de; --accent:#2b6cb0; --bg-soft:#f5f7f9; }
* { box-sizing: border-box; }
body { margin:0; font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; font-size:15px;
       line-height:1.5; color:var(--fg); background:#fff; }
header { padding:1.4rem 2rem 1rem; border-bottom:1px solid var(--line); background:var(--bg-soft); }
header h1 { margin:0 0 .3rem; font-size:1.6rem; font-weight:600; }
header p { margin:0; color:var(--dim); }
.layout { display:grid; grid-template-columns:210px minmax(0,1fr); gap:2rem; max-width:1400px; margin:0 auto; padding:0 2rem 3rem; }
nav.toc { position:sticky; top:0; align-self:start; padding:1.2rem 0; font-size:.9rem; }
nav.toc h2 { font-size:.8rem; text-transform:uppercase; letter-spacing:.06em; color:var(--dim); margin:0 0 .4rem; }
nav.toc ol { margin:0; padding-left:1.2rem; }
nav.toc li { margin:.2rem 0; }
a { color:var(--accent); text-decoration:none; }
a:hover { text-decoration:underline; }
main { min-width:0; }
section { padding-top:1.2rem; border-bottom:1px solid var(--line); padding-bottom:1.2rem; scroll-margin-top:.5rem; }
section h2 { font-size:1.35rem; margin:.2rem 0 .6rem; }
h3 { font-size:1.08rem; margin:1.2rem 0 .4rem; }
h4 { font-size:.98rem; margin:1rem 0 .3rem; color:#333; }
.caption { color:#444; background:var(--bg-soft); border-left:3px solid var(--accent); padding:.4rem .7rem; margin:.5rem 0 .9rem; max-width:70rem; }
.missing { color:var(--dim); font-style:italic; }
.dim { color:var(--dim); font-size:.85em; }
code { font-family: "SFMono-Regular", Consolas, "Liberation Mono", monospace; font-size:.88em; }
figure { margin:.4rem 0 1rem; }
figure img { max-width:100%; height:auto; display:block; border:1px solid #eceff2; }
figcaption { color:var(--dim); font-size:.88rem; margin-top:.25rem; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(440px, 1fr)); gap:1rem 1.5rem; align-items:start; }
.table-wrap { overflow-x:auto; margin:.4rem 0 1rem; }
table { border-collapse:collapse; font-size:.88rem; }
th, td { border:1px solid var(--line); padding:.25rem .55rem; text-align:left; vertical-align:top; }
thead th { background:var(--bg-soft); font-weight:600; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr.sig td { background:#eef8ee; }
.kv-row { display:flex; flex-wrap:wrap; gap:1rem 2rem; align-items:flex-start; }
.kv h3 { margin-top:.4rem; }
.kv th { background:var(--bg-soft); font-weight:600; white-space:nowrap; }
.swatch { display:inline-block; width:.8em; height:.8em; border-radius:2px; margin-right:.4em; vertical-align:baseline; }
ul.findings { margin:.2rem 0 .8rem; }
ul.findings li, ul.notes li, ul.rejected li { margin:.3rem 0; }
ul.rejected li { color:var(--dim); }
.notice { border-left:4px solid #d9822b; background:#fff6ec; padding:.4rem .8rem; margin:.4rem 0 1rem; }
details { margin:.2rem 0 1rem; }
summary { cursor:pointer; color:var(--accent); }
footer { color:var(--dim); font-size:.85rem; text-align:center; padding:1rem; }
@media (max-width: 900px) {
  .layout { display:block; padding:0 1rem 2rem; }
  nav.toc { background:#fff; border-bottom:1px solid var(--line); padding:.5rem 0; z-index:1; }
  nav.toc ol { display:flex; flex-wrap:wrap; gap:.2rem 1rem; list-style:none; padding:0; }
  .grid { grid-template-columns:1fr; }
}
@media print { nav.toc { display:none; } .layout { display:block; } }
""".strip()

_PAGE = """<!DOCTYPE html>
<html lang="en">
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
</body>
</html>
"""

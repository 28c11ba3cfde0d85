"""The self-contained HTML concept report of a results folder, and the figures conceptlens draws.

:func:`write_report` reads what a pipeline run wrote (``run.json``, ``probe_<model>_<method>.json``,
``compare_<method>/``, ``tcav.json``, ``examples/<model>.*``, ``prototypes/<model>.*``), or the
``--out`` folder of ``conceptlens probe``, ``compare`` or ``tcav``, draws every figure itself with
matplotlib (Agg, in memory), and writes ``<out>/report.html``: one file, inline CSS and script,
figures as ``data:image/png;base64`` URIs, no external resource, so that it opens offline and can
be mailed or archived as it is. The script only adds sorting, filtering and a one-concept-at-a-time
view; the page reads and prints in full without it. The bytes depend only on the results (no
timestamps, PNGs without a software tag), so rendering twice gives the same file.

Sections (``<section id=…>``), in page order: ``findings`` (each linked to the figure or table it
rests on), ``probe-quality``, ``concepts`` (the per-concept view), ``segmentation``, ``ncavs``,
``similarity``, ``tcav``, ``summary`` (versions, hashes). An input that the results lack leaves its
section with a "not run in this configuration" note.

Modules, one job each: :mod:`~conceptlens.report.results` (typed records of the result files,
shared with their writers), :mod:`~conceptlens.report.loading` (a results folder into
:class:`Results`), :mod:`~conceptlens.report.findings` (sentences from the numbers),
:mod:`~conceptlens.report.figures` (every figure, the heatmaps and concept-map overlays too),
:mod:`~conceptlens.report.svg` (inline SVG charts), :mod:`~conceptlens.report.anchors` (the ids
links point at), :mod:`~conceptlens.report.sections`, :mod:`~conceptlens.report.concept_view` and
:mod:`~conceptlens.report.html` (the page), :mod:`~conceptlens.report.assets` (its CSS and
script), :mod:`~conceptlens.report.formatting` (numbers as text), :mod:`~conceptlens.report.render`.
"""

from conceptlens.report.figures import (
    overlay_concept_maps,
    overlay_layout,
    similarity_heatmap,
)
from conceptlens.report.findings import findings, grouped_findings
from conceptlens.report.html import NOT_RUN
from conceptlens.report.loading import ReportError, Results, load_results
from conceptlens.report.render import render_report, write_report
from conceptlens.report.sections import SECTIONS

__all__ = [
    "NOT_RUN", "SECTIONS", "ReportError", "Results", "findings", "grouped_findings", "load_results", "overlay_concept_maps", "overlay_layout",
    "render_report", "similarity_heatmap", "write_report",
]

"""The report's per-concept view: one block per concept with everything the results say about it.

A block (``id`` from :func:`~conceptlens.report.anchors.concept_anchor`) holds the concept's
Net2Vec test set IoU across relative depth for every model beside its controls (an inline SVG
chart, exact values on hover, and the same numbers in a table), its segmentation on example test
images, its TCAV scores with run spread, CI and corrected p, and the NCAVs whose best overlap it
is, matched or not. Without the page's script every block is shown in sequence; with it, one at a
time, picked with a ``<select>`` or the index links.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from matplotlib.colors import to_hex

from conceptlens.report.anchors import concept_anchor, ncav_anchor, tcav_anchor
from conceptlens.report.figures import (
    CONTROL_STYLES,
    FigureSink,
    concept_color,
    concept_examples_figure,
)
from conceptlens.report.findings import ncav_controls, ncav_unmatched_reason
from conceptlens.report.formatting import f2, f3g, number, p_value
from conceptlens.report.html import Cell, caption, escape, figure, missing, num, table
from conceptlens.report.loading import Results
from conceptlens.report.results import ProbeResults
from conceptlens.report.svg import Point, Series, depth_chart

__all__ = ["MODEL_COLORS", "concept_names", "concept_view_section"]

#: Line colours of the models in the per-concept charts, in run order.
MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_CONTROL_LINE = {"random_weights": "dashed", "permuted_masks": "dotted"}


def concept_names(results: Results) -> list[str]:
    """Every concept of the results: the run's and the probes' (run order), then TCAV's."""
    names = list(results.concepts)
    for record in results.tcav.records if results.tcav else ():
        if record.concept not in names:
            names.append(record.concept)
    return names


def concept_view_section(results: Results, colors: Mapping[str, Any], sink: FigureSink) -> str:
    """The body of the per-concept section: a picker, an index of links and one block per concept.

    Parameters
    ----------
    results : Results
        The loaded results folder.
    colors : mapping
        Each concept's colour (:func:`~conceptlens.report.figures.concept_palette`).
    sink : FigureSink
        Turns the examples figures into PNG bytes.

    Returns
    -------
    str
        HTML.
    """
    names = concept_names(results)
    if not names:
        return missing("no concepts in the results: no run.json, probe or TCAV file names any")
    anchors = {name: concept_anchor(name) for name in names}
    parts = [caption("Everything the results say about one concept: its Net2Vec test set IoU across relative depth for every model "
                     "beside the controls (dashed: the same probe on a random-weights copy of the model; dotted: on masks permuted "
                     "across images; a filled point is a layer where the concept counts as encoded; hover a point for its values), "
                     "its segmentation on example test images, its TCAV scores and the NCAVs whose best overlap it is.")]
    options = "".join(f'<option value="{escape(anchors[n])}">{escape(n)}</option>' for n in names)
    parts.append('<div id="concept-view">')
    parts.append(f'<p class="concept-picker js-only"><label>Concept <select aria-label="concept to show">{options}</select></label></p>')
    parts.append('<ul class="concept-index">' + "".join(f'<li><a href="#{escape(anchors[n])}">{escape(n)}</a></li>' for n in names) + "</ul>")
    for name in names:
        parts.append(_concept_block(results, name, anchors[name], colors, sink))
    parts.append("</div>")
    return "\n".join(parts)


def _concept_block(results: Results, concept: str, anchor: str, colors: Mapping[str, Any], sink: FigureSink) -> str:
    color = to_hex(concept_color(colors, concept))
    parts = [f'<div class="concept-block" id="{escape(anchor)}">', f'<h3><span class="swatch" style="background:{color}"></span>{escape(concept)}</h3>']
    probes = [(m, results.probe(m, "net2vec")) for m in results.models if results.probe(m, "net2vec")]
    panels = []
    if probes:
        panels.append("<div><h4>Set IoU across relative depth</h4>" + _depth_chart(probes, concept) + "</div>")
    examples = {m: (e.meta, e.tensors) for m, e in results.examples.items()}
    drawn = concept_examples_figure(examples, concept, concept_color(colors, concept)) if examples else None
    if drawn is not None:
        panels.append("<div><h4>Segmentation examples</h4>" + figure(sink.png(drawn, f"concept_{concept}"), f"segmentation of {concept}") + "</div>")
    if panels:
        parts.append('<div class="concept-panels">' + "".join(panels) + "</div>")
    if probes:
        parts.append("<h4>Probe per layer, beside its controls</h4>")
        parts.append(_probe_table(probes, concept))
    else:
        parts.append(missing("no Net2Vec probe results"))
    parts.append("<h4>TCAV</h4>")
    parts.append(_tcav_table(results, concept))
    parts.append("<h4>NCAVs</h4>")
    parts.append(_ncav_table(results, concept))
    parts.append("</div>")
    return "\n".join(parts)


def _entry(probe: ProbeResults, layer: str, concept: str) -> dict[str, Any]:
    return probe.metrics.get(layer, {}).get(concept) or {}


def _control_iou(entry: Mapping[str, Any], kind: str) -> float:
    return number(((entry.get("controls") or {}).get(kind) or {}).get("set_iou"))


def _depth_chart(probes: list[tuple[str, ProbeResults]], concept: str) -> str:
    series, legend, styles = [], [], {}
    for index, (model, probe) in enumerate(probes):
        color = MODEL_COLORS[index % len(MODEL_COLORS)]
        layers, depths, ious = probe.curve(concept)
        entries = [_entry(probe, layer, concept) for layer in layers]
        controlled = any("encoded" in e for e in entries)
        best = max((i for i in range(len(ious)) if math.isfinite(ious[i])), key=lambda i: ious[i], default=None)
        points = [Point(d, v, _tooltip(model, layer, d, e, v), filled=not controlled or e.get("encoded") is True, highlight=i == best)
                  for i, (layer, d, v, e) in enumerate(zip(layers, depths, ious, entries))]
        series.append(Series(model, color, points))
        legend.append(Series(model, color))
        for kind, (label, _) in CONTROL_STYLES.items():
            values = [_control_iou(e, kind) for e in entries]
            if any(math.isfinite(v) for v in values):
                control_points = [Point(d, v, f"{model} · {layer} (relative depth {d:.2f}): {label} control set IoU {f3g(v)}")
                                  for layer, d, v in zip(layers, depths, values)]
                series.append(Series(f"{model}, {label} control", color, control_points, _CONTROL_LINE[kind]))
                styles[kind] = Series(f"{label} control", "#666666", style=_CONTROL_LINE[kind])
    if styles:
        legend += [styles[kind] for kind in CONTROL_STYLES if kind in styles]
    note = "Large point: best layer" + ("; filled: encoded, hollow: not encoded." if styles else ".") + " Hover a point for its values."
    return depth_chart(series, f"test set IoU of {concept} across relative depth", legend=legend) + f'<p class="dim">{note}</p>'


def _tooltip(model: str, layer: str, depth: float, entry: Mapping[str, Any], value: float) -> str:
    text = f"{model} · {layer} (relative depth {depth:.2f}): set IoU {f3g(value)}"
    for kind, (label, _) in CONTROL_STYLES.items():
        control = _control_iou(entry, kind)
        if math.isfinite(control):
            text += f"; {label} {f3g(control)}"
    if "encoded" in entry:
        text += "; encoded" if entry.get("encoded") is True else f"; not encoded ({entry.get('verdict') or 'does not clear its controls'})"
    return text


def _probe_table(probes: list[tuple[str, ProbeResults]], concept: str) -> str:
    rows = []
    for model, probe in probes:
        layers, depths, ious = probe.curve(concept)
        best = probe.best(concept)
        for layer, depth, iou in zip(layers, depths, ious):
            entry = _entry(probe, layer, concept)
            star = " ★" if best is not None and best.layer == layer else ""
            verdict = "—" if "encoded" not in entry else "encoded" if entry.get("encoded") is True else escape(entry.get("verdict") or "not encoded")
            rows.append([escape(model), f"<code>{escape(layer)}</code>{star}", num(depth, what="relative depth"), num(iou, what="set IoU"),
                         num(_control_iou(entry, "random_weights"), what="random-weights control set IoU"),
                         num(_control_iou(entry, "permuted_masks"), what="permuted-masks control set IoU"), verdict])
    head = ["model", "layer (★ best)", "depth", "set IoU", "random-weights control", "permuted-masks control", "verdict"]
    return table(head, rows, numeric=(2, 3, 4, 5), sortable=True)


def _tcav_table(results: Results, concept: str) -> str:
    tcav = results.tcav
    if tcav is None:
        return missing("no tcav.json")
    records = [r for r in tcav.records if r.concept == concept]
    if not records:
        return '<p class="dim">No TCAV hypothesis tests this concept.</p>'
    value = f3g if tcav.statistic == "mean_sensitivity" else f2
    rows = []
    for r in records:
        robust = {True: "robust", False: "not robust"}.get(r.robust, "")
        verdict = ("significant" + (f", {robust}" if robust else "")) if r.significant else "not significant"
        rows.append([f'<a href="#{escape(tcav_anchor(r.target))}">{escape(r.target)}</a>', f"<code>{escape(r.layer)}</code>",
                     num(r.mean, value, "mean over runs"), num(r.run_std, value, "sd across CAV runs"),
                     Cell(f"{value(r.ci_low)} – {value(r.ci_high)}", number(r.ci_low), f"bootstrap CI {f3g(r.ci_low)} to {f3g(r.ci_high)}"),
                     num(r.null_mean, value, "null mean (random CAVs)"), Cell(escape(p_value(r.adjusted_p(tcav.correction))), number(r.adjusted_p(tcav.correction))),
                     verdict])
    head = ["target", "layer", "score", "run sd", "CI", "null mean", f"p ({tcav.correction})", "verdict"]
    return table(head, rows, numeric=(2, 3, 4, 5, 6), row_class=lambda i: "sig" if records[i].significant else "", sortable=True)


def _ncav_table(results: Results, concept: str) -> str:
    rows = []
    for model in results.models:
        control, margin = ncav_controls(results, model)
        for layer, ncavs in results.ncav_labels(model).items():
            for ncav in ncavs:
                if ncav.label != concept:
                    continue
                floor = control.get((layer, ncav.name), number(ncav.control_iou))
                reason = ncav_unmatched_reason(ncav, floor, margin)
                status = "matches" if reason is None else f'<span class="unmatched">unmatched</span> <span class="dim">({escape(reason)})</span>'
                link = f'<a href="#{escape(ncav_anchor(model, layer))}">{escape(ncav.name or "")}</a>'
                rows.append([escape(model), f"<code>{escape(layer)}</code>", link, num(ncav.set_iou, what="set IoU"),
                             num(floor, what="permuted-masks control IoU"), status])
    if not rows:
        if not results.prototypes and not any(results.probe(m, "nmf") for m in results.models):
            return missing("no NMF probe or prototypes")
        return '<p class="dim">No NCAV matches this concept: none has it as its best overlap.</p>'
    return table(["model", "layer", "NCAV", "set IoU", "control IoU", "status"], rows, numeric=(3, 4), sortable=True)

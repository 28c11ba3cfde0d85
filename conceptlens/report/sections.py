"""The report's sections: each turns the loaded results into its HTML body (tables, figures, captions).

Key findings come first, each linked to the figure or table it rests on; the run summary (versions,
hashes, times) comes last. An input that the run did not produce leaves its section with a "not
run in this configuration" note (:func:`conceptlens.report.html.missing`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import to_hex

from conceptlens.concepts.compare.similarity import BLIND_LAYER_IOU
from conceptlens.report.anchors import (
    concept_anchor,
    ncav_anchor,
    pair_anchor,
    tcav_anchor,
)
from conceptlens.report.concept_view import concept_view_section
from conceptlens.report.figures import (
    CONTROL_STYLES,
    MAX_EXAMPLE_CONCEPTS,
    MAX_PROBE_LINES,
    FigureSink,
    concept_color,
    flow_figure,
    ncav_figure,
    probe_controls_figure,
    probe_figure,
    segmentation_figure,
    tcav_figure,
)
from conceptlens.report.findings import (
    NCAV_MATCH_IOU,
    NEAR_DIAGONAL,
    WELL_ENCODED_IOU,
    linked_findings,
    linked_rejections,
    ncav_controls,
    ncav_unmatched_reason,
    sample_size_notices,
)
from conceptlens.report.formatting import (
    METHOD_NAMES,
    duration,
    f2,
    f3g,
    number,
    p_value,
)
from conceptlens.report.html import (
    Cell,
    caption,
    escape,
    figure,
    key_values,
    missing,
    num,
    table,
)
from conceptlens.report.loading import Results
from conceptlens.report.results import TCAVResults

__all__ = ["SECTIONS", "section_bodies"]

#: Section ids and headings, in report order.
SECTIONS = (
    ("findings", "Key findings"),
    ("probe-quality", "Probe quality"),
    ("concepts", "Per concept"),
    ("segmentation", "Concept segmentation"),
    ("ncavs", "NCAVs (unsupervised concepts)"),
    ("similarity", "Layer similarity"),
    ("tcav", "TCAV"),
    ("summary", "Run summary (versions, hashes)"),
)

Colors = Mapping[str, Any]


def section_bodies(results: Results, colors: Colors, sink: FigureSink) -> dict[str, str]:
    """The HTML body of every section of :data:`SECTIONS`, by id; figures go through ``sink``.

    Draw under :data:`conceptlens.report.figures.STYLE` (``matplotlib.rc_context``) for the report's look.
    """
    bodies: dict[str, Callable[[], str]] = {
        "summary": lambda: _summary_section(results),
        "probe-quality": lambda: _probe_section(results, colors, sink),
        "concepts": lambda: concept_view_section(results, colors, sink),
        "segmentation": lambda: _segmentation_section(results, colors, sink),
        "ncavs": lambda: _ncav_section(results, sink),
        "similarity": lambda: _similarity_section(results, sink),
        "tcav": lambda: _tcav_section(results, colors, sink),
        "findings": lambda: _findings_section(results),
    }
    return {sid: bodies[sid]() for sid, _ in SECTIONS}


def _text(value: Any, default: str = "—") -> str:
    """``value`` escaped; ``default`` for a value the file did not hold."""
    return escape(default if value is None else value)


# ---------------------------------------------------------------------------------------------
# run summary


def _summary_section(results: Results) -> str:
    run = results.run
    if not run:
        return missing("no run.json in the results folder; the sections below use the files that are there")
    data = run.data
    run_pairs = [("name", _text(run.name)), ("started", _text(run.started)), ("seed", _text(run.seed)),
                 ("device", _text(run.device)), ("config hash", f"<code>{_text(run.config_hash)}</code>"),
                 ("total time", escape(duration(run.total_seconds)))]
    data_pairs = [("spec", f"<code>{_text(data.spec if data else None)}</code>"), ("name", _text(data.name if data else None)),
                  ("images", _text(data.n_images if data else None)),
                  ("splits", escape(" / ".join(f"{k} {v}" for k, v in (data.splits if data else {}).items()) or "—")),
                  ("concepts", escape(", ".join(data.concepts if data else ()) or "—"))]
    version_pairs = [(k, escape(v)) for k, v in run.versions.items()]
    parts = ['<div class="kv-row">', key_values("Run", run_pairs), key_values("Data", data_pairs)]
    if version_pairs:
        parts.append(key_values("Versions", version_pairs))
    parts.append("</div>")
    if run.models:
        parts.append("<h3>Models</h3>")
        rows = []
        for m in run.models:
            depths = m.depths or ()
            layers = [f"{escape(layer)} <span class=\"dim\">{f2(depths[i]) if i < len(depths) else ''}</span>" for i, layer in enumerate(m.layers)]
            rows.append([f"<b>{_text(m.name, '')}</b>", f"<code>{_text(m.spec, '')}</code>", _text(m.weights, ""),
                         f"<code>{escape(str(m.hash or '')[:12])}</code>", "<br>".join(layers)])
        parts.append(table(["name", "spec", "weights", "hash", "probed layers (relative depth)"], rows))
    if run.steps:
        parts.append("<h3>Time per step</h3>")
        rows = [[_text(s.name, ""), escape(duration(s.seconds)), "reused" if s.skipped else ""] for s in run.steps]
        total = sum(number(s.seconds) for s in run.steps if math.isfinite(number(s.seconds)))
        rows.append(["<b>total (sum of steps)</b>", f"<b>{escape(duration(total))}</b>", ""])
        parts.append(table(["step", "time", "skipped"], rows, numeric=(1,)))
    return "\n".join(parts)


def _sample_size_notice(results: Results) -> str:
    """A highlighted list of the results whose test split is too small (empty when none is)."""
    notices = sample_size_notices(results)
    if not notices:
        return ""
    items = "".join(f"<li>{escape(n[0].upper() + n[1:])}.</li>" for n in notices)
    return f'<div class="notice"><b>Sample size.</b><ul class="notes">{items}</ul></div>'


# ---------------------------------------------------------------------------------------------
# probes and segmentation


def _probe_section(results: Results, colors: Colors, sink: FigureSink) -> str:
    models = [m for m in results.models if results.probe(m, "net2vec")]
    linear = _linear_section(results)
    if not models:
        return missing("no Net2Vec probe results, probe_<model>_net2vec.json") + linear
    concepts = results.concepts
    shape = "line" if len(concepts) <= MAX_PROBE_LINES else "row"
    parts = [caption(f"Each {shape} is one concept: its set IoU on the held-out test images (pixels pooled over the whole set) when a linear "
                     "Net2Vec probe reads it from the layer on the x axis. Higher is better; the star marks the concept's best layer. "
                     "Relative depth 0 is the model's shallowest probed layer, 1 its deepest.")]
    parts.append('<div class="grid">')
    for model in models:
        drawn = probe_figure(results.probe(model, "net2vec"), model, concepts, colors)
        parts.append(figure(sink.png(drawn, f"probe_{model}"), f"probe quality of {model}") if drawn else missing(f"no set IoU in probe_{model}_net2vec.json"))
    parts.append("</div>")
    controlled = [(m, probe_controls_figure(results.probe(m, "net2vec"), m, concepts, colors)) for m in models]
    if any(drawn for _, drawn in controlled):
        parts.append("<h3>Probe vs controls across depth</h3>")
        parts.append(caption("Per concept, the probe's test set IoU (solid) beside the same probe on a random-weights copy of the model "
                             "(dashed) and on masks permuted across images (dotted). A filled marker is a layer where the concept counts as "
                             "encoded: it clears both controls by the margin and the bootstrap CI of the difference excludes zero."))
        for model, drawn in controlled:
            if drawn:
                parts.append(figure(sink.png(drawn, f"probe_controls_{model}"), f"probe vs controls of {model}"))
    parts.append("<h3>Best layer per concept</h3>")
    parts.append(_best_layer_table(results, models, colors))
    parts.append(linear)
    return "\n".join(parts)


def _linear_section(results: Results) -> str:
    """The held-out accuracy of image-level linear CAVs (``probe_linear.json``), per model, layer and concept; empty without them."""
    rows = []
    for model in results.models:
        probe = results.probe(model, "linear")
        for layer, by_concept in (probe.metrics if probe else {}).items():
            for concept, entry in by_concept.items():
                rows.append([escape(model), f"<code>{escape(layer)}</code>", escape(concept), num(entry.get("accuracy_mean"), what="mean held-out accuracy"),
                             num(entry.get("accuracy_std"), what="sd over runs")])
    if not rows:
        return ""
    return ("<h3>Linear CAVs (image level)</h3>"
            + caption("Held-out accuracy of linear CAVs separating each concept's images from random images, mean and sd over the runs "
                      "(one random set each); 0.5 is chance.")
            + table(["model", "layer", "concept", "accuracy", "sd"], rows, numeric=(3, 4), sortable=True, filterable=True))


def _best_layer_table(results: Results, models: list[str], colors: Colors) -> str:
    """Per concept and model, the best layer with its set IoU beside the controls' at that layer (when the probe has them)."""
    controlled = any("encoded" in entry for m in models for by_concept in results.probe(m, "net2vec").metrics.values()
                     for entry in by_concept.values() if isinstance(entry, dict))
    rows = []
    for concept in results.concepts:
        name = (f'<span class="swatch" style="background:{to_hex(concept_color(colors, concept))}"></span>'
                f'<a href="#{escape(concept_anchor(concept))}">{escape(concept)}</a>')
        for model in models:
            probe = results.probe(model, "net2vec")
            best = probe.best(concept)
            row = [Cell(name, sort=concept), escape(model)]
            row += [f"<code>{escape(best.layer)}</code>", num(best.depth, what="relative depth"), num(best.set_iou, what="test set IoU")] if best else ["—", "", ""]
            if controlled:
                entry = (probe.metrics.get(best.layer, {}).get(concept) or {}) if best else {}
                controls = entry.get("controls") or {}
                row += [num((controls.get(kind) or {}).get("set_iou"), what=f"{label} control set IoU") for kind, (label, _) in CONTROL_STYLES.items()]
                row.append("—" if "encoded" not in entry else "encoded" if entry.get("encoded") is True else escape(entry.get("verdict") or "not encoded"))
            rows.append(row)
    head = ["concept", "model", "best layer", "depth", "set IoU"]
    if controlled:
        head += ["random-weights control", "permuted-masks control", "verdict at that layer"]
    return table(head, rows, numeric=(3, 4, 5, 6), sortable=True, filterable=True)


def _segmentation_section(results: Results, colors: Colors, sink: FigureSink) -> str:
    if not results.examples:
        return missing("no segmentation examples, examples/<model>.json")
    parts = [caption(f"Test images with the ground-truth concept masks (middle) and the Net2Vec prediction, probability above 0.5 (right), in the same "
                     f"colours. Each concept is read from its own best layer (named in the legend, with the IoU on this image); at most "
                     f"{MAX_EXAMPLE_CONCEPTS} concepts present in the image are drawn, the largest first.")]
    for model, example in results.examples.items():
        drawn = segmentation_figure(example.meta, example.tensors, model, colors)
        parts.append(f"<h3>{escape(model)}</h3>")
        parts.append(figure(sink.png(drawn, f"segmentation_{model}"), f"segmentation examples of {model}") if drawn else missing("no example images"))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# NCAVs


def _ncav_section(results: Results, sink: FigureSink) -> str:
    nmf_models = [m for m in results.models if results.probe(m, "nmf")]
    if not results.prototypes and not nmf_models:
        return missing("no NMF probe, probe_<model>_nmf.json, and no prototypes/<model>.json")
    parts = [caption(f"NMF splits a layer's activations into k non-negative concept directions (NCAVs) without labels. Each row shows the "
                     f"image patches where one NCAV is most active, dimmed where its map is weak and outlined (yellow) where it reaches half "
                     f"its peak. The label is the known concept its map overlaps best (set IoU on the test images); an NCAV reads "
                     f"<i>unmatched</i> when that overlap is below {NCAV_MATCH_IOU:g} or, with controls, does not exceed its permuted-masks "
                     "control by the margin. The relative reconstruction error ‖V − SP‖/‖V‖ says how much of the layer the NCAVs leave "
                     "unexplained: lower is better; the held-out one is on test images.")]
    for model in results.models:
        proto = results.prototypes.get(model)
        probe = results.probe(model, "nmf")
        if not proto and not probe:
            continue
        parts.append(f"<h3>{escape(model)}</h3>")
        labels = results.ncav_labels(model)
        control, margin = ncav_controls(results, model)
        fidelities = proto.meta.fidelity if proto else {}
        layers = list((proto.meta.layers if proto else ()) or (probe.layers if probe else None) or labels.keys())
        rows = []
        for layer in layers:
            fidelity = fidelities.get(layer)
            first = next(iter(((probe.metrics if probe else {}).get(layer) or {}).values()), {})
            if fidelity is None:
                fidelity = first.get("fidelity")
            ncavs = labels.get(layer, [])
            matched = [f"{escape(n.label)} ({f2(n.set_iou)})" for n in ncavs
                       if ncav_unmatched_reason(n, control.get((layer, n.name), number(n.control_iou)), margin) is None]
            link = f'<a href="#{escape(ncav_anchor(model, layer))}"><code>{escape(layer)}</code></a>' if proto else f"<code>{escape(layer)}</code>"
            rows.append([link, str(len(ncavs)), num(fidelity, what="held-out relative reconstruction error"),
                         num(first.get("relative_error"), what="training relative reconstruction error"), ", ".join(matched) or '<span class="unmatched">none</span>'])
        parts.append(table(["layer", "NCAVs", "relative reconstruction error (held-out)", "relative reconstruction error (training)",
                            "matched concepts (set IoU)"], rows, numeric=(1, 2, 3)))
        parts.append(_ncav_table(model, labels, control, margin))
        if not proto:
            parts.append(missing("no prototype patches, prototypes/<model>.json"))
            continue
        parts += _ncav_figures(model, proto, labels, control, margin, sink)
    return "\n".join(parts)


def _ncav_table(model: str, labels: Mapping[str, Any], control: Mapping[tuple[str, str], float], margin: float | None) -> str:
    """Every NCAV of ``model``: its best-overlapping concept, set IoU, control and whether it matches, in a sortable table."""
    rows = []
    for layer, ncavs in labels.items():
        for ncav in ncavs:
            floor = control.get((layer, ncav.name), number(ncav.control_iou))
            reason = ncav_unmatched_reason(ncav, floor, margin)
            status = escape(ncav.label) if reason is None else f'<span class="unmatched">unmatched</span> <span class="dim">({escape(reason)})</span>'
            rows.append([f"<code>{escape(layer)}</code>", escape(ncav.name or ""), status, escape(ncav.label or "—"), num(ncav.set_iou, what="set IoU"),
                         num(floor, what="permuted-masks control IoU")])
    head = ["layer", "NCAV", "matched concept", "best overlap", "set IoU", "control IoU"]
    return (f"<details><summary>every NCAV of {escape(model)}: matched concept, set IoU and control ({len(rows)} rows)</summary>"
            + table(head, rows, numeric=(4, 5), sortable=True, filterable=True) + "</details>")


def _ncav_figures(model: str, proto: Any, labels: Mapping[str, Any], control: Mapping[tuple[str, str], float], margin: float | None,
                  sink: FigureSink) -> list[str]:
    """The prototype figure of every layer of ``model`` (larger patches, where the NCAV fires when the results hold its maps)."""
    parts = ['<div class="grid ncav-grid">']
    for index, layer in enumerate(proto.meta.layers):
        patches = proto.tensors.get(f"patches_{index}")
        if patches is None or patches.ndim != 5 or patches.shape[0] == 0:
            continue
        heat = proto.tensors.get(f"heat_{index}")
        heat = heat if heat is not None and heat.shape == patches.shape[:4] else None
        ncavs = proto.meta.ncavs.get(layer) or labels.get(layer, [])
        matched = [ncav_unmatched_reason(n, control.get((layer, n.name), number(n.control_iou)), margin) is None for n in ncavs]
        drawn = ncav_figure(patches, ncavs, model, layer, matched, heat)
        note = "" if heat is not None else " · no activation maps in these results (run the prototypes step again to see where each NCAV fires)"
        parts.append(figure(sink.png(drawn, f"ncavs_{model}_{layer}"), f"NCAV prototypes of {model} {layer}",
                            f"<code>{escape(layer)}</code> · held-out relative reconstruction error {f2(proto.meta.fidelity.get(layer))}{escape(note)}",
                            anchor=ncav_anchor(model, layer)))
    parts.append("</div>")
    return parts


# ---------------------------------------------------------------------------------------------
# layer similarity


def _similarity_section(results: Results, sink: FigureSink) -> str:
    if not results.compare:
        return missing("no layer comparison, compare_<method>/compare.json")
    parts = []
    flow = flow_figure(results.models, results.compare)
    if flow is not None:
        parts.append("<h3>Semantic flow within each model</h3>")
        parts.append(caption("Similarity of each probed layer to the next deeper one. High values mean the concepts a layer encodes "
                             "carry over to the next; a dip marks where the representation changes most."))
        parts.append(figure(sink.png(flow, "semantic_flow"), "semantic flow"))
    parts.append("<h3>Layer × layer similarity</h3>")
    parts.append(caption("Both axes are ordered by relative depth; a cell is the similarity of a row layer and a column layer on the same test "
                         "images (supervised: mean concept set IoU of the Net2Vec maps; unsupervised: NCAV best-match set IoU; linear CKA as "
                         "a representation baseline). Red dots mark each row's best match (the ridge): a ridge along the dashed diagonal "
                         "means the models learn the same concepts at similar relative depths."))
    if any(block.corrected is not None for c in results.compare.values() for block in c.blocks):
        parts.append(caption("With controls, each heatmap shows the chance-corrected score (s − null)/(1 − null): 0 is what images "
                             "permuted between the two layers give, 1 a perfect match; hatched cells are not significant (permutation "
                             "p-value, Holm over the block's cells). The raw scores, nulls, p-values and CIs are in compare.json and compare.csv."))
    parts += _heatmap_grids(results)
    parts.append("<h3>Ridges</h3>")
    parts.append(caption("Per model pair, each row layer's best-matching column layer (within a model: the best other layer), the mean "
                         "relative-depth gap |d_A − d_B| of these matches and the correlation of their depths."))
    parts.append(table(["method", "pair", "", "best match per row (similarity)", "mean |d_A − d_B|", "depth r"], _ridge_rows(results), numeric=(4, 5)))
    cells = _ridge_cells(results)
    if cells:
        parts.append("<h3>Best matches against their null</h3>")
        parts.append(caption("Every best match of the ridges above: the raw similarity, the mean similarity of images permuted between the "
                             "two layers (the null), the chance-corrected similarity (s − null)/(1 − null), its bootstrap CI and the "
                             "permutation p-value; significant after Holm correction over the block's cells."))
        parts.append(table(["method", "pair", "row layer", "best match", "|d_A − d_B|", "similarity", "null", "corrected", "CI (raw)", "p", "significant"],
                           cells, numeric=(4, 5, 6, 7, 8, 9), sortable=True, filterable=True))
    return "\n".join(parts)


def _matrix_cell(matrices: Mapping[str, Any], i: int, j: int) -> Callable[[str], Any]:
    """A reader of cell (i, j) of each matrix in ``matrices`` by key (None for a matrix that is missing)."""
    return lambda key: matrices[key][i][j] if matrices.get(key) is not None else None


def _ridge_cells(results: Results) -> list[list[str | Cell]]:
    """One row per ridge pair of every block with controls: raw, null, corrected, CI, p and significance."""
    rows: list[list[str | Cell]] = []
    for method, result in results.compare.items():
        depth_of = result.depth_of()
        for block in result.blocks:
            controls = block.controlled("")
            if controls is None:
                continue
            for i, j, da, db, score in block.ridge_pairs(depth_of):
                value = _matrix_cell(controls, i, j)
                significant = value("significant")
                rows.append([escape(METHOD_NAMES.get(method, method)), f'<a href="#{escape(pair_anchor(block.a, block.b))}">{escape(f"{block.a} vs {block.b}")}</a>',
                             f"<code>{escape(block.rows[i])}</code>", f"<code>{escape(block.columns[j])}</code>", num(abs(da - db), what="depth gap"),
                             num(score, what="raw similarity"), num(value("null_mean"), what="permutation null mean"),
                             num(value("corrected"), what="chance-corrected similarity"),
                             Cell(f"{f2(value('ci_low'))} – {f2(value('ci_high'))}", number(value("ci_low")), "bootstrap CI of the raw similarity"),
                             Cell(escape(p_value(value("p_value"))), number(value("p_value"))), "✔" if significant is True else "✘" if significant is False else "—"])
    return rows


def _heatmap_grids(results: Results) -> list[str]:
    """Per model pair, the comparisons' heatmaps side by side (CKA pooled beside them, spatial folded away)."""
    parts = []
    compare, heatmaps = results.compare, results.heatmaps
    for a, b in dict.fromkeys((block.a, block.b) for c in compare.values() for block in c.blocks):
        stem = f"{a}_vs_{b}"
        parts.append(f"<h4 id=\"{escape(pair_anchor(a, b))}\">{escape(f'within {a}' if a == b else f'{a} (rows) vs {b} (columns)')}</h4>")
        figures = []
        for method in compare:
            data = _heatmap(heatmaps.get(method, {}), f"{method}_{stem}.png")
            figures.append(figure(data, f"{method} {stem}", escape(METHOD_NAMES.get(method, method))) if data else missing(f"no {method}_{stem}.png"))
        cka = {mode: next((d for d in (_heatmap(heatmaps.get(m, {}), f"cka_{mode}_{stem}.png") for m in compare) if d), None) for mode in ("pooled", "spatial")}
        if cka["pooled"]:
            figures.append(figure(cka["pooled"], f"CKA pooled {stem}", "linear CKA (pooled)"))
        parts.append('<div class="grid">' + "".join(figures) + "</div>")
        if cka["spatial"]:
            parts.append(f"<details><summary>linear CKA (spatial)</summary>{figure(cka['spatial'], f'CKA spatial {stem}')}</details>")
    return parts


def _ridge_rows(results: Results) -> list[list[str]]:
    rows = []
    for method, result in results.compare.items():
        depth_of = result.depth_of()
        for block in result.blocks:
            pairs = block.ridge_pairs(depth_of)
            if not pairs:
                continue
            gap = np.mean([abs(p[2] - p[3]) for p in pairs])
            matches = "<br>".join(f"{escape(block.rows[i])} → {escape(block.columns[j])} <span class=\"dim\">{f2(score)}</span>" for i, j, _, _, score in pairs)
            kind = "within" if block.a == block.b else "cross"
            rows.append([escape(METHOD_NAMES.get(method, method)), escape(f"{block.a} vs {block.b}"), kind, matches, f2(gap),
                         f2(block.ridge.depth_correlation if block.ridge else None)])
    return rows


def _heatmap(files: Mapping[str, Path], name: str) -> bytes | None:
    """The PNG bytes of the heatmap file ``name``; None when missing or not a PNG."""
    path = files.get(name)
    if path is None:
        return None
    data = path.read_bytes()
    return data if data.startswith(b"\x89PNG\r\n\x1a\n") else None


# ---------------------------------------------------------------------------------------------
# TCAV and findings


def _tcav_test_name(tcav: TCAVResults) -> str:
    """The significance test the run used, as the caption names it."""
    if tcav.test in (None, "ttest"):
        return "two-sided t-test"
    return "exact two-sided permutation test of the runs against the null CAVs" if tcav.test == "permutation" else escape(tcav.test)


def _tcav_section(results: Results, colors: Colors, sink: FigureSink) -> str:
    tcav = results.tcav
    if not tcav:
        return missing("no tcav.json: TCAV was not part of this run")
    records, statistic, correction, alpha = tcav.records, tcav.statistic, tcav.correction, number(tcav.alpha)
    n_hypotheses = tcav.n_hypotheses if tcav.n_hypotheses is not None else len(records)
    parts = [caption(f"TCAV score = fraction of the target's inputs whose output grows when the activation moves towards the concept "
                     f"(statistic <code>{escape(statistic)}</code>). Each bar runs from the null (the black tick: the mean score of random-vs-random CAVs) "
                     f"to the mean over CAVs trained against different random sets, so a score no better than chance draws no bar; "
                     f"faded bars are not significant. Whiskers are the "
                     f"bootstrap confidence interval, the purple line the spread (± sd) across CAV runs. A star marks a "
                     f"significant difference from the null: {_tcav_test_name(tcav)}, {escape(correction)} correction over "
                     f"{escape(n_hypotheses)} hypotheses, α = {alpha:g}.")]
    if not records:
        parts.append(missing("tcav.json has no records"))
    shown = tcav.target_labels or {}  # display names with the class name
    for target in dict.fromkeys(r.target for r in records):
        drawn = tcav_figure([r for r in records if r.target == target], shown.get(target, target), statistic, colors, f" (p_{correction} < {alpha:g})")
        parts.append(figure(sink.png(drawn, f"tcav_{target}"), f"TCAV scores for {shown.get(target, target)}", anchor=tcav_anchor(target)))
    if records:
        value = f3g if statistic == "mean_sensitivity" else f2
        rows = [[Cell(f'<a href="#{escape(concept_anchor(r.concept))}">{escape(r.concept)}</a>', sort=r.concept), f"<code>{escape(r.layer)}</code>",
                 escape(shown.get(r.target, r.target)), num(r.mean, value, "mean over runs"), num(r.null_mean, value, "null mean (random CAVs)"),
                 Cell(f"{value(r.ci_low)} – {value(r.ci_high)}", number(r.ci_low), f"bootstrap CI {f3g(r.ci_low)} to {f3g(r.ci_high)}"),
                 Cell(escape(p_value(r.p)), number(r.p)), Cell(escape(p_value(r.adjusted_p(correction))), number(r.adjusted_p(correction))),
                 "✔" if r.significant else ""]
                for r in records]
        head = ["concept", "layer", "target", "mean", "null mean", "CI", "p", f"p ({correction})", "significant"]
        if any(r.run_std is not None or r.robust is not None for r in records):  # controls: run spread, robustness, degenerate layers
            head += ["run sd", "robust", "layer note"]
            for row, r in zip(rows, records):
                row += [num(r.run_std, value, "sd across CAV runs"), {True: "✔", False: "✘"}.get(r.robust, "—"), "degenerate" if r.degenerate_layer else ""]
        parts.append(table(head, rows, numeric=(3, 4, 5, 6, 7, 9), row_class=lambda i: "sig" if records[i].significant else "", sortable=True, filterable=True))
    if tcav.missing_lines:
        parts.append("<h3>Inputs left out</h3><ul class=\"notes\">" + "".join(f"<li>{escape(line)}</li>" for line in tcav.missing_lines) + "</ul>")
    return "\n".join(parts)


def _findings_section(results: Results) -> str:
    groups = linked_findings(results)
    notice = _sample_size_notice(results)
    if not groups:
        return notice + missing("no results to summarise")
    parts = [notice, caption(f"Sentences computed from the numbers in the sections below; each links to the figure or table it rests on. "
                             f"Thresholds: a concept counts as encoded from set IoU {BLIND_LAYER_IOU:g}, as well encoded from "
                             f"{WELL_ENCODED_IOU:g}; an NCAV matches a concept from set IoU {NCAV_MATCH_IOU:g}; a ridge is near the diagonal "
                             f"when its mean |d_A − d_B| is at most {NEAR_DIAGONAL:g}.")]
    for heading, items in groups:  # sentences start with a plain word (see findings): capitalising it keeps identifiers intact
        parts.append(f"<h3>{escape(heading)}</h3>")
        parts.append("<ul class=\"findings\">" + "".join(f"<li>{escape(f.text[0].upper() + f.text[1:])}.{_see(f.anchor)}</li>" for f in items) + "</ul>")
    rejected = linked_rejections(results)
    if rejected:
        parts.append("<h3>Not distinguishable from control</h3>")
        parts.append(caption("Claims the raw numbers suggest but the controls, nulls or robustness checks do not support, with the reason."))
        parts.append("<ul class=\"rejected\">" + "".join(f"<li>{escape(r.claim[0].upper() + r.claim[1:])}: {escape(r.reason)}.{_see(r.anchor)}</li>"
                                                        for r in rejected) + "</ul>")
    return "\n".join(parts)


#: What a finding's link says, by the kind of element its anchor names (the first prefix that matches).
_SEE = (("concept-", "per-concept view"), ("similarity-", "heatmaps"), ("ncavs-", "prototypes"), ("tcav-", "TCAV chart"), ("tcav", "TCAV table"))


def _see(anchor: str) -> str:
    """The link after a finding to the element it rests on (none without an anchor)."""
    if not anchor:
        return ""
    label = next((text for prefix, text in _SEE if anchor.startswith(prefix)), "figure")
    return f' <a class="ref" href="#{escape(anchor)}">→ {label}</a>'

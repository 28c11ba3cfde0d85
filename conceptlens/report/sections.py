"""The report's sections: each turns the loaded results into its HTML body (tables, figures, captions).

An input that the run did not produce leaves its section with a "not run in this configuration"
note (:func:`conceptlens.report.html.missing`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import to_hex

from conceptlens.concepts.compare.similarity import BLIND_LAYER_IOU
from conceptlens.report.figures import (
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
    grouped_findings,
    not_distinguishable,
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
from conceptlens.report.html import caption, escape, figure, key_values, missing, table
from conceptlens.report.loading import Results

__all__ = ["SECTIONS", "section_bodies"]

#: Section ids and headings, in report order.
SECTIONS = (
    ("summary", "Run summary"),
    ("probe-quality", "Probe quality"),
    ("segmentation", "Concept segmentation"),
    ("ncavs", "NCAVs (unsupervised concepts)"),
    ("similarity", "Layer similarity"),
    ("tcav", "TCAV"),
    ("findings", "Findings"),
)

Colors = Mapping[str, Any]


def section_bodies(results: Results, colors: Colors, sink: FigureSink) -> dict[str, str]:
    """The HTML body of every section of :data:`SECTIONS`, by id; figures go through ``sink``.

    Draw under :data:`conceptlens.report.figures.STYLE` (``matplotlib.rc_context``) for the report's look.
    """
    bodies: dict[str, Callable[[], str]] = {
        "summary": lambda: _summary_section(results),
        "probe-quality": lambda: _probe_section(results, colors, sink),
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
    parts = [_sample_size_notice(results)]
    parts += ['<div class="kv-row">', key_values("Run", run_pairs), key_values("Data", data_pairs)]
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
    if not models:
        return missing("no Net2Vec probe results, probe_<model>_net2vec.json")
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
    head = ("<tr><th rowspan=\"2\">concept</th>" + "".join(f'<th colspan="3">{escape(m)}</th>' for m in models) + "</tr><tr>"
            + "".join("<th>best layer</th><th>depth</th><th>set IoU</th>" for _ in models) + "</tr>")
    rows = []
    for concept in concepts:
        row = [f'<span class="swatch" style="background:{to_hex(concept_color(colors, concept))}"></span>{escape(concept)}']
        for model in models:
            best = results.probe(model, "net2vec").best(concept)
            row += [f"<code>{escape(best.layer)}</code>", f2(best.depth), f2(best.set_iou)] if best else ["—", "—", "—"]
        rows.append(row)
    numeric = [i for m in range(len(models)) for i in (2 + 3 * m, 3 + 3 * m)]
    parts.append("<h3>Best layer per concept</h3>")
    parts.append(table([], rows, numeric=numeric, head_html=head))
    return "\n".join(parts)


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
    parts = [caption("NMF splits a layer's activations into k non-negative concept directions (NCAVs) without labels. Each row shows the image "
                     "patches where one NCAV is most active; the label is the known concept its map overlaps best (set IoU on the test "
                     "images). Fidelity is the relative reconstruction error ‖V − SP‖/‖V‖ on held-out images: lower means the NCAVs "
                     "explain more of the layer.")]
    for model in results.models:
        proto = results.prototypes.get(model)
        probe = results.probe(model, "nmf")
        if not proto and not probe:
            continue
        parts.append(f"<h3>{escape(model)}</h3>")
        labels = results.ncav_labels(model)
        fidelities = proto.meta.fidelity if proto else {}
        layers = list((proto.meta.layers if proto else ()) or (probe.layers if probe else None) or labels.keys())
        rows = []
        for layer in layers:
            fidelity = fidelities.get(layer)
            first = next(iter(((probe.metrics if probe else {}).get(layer) or {}).values()), {})
            if fidelity is None:
                fidelity = first.get("fidelity")
            matched = [f"{escape(n.label)} ({f2(n.set_iou)})" for n in labels.get(layer, []) if n.label]
            rows.append([f"<code>{escape(layer)}</code>", str(len(labels.get(layer, []))), f2(fidelity), f2(first.get("relative_error")), ", ".join(matched) or "—"])
        parts.append(table(["layer", "NCAVs", "fidelity (held-out rel. error)", "training rel. error", "matched concepts (set IoU)"], rows, numeric=(1, 2, 3)))
        if not proto:
            parts.append(missing("no prototype patches, prototypes/<model>.json"))
            continue
        parts.append('<div class="grid">')
        for index, layer in enumerate(proto.meta.layers):
            patches = proto.tensors.get(f"patches_{index}")
            if patches is None or patches.ndim != 5 or patches.shape[0] == 0:
                continue
            ncavs = proto.meta.ncavs.get(layer) or labels.get(layer, [])
            drawn = ncav_figure(patches, ncavs, model, layer)
            parts.append(figure(sink.png(drawn, f"ncavs_{model}_{layer}"), f"NCAV prototypes of {model} {layer}",
                                f"<code>{escape(layer)}</code> · fidelity (relative error) {f2(fidelities.get(layer))}"))
        parts.append("</div>")
    return "\n".join(parts)


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
    return "\n".join(parts)


def _heatmap_grids(results: Results) -> list[str]:
    """Per model pair, the comparisons' heatmaps side by side (CKA pooled beside them, spatial folded away)."""
    parts = []
    compare, heatmaps = results.compare, results.heatmaps
    for a, b in dict.fromkeys((block.a, block.b) for c in compare.values() for block in c.blocks):
        stem = f"{a}_vs_{b}"
        parts.append(f"<h4>{escape(f'within {a}' if a == b else f'{a} (rows) vs {b} (columns)')}</h4>")
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


def _tcav_section(results: Results, colors: Colors, sink: FigureSink) -> str:
    tcav = results.tcav
    if not tcav:
        return missing("no tcav.json: TCAV was not part of this run")
    records, statistic, correction, alpha = tcav.records, tcav.statistic, tcav.correction, number(tcav.alpha)
    n_hypotheses = tcav.n_hypotheses if tcav.n_hypotheses is not None else len(records)
    parts = [caption(f"TCAV score = fraction of the target's inputs whose output grows when the activation moves towards the concept "
                     f"(statistic <code>{escape(statistic)}</code>). Bars are means over CAVs trained against different random sets, whiskers the "
                     f"bootstrap confidence interval, the black tick the mean score of random-vs-random CAVs (the null). A star marks a "
                     f"significant difference from the null: two-sided t-test, {escape(correction)} correction over "
                     f"{escape(n_hypotheses)} hypotheses, α = {alpha:g}.")]
    if not records:
        parts.append(missing("tcav.json has no records"))
    for target in dict.fromkeys(r.target for r in records):
        drawn = tcav_figure([r for r in records if r.target == target], target, statistic, colors, f" (p_{correction} < {alpha:g})")
        parts.append(figure(sink.png(drawn, f"tcav_{target}"), f"TCAV scores for {target}"))
    if records:
        value = f3g if statistic == "mean_sensitivity" else f2
        rows = [[escape(r.concept), f"<code>{escape(r.layer)}</code>", escape(r.target), value(r.mean), value(r.null_mean),
                 f"{value(r.ci_low)} – {value(r.ci_high)}", escape(p_value(r.p)), escape(p_value(r.adjusted_p(correction))), "✔" if r.significant else ""]
                for r in records]
        head = ["concept", "layer", "target", "mean", "null mean", "CI", "p", f"p ({correction})", "significant"]
        if any(r.run_std is not None or r.robust is not None for r in records):  # controls: run spread, robustness, degenerate layers
            head += ["run sd", "robust", "layer note"]
            for row, r in zip(rows, records):
                row += [value(r.run_std), {True: "✔", False: "✘"}.get(r.robust, "—"), "degenerate" if r.degenerate_layer else ""]
        parts.append(table(head, rows, numeric=(3, 4, 5, 6, 7), row_class=lambda i: "sig" if records[i].significant else ""))
    if tcav.missing_lines:
        parts.append("<h3>Inputs left out</h3><ul class=\"notes\">" + "".join(f"<li>{escape(line)}</li>" for line in tcav.missing_lines) + "</ul>")
    return "\n".join(parts)


def _findings_section(results: Results) -> str:
    groups = grouped_findings(results)
    if not groups:
        return missing("no results to summarise")
    parts = [caption(f"Sentences computed from the numbers in the sections above. Thresholds: a concept counts as encoded from set IoU "
                     f"{BLIND_LAYER_IOU:g}, as well encoded from {WELL_ENCODED_IOU:g}; an NCAV matches a concept from set IoU {NCAV_MATCH_IOU:g}; "
                     f"a ridge is near the diagonal when its mean |d_A − d_B| is at most {NEAR_DIAGONAL:g}.")]
    for heading, sentences in groups:  # sentences start with a plain word (see findings): capitalising it keeps identifiers intact
        parts.append(f"<h3>{escape(heading)}</h3>")
        parts.append("<ul class=\"findings\">" + "".join(f"<li>{escape(s[0].upper() + s[1:])}.</li>" for s in sentences) + "</ul>")
    rejected = not_distinguishable(results)
    if rejected:
        parts.append("<h3>Not distinguishable from control</h3>")
        parts.append(caption("Claims the raw numbers suggest but the controls, nulls or robustness checks do not support, with the reason."))
        parts.append("<ul class=\"rejected\">" + "".join(f"<li>{escape(claim[0].upper() + claim[1:])}: {escape(reason)}.</li>" for claim, reason in rejected) + "</ul>")
    notices = sample_size_notices(results)
    if notices:
        parts.append("<h3>Sample size</h3><ul class=\"notes\">" + "".join(f"<li>{escape(n[0].upper() + n[1:])}.</li>" for n in notices) + "</ul>")
    return "\n".join(parts)

"""Sentences computed from the numbers of a results folder (only what the data supports).

Every sentence starts with a plain word (never a model, layer or concept name), so that the report
can capitalise its first letter without changing an identifier.
"""

from __future__ import annotations

import math

import numpy as np

from conceptlens.concepts.compare.similarity import BLIND_LAYER_IOU
from conceptlens.report.formatting import (
    METHOD_NAMES,
    STATISTIC_NAMES,
    f2,
    f3g,
    join_words,
    number,
    p_phrase,
)
from conceptlens.report.loading import Results
from conceptlens.report.results import BestLayer, TCAVResults

__all__ = ["MAX_TCAV_FINDINGS", "NCAV_MATCH_IOU", "NEAR_DIAGONAL", "WELL_ENCODED_IOU", "findings", "grouped_findings"]

#: A shallowest layer is "already well encoded" at set IoU ≥ this and ≥ 90 % of the concept's best.
WELL_ENCODED_IOU = 0.5
#: An NCAV "matches" a concept (in the findings) from this set IoU on.
NCAV_MATCH_IOU = 0.2
#: A ridge "lies near the diagonal" when the mean |d_A − d_B| of its pairs is at most this.
NEAR_DIAGONAL = 0.2
#: At most this many significant TCAV hypotheses are listed one by one in the findings.
MAX_TCAV_FINDINGS = 8


def findings(results: Results) -> list[str]:
    """Sentences computed from the numbers of :func:`~conceptlens.report.load_results`.

    Covers: where each concept is best encoded (relative depth, layer, set IoU) per model; concepts
    already well encoded at a model's shallowest layer, or encoded by no layer; whether each
    cross-model ridge lies near the diagonal; whether adjacent layers are the most similar within
    each model; significant TCAV hypotheses; NCAVs that match known concepts.

    Parameters
    ----------
    results : Results
        A loaded results folder.

    Returns
    -------
    list of str
        The sentences, without a final full stop, each starting with a plain lower-case word.
    """
    return [sentence for _, sentences in grouped_findings(results) for sentence in sentences]


def grouped_findings(results: Results) -> list[tuple[str, list[str]]]:
    """:func:`findings` under their topics: (heading, sentences) for the non-empty ones of
    "Probes", "Similarity", "TCAV" and "NCAVs", in that order."""
    groups = [
        ("Probes", _probe_findings(results)),
        ("Similarity", _ridge_findings(results) + _adjacency_findings(results)),
        ("TCAV", _tcav_findings(results.tcav)),
        ("NCAVs", _ncav_findings(results)),
    ]
    return [(heading, sentences) for heading, sentences in groups if sentences]


def _probe_findings(results: Results) -> list[str]:
    out = []
    models = [m for m in results.models if results.probe(m, "net2vec")]
    for concept in results.concepts:
        encoded: list[tuple[str, BestLayer]] = []
        blind: list[tuple[str, BestLayer]] = []
        for model in models:
            best = results.probe(model, "net2vec").best(concept)
            if best is None or math.isnan(best.set_iou):
                continue
            (blind if best.set_iou < BLIND_LAYER_IOU else encoded).append((model, best))
        if encoded:
            parts = [f"{b.depth:.2f} in {m} ({b.layer}, set IoU {b.set_iou:.2f})" for m, b in encoded]
            out.append(f"the concept {concept} is best encoded at relative depth {join_words(parts)}")
        for model, best in blind:
            out.append(f"no probed layer of {model} encodes {concept} (best set IoU {best.set_iou:.2f}, below {BLIND_LAYER_IOU:.2f})")
    for model in models:
        probe = results.probe(model, "net2vec")
        for concept in results.concepts:
            layers, _, ious = probe.curve(concept)
            best = probe.best(concept)
            if not layers or best is None or math.isnan(ious[0]) or len(layers) < 2:
                continue
            if ious[0] >= WELL_ENCODED_IOU and ious[0] >= 0.9 * best.set_iou:
                out.append(f"the shallowest layer of {model} already encodes {concept} well ({layers[0]}, set IoU {ious[0]:.2f})")
    return out


def _ridge_findings(results: Results) -> list[str]:
    out = []
    for method, compare in results.compare.items():
        depth_of = compare.depth_of()
        for block in compare.blocks:
            if block.a == block.b:
                continue
            pairs = [p for p in block.ridge_pairs(depth_of) if math.isfinite(p[2]) and math.isfinite(p[3])]
            if not pairs:
                continue
            gap = float(np.mean([abs(p[2] - p[3]) for p in pairs]))
            r = number(block.ridge.depth_correlation if block.ridge else None)
            extra = f", depth correlation r = {r:.2f}" if math.isfinite(r) else ""
            where = f"the cross-model ridge of {block.a} vs {block.b} ({METHOD_NAMES.get(method, method)})"
            if gap <= NEAR_DIAGONAL:
                out.append(f"{where} lies near the diagonal (mean |d_A − d_B| = {gap:.2f}{extra}): the best-matching layers sit at similar relative depths")
            else:
                out.append(f"{where} lies off the diagonal (mean |d_A − d_B| = {gap:.2f}{extra}): the best-matching layers sit at different relative depths")
    return out


def _adjacency_findings(results: Results) -> list[str]:
    out = []
    for method, compare in results.compare.items():
        depth_of = compare.depth_of()
        for block in compare.blocks:
            n = len(block.rows)
            if block.a != block.b or n < 3:
                continue
            ranks = block.depth_ranks(depth_of)
            pairs = block.ridge_pairs(depth_of)
            if not pairs:
                continue
            adjacent = sum(abs(ranks[i] - ranks[j]) == 1 for i, j, *_ in pairs)
            matrix = np.array([[number(v) for v in row] for row in block.similarity])
            near = [matrix[i, j] for i in range(n) for j in range(n) if abs(ranks[i] - ranks[j]) == 1]
            far = [matrix[i, j] for i in range(n) for j in range(n) if abs(ranks[i] - ranks[j]) > 1]
            means = ""
            if np.isfinite(near).any() and np.isfinite(far).any():
                means = f"; mean similarity {np.nanmean(near):.2f} between neighbours vs {np.nanmean(far):.2f} otherwise"
            name = METHOD_NAMES.get(method, method)
            if adjacent == len(pairs):
                out.append(f"within {block.a}, adjacent layers are the most similar ({name}: every layer's best match is a neighbouring layer{means})")
            else:
                out.append(f"within {block.a}, the most similar other layer is a neighbouring one for {adjacent} of {len(pairs)} layers ({name}{means})")
    return out


def _tcav_findings(tcav: TCAVResults | None) -> list[str]:
    if not tcav or not tcav.records:
        return []
    records = tcav.records
    correction, alpha, statistic = tcav.correction, number(tcav.alpha), tcav.statistic
    significant = [r for r in records if r.significant]
    out = [f"{len(significant)} of {len(records)} TCAV hypotheses are significant at α = {alpha:g} after {correction} correction"]
    value = f3g if statistic == "mean_sensitivity" else f2
    for r in significant[:MAX_TCAV_FINDINGS]:
        direction = "raises" if number(r.mean) > number(r.null_mean) else "lowers"
        out.append(f"for target {r.target}, {r.concept} at {r.layer} is significant and {direction} the target "
                   f"({STATISTIC_NAMES.get(statistic, statistic)} {value(r.mean)} vs null {value(r.null_mean)}, "
                   f"{p_phrase(f'p_{correction}', r.adjusted_p(correction))})")
    if len(significant) > MAX_TCAV_FINDINGS:
        out.append(f"… and {len(significant) - MAX_TCAV_FINDINGS} more significant TCAV hypotheses (see the TCAV table)")
    return out


def _ncav_findings(results: Results) -> list[str]:
    out = []
    for model in results.models:
        for layer, ncavs in results.ncav_labels(model).items():
            best: dict[str, float] = {}
            for ncav in ncavs:
                concept, iou = ncav.label, number(ncav.set_iou)
                if concept is not None and iou >= NCAV_MATCH_IOU:
                    best[concept] = max(best.get(concept, 0.0), iou)
            if not best:
                continue
            matches = [f"{c} (IoU {v:.2f})" for c, v in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))]
            noun = "an NCAV" if len(matches) == 1 else "NCAVs"
            out.append(f"in {model}, {layer} has {noun} matching {join_words(matches)}")
    return out

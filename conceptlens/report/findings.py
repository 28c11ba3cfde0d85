"""Sentences computed from the numbers of a results folder (only what the data supports).

Every sentence starts with a plain word (never a model, layer or concept name), so that the report
can capitalise its first letter without changing an identifier.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from conceptlens.concepts.compare.similarity import BLIND_LAYER_IOU
from conceptlens.report.anchors import (
    concept_anchor,
    ncav_anchor,
    pair_anchor,
    tcav_anchor,
)
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
from conceptlens.report.results import BestLayer, NCAVLabel, TCAVResults

__all__ = ["MAX_TCAV_FINDINGS", "NCAV_MATCH_IOU", "NEAR_DIAGONAL", "WELL_ENCODED_IOU", "Finding", "Rejection", "findings", "grouped_findings",
           "linked_findings", "linked_rejections", "ncav_controls", "ncav_match_counts", "ncav_unmatched_reason", "not_distinguishable", "sample_size_notices"]

#: A shallowest layer is "already well encoded" at set IoU ≥ this and ≥ 90 % of the concept's best.
WELL_ENCODED_IOU = 0.5
#: An NCAV "matches" a concept (in the findings) from this set IoU on.
NCAV_MATCH_IOU = 0.2
#: A ridge "lies near the diagonal" when the mean |d_A − d_B| of its pairs is at most this.
NEAR_DIAGONAL = 0.2
#: At most this many significant TCAV hypotheses are listed one by one in the findings.
MAX_TCAV_FINDINGS = 8


class Finding(NamedTuple):
    """A sentence and the id of the report element (figure, table, concept block) it rests on."""

    text: str
    anchor: str


class Rejection(NamedTuple):
    """A claim the controls do not support, the reason, and the id of the element it rests on."""

    claim: str
    reason: str
    anchor: str


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
    "Probes", "Similarity", "TCAV" and "NCAVs", in that order.

    Where the results carry controls, a finding is stated only when it clears them; the others are
    listed by :func:`not_distinguishable`.
    """
    return [(heading, [item.text for item in items]) for heading, items in linked_findings(results)]


def linked_findings(results: Results) -> list[tuple[str, list[Finding]]]:
    """:func:`grouped_findings` with each sentence's anchor: the id of the figure or table it rests on
    (see :mod:`conceptlens.report.anchors`; ``tcav`` for the TCAV summary).

    Parameters
    ----------
    results : Results
        A loaded results folder.

    Returns
    -------
    list of (str, list of Finding)
    """
    groups = [
        ("Probes", _probe_findings(results)),
        ("Similarity", _ridge_findings(results) + _adjacency_findings(results)),
        ("TCAV", _tcav_findings(results.tcav)),
        ("NCAVs", _ncav_findings(results)),
    ]
    return [(heading, sentences) for heading, sentences in groups if sentences]


def not_distinguishable(results: Results) -> list[tuple[str, str]]:
    """Claims the numbers would suggest but the controls do not support: (claim, reason) pairs.

    Probes: a concept encoded at no layer of a model by the controls' rule (the probe's
    ``verdict``); similarity: a model pair whose ridge has no significant cell, and within a model
    the layers whose best match is not significant (all of them: the adjacency claim itself); TCAV: significant
    hypotheses on a degenerate layer or not significant in every robustness variant; NCAVs: a match
    whose IoU does not exceed its permuted-masks control by the controls' margin. Empty when the
    results carry no controls (controls off, older results).
    """
    return [(item.claim, item.reason) for item in linked_rejections(results)]


def linked_rejections(results: Results) -> list[Rejection]:
    """:func:`not_distinguishable` with each claim's anchor (the element it rests on).

    Parameters
    ----------
    results : Results
        A loaded results folder.

    Returns
    -------
    list of Rejection
    """
    return (_probe_rejections(results) + _similarity_rejections(results) + _adjacency_rejections(results) + _tcav_rejections(results.tcav)
            + _ncav_rejections(results))


def sample_size_notices(results: Results) -> list[str]:
    """One sentence per result whose ``sample_size`` record says the test split is too small."""
    records = [("the run", results.run.sample_size if results.run else None)]
    records += [(f"the {method} comparison", compare.sample_size) for method, compare in results.compare.items()]
    records += [(f"the {method} probe of {model}", probe.sample_size) for model, by_method in results.probes.items() for method, probe in by_method.items()]
    records.append(("TCAV", results.tcav.sample_size if results.tcav else None))
    notices = []
    for what, record in records:
        if isinstance(record, dict) and record.get("adequate") is False:
            reason = record.get("reason") or f"{record.get('n_test')} test images, {record.get('needed')} needed"
            notices.append(f"test split too small for {what}: {reason}")
    notices += _tcav_power_notices(results.tcav)
    return list(dict.fromkeys(notices))


def _tcav_power_notices(tcav: TCAVResults | None) -> list[str]:
    """A sentence when TCAV's random sets are too few for any hypothesis to reach the corrected level (``power`` records)."""
    powers = [r.power for r in (tcav.records if tcav and tcav.test == "permutation" else ()) if isinstance(r.power, dict)]
    short = [p for p in powers if isinstance(p.get("min_for_correction"), (int, float)) and isinstance(p.get("n_random_sets"), (int, float))
             and p["n_random_sets"] < p["min_for_correction"]]
    if not short:
        return []
    first = short[0]
    level = number(first.get("alpha_per_test"))
    at = f" (α per test {level:.2g})" if math.isfinite(level) else ""
    return [f"too few TCAV random sets: with {int(first['n_random_sets'])} the permutation test cannot reach the corrected "
            f"level{at} for any of {len(tcav.records)} hypotheses; at least {int(first['min_for_correction'])} are needed"]


def _controlled(entry: dict) -> bool:
    return "encoded" in entry


def _encoded_best(probe, concept: str) -> tuple[BestLayer | None, bool]:
    """``concept``'s best layer among those where it counts as encoded, and whether the probe has controls for it."""
    layers, depths, ious = probe.curve(concept)
    entries = [(probe.metrics.get(layer, {}).get(concept) or {}) for layer in layers]
    if not any(_controlled(e) for e in entries):
        return probe.best(concept), False
    kept = [(ious[i], -i) for i, e in enumerate(entries) if e.get("encoded") is True and math.isfinite(ious[i])]
    if not kept:
        return None, True
    _, i = max(kept)
    return BestLayer(layers[-i], depths[-i], ious[-i]), True


def _probe_rejections(results: Results) -> list[Rejection]:
    out = []
    for model in results.models:
        probe = results.probe(model, "net2vec")
        if not probe:
            continue
        for concept in results.concepts:
            best, controlled = _encoded_best(probe, concept)
            if not controlled or best is not None:
                continue
            raw = probe.best(concept)
            verdict = ((probe.metrics.get(raw.layer, {}).get(concept) or {}).get("verdict") if raw else None) or "does not clear its controls at any layer"
            where = f" (best raw set IoU {raw.set_iou:.2f} at {raw.layer})" if raw and math.isfinite(raw.set_iou) else ""
            out.append(Rejection(f"the concept {concept} is encoded in {model}{where}", verdict, concept_anchor(concept)))
    return out


def _significant_cell(block, i: int, j: int) -> bool | None:
    """Whether cell (i, j) of ``block`` is significant; None when the block has no controls."""
    if block.significant is None:
        return None
    return block.significant[i][j] is True


def _similarity_rejections(results: Results) -> list[Rejection]:
    out = []
    for method, compare in results.compare.items():
        for block in compare.blocks:
            pairs = block.ridge_pairs(compare.depth_of())
            if block.significant is None or not pairs or (block.a == block.b and len(block.rows) >= 3):
                continue  # within-model blocks of three or more layers: judged as adjacency (_adjacency_rejections)
            kept = [p for p in pairs if _significant_cell(block, p[0], p[1])]
            if not kept:
                kind = "cross-model ridge" if block.a != block.b else "within-model ridge"
                out.append(Rejection(f"the {kind} of {block.a} vs {block.b} ({METHOD_NAMES.get(method, method)})",
                                     "no best-match cell is above its permutation null after Holm correction", pair_anchor(block.a, block.b)))
    return out


def _tcav_controlled(tcav: TCAVResults | None) -> bool:
    """Whether TCAV ran with controls (the permutation test); the reference t-test or an older file: as before them."""
    return tcav is not None and tcav.test not in (None, "ttest")


def _tcav_rejections(tcav: TCAVResults | None) -> list[Rejection]:
    out = []
    for r in (tcav.records if _tcav_controlled(tcav) else ()):
        if not r.significant:
            continue
        claim = f"for target {r.target}, {r.concept} at {r.layer} is significant"
        if r.degenerate_layer:
            out.append(Rejection(claim, f"degenerate layer: {r.degenerate_reason or 'its CAVs do not separate concept from random images better than random sets do'}",
                                 tcav_anchor(r.target)))
        elif r.robust is False:
            failed = [name for name, v in (r.variants or {}).items() if isinstance(v, dict) and v.get("significant") is False]
            out.append(Rejection(claim, "not significant in every robustness variant" + (f" (fails: {', '.join(failed)})" if failed else ""), tcav_anchor(r.target)))
    return out


def _probe_findings(results: Results) -> list[Finding]:
    out = []
    models = [m for m in results.models if results.probe(m, "net2vec")]
    for concept in results.concepts:
        encoded: list[tuple[str, BestLayer]] = []
        blind: list[tuple[str, BestLayer]] = []
        for model in models:
            best, controlled = _encoded_best(results.probe(model, "net2vec"), concept)
            if best is None or math.isnan(best.set_iou) or (controlled and best.set_iou < BLIND_LAYER_IOU):
                continue
            (blind if best.set_iou < BLIND_LAYER_IOU else encoded).append((model, best))
        if encoded:
            parts = [f"{b.depth:.2f} in {m} ({b.layer}, set IoU {b.set_iou:.2f})" for m, b in encoded]
            out.append(Finding(f"the concept {concept} is best encoded at relative depth {join_words(parts)}", concept_anchor(concept)))
        for model, best in blind:
            out.append(Finding(f"no probed layer of {model} encodes {concept} (best set IoU {best.set_iou:.2f}, below {BLIND_LAYER_IOU:.2f})", concept_anchor(concept)))
    for model in models:
        probe = results.probe(model, "net2vec")
        for concept in results.concepts:
            layers, _, ious = probe.curve(concept)
            best = probe.best(concept)
            first = probe.metrics.get(layers[0], {}).get(concept) or {} if layers else {}
            if not layers or best is None or math.isnan(ious[0]) or len(layers) < 2 or first.get("encoded") is False:
                continue
            if ious[0] >= WELL_ENCODED_IOU and ious[0] >= 0.9 * best.set_iou:
                out.append(Finding(f"the shallowest layer of {model} already encodes {concept} well ({layers[0]}, set IoU {ious[0]:.2f})", concept_anchor(concept)))
    return out


def _ridge_findings(results: Results) -> list[Finding]:
    out = []
    for method, compare in results.compare.items():
        depth_of = compare.depth_of()
        for block in compare.blocks:
            if block.a == block.b:
                continue
            pairs = [p for p in block.ridge_pairs(depth_of) if math.isfinite(p[2]) and math.isfinite(p[3])]
            pairs = [p for p in pairs if _significant_cell(block, p[0], p[1]) is not False]  # controls: significant cells only
            if not pairs:
                continue
            gap = float(np.mean([abs(p[2] - p[3]) for p in pairs]))
            r = number(block.ridge.depth_correlation if block.ridge else None)
            extra = f", depth correlation r = {r:.2f}" if math.isfinite(r) else ""
            ci = block.ridge.depth_correlation_ci if block.ridge else None
            if extra and ci and len(ci) == 2 and all(math.isfinite(number(v)) for v in ci):
                extra += f" (95 % CI {number(ci[0]):.2f} to {number(ci[1]):.2f})"
            if block.significant is not None:
                extra += f"; {len(pairs)} of {len(block.rows)} best matches significant"
            where = f"the cross-model ridge of {block.a} vs {block.b} ({METHOD_NAMES.get(method, method)})"
            if gap <= NEAR_DIAGONAL:
                text = f"{where} lies near the diagonal (mean |d_A − d_B| = {gap:.2f}{extra}): the best-matching layers sit at similar relative depths"
            else:
                text = f"{where} lies off the diagonal (mean |d_A − d_B| = {gap:.2f}{extra}): the best-matching layers sit at different relative depths"
            out.append(Finding(text, pair_anchor(block.a, block.b)))
    return out


def _adjacency(results: Results) -> list[tuple[str | None, str | None, str | None, str]]:
    """Within-model adjacency per block: (finding or None, rejected claim or None, its reason or None, the block's anchor).

    Without controls every layer's best match counts. With controls (the block has ``significant``)
    only best matches whose cell is significant count: the finding is stated over those layers, the
    layers whose best match is not significant are listed as not distinguishable from control, and a
    block with no significant best match gives no finding, only the rejected claim.
    """
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
            name = METHOD_NAMES.get(method, method)
            controlled = block.significant is not None
            kept = [p for p in pairs if _significant_cell(block, p[0], p[1])] if controlled else pairs
            dropped = [p for p in pairs if p not in kept]
            rejected = reason = None
            if dropped:
                matches = join_words([f"{block.rows[i]} → {block.columns[j]}" for i, j, *_ in dropped])
                if kept:
                    rejected = f"within {block.a}, the best match of {len(dropped)} of {len(pairs)} layers ({name}: {matches})"
                    reason = "its cell is not above its permutation null after Holm correction"
                else:
                    adjacent_all = sum(abs(ranks[i] - ranks[j]) == 1 for i, j, *_ in pairs)
                    rejected = (f"within {block.a}, adjacent layers are the most similar ({name})" if adjacent_all == len(pairs) else
                                f"within {block.a}, the most similar other layer is a neighbouring one for {adjacent_all} of {len(pairs)} layers ({name})")
                    reason = f"none of the {len(pairs)} best-match cells is above its permutation null after Holm correction"
            if not kept:
                out.append((None, rejected, reason, pair_anchor(block.a, block.b)))
                continue
            adjacent = sum(abs(ranks[i] - ranks[j]) == 1 for i, j, *_ in kept)
            matrix = np.array([[number(v) for v in row] for row in (block.corrected or block.similarity)])  # chance-corrected when controlled
            near = [matrix[i, j] for i in range(n) for j in range(n) if abs(ranks[i] - ranks[j]) == 1]
            far = [matrix[i, j] for i in range(n) for j in range(n) if abs(ranks[i] - ranks[j]) > 1]
            means = ""
            if np.isfinite(near).any() and np.isfinite(far).any():
                what = "chance-corrected similarity" if block.corrected else "similarity"
                means = f"; mean {what} {np.nanmean(near):.2f} between neighbours vs {np.nanmean(far):.2f} otherwise"
            if dropped:
                means += f"; {len(kept)} of {len(pairs)} best matches significant"
            if adjacent == len(pairs):
                finding = f"within {block.a}, adjacent layers are the most similar ({name}: every layer's best match is a neighbouring layer{means})"
            else:
                finding = f"within {block.a}, the most similar other layer is a neighbouring one for {adjacent} of {len(pairs) if not dropped else len(kept)} layers ({name}{means})"
            out.append((finding, rejected, reason, pair_anchor(block.a, block.b)))
    return out


def _adjacency_findings(results: Results) -> list[Finding]:
    return [Finding(finding, anchor) for finding, _, _, anchor in _adjacency(results) if finding]


def _adjacency_rejections(results: Results) -> list[Rejection]:
    return [Rejection(claim, reason or "", anchor) for _, claim, reason, anchor in _adjacency(results) if claim]


def _tcav_findings(tcav: TCAVResults | None) -> list[Finding]:
    if not tcav or not tcav.records:
        return []
    records = tcav.records
    correction, alpha, statistic = tcav.correction, number(tcav.alpha), tcav.statistic
    significant = [r for r in records if r.significant]
    summary = f"{len(significant)} of {len(records)} TCAV hypotheses are significant at α = {alpha:g} after {correction} correction"
    cleared = [r for r in significant if r.robust is not False and not r.degenerate_layer] if _tcav_controlled(tcav) else significant
    if len(cleared) < len(significant):
        summary += f"; {len(cleared)} of them also robust to every variant and on a non-degenerate layer"
    out = [Finding(summary, "tcav")]
    significant = cleared
    value = f3g if statistic == "mean_sensitivity" else f2
    for r in significant[:MAX_TCAV_FINDINGS]:
        direction = "raises" if number(r.mean) > number(r.null_mean) else "lowers"
        out.append(Finding(f"for target {r.target}, {r.concept} at {r.layer} is significant and {direction} the target "
                           f"({STATISTIC_NAMES.get(statistic, statistic)} {value(r.mean)} vs null {value(r.null_mean)}, "
                           f"{p_phrase(f'p_{correction}', r.adjusted_p(correction))})", tcav_anchor(r.target)))
    if len(significant) > MAX_TCAV_FINDINGS:
        out.append(Finding(f"… and {len(significant) - MAX_TCAV_FINDINGS} more significant TCAV hypotheses (see the TCAV table)", "tcav"))
    return out


def ncav_unmatched_reason(ncav: NCAVLabel, control_iou: float | None, margin: float | None) -> str | None:
    """Why ``ncav`` reads "unmatched" in the report; None when its match counts (:func:`ncav_match_counts`).

    Parameters
    ----------
    ncav : NCAVLabel
        The NCAV with its best-overlapping concept and that set IoU.
    control_iou : float or None
        Its permuted-masks control IoU (None: none).
    margin : float or None
        The controls' margin (None: the results carry no NCAV controls).

    Returns
    -------
    str or None
    """
    if ncav.label is None:
        return "overlaps no concept"
    iou = number(ncav.set_iou)
    if not iou >= NCAV_MATCH_IOU:
        return f"its best overlap, {ncav.label}, has set IoU {f2(iou)}, below {NCAV_MATCH_IOU:g}"
    if not ncav_match_counts(iou, control_iou, margin):
        return f"set IoU {f2(iou)} does not exceed its permuted-masks control {f2(control_iou)} by the margin {number(margin):g}"
    return None


def ncav_controls(results: Results, model: str) -> tuple[dict[tuple[str, str], float], float | None]:
    """``model``'s NCAV controls from its prototypes: {(layer, ncav): control IoU} and the margin (None: no controls)."""
    prototypes = results.prototypes.get(model)
    meta = prototypes.meta if prototypes else None
    if meta is None or meta.control_margin is None:
        return {}, None
    control = {(layer, n.name): number(n.control_iou) for layer, ncavs in meta.ncavs.items() for n in ncavs if n.control_iou is not None}
    return control, number(meta.control_margin)


def ncav_match_counts(iou: float | None, control_iou: float | None, margin: float | None) -> bool:
    """Whether an NCAV's match to its concept counts: set IoU ≥ :data:`NCAV_MATCH_IOU` and, with controls
    (``margin`` not None), above its permuted-masks ``control_iou`` by more than ``margin``.

    Parameters
    ----------
    iou : float or None
        The match's set IoU on the test images.
    control_iou : float or None
        The same match's IoU against permuted masks (None: no control for it).
    margin : float or None
        The controls' margin; None when the results carry no NCAV controls.

    Returns
    -------
    bool
    """
    iou = number(iou)
    if not iou >= NCAV_MATCH_IOU:
        return False
    if margin is None:
        return True
    floor = number(control_iou)
    return math.isfinite(floor) and iou > floor + number(margin)


def _ncav_matches(results: Results) -> list[tuple[str | None, str | None, str | None, str]]:
    """Per model and layer: (finding or None, rejected claim or None, its reason or None, the layer's anchor).

    Without controls every NCAV match with set IoU ≥ :data:`NCAV_MATCH_IOU` counts. With controls
    (the prototypes carry ``control_margin``) a match counts only when its IoU exceeds its
    permuted-masks control IoU by more than the margin; the others are rejected claims.
    """
    out = []
    for model in results.models:
        control, margin = ncav_controls(results, model)
        for layer, ncavs in results.ncav_labels(model).items():
            best: dict[str, float] = {}
            failed: dict[str, tuple[float, float]] = {}
            for ncav in ncavs:
                concept, iou = ncav.label, number(ncav.set_iou)
                if concept is None or not iou >= NCAV_MATCH_IOU:
                    continue
                if margin is not None:
                    floor = control.get((layer, ncav.name), number(ncav.control_iou))
                    if not ncav_match_counts(iou, floor, margin):
                        if iou > failed.get(concept, (-1.0, 0.0))[0]:
                            failed[concept] = (iou, floor)
                        continue
                best[concept] = max(best.get(concept, 0.0), iou)
            failed = {c: v for c, v in failed.items() if c not in best}
            finding = rejected = reason = None
            if best:
                matches = [f"{c} (IoU {v:.2f})" for c, v in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))]
                noun = "an NCAV" if len(matches) == 1 else "NCAVs"
                finding = f"in {model}, {layer} has {noun} matching {join_words(matches)}"
            if failed:
                items = sorted(failed.items(), key=lambda kv: (-kv[1][0], kv[0]))
                noun = "an NCAV" if len(items) == 1 else "NCAVs"
                rejected = f"in {model}, {layer} has {noun} matching {join_words([f'{c} (IoU {v:.2f})' for c, (v, _) in items])}"
                controls = join_words([f"{c} {f2(floor)}" for c, (_, floor) in items])
                reason = f"the IoU does not exceed its permuted-masks control ({controls}) by the margin {margin:g}"
            out.append((finding, rejected, reason, ncav_anchor(model, layer)))
    return out


def _ncav_findings(results: Results) -> list[Finding]:
    return [Finding(finding, anchor) for finding, _, _, anchor in _ncav_matches(results) if finding]


def _ncav_rejections(results: Results) -> list[Rejection]:
    return [Rejection(claim, reason or "", anchor) for _, claim, reason, anchor in _ncav_matches(results) if claim]

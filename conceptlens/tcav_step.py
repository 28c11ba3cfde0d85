"""The TCAV output files shared by ``conceptlens tcav`` and the pipeline: ``tcav.json``, ``tcav.csv`` and the table.

The CAVs come from :mod:`conceptlens.probes.image_cavs` (``set_activations``, ``fit_image_cavs``) and
the scores from :func:`conceptlens.attribution.tcav.tcav_scores`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from conceptlens.attribution.tcav import TCAVResult
from conceptlens.concepts.store.artifacts import write_json
from conceptlens.report.results import TCAVResults

__all__ = ["target_labels", "tcav_table", "write_tcav"]


def write_tcav(result: TCAVResult, out: Path, provenance: dict[str, Any], stem: str = "tcav",
               labels: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write ``<stem>.json`` (a :class:`~conceptlens.report.results.TCAVResults`: every record with per-run
    scores, the null, provenance) and ``<stem>.csv``.

    ``labels`` maps a target name to its display name (``"vgg:top:1" -> "vgg:top:1 (car)"``, see
    :func:`target_labels`); the JSON then holds them as ``target_labels``.
    """
    out = Path(out)
    data = TCAVResults.from_result(result, provenance).to_json()
    _add_validity_keys(data, result)
    shown = {name: label for name, label in (labels or {}).items() if label != name}
    if shown:
        data["target_labels"] = shown
    return {"json": write_json(out / f"{stem}.json", data), "csv": result.write_csv(out / f"{stem}.csv")}


def target_labels(targets: Mapping[str, Any]) -> dict[str, str]:
    """Display names of named targets: the class name added where the target knows it, the class id
    where the name already holds the class name.

    Examples
    --------
    >>> from conceptlens.attribution.targets import target_from_spec
    >>> names = ["__background__", "car"]
    >>> target_labels({"m:top:1": target_from_spec("top:1", categories=names), "m:top:car": target_from_spec("top:car", categories=names),
    ...                "m:top:2": target_from_spec("top:2")})
    {'m:top:1': 'm:top:1 (car)', 'm:top:car': 'm:top:car (top:1)', 'm:top:2': 'm:top:2'}
    """
    return {name: _label(name, target) for name, target in targets.items()}


def _label(name: str, target: Any) -> str:
    category = getattr(target, "category", None)
    if not category:
        return name
    return f"{name} ({target.name})" if category.casefold() in name.casefold() else f"{name} ({category})"


def _add_validity_keys(data: dict[str, Any], result: TCAVResult) -> None:
    """The test's validity keys of every record (``test``, ``run_std``, ``ci_naive_*``, ``degenerate_*``,
    ``robust``, ``variants``, ``power``, ``null_statistics`` …) that the report record does not carry
    (yet), added after the record's own keys; keys it carries are left as they are."""
    data.setdefault("test", result.test)
    for row, record in zip(data["records"], result.to_dict()["records"]):
        for key, value in record.items():
            row.setdefault(key, value)


def tcav_table(result: TCAVResult, labels: Mapping[str, str] | None = None) -> str:
    """A plain-text table: one row per hypothesis, significance marked with ``*``; targets shown by
    their ``labels`` (display names with the class name, :func:`target_labels`) when given."""
    labels = labels or {}
    width = max([14, *(len(labels.get(r.target, r.target)) for r in result.records)])
    lines = [f"{'target':<{width}} {'layer':<24} {'concept':<14} {result.statistic:>10} {'±runs':>6} {'null':>6} {'95% CI':>13} "
             f"{'p_' + result.correction:>12}  sig"]
    for r in result.records:
        adjusted = r.p_holm if result.correction == "holm" else r.p_bonferroni
        ci = f"{r.ci_low:.2f}–{r.ci_high:.2f}" if np.isfinite(r.ci_low) else "—"
        p = f"{adjusted:.2g}" if np.isfinite(adjusted) else "—"
        spread = f"{r.run_std:.3f}" if np.isfinite(r.run_std) else "—"
        lines.append(f"{labels.get(r.target, r.target):<{width}} {r.layer:<24} {r.concept:<14} {r.mean:>10.3f} {spread:>6} {r.null_mean:>6.3f} {ci:>13} {p:>12}  "
                     f"{_flags(r)}")
    return "\n".join(lines + _table_notes(result))


def _flags(record: Any) -> str:
    """``*`` significant, ``R`` robust (significant in every variant), ``D`` degenerate layer."""
    return ("*" if record.significant else "") + ("R" if record.robust else "") + ("D" if record.degenerate_layer else "")


def _table_notes(result: TCAVResult) -> list[str]:
    """The legend, the degenerate layers and the random sets the correction needs."""
    notes = [f"test: {result.test}; ±runs: std over CAV runs; CI over inputs and runs; * significant, R robust, D degenerate layer"]
    for layer, reason in sorted({(r.layer, r.degenerate_reason) for r in result.records if r.degenerate_layer}):
        notes.append(f"degenerate layer {layer}: {reason}")
    needed = [r.power.get("min_for_correction") for r in result.records if r.power]
    runs = [r.power.get("n_random_sets") for r in result.records if r.power]
    if result.test == "permutation" and needed and min(runs) < max(needed):
        notes.append(f"with {min(runs)} random sets no hypothesis can be significant after {result.correction} over {len(result.records)} "
                     f"hypotheses: the permutation test needs {max(needed)} random sets")
    return notes

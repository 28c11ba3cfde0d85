"""The TCAV output files shared by ``conceptlens tcav`` and the pipeline: ``tcav.json``, ``tcav.csv`` and the table.

The CAVs come from :mod:`conceptlens.probes.image_cavs` (``set_activations``, ``fit_image_cavs``) and
the scores from :func:`conceptlens.attribution.tcav.tcav_scores`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conceptlens.attribution.tcav import TCAVResult
from conceptlens.report.results import TCAVResults

__all__ = ["write_tcav", "tcav_table"]


def write_tcav(result: TCAVResult, out: Path, provenance: dict[str, Any], stem: str = "tcav") -> dict[str, Path]:
    """Write ``<stem>.json`` (a :class:`~conceptlens.report.results.TCAVResults`: every record with per-run
    scores, the null, provenance) and ``<stem>.csv``."""
    out = Path(out)
    record = TCAVResults.from_result(result, provenance)
    return {"json": record.write(out / f"{stem}.json"), "csv": result.write_csv(out / f"{stem}.csv")}


def tcav_table(result: TCAVResult) -> str:
    """A plain-text table: one row per hypothesis, significance marked with ``*``."""
    lines = [f"{'target':<14} {'layer':<24} {'concept':<14} {result.statistic:>10} {'null':>6} {'95% CI':>13} {'p_' + result.correction:>12}  sig"]
    for r in result.records:
        adjusted = r.p_holm if result.correction == "holm" else r.p_bonferroni
        ci = f"{r.ci_low:.2f}–{r.ci_high:.2f}" if np.isfinite(r.ci_low) else "—"
        p = f"{adjusted:.2g}" if np.isfinite(adjusted) else "—"
        lines.append(f"{r.target:<14} {r.layer:<24} {r.concept:<14} {r.mean:>10.3f} {r.null_mean:>6.3f} {ci:>13} {p:>12}  {'*' if r.significant else ''}")
    return "\n".join(lines)

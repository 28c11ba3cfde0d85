"""The TCAV step shared by ``conceptlens tcav`` and the pipeline: image-level CAVs, scores, output files.

Concept and random image sets are embedded once per layer with spatial mean pooling (the store
reuses earlier runs), one CAV is trained per (concept, random set) plus the random-vs-random null
CAVs, and the target's gradients are taken on the scored inputs (see :mod:`conceptlens.attribution.tcav`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptlens.attribution.tcav import TCAVResult
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.models.loading import LoadedModel
from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.workflow import write_json
from conceptlens.probes.linear import CAVSet, pooled_activations, train_layer_cavs

__all__ = ["set_activations", "fit_image_cavs", "write_tcav", "tcav_table"]


def set_activations(
    model: LoadedModel,
    sets: Mapping[str, ConceptDataset],
    layers: Sequence[str],
    store: ActivationStore,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
    *,
    flatten: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """Image-level activations of every image set at every layer: ``{layer: {set: tensor}}``.

    Pooled ``(n, C)`` by default (embedded with ``reduce='mean'``); with ``flatten``, the native
    maps flattened to ``(n, C·h·w)`` (embedded with ``reduce='native'``), the features TCAV and
    captum train their CAVs on (METHODS §3: pooled for speed, flattened for fidelity).
    """
    pooled: dict[str, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    reduce = "native" if flatten else "mean"
    for name, dataset in sets.items():
        result = embed(model, dataset, list(layers), store, reduce=reduce, batch_size=batch_size, device=device, progress=progress)
        for layer in layers:
            pooled[layer][name] = pooled_activations(result.entries[layer], flatten=flatten)
    return pooled


def fit_image_cavs(
    pooled: Mapping[str, Mapping[str, torch.Tensor]],
    concepts: Sequence[str],
    random_sets: Sequence[str],
    n_runs: int | None = None,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> dict[str, CAVSet]:
    """One :class:`CAVSet` per layer: each concept against each random set, plus the null CAVs."""
    problems = {layer: ({c: by_set[c] for c in concepts}, {r: by_set[r] for r in random_sets}) for layer, by_set in pooled.items()}
    return train_layer_cavs(problems, n_runs, provenance=provenance, seed=seed)


def write_tcav(result: TCAVResult, out: Path, provenance: dict[str, Any], stem: str = "tcav") -> dict[str, Path]:
    """Write ``<stem>.json`` (every record with per-run scores, the null, provenance) and ``<stem>.csv``."""
    out = Path(out)
    data = {**result.to_dict(), "provenance": provenance, "missing_lines": result.missing_lines()}
    return {"json": write_json(out / f"{stem}.json", data), "csv": result.write_csv(out / f"{stem}.csv")}


def tcav_table(result: TCAVResult) -> str:
    """A plain-text table: one row per hypothesis, significance marked with ``*``."""
    lines = [f"{'target':<14} {'layer':<24} {'concept':<14} {result.statistic:>10} {'null':>6} {'95% CI':>13} {'p_' + result.correction:>12}  sig"]
    for r in result.records:
        adjusted = r.p_holm if result.correction == "holm" else r.p_bonferroni
        ci = f"{r.ci_low:.2f}–{r.ci_high:.2f}" if np.isfinite(r.ci_low) else "—"
        p = f"{adjusted:.2g}" if np.isfinite(adjusted) else "—"
        lines.append(f"{r.target:<14} {r.layer:<24} {r.concept:<14} {r.mean:>10.3f} {r.null_mean:>6.3f} {ci:>13} {p:>12}  {'*' if r.significant else ''}")
    return "\n".join(lines)

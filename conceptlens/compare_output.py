"""Write a comparison's results: ``compare.json``, CSV tables and depth-ordered heatmaps.

``compare.json`` is a :class:`conceptlens.report.results.Comparison` (the record the report reads
it back with; see README, "Comparison outputs"): ``method``, ``grid``,
``n_test_images``, ``layers`` (label, model, layer, depth, module_depth), ``matrix`` (all layers ×
all layers; mean set IoU over concepts, or NCAV best-match mean), ``details`` (per-concept set IoU,
soft IoU and Pearson matrices, or per-pair NCAV IoU matrices with matched pairs; flagged pairs),
``cka`` (pooled and spatial, all layers × all layers), ``blocks`` (per model pair: sub-matrices and
the ridge), ``provenance``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conceptlens.concepts.store.atomic import atomic_write_text
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.concepts.compare.shards import ShardRunner
from conceptlens.concepts.compare.workflow import compare_models
from conceptlens.probes.registry import get_method
from conceptlens.concepts.vectors.probed import ProbedModel
from conceptlens.report.figures import similarity_heatmap
from conceptlens.report.results import Comparison

__all__ = ["CONCEPT_CONTROL_KEYS", "CONTROL_KEYS", "CONTROL_PREFIXES", "write_comparison"]


def write_comparison(
    probed: Sequence[ProbedModel], dataset: ConceptDataset, store: ActivationStore, method: str, grid: tuple[int, int], out: Path,
    progress: bool = False, cka: bool = True, controls: dict[str, Any] | None = None, runner: ShardRunner | None = None,
) -> dict[str, Any]:
    """Compare every probed layer and write JSON, CSV and heatmaps under ``out``; return the paths.

    ``cka``: also the linear CKA baseline (matrices, CSV columns, heatmaps). ``controls``: the
    null's and bootstrap's settings passed to :func:`~conceptlens.concepts.compare.workflow.compare_models`
    (``n_permutations``, ``n_bootstrap``, ``seed``, ``alpha``); None: no controls, the files are
    exactly as before them. ``runner``: the comparison's sums per shard of the test images on
    workers (the Ray backend's; None: here). The returned ``result`` is the :class:`~conceptlens.report.results.Comparison`
    written to ``compare.json``.
    """
    provenance = {
        "dataset": dataset.name,
        "models": [{"label": m.label, "spec": m.model.spec, "weights": m.model.weights, "hash": m.model.hash, "layers": m.layers} for m in probed],
        "banks": {f"{m.label}:{layer}": m.banks[layer].provenance for m in probed for layer in m.layers},
    }
    settings = controls or {"n_permutations": 0, "n_bootstrap": 0}
    compared = compare_models(probed, dataset, store, method, grid, progress=progress, cka=cka, runner=runner, **settings)
    result = dataclasses.replace(Comparison.from_json(compared), provenance=provenance)
    out = Path(out)
    json_path = result.write(out / "compare.json")
    csv_path = _write_tables(result, out / "compare.csv", out / "compare_concepts.csv")
    specs = {m.label: m.model.spec for m in probed}
    heatmaps = _write_heatmaps(result, out / "heatmaps", method, specs)
    return {"json": json_path, "csv": csv_path, "heatmaps": heatmaps, "result": result}


#: The control columns of ``compare.csv`` (written when the comparison has controls): per measure prefix, its cell values.
CONTROL_KEYS = ("null_mean", "corrected", "p_value", "ci_low", "ci_high", "significant")
CONTROL_PREFIXES = ("", "cka_pooled_", "cka_spatial_")
#: The per-concept control columns of ``compare_concepts.csv`` (the ``per_concept`` keys of the details, written when present).
CONCEPT_CONTROL_KEYS = ("set_iou_null_mean", "set_iou_corrected", "set_iou_p_value", "set_iou_ci_low", "set_iou_ci_high")


def _control_cells(result: Comparison) -> tuple[list[str], dict[tuple[str, str], list[Any]]]:
    """The control columns present in the blocks, and per (row label, column label) their values (both orders)."""
    present = [prefix for prefix in CONTROL_PREFIXES if any(block.controlled(prefix) for block in result.blocks)]
    columns = [f"{prefix or 'similarity_'}{key}" for prefix in present for key in CONTROL_KEYS]
    cells: dict[tuple[str, str], list[Any]] = {}
    for block in result.blocks:
        for i, row in enumerate(block.rows):
            for j, column in enumerate(block.columns):
                values = []
                for prefix in present:
                    controls = block.controlled(prefix) or {}
                    values += [controls[key][i][j] if controls.get(key) is not None else None for key in CONTROL_KEYS]
                a, b = f"{block.a}:{row}", f"{block.b}:{column}"
                cells[(a, b)] = values
                cells.setdefault((b, a), values)
    return columns, cells


def _write_tables(result: Comparison, pairs_path: Path, concepts_path: Path) -> Path:
    layers = result.layers
    extra, cells = _control_cells(result)
    rows = [["a", "b", "depth_a", "depth_b", "similarity", "cka_pooled", "cka_spatial", *extra]]
    for i, a in enumerate(layers):
        for j, b in enumerate(layers):
            cka = [result.cka[mode][i][j] for mode in ("pooled", "spatial")] if result.cka else [None, None]
            controls = cells.get((a.label, b.label), [None] * len(extra)) if extra else []
            rows.append([a.label, b.label, a.depth, b.depth, result.matrix[i][j], *cka, *controls])
    atomic_write_text(pairs_path, _csv(rows))
    per_concept = result.details.get("per_concept")
    if per_concept:
        controls = [key for key in CONCEPT_CONTROL_KEYS if any(key in matrices for matrices in per_concept.values())]
        concept_rows = [["concept", "a", "b", "set_iou", "soft_iou", "pearson", *controls]]
        for concept, matrices in per_concept.items():
            for i, a in enumerate(layers):
                for j, b in enumerate(layers):
                    concept_rows.append([concept, a.label, b.label, matrices["set_iou"][i][j], matrices["soft_iou"][i][j], matrices["pearson"][i][j],
                                         *[matrices[key][i][j] if matrices.get(key) is not None else None for key in controls]])
        atomic_write_text(concepts_path, _csv(concept_rows))
    return pairs_path


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def _write_heatmaps(result: Comparison, folder: Path, method: str, specs: dict[str, str]) -> Path:
    depth = {layer.label: layer.depth for layer in result.layers}
    kind = get_method(method).similarity_label
    for block in result.blocks:
        rows = [f"{block.a}:{name}" for name in block.rows]
        columns = [f"{block.b}:{name}" for name in block.columns]
        depths_a, depths_b = [depth[r] for r in rows], [depth[c] for c in columns]
        name = f"{block.a}_vs_{block.b}"
        a, b = f"{block.a} = {specs[block.a]}", f"{block.b} = {specs[block.b]}"
        title = f"within {a}" if block.a == block.b else f"rows {a}\ncolumns {b}"
        drawn, label, extent, hatched = _shown(block.similarity, block.controlled(""), kind)
        similarity_heatmap(drawn, block.rows, block.columns, depths_a, depths_b, f"{label}, {title}",
                           folder / f"{method}_{name}.png", block.ridge.pairs if block.ridge else None, extent, hatched)
        cka = {"pooled": block.cka_pooled, "spatial": block.cka_spatial}
        for mode in ("pooled", "spatial") if block.cka_pooled is not None else ():
            drawn, label, extent, hatched = _shown(cka[mode], block.controlled(f"cka_{mode}_"), f"linear CKA ({mode})")
            similarity_heatmap(drawn, block.rows, block.columns, depths_a, depths_b, f"{label}, {title}", folder / f"cka_{mode}_{name}.png",
                               value_range=extent, hatched=hatched)
    return folder


def _shown(raw: Sequence[Sequence[float | None]], controls: dict[str, Any] | None, kind: str
           ) -> tuple[np.ndarray, str, tuple[float, float], np.ndarray | None]:
    """What a heatmap draws: the chance-corrected score with non-significant cells hatched when the
    block has controls (the raw score stays in the JSON), else the raw score on [0, 1]."""
    if controls is None:
        return _array(raw), kind, (0.0, 1.0), None
    corrected = _array(controls["corrected"])
    low = float(np.nanmin(corrected)) if np.isfinite(corrected).any() else 0.0
    extent = (min(0.0, math.floor(low * 10) / 10), 1.0)
    significant = controls.get("significant")
    hatched = None if significant is None else np.array([[v is False for v in row] for row in significant], dtype=bool)  # None: diagonal, undefined
    return corrected, f"{kind}, chance-corrected (s − null)/(1 − null)", extent, hatched


def _array(matrix: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)

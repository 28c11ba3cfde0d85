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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conceptlens.concepts.store.atomic import atomic_write_text
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.concepts.compare.workflow import compare_models
from conceptlens.probes.registry import get_method
from conceptlens.concepts.vectors.probed import ProbedModel
from conceptlens.report.figures import similarity_heatmap
from conceptlens.report.results import Comparison

__all__ = ["write_comparison"]


def write_comparison(
    probed: Sequence[ProbedModel], dataset: ConceptDataset, store: ActivationStore, method: str, grid: tuple[int, int], out: Path,
    progress: bool = False, cka: bool = True,
) -> dict[str, Any]:
    """Compare every probed layer and write JSON, CSV and heatmaps under ``out``; return the paths.

    ``cka``: also the linear CKA baseline (matrices, CSV columns, heatmaps). The returned ``result``
    is the :class:`~conceptlens.report.results.Comparison` written to ``compare.json``.
    """
    provenance = {
        "dataset": dataset.name,
        "models": [{"label": m.label, "spec": m.model.spec, "weights": m.model.weights, "hash": m.model.hash, "layers": m.layers} for m in probed],
        "banks": {f"{m.label}:{layer}": m.banks[layer].provenance for m in probed for layer in m.layers},
    }
    compared = compare_models(probed, dataset, store, method, grid, progress=progress, cka=cka)
    result = dataclasses.replace(Comparison.from_json(compared), provenance=provenance)
    out = Path(out)
    json_path = result.write(out / "compare.json")
    csv_path = _write_tables(result, out / "compare.csv", out / "compare_concepts.csv")
    specs = {m.label: m.model.spec for m in probed}
    heatmaps = _write_heatmaps(result, out / "heatmaps", method, specs)
    return {"json": json_path, "csv": csv_path, "heatmaps": heatmaps, "result": result}


def _write_tables(result: Comparison, pairs_path: Path, concepts_path: Path) -> Path:
    layers = result.layers
    rows = [["a", "b", "depth_a", "depth_b", "similarity", "cka_pooled", "cka_spatial"]]
    for i, a in enumerate(layers):
        for j, b in enumerate(layers):
            cka = [result.cka[mode][i][j] for mode in ("pooled", "spatial")] if result.cka else [None, None]
            rows.append([a.label, b.label, a.depth, b.depth, result.matrix[i][j], *cka])
    atomic_write_text(pairs_path, _csv(rows))
    per_concept = result.details.get("per_concept")
    if per_concept:
        concept_rows = [["concept", "a", "b", "set_iou", "soft_iou", "pearson"]]
        for concept, matrices in per_concept.items():
            for i, a in enumerate(layers):
                for j, b in enumerate(layers):
                    concept_rows.append([concept, a.label, b.label, matrices["set_iou"][i][j], matrices["soft_iou"][i][j], matrices["pearson"][i][j]])
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
        similarity_heatmap(_array(block.similarity), block.rows, block.columns, depths_a, depths_b, f"{kind}, {title}",
                           folder / f"{method}_{name}.png", block.ridge.pairs if block.ridge else None)
        cka = {"pooled": block.cka_pooled, "spatial": block.cka_spatial}
        for mode in ("pooled", "spatial") if block.cka_pooled is not None else ():
            similarity_heatmap(_array(cka[mode]), block.rows, block.columns, depths_a, depths_b,
                               f"linear CKA ({mode}), {title}", folder / f"cka_{mode}_{name}.png")
    return folder


def _array(matrix: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)

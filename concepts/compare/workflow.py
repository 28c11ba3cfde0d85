"""One call to compare probed models layer by layer: concept similarity, CKA beside it, ridges.

:func:`compare_models` takes the :class:`~conceptlens.concepts.vectors.probed.ProbedModel` objects
:func:`conceptlens.probes.workflow.probe_model` returns and the dataset they were probed on, computes
every probed layer's concept maps on the test split (stored, so a second call reuses them), and
compares every layer with every other: concept-wise for named concepts (``supervised``, e.g.
Net2Vec banks), by best match for unnamed ones (``unsupervised``, NMF banks), with linear CKA on
the activations beside it. The result is a JSON-able dict (the schema of ``compare.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from conceptlens.concepts.compare.cka import cka_matrix
from conceptlens.concepts.compare.similarity import CompareError, LayerMaps, ridge, supervised_similarity, unsupervised_similarity
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.data.splits import split_indices
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.store.temporary import StoreLike, open_store
from conceptlens.concepts.vectors.concept_maps import concept_map_entry
from conceptlens.concepts.vectors.probed import ProbedModel

__all__ = ["COMPARISONS", "compare_models"]

#: ``supervised``: concept-wise similarity of named concepts; ``unsupervised``: best match of unnamed ones.
COMPARISONS = ("supervised", "unsupervised")


def compare_models(
    probed: Sequence[ProbedModel],
    dataset: ConceptDataset,
    store: StoreLike = None,
    method: str | None = None,
    grid: tuple[int, int] | None = None,
    *,
    comparison: str | None = None,
    cka_grid: tuple[int, int] = (8, 8),
    cka: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Layer × layer similarity of every probed layer of every model on the test split.

    Parameters
    ----------
    probed : sequence of ProbedModel
        Models probed with one method on ``dataset`` (labels unique).
    dataset : ConceptDataset
        The dataset they were probed on (its test split is compared).
    store : ActivationStore, str, PathLike or None
        Where masks and concept maps go; None: the session's temporary store.
    method : str, optional
        The banks' method; default: the method of the first probed model's banks.
    grid : (int, int), optional
        Concept grid; default: the grid the models were probed on, else 100 × 100.
    comparison : {'supervised', 'unsupervised'}, optional
        Default: the probed models' ``comparison`` (set by ``probe_model`` from the method
        registry: ``unsupervised`` for NMF banks, ``supervised`` for Net2Vec ones).
    cka_grid : (int, int)
        Grid of the spatial CKA.
    cka : bool
        Also compute linear CKA (pooled and spatial); ``None`` in the result without.
    progress : bool
        Progress bars.

    Returns
    -------
    dict
        ``method``, ``grid``, ``n_test_images``, ``layers`` (label, model, layer, depth,
        module_depth), ``matrix`` (all layers × all layers), ``details`` (per-concept matrices or
        NCAV matches), ``cka`` (pooled and spatial, or None) and ``blocks`` (per model pair: the
        sub-matrices and the ridge of the similarity).

    Raises
    ------
    CompareError
        When no model is given, labels repeat, or the comparison is unknown.
    """
    _check_probed(probed)
    method = method or probed[0].method
    comparison = comparison or probed[0].comparison
    if comparison not in COMPARISONS:
        raise CompareError(
            f"comparison {comparison!r}", "is not a layer comparison",
            f"pass comparison= (one of {', '.join(COMPARISONS)}; a method's is conceptlens.probes.registry.get_method(method).comparison)",
        )
    grid = tuple(grid or probed[0].grid or (100, 100))
    store = open_store(store)
    masks = embed_masks(dataset, store, grid=grid, progress=progress)
    test = split_indices(masks, "test")
    layer_maps, entries, depths, module_depths = _layer_maps(probed, test, grid, store, progress)
    if comparison == "unsupervised":
        similarity = unsupervised_similarity(layer_maps)
        matrix, details = similarity.best_match, similarity.to_dict()
    else:
        similarity = supervised_similarity(layer_maps)
        matrix, details = similarity.matrix, similarity.to_dict()
    cka_matrices = {mode: cka_matrix(entries, test, mode=mode, grid=cka_grid) for mode in ("pooled", "spatial")} if cka else None
    return {
        "method": method,
        "grid": list(grid),
        "n_test_images": int(len(test)),
        "layers": [
            {"label": m.label, "model": m.model, "layer": m.layer, "depth": d, "module_depth": md}
            for m, d, md in zip(layer_maps, depths, module_depths)
        ],
        "matrix": details.get("matrix") or details.get("best_match"),
        "details": details,
        "cka": {mode: np.round(values, 6).tolist() for mode, values in cka_matrices.items()} if cka_matrices else None,
        "blocks": _blocks(probed, matrix, cka_matrices, depths),
    }


def _check_probed(probed: Sequence[ProbedModel]) -> None:
    if not probed:
        raise CompareError("compare_models", "got no probed model", "pass the results of probe_model")
    labels = [m.label for m in probed]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise CompareError(f"labels {', '.join(repeated)}", "name more than one probed model", "pass a distinct label= to each probe_model call")


def _layer_maps(
    probed: Sequence[ProbedModel], test: np.ndarray, grid: tuple[int, int], store, progress: bool
) -> tuple[list[LayerMaps], list, list[float], list[float]]:
    """Every probed layer's stored concept maps on the test split, its activations and its depths."""
    layer_maps, entries, depths, module_depths = [], [], [], []
    for model in probed:
        for layer, depth, module_depth in zip(model.layers, model.depths, model.module_depths):
            bank = model.banks[layer]
            maps = concept_map_entry(bank, model.activations[layer], test, grid, store, progress=progress)
            iou = {c: bank.metrics.get(c, {}).get("set_iou") for c in bank.concepts}
            layer_maps.append(LayerMaps(model.label, layer, bank.concepts, maps, iou))
            entries.append(model.activations[layer])
            depths.append(depth)
            module_depths.append(module_depth)
    return layer_maps, entries, depths, module_depths


def _blocks(probed: Sequence[ProbedModel], matrix: np.ndarray, cka: dict[str, np.ndarray] | None, depths: list[float]) -> list[dict[str, Any]]:
    """Per (model A, model B) pair: the sub-matrices and the ridge of the concept similarity."""
    offsets = np.cumsum([0] + [len(m.layers) for m in probed])
    blocks = []
    for a, model_a in enumerate(probed):
        for b, model_b in enumerate(probed):
            if b < a:
                continue
            rows = slice(offsets[a], offsets[a + 1])
            cols = slice(offsets[b], offsets[b + 1])
            sub = np.asarray(matrix)[rows, cols]
            blocks.append({
                "a": model_a.label,
                "b": model_b.label,
                "rows": model_a.layers,
                "columns": model_b.layers,
                "similarity": sub.tolist(),
                "cka_pooled": cka["pooled"][rows, cols].tolist() if cka else None,
                "cka_spatial": cka["spatial"][rows, cols].tolist() if cka else None,
                "ridge": ridge(_without_diagonal(sub) if a == b else sub, depths[rows], depths[cols]),
            })
    return blocks


def _without_diagonal(matrix: np.ndarray) -> np.ndarray:
    """Within one model every layer matches itself; its ridge is the best *other* layer."""
    masked = np.array(matrix, dtype=float)
    np.fill_diagonal(masked, np.nan)
    return masked

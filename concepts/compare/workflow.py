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

from conceptlens.concepts.compare.cka import CKAStatistics, cka_statistics
from conceptlens.concepts.compare.shards import ShardRunner
from conceptlens.concepts.compare.nulls import DEFAULT_ALPHA, DEFAULT_N_BOOTSTRAP, DEFAULT_N_PERMUTATIONS, SimilarityNull, holm, percentile_interval
from conceptlens.concepts.compare.similarity import CompareError, LayerMaps, _json_matrix, ridge, supervised_similarity, unsupervised_similarity
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
    n_permutations: int = DEFAULT_N_PERMUTATIONS,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    progress: bool = False,
    runner: ShardRunner | None = None,
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
    n_permutations : int
        Permutations of the test images for the similarity's null (0: no null; the result is
        then exactly as without these parameters).
    n_bootstrap : int
        Bootstrap resamples of the test images for the CIs (0: none).
    seed : int
        Seed of the permutations and resamples.
    alpha : float
        Family-wise error rate of the Holm correction over each block's cells (``significant``).
    progress : bool
        Progress bars.
    runner : ShardRunner, optional
        Computes the similarity's and the CKA's sums (and the similarity null's overlap counts)
        per shard of the test images on workers (:mod:`~conceptlens.concepts.compare.shards`);
        None: everything here.

    Returns
    -------
    dict
        ``method``, ``grid``, ``n_test_images``, ``layers`` (label, model, layer, depth,
        module_depth), ``matrix`` (all layers × all layers), ``details`` (per-concept matrices or
        NCAV matches), ``cka`` (pooled and spatial, or None) and ``blocks`` (per model pair: the
        sub-matrices and the ridge of the similarity). With the null on, each block also holds
        ``null_mean``, ``corrected``, ``p_value`` and ``significant``, with the bootstrap
        ``ci_low``, ``ci_high`` and ``ridge.depth_correlation_ci``; top level ``null`` and
        ``bootstrap`` record their settings (docs/METHODS.md §5).

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
    controls = {"n_permutations": n_permutations, "n_bootstrap": n_bootstrap, "seed": seed, "progress": progress, "runner": runner}
    if comparison == "unsupervised":
        similarity = unsupervised_similarity(layer_maps, **controls)
        matrix, details = similarity.best_match, similarity.to_dict()
    else:
        similarity = supervised_similarity(layer_maps, **controls)
        matrix, details = similarity.matrix, similarity.to_dict()
    cka_stats = {
        mode: cka_statistics(entries, test, mode=mode, grid=cka_grid, n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed, progress=progress,
                             runner=runner)
        for mode in ("pooled", "spatial")
    } if cka else None
    cka_matrices = {mode: stats.cka for mode, stats in cka_stats.items()} if cka_stats else None
    result = {
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
        "blocks": _blocks(probed, matrix, cka_matrices, depths, similarity.uncertainty, alpha),
    }
    result.update(_null_settings(similarity.uncertainty))
    _add_cka_statistics(result["blocks"], probed, cka_stats, alpha)
    return result


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


def _blocks(
    probed: Sequence[ProbedModel], matrix: np.ndarray, cka: dict[str, np.ndarray] | None, depths: list[float],
    uncertainty: SimilarityNull | None = None, alpha: float = DEFAULT_ALPHA,
) -> list[dict[str, Any]]:
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
            add_similarity_statistics(blocks[-1], uncertainty, rows, cols, a == b, depths, alpha)
    return blocks


def _add_cka_statistics(blocks: list[dict[str, Any]], probed: Sequence[ProbedModel], cka: dict[str, CKAStatistics] | None, alpha: float) -> None:
    """Add ``cka_<mode>_null_mean``, ``_corrected``, ``_p_value``, ``_significant``, ``_ci_low``, ``_ci_high`` to each block.

    The same conventions as the similarity's (Holm over the block's cells, above the diagonal
    within one model); nothing when the CKA's null and bootstrap are off.
    """
    offsets = np.cumsum([0] + [len(m.layers) for m in probed])
    pairs = [(a, b) for a in range(len(probed)) for b in range(a, len(probed))]
    for block, (a, b) in zip(blocks, pairs):
        rows, cols = slice(offsets[a], offsets[a + 1]), slice(offsets[b], offsets[b + 1])
        for mode, stats in (cka or {}).items():
            prefix = f"cka_{mode}_"
            if stats.p_value is not None:
                p_value = stats.p_value[rows, cols]
                block[prefix + "null_mean"] = _json_matrix(stats.null_mean[rows, cols])
                block[prefix + "corrected"] = _json_matrix(stats.corrected()[rows, cols])
                block[prefix + "p_value"] = _json_matrix(p_value)
                block[prefix + "significant"] = _significant(p_value, a == b, alpha)
            if stats.ci_low is not None:
                block[prefix + "ci_low"] = _json_matrix(stats.ci_low[rows, cols])
                block[prefix + "ci_high"] = _json_matrix(stats.ci_high[rows, cols])


def _null_settings(uncertainty: SimilarityNull | None) -> dict[str, Any]:
    """Top-level ``null`` and ``bootstrap`` records (absent when off)."""
    out: dict[str, Any] = {}
    if uncertainty is not None and uncertainty.null is not None:
        out["null"] = {"kind": "image_permutation", "n_permutations": uncertainty.n_permutations, "seed": uncertainty.seed}
    if uncertainty is not None and uncertainty.bootstrap is not None:
        out["bootstrap"] = {"n": uncertainty.n_bootstrap, "level": uncertainty.level}
    return out


def add_similarity_statistics(
    block: dict[str, Any], uncertainty: SimilarityNull | None, rows: slice, cols: slice, within: bool, depths: Sequence[float], alpha: float = DEFAULT_ALPHA
) -> None:
    """Add the similarity's null, chance-corrected score, p-value, Holm significance and CIs to a block.

    ``within``: a model compared with itself; its family for Holm is the cells above the diagonal
    (the matrix is symmetric), the diagonal (a layer with itself) is not tested (``None``). The
    ridge's ``depth_correlation_ci`` is the percentile interval of the ridge's depth correlation
    recomputed on each bootstrap matrix (``None`` when it is undefined on half the resamples or more).
    """
    if uncertainty is None:
        return
    depths = np.asarray(depths, dtype=float)
    if uncertainty.null is not None:
        p_value = uncertainty.p_value()[rows, cols]
        block.update(
            null_mean=_json_matrix(uncertainty.null_mean()[rows, cols]),
            corrected=_json_matrix(uncertainty.corrected()[rows, cols]),
            p_value=_json_matrix(p_value),
            significant=_significant(p_value, within, alpha),
        )
    if uncertainty.bootstrap is not None:
        low, high = uncertainty.interval()
        block.update(ci_low=_json_matrix(low[rows, cols]), ci_high=_json_matrix(high[rows, cols]))
        draws = [ridge(_without_diagonal(m[rows, cols]) if within else m[rows, cols], depths[rows], depths[cols])["depth_correlation"] for m in uncertainty.bootstrap]
        finite = np.array([r for r in draws if r is not None])
        interval = None
        if len(finite) and 2 * len(finite) > len(draws):
            low, high = percentile_interval(finite[:, None], uncertainty.level)
            interval = [round(float(low[0]), 6), round(float(high[0]), 6)]
        block["ridge"]["depth_correlation_ci"] = interval


def _significant(p_value: np.ndarray, within: bool, alpha: float) -> list[list[bool | None]]:
    """Holm over the block's tested cells; None for untested or undefined cells."""
    family = np.array(p_value, dtype=float)
    if within:
        family[np.tril_indices(family.shape[0])] = np.nan
    rejected = holm(family, alpha)
    if within:
        rejected = rejected | rejected.T
    tested = np.isfinite(family) | (np.isfinite(family.T) if within else False)
    return [[bool(r) if t else None for r, t in zip(rej_row, t_row)] for rej_row, t_row in zip(rejected, tested)]


def _without_diagonal(matrix: np.ndarray) -> np.ndarray:
    """Within one model every layer matches itself; its ridge is the best *other* layer."""
    masked = np.array(matrix, dtype=float)
    np.fill_diagonal(masked, np.nan)
    return masked

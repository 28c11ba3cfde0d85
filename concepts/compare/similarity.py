"""Layer-wise concept similarity within one model and across models (Mikriukov et al. 2023).

Concept vectors of different layers live in different spaces, so they are compared through their
maps on the same test images, on the common concept grid (docs/METHODS.md §5):

* supervised banks: per concept, set IoU of the binarised maps, soft IoU ``Σmin/Σmax`` and
  Pearson r of the soft maps; a layer pair's score is the mean over concepts;
* NMF banks: NCAV maps normalised by their maximum over the test set and binarised at τ; the
  pairwise set-IoU matrix, its symmetric best-match mean and its Hungarian mean.

Everything accumulates batch by batch over the test images (memory does not grow with their
number), reading each layer's maps once per batch from a :func:`conceptlens.concepts.vectors.concept_maps.concept_map_entry`.
The sums of an image range (:func:`supervised_sums`, :func:`ncav_maxima`, :func:`ncav_overlap_sums`
and the null's :func:`~conceptlens.concepts.compare.nulls.overlap_sums`) are pure functions of
their range: given a ``runner`` (:class:`~conceptlens.concepts.compare.shards.ShardRunner`) each
shard of the test images is summed on a worker (the ``*_shard`` functions) and the sums reduced here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from conceptlens.concepts.compare.nulls import SimilarityNull, bootstrap_counts, combine_overlaps, overlap_sums, random_permutations
from conceptlens.concepts.compare.shards import ShardRunner, entry_reference, map_rows, open_reference, sum_parts
from conceptlens.concepts.errors import ConceptLensError, closest_names
from conceptlens.concepts.store.activations import EntryReader, StoreEntry

__all__ = [
    "CompareError",
    "LayerMaps",
    "SupervisedSimilarity",
    "UnsupervisedSimilarity",
    "supervised_similarity",
    "supervised_sums",
    "unsupervised_similarity",
    "ncav_maxima",
    "ncav_overlap_sums",
    "pairwise_set_iou",
    "best_match_mean",
    "hungarian_mean",
    "relative_depths",
    "ridge",
    "BLIND_LAYER_IOU",
]

BLIND_LAYER_IOU = 0.1


class CompareError(ConceptLensError):
    """Inputs of a comparison do not fit together."""


@dataclass
class LayerMaps:
    """One probed layer in a comparison: its maps on the test images and where it sits.

    Attributes
    ----------
    model : str
        Model label (e.g. ``"A"`` or a model spec).
    layer : str
        Layer name.
    concepts : list of str
        Concepts (or NCAV names) of the maps, in the order of the entry's channels.
    maps : StoreEntry
        Concept maps on the grid for the test images (tensor ``maps``, (n, K, Gh, Gw)).
    ground_truth_iou : dict
        Concept -> the layer's own set IoU against ground truth (None when unknown).
    """

    model: str
    layer: str
    concepts: list[str]
    maps: StoreEntry
    ground_truth_iou: dict[str, float | None] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model}:{self.layer}"


def _check_same_items(layers: Sequence[LayerMaps]) -> int:
    if not layers:
        raise CompareError("layers", "nothing to compare", "give at least one layer")
    reference = layers[0].maps.manifest()
    for layer in layers[1:]:
        manifest = layer.maps.manifest()
        if manifest["dataset"]["ids"] != reference["dataset"]["ids"]:
            raise CompareError(
                f"{layer.label} vs {layers[0].label}",
                "maps of different test images (other dataset or split)",
                "embed both models on the same dataset and compare the same split",
            )
        if manifest["request"]["grid"] != reference["request"]["grid"]:
            raise CompareError(f"{layer.label}", f"grid {manifest['request']['grid']} differs from {reference['request']['grid']}", "use one concept grid")
    return int(reference["n_items"])


def _batches(rows: range, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, rows.stop)) for s in range(rows.start, rows.stop, batch_size)]


def _readers(references: Sequence[dict[str, Any]]) -> list[EntryReader]:
    """Readers of the map entries a worker was sent (:func:`~conceptlens.concepts.compare.shards.entry_reference`)."""
    return [EntryReader(open_reference(reference)) for reference in references]


# ------------------------------------------------------------------------------- supervised
@dataclass
class SupervisedSimilarity:
    """Layer × layer similarity of supervised concept maps.

    ``set_iou``, ``soft_iou`` and ``pearson`` map each concept to an (n, n) array (NaN-free:
    undefined entries are None in :meth:`to_dict`, and listed in ``undefined``); ``matrix`` is
    the mean set IoU over concepts; ``blind`` lists (concept, i, j) where either layer's own
    ground-truth set IoU is below 0.1.
    """

    labels: list[str]
    concepts: list[str]
    set_iou: dict[str, np.ndarray]
    soft_iou: dict[str, np.ndarray]
    pearson: dict[str, np.ndarray]
    matrix: np.ndarray
    blind: list[tuple[str, int, int]]
    undefined: list[tuple[str, int, int, str]]
    uncertainty: SimilarityNull | None = None
    #: Per concept, the null and bootstrap of its set IoU matrix (same permutations and resamples as ``uncertainty``).
    concept_uncertainty: dict[str, SimilarityNull] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "concepts": self.concepts,
            "matrix": _json_matrix(self.matrix),
            "per_concept": {
                c: {
                    "set_iou": _json_matrix(self.set_iou[c]), "soft_iou": _json_matrix(self.soft_iou[c]), "pearson": _json_matrix(self.pearson[c]),
                    **{f"set_iou_{key}": value for key, value in _uncertainty_dict((self.concept_uncertainty or {}).get(c)).items()},
                }
                for c in self.concepts
            },
            "blind_pairs": [{"concept": c, "a": self.labels[i], "b": self.labels[j]} for c, i, j in self.blind],
            "undefined": [{"concept": c, "a": self.labels[i], "b": self.labels[j], "why": why} for c, i, j, why in self.undefined],
            **_uncertainty_dict(self.uncertainty),
        }


def _uncertainty_dict(uncertainty: SimilarityNull | None) -> dict[str, Any]:
    """The null's and the bootstrap's all-layers matrices (nothing when neither was computed)."""
    out: dict[str, Any] = {}
    if uncertainty is not None and uncertainty.null is not None:
        out.update(null_mean=_json_matrix(uncertainty.null_mean()), corrected=_json_matrix(uncertainty.corrected()), p_value=_json_matrix(uncertainty.p_value()))
    if uncertainty is not None and uncertainty.bootstrap is not None:
        low, high = uncertainty.interval()
        out.update(ci_low=_json_matrix(low), ci_high=_json_matrix(high))
    return out


def _json_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in matrix]


def supervised_similarity(
    layers: Sequence[LayerMaps],
    concepts: Sequence[str] | None = None,
    threshold: float = 0.5,
    batch_size: int = 16,
    *,
    n_permutations: int = 0,
    n_bootstrap: int = 0,
    seed: int = 0,
    level: float = 0.95,
    progress: bool = False,
    runner: ShardRunner | None = None,
) -> SupervisedSimilarity:
    """Compare supervised concept maps of every pair of layers on the same test images.

    Parameters
    ----------
    layers : sequence of LayerMaps
        Layers of one or more models, maps of the same test images on the same grid.
    concepts : sequence of str, optional
        Concepts to compare (default: every concept all layers share; unknown names fail).
    threshold : float
        Probability above which a cell belongs to the predicted mask.
    batch_size : int
        Test images per step.
    n_permutations : int
        Permutations of the test images for the null of ``matrix`` (0: no null).
    n_bootstrap : int
        Bootstrap resamples of the test images for its CI (0: no CI).
    seed : int
        Seed of the permutations and resamples.
    level : float
        Confidence level of the CI.
    progress : bool
        A progress bar over the null's passes.
    runner : ShardRunner, optional
        Sums shards of the test images on workers (None: every image here, in one range).

    Returns
    -------
    SupervisedSimilarity
        With ``uncertainty`` (:class:`~conceptlens.concepts.compare.nulls.SimilarityNull`) when
        ``n_permutations`` or ``n_bootstrap`` is positive, and ``concept_uncertainty`` (the same
        permutations and resamples applied to each concept's set IoU matrix, written as the
        ``set_iou_*`` keys of ``per_concept`` in :meth:`~SupervisedSimilarity.to_dict`); every
        other field is the same either way.
    """
    n_items = _check_same_items(layers)
    concepts = _common_concepts(layers, concepts)
    columns = [[layer.concepts.index(c) for c in concepts] for layer in layers]
    readers = [EntryReader(layer.maps) for layer in layers]
    references = [entry_reference(layer.maps) for layer in layers] if runner is not None else []
    parts = map_rows(runner, "similarity.supervised", n_items, {"maps": references, "columns": columns, "threshold": threshold, "batch_size": batch_size},
                     "similarity sums (images)", lambda rows: supervised_sums(readers, columns, rows, threshold, batch_size))
    stats = sum_parts(parts)
    result = _supervised_result(layers, concepts, stats, stats.pop("count"))
    if n_permutations > 0 or n_bootstrap > 0:
        binary = {"maps": references, "columns": columns, "threshold": threshold}
        overlaps = _overlaps(_supervised_binary(readers, columns, threshold), binary, n_items, n_permutations, seed, progress, runner)
        result.uncertainty = _uncertainty(result.matrix, overlaps, _set_iou_scores, n_bootstrap, seed, level)
        per_concept = _uncertainty(np.stack([result.set_iou[c] for c in concepts]), overlaps, _concept_set_iou_scores, n_bootstrap, seed, level)
        result.concept_uncertainty = {
            c: SimilarityNull(
                per_concept.score[i],
                None if per_concept.null is None else per_concept.null[:, i],
                None if per_concept.bootstrap is None else per_concept.bootstrap[:, i],
                seed, level,
            )
            for i, c in enumerate(concepts)
        }
    return result


def supervised_sums(readers: Sequence[EntryReader], columns: Sequence[Sequence[int]], rows: range, threshold: float, batch_size: int) -> dict[str, Any]:
    """The sums :func:`supervised_similarity` reduces, over the test images ``rows``.

    Parameters
    ----------
    readers : sequence of EntryReader
        Each layer's concept maps.
    columns : sequence of sequence of int
        Per layer, the map channels of the compared concepts (in the concepts' order).
    rows : range
        Test images summed over (read ``batch_size`` at a time from ``rows.start``).
    threshold, batch_size
        As for :func:`supervised_similarity`.

    Returns
    -------
    dict
        ``intersection``, ``minimum``, ``cross`` (K, L, L), ``binary``, ``total``, ``squares``
        (K, L) float64 sums and ``count`` (cells summed per map). ``intersection`` and
        ``binary`` are counts: exact, whatever the split of the images.
    """
    n, k = len(readers), len(columns[0])
    stats: dict[str, Any] = {name: np.zeros((k, n, n)) for name in ("intersection", "minimum", "cross")}
    stats.update({name: np.zeros((k, n)) for name in ("binary", "total", "squares")})
    count = 0
    for batch in _batches(rows, batch_size):
        maps = [reader.rows(batch)["maps"][:, cols].float() for reader, cols in zip(readers, columns)]
        for c in range(k):
            values = torch.stack([m[:, c].reshape(-1) for m in maps])  # (n layers, pixels)
            _accumulate(stats, c, values, threshold)
        count += maps[0][:, 0].numel()
    stats["count"] = count
    return stats


def supervised_shard(maps: list[dict[str, Any]], columns: list[list[int]], rows: list[int], threshold: float, batch_size: int) -> dict[str, Any]:
    """:func:`supervised_sums` of the images ``range(*rows)`` on a worker (``maps``: entry references)."""
    return supervised_sums(_readers(maps), columns, range(*rows), threshold, batch_size)


def _supervised_binary(readers: Sequence[EntryReader], columns: Sequence[Sequence[int]], threshold: float):
    """``read_binary(rows)`` of the null: the binarised maps (K concepts, L layers, b, cells)."""
    def read_binary(rows: range) -> torch.Tensor:
        maps = [reader.rows(rows)["maps"][:, cols].float() > threshold for reader, cols in zip(readers, columns)]
        return torch.stack(maps).flatten(3).permute(2, 0, 1, 3).float()

    return read_binary


def _ncav_binary(readers: Sequence[EntryReader], maxima: Sequence[torch.Tensor], tau: float):
    """``read_binary(rows)`` of the null: every NCAV map of every layer, binarised (1 group, all NCAVs, b, cells)."""
    def read_binary(rows: range) -> torch.Tensor:
        maps = [reader.rows(rows)["maps"].float() / top.clamp(min=1e-12).view(1, -1, 1, 1) > tau for reader, top in zip(readers, maxima)]
        return torch.cat(maps, dim=1).flatten(2).transpose(0, 1).unsqueeze(0).float()

    return read_binary


def null_shard(binary: dict[str, Any], n_items: int, n_permutations: int, seed: int, rows: list[int]) -> dict[str, np.ndarray]:
    """The null's :func:`~conceptlens.concepts.compare.nulls.overlap_sums` of the row images ``range(*rows)`` on a worker.

    ``binary``: ``maps`` (entry references) and either ``columns`` and ``threshold`` (supervised)
    or ``maxima`` and ``tau`` (NCAVs); the permutations are drawn again from ``seed``.
    """
    readers = _readers(binary["maps"])
    if "columns" in binary:
        read_binary = _supervised_binary(readers, binary["columns"], binary["threshold"])
    else:
        read_binary = _ncav_binary(readers, [torch.as_tensor(np.asarray(m)) for m in binary["maxima"]], binary["tau"])
    return overlap_sums(read_binary, n_items, random_permutations(n_items, n_permutations, seed), range(*rows))


def _overlaps(read_binary, binary: dict[str, Any], n_items: int, n_permutations: int, seed: int, progress: bool, runner: ShardRunner | None):
    """The null's overlap counts: here through ``read_binary``, or per shard of row images on the runner's workers (``binary``)."""
    parts = map_rows(runner, "similarity.null", n_items, {"binary": binary, "n_items": n_items, "n_permutations": n_permutations, "seed": seed},
                     "similarity null (image permutations)",
                     lambda rows: overlap_sums(read_binary, n_items, random_permutations(n_items, n_permutations, seed), rows, progress=progress))
    return combine_overlaps(parts)


def _uncertainty(score: np.ndarray, overlaps, scores, n_bootstrap: int, seed: int, level: float) -> SimilarityNull:
    """Null draws (upper triangle mirrored: the row layer keeps its images) and bootstrap draws."""
    totals = overlaps.sizes.sum(axis=0)
    null = None
    if len(overlaps.permuted):
        null = scores(overlaps.permuted, np.broadcast_to(totals, (len(overlaps.permuted), *totals.shape)))
        lower = np.tril_indices(score.shape[-1], -1)
        null[..., lower[0], lower[1]] = null[..., lower[1], lower[0]]
    bootstrap = None
    if n_bootstrap > 0:
        counts = bootstrap_counts(overlaps.per_item.shape[0], n_bootstrap, seed)
        inter = np.tensordot(counts, overlaps.per_item, axes=1)
        bootstrap = scores(inter, np.tensordot(counts, overlaps.sizes, axes=1))
    return SimilarityNull(score, null, bootstrap, seed, level)


def _concept_set_iou_scores(intersection: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Set IoU of each concept from (R, K, L, L) intersections and (R, K, L) sizes -> (R, K, L, L) (NaN: empty union)."""
    union = sizes[..., :, None] + sizes[..., None, :] - intersection
    return _ratio(intersection, union)


def _set_iou_scores(intersection: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Mean set IoU over concepts from (R, K, L, L) intersections and (R, K, L) sizes -> (R, L, L)."""
    iou = _concept_set_iou_scores(intersection, sizes)
    counts = np.isfinite(iou).sum(axis=1)
    return _ratio(np.where(np.isfinite(iou), iou, 0.0).sum(axis=1), counts.astype(float))


def _accumulate(stats: dict[str, np.ndarray], c: int, values: torch.Tensor, threshold: float) -> None:
    # Sums accumulate in float64 without float64 copies of the maps (``sum(dtype=...)``); binary
    # counts are exact in float32 up to 2^24 cells per batch.
    binary = (values > threshold).float()
    stats["intersection"][c] += (binary @ binary.T).double().numpy()
    stats["binary"][c] += binary.sum(dim=1, dtype=torch.float64).numpy()
    wide = values.double()
    stats["cross"][c] += (wide @ wide.T).numpy()
    stats["total"][c] += values.sum(dim=1, dtype=torch.float64).numpy()
    stats["squares"][c] += (wide * wide).sum(dim=1).numpy()
    for i in range(values.shape[0]):  # Σ min(p_i, p_j) for j ≥ i, mirrored
        minimum = torch.minimum(values[i : i + 1], values[i:]).sum(dim=1, dtype=torch.float64).numpy()
        stats["minimum"][c, i, i:] += minimum
        stats["minimum"][c, i + 1 :, i] += minimum[1:]


def _supervised_result(layers: Sequence[LayerMaps], concepts: list[str], stats: dict[str, np.ndarray], count: int) -> SupervisedSimilarity:
    n = len(layers)
    set_iou, soft_iou, pearson, undefined, blind = {}, {}, {}, [], []
    for c, concept in enumerate(concepts):
        binary, total, squares = stats["binary"][c], stats["total"][c], stats["squares"][c]
        union = binary[:, None] + binary[None, :] - stats["intersection"][c]
        set_iou[concept] = _ratio(stats["intersection"][c], union)
        soft_union = total[:, None] + total[None, :] - stats["minimum"][c]
        soft_iou[concept] = _ratio(stats["minimum"][c], soft_union)
        covariance = count * stats["cross"][c] - np.outer(total, total)
        spread = np.sqrt(np.clip(count * squares - total**2, 0, None))
        pearson[concept] = _ratio(covariance, np.outer(spread, spread))
        for i in range(n):
            for j in range(n):
                if union[i, j] == 0:
                    undefined.append((concept, i, j, "neither layer predicts this concept anywhere on the test images"))
                if _is_blind(layers[i], concept) or _is_blind(layers[j], concept):
                    blind.append((concept, i, j))
    matrix = _nanmean_stack([set_iou[c] for c in concepts])
    return SupervisedSimilarity([layer.label for layer in layers], concepts, set_iou, soft_iou, pearson, matrix, blind, undefined)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _nanmean_stack(matrices: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack(matrices)
    counts = np.isfinite(stacked).sum(axis=0)
    sums = np.where(np.isfinite(stacked), stacked, 0).sum(axis=0)
    return _ratio(sums, counts.astype(float))


def _is_blind(layer: LayerMaps, concept: str) -> bool:
    value = layer.ground_truth_iou.get(concept)
    return value is None or value < BLIND_LAYER_IOU


def _common_concepts(layers: Sequence[LayerMaps], concepts: Sequence[str] | None) -> list[str]:
    shared = [c for c in layers[0].concepts if all(c in layer.concepts for layer in layers[1:])]
    if concepts is None:
        if not shared:
            raise CompareError("concepts", "the layers' banks share no concept name", "probe every layer for the same concepts")
        return shared
    for concept in concepts:
        for layer in layers:
            if concept not in layer.concepts:
                raise CompareError(f"concept {concept!r}", f"not in the bank of {layer.label}", f"its concepts: {closest_names(concept, layer.concepts)}")
    return list(concepts)


# ----------------------------------------------------------------------------- unsupervised
def pairwise_set_iou(intersections: np.ndarray, sizes_a: np.ndarray, sizes_b: np.ndarray) -> np.ndarray:
    """Set IoU of every NCAV pair from pooled intersections (k1, k2) and mask sizes (k1,), (k2,).

    Two NCAVs that are both empty on every test image get 0 (they share nothing observable).
    """
    union = sizes_a[:, None] + sizes_b[None, :] - intersections
    return np.nan_to_num(_ratio(intersections, union), nan=0.0)


def best_match_mean(similarity: np.ndarray) -> float:
    """Symmetric best-match mean ``½[(1/k1)Σ_i max_j s_ij + (1/k2)Σ_j max_i s_ij]``."""
    return 0.5 * (float(similarity.max(axis=1).mean()) + float(similarity.max(axis=0).mean()))


def hungarian_mean(similarity: np.ndarray) -> tuple[float, list[tuple[int, int, float]]]:
    """Mean similarity of the one-to-one matching that maximises the total, and the matched pairs."""
    rows, cols = linear_sum_assignment(-similarity)
    pairs = [(int(i), int(j), float(similarity[i, j])) for i, j in zip(rows, cols)]
    return float(np.mean([s for _, _, s in pairs])), pairs


@dataclass
class UnsupervisedSimilarity:
    """Layer × layer similarity of NCAV maps: best-match and Hungarian means, per-pair details."""

    labels: list[str]
    best_match: np.ndarray
    hungarian: np.ndarray
    pair_iou: dict[tuple[int, int], np.ndarray]
    matched: dict[tuple[int, int], list[tuple[int, int, float]]]
    empty_ncavs: dict[str, list[str]]
    uncertainty: SimilarityNull | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "best_match": _json_matrix(self.best_match),
            "hungarian": _json_matrix(self.hungarian),
            "pairs": [
                {"a": self.labels[i], "b": self.labels[j], "set_iou": _json_matrix(self.pair_iou[(i, j)]), "matched": [list(p) for p in self.matched[(i, j)]]}
                for (i, j) in sorted(self.pair_iou)
            ],
            "empty_ncavs": self.empty_ncavs,
            **_uncertainty_dict(self.uncertainty),
        }


def unsupervised_similarity(
    layers: Sequence[LayerMaps],
    tau: float = 0.5,
    batch_size: int = 16,
    *,
    n_permutations: int = 0,
    n_bootstrap: int = 0,
    seed: int = 0,
    level: float = 0.95,
    progress: bool = False,
    runner: ShardRunner | None = None,
) -> UnsupervisedSimilarity:
    """Compare NCAV maps of every pair of layers (two streaming passes: maxima, then overlaps).

    ``n_permutations``, ``n_bootstrap``, ``seed``, ``level`` and ``progress``: the null and the
    CI of the best-match matrix, as in :func:`supervised_similarity` (0, 0: none, the result is
    the same as without them). ``runner``: both passes and the null per shard of the test
    images on workers (maxima and counts: the same numbers as here, exactly).
    """
    n_items = _check_same_items(layers)
    readers = [EntryReader(layer.maps) for layer in layers]
    references = [entry_reference(layer.maps) for layer in layers] if runner is not None else []
    parts = map_rows(runner, "similarity.maxima", n_items, {"maps": references, "batch_size": batch_size}, "NCAV maxima (images)",
                     lambda rows: ncav_maxima(readers, rows, batch_size))
    maxima = [torch.from_numpy(np.maximum.reduce([part[l] for part in parts])) for l in range(len(layers))]
    common = {"maps": references, "maxima": [m.numpy() for m in maxima], "tau": tau, "batch_size": batch_size}
    parts = map_rows(runner, "similarity.overlaps", n_items, common, "NCAV overlaps (images)", lambda rows: ncav_overlap_sums(readers, maxima, tau, rows, batch_size))
    sums = sum_parts(parts)
    n = len(layers)
    intersections = dict(zip([(i, j) for i in range(n) for j in range(i, n)], sums["intersections"]))
    result = _unsupervised_result(layers, intersections, sums["sizes"], maxima)
    if n_permutations > 0 or n_bootstrap > 0:
        binary = {"maps": references, "maxima": common["maxima"], "tau": tau}
        overlaps = _overlaps(_ncav_binary(readers, maxima, tau), binary, n_items, n_permutations, seed, progress, runner)
        ends = np.cumsum([len(layer.concepts) for layer in layers])
        slices = [slice(end - len(layer.concepts), end) for end, layer in zip(ends, layers)]

        def scores(intersection: np.ndarray, sizes: np.ndarray) -> np.ndarray:
            return _best_match_scores(intersection[:, 0], sizes[:, 0], slices)

        result.uncertainty = _uncertainty(result.best_match, overlaps, scores, n_bootstrap, seed, level)
        if result.uncertainty.bootstrap is not None:  # a layer matches itself by definition (best_match's diagonal)
            diagonal = np.arange(len(layers))
            result.uncertainty.bootstrap[:, diagonal, diagonal] = 1.0
    return result


def ncav_maxima(readers: Sequence[EntryReader], rows: range, batch_size: int) -> list[np.ndarray]:
    """Per layer, each NCAV map's maximum over the test images ``rows`` (float32; 0 for maps ≤ 0)."""
    maxima = [None] * len(readers)
    for batch in _batches(rows, batch_size):
        for l, reader in enumerate(readers):
            top = reader.rows(batch)["maps"].float().amax(dim=(0, 2, 3))
            maxima[l] = torch.maximum(torch.zeros_like(top) if maxima[l] is None else maxima[l], top)
    return [m.numpy() for m in maxima]


def maxima_shard(maps: list[dict[str, Any]], rows: list[int], batch_size: int) -> list[np.ndarray]:
    """:func:`ncav_maxima` of the images ``range(*rows)`` on a worker."""
    return ncav_maxima(_readers(maps), range(*rows), batch_size)


def ncav_overlap_sums(readers: Sequence[EntryReader], maxima: Sequence[torch.Tensor], tau: float, rows: range, batch_size: int) -> dict[str, list[np.ndarray]]:
    """Binarised NCAV map sizes and overlaps over the test images ``rows`` (maps normalised by ``maxima``).

    Returns ``sizes`` (per layer, (k_l,)) and ``intersections`` (per layer pair i ≤ j in row-major
    order, (k_i, k_j)): cell counts, exact whatever the split of the images.
    """
    widths = [len(m) for m in maxima]
    sizes = [np.zeros(k) for k in widths]
    pairs = [(i, j) for i in range(len(readers)) for j in range(i, len(readers))]
    intersections = [np.zeros((widths[i], widths[j])) for i, j in pairs]
    for batch in _batches(rows, batch_size):
        binary = []
        for l, reader in enumerate(readers):
            maps = reader.rows(batch)["maps"].float()
            normalised = maps / maxima[l].clamp(min=1e-12).view(1, -1, 1, 1)
            binary.append((normalised > tau).float().movedim(1, -1).reshape(-1, widths[l]))
            sizes[l] += binary[-1].sum(dim=0).double().numpy()
        for p, (i, j) in enumerate(pairs):
            intersections[p] += (binary[i].T @ binary[j]).double().numpy()
    return {"sizes": sizes, "intersections": intersections}


def overlaps_shard(maps: list[dict[str, Any]], maxima: list[np.ndarray], tau: float, rows: list[int], batch_size: int) -> dict[str, list[np.ndarray]]:
    """:func:`ncav_overlap_sums` of the images ``range(*rows)`` on a worker."""
    return ncav_overlap_sums(_readers(maps), [torch.as_tensor(np.asarray(m)) for m in maxima], tau, range(*rows), batch_size)


def _best_match_scores(intersection: np.ndarray, sizes: np.ndarray, slices: list[slice]) -> np.ndarray:
    """Best-match means of every layer pair from (R, C, C) NCAV intersections and (R, C) sizes."""
    out = np.zeros((intersection.shape[0], len(slices), len(slices)))
    for i, rows in enumerate(slices):
        for j, cols in enumerate(slices):
            if j < i:
                continue
            inter = intersection[:, rows, cols]
            union = sizes[:, rows, None] + sizes[:, None, cols] - inter
            iou = np.nan_to_num(_ratio(inter, union), nan=0.0)
            out[:, i, j] = out[:, j, i] = 0.5 * (iou.max(axis=2).mean(axis=1) + iou.max(axis=1).mean(axis=1))
    return out


def _unsupervised_result(layers, intersections, sizes, maxima) -> UnsupervisedSimilarity:
    n = len(layers)
    best, hungarian = np.eye(n), np.eye(n)
    pair_iou, matched = {}, {}
    for (i, j), inter in intersections.items():
        similarity = pairwise_set_iou(inter, sizes[i], sizes[j])
        pair_iou[(i, j)] = similarity
        best[i, j] = best[j, i] = best_match_mean(similarity)
        score, matched[(i, j)] = hungarian_mean(similarity)
        hungarian[i, j] = hungarian[j, i] = score
    empty = {layer.label: [c for c, m in zip(layer.concepts, maxima[l]) if m <= 0] for l, layer in enumerate(layers)}
    return UnsupervisedSimilarity([layer.label for layer in layers], best, hungarian, pair_iou, matched, {k: v for k, v in empty.items() if v})


# ---------------------------------------------------------------------------------- depth
def relative_depths(names: Sequence[str], order: Sequence[str] | None = None) -> list[float]:
    """Relative depth in [0, 1] of each layer.

    Without ``order``: rank among ``names`` (given shallow to deep) / (n − 1). With ``order``
    (every module in execution order, e.g. from :func:`conceptlens.concepts.models.loading.list_layers`): rank of
    each layer's module in that order / (len(order) − 1).
    """
    if order is None:
        return [i / (len(names) - 1) if len(names) > 1 else 0.0 for i in range(len(names))]
    position = {name: i for i, name in enumerate(order)}
    missing = [name for name in names if name.split(":")[0] not in position and name not in position]
    if missing:
        raise CompareError(f"layers {missing}", "not in the module order", "list layers with `conceptlens layers MODEL`")
    ranks = [position.get(name, position.get(name.split(":")[0])) for name in names]
    return [r / (len(order) - 1) if len(order) > 1 else 0.0 for r in ranks]


def ridge(matrix: np.ndarray, depths_a: Sequence[float], depths_b: Sequence[float]) -> dict[str, Any]:
    """For each layer of A (rows), the best-matching layer of B (columns) and the depth correlation.

    Returns ``{"pairs": [{"a": i, "b": j, "depth_a", "depth_b", "score"}], "depth_correlation": r}``
    (r is None when fewer than 3 layers or a constant depth sequence).
    """
    pairs = []
    for i, row in enumerate(matrix):
        if not np.isfinite(row).any():
            continue
        j = int(np.nanargmax(row))
        pairs.append({"a": i, "b": j, "depth_a": float(depths_a[i]), "depth_b": float(depths_b[j]), "score": float(row[j])})
    correlation = None
    if len(pairs) >= 3:
        x = np.array([p["depth_a"] for p in pairs])
        y = np.array([p["depth_b"] for p in pairs])
        if x.std() > 0 and y.std() > 0:
            correlation = float(np.corrcoef(x, y)[0, 1])
    return {"pairs": pairs, "depth_correlation": correlation if correlation is None or math.isfinite(correlation) else None}

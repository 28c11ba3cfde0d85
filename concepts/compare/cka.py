"""Linear CKA (Kornblith et al. 2019), the representation-similarity baseline, with a null and CIs
(docs/METHODS.md §7).

* :func:`linear_cka`: the closed form ``‖ỸᵀX̃‖_F² / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)`` on centred features.
* :class:`LinearCKA`: the same value, exact, streamed over batches of samples: it accumulates the
  sums ``Σz`` and ``Σzzᵀ`` of every layer's features side by side, so the result does not depend
  on the batch size and every sample counts once.
* :class:`MinibatchCKA`: the minibatch estimator of Nguyen et al. (2021) (unbiased HSIC₁ per
  batch, averaged with weights proportional to the batch size; a batch under 4 samples raises).
* :func:`cka_statistics`: every layer pair of several store entries on a set of items, with pooled
  features (one sample per image: the mean over the image's own cells, padding left out) or
  spatial features (every cell of a common grid over each original image); optionally a
  permutation null (test images permuted between the two layers) and bootstrap CIs over test
  images, both computed from the Gram matrices of the samples. Its streamed sums are
  :func:`cka_sums` of image ranges (one range here, one per shard on a runner's workers).
* :func:`cka_matrix`: the CKA matrix alone.

Example
-------
>>> import torch
>>> x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> round(linear_cka(x, 3.0 * x + 1.0), 6)
1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from conceptlens.concepts.progress import progress_bar

from conceptlens.concepts.compare.nulls import SimilarityNull, bootstrap_counts, random_permutations
from conceptlens.concepts.compare.shards import ShardRunner, entry_reference, map_rows, open_reference
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.geometry import Geometry, features_to_grid, image_cells
from conceptlens.concepts.store.activations import EntryReader, StoreEntry

__all__ = [
    "CKAError",
    "CKAStatistics",
    "LinearCKA",
    "MinibatchCKA",
    "cka_matrix",
    "cka_statistics",
    "cka_sums",
    "layer_features",
    "linear_cka",
    "unbiased_hsic",
]

#: Default cap on the samples (images × cells) the null and the bootstrap use (their Gram is n × n).
MAX_NULL_SAMPLES = 512


class CKAError(ConceptLensError, ValueError):
    """Features that cannot give a CKA value (a batch too small, entries of different sizes)."""


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Closed-form linear CKA of two feature matrices (n, p) and (n, q) (centred here)."""
    x = (x - x.mean(dim=0)).double()
    y = (y - y.mean(dim=0)).double()
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def unbiased_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased HSIC₁ (Song et al. 2012) of linear kernels ``K = XXᵀ``, ``L = YYᵀ`` (n ≥ 4).

    With ``K̃``, ``L̃`` the Gram matrices with zeroed diagonals:
    ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2·1ᵀK̃L̃1 / (n−2)] / (n(n−3))``,
    each term computed from X and Y in O(n·p·q).
    """
    x, y = x.double(), y.double()
    n = x.shape[0]
    norms_x, norms_y = (x * x).sum(dim=1), (y * y).sum(dim=1)
    trace = (x.T @ y).pow(2).sum() - (norms_x * norms_y).sum()
    row_sums_k = x @ x.sum(dim=0) - norms_x  # K̃ 1
    row_sums_l = y @ y.sum(dim=0) - norms_y  # L̃ 1
    total_k, total_l = row_sums_k.sum(), row_sums_l.sum()
    value = trace + total_k * total_l / ((n - 1) * (n - 2)) - 2 * (row_sums_k * row_sums_l).sum() / (n - 2)
    return float(value / (n * (n - 3)))


class MinibatchCKA:
    """Minibatch linear CKA between every pair of ``n_layers`` feature sets (Nguyen et al. 2021).

    Each batch contributes its unbiased HSIC₁ weighted by its number of samples, so unequal
    batches count in proportion to their size. HSIC₁ needs n ≥ 4: a smaller batch raises
    :class:`CKAError` instead of being dropped (merge it into a neighbour). :class:`LinearCKA`
    is the exact, batch-size-free alternative :func:`cka_statistics` uses.
    """

    def __init__(self, n_layers: int) -> None:
        self.hsic = np.zeros((n_layers, n_layers))
        self.batches = 0
        self.samples = 0

    def update(self, features: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: per layer a (samples, channels) matrix, same samples in the same order."""
        n = int(features[0].shape[0])
        if n < 4:
            raise CKAError(f"minibatch {self.batches}", f"has {n} samples; the unbiased HSIC needs at least 4", "merge it into the previous batch")
        for i in range(len(features)):
            for j in range(i, len(features)):
                self.hsic[i, j] += n * unbiased_hsic(features[i], features[j])
                self.hsic[j, i] = self.hsic[i, j]
        self.batches += 1
        self.samples += n

    def compute(self) -> np.ndarray:
        """The (n_layers, n_layers) CKA matrix."""
        diagonal = np.sqrt(np.clip(np.diag(self.hsic), 1e-300, None))
        return self.hsic / np.outer(diagonal, diagonal)


class LinearCKA:
    """Exact linear CKA between every pair of feature sets, streamed over batches of samples.

    Accumulates ``Σz`` and ``Σzzᵀ`` of the concatenated features ``z = [x₁, …, x_L]`` (shifted by
    the first batch's mean for accuracy); the centred cross-covariances ``C_ij`` then give
    ``CKA_ij = ‖C_ij‖_F² / (‖C_ii‖_F ‖C_jj‖_F)``, the value :func:`linear_cka` gives on all
    samples at once, whatever the batches. Memory: ``(Σ C_l)²`` float64.

    Parameters
    ----------
    widths : sequence of int
        Channels of each feature set.
    """

    def __init__(self, widths: Sequence[int], shift: torch.Tensor | None = None) -> None:
        self.offsets = np.cumsum([0, *[int(w) for w in widths]])
        size = int(self.offsets[-1])
        self.total = torch.zeros(size, dtype=torch.float64)
        self.cross = torch.zeros(size, size, dtype=torch.float64)
        self.shift = shift  # None: the first batch's mean
        self.samples = 0

    def merge(self, other: LinearCKA) -> None:
        """Add the sums of ``other``, accumulated with the same ``shift`` over other samples."""
        if self.shift is None or other.shift is None or not torch.equal(self.shift, other.shift):
            raise CKAError("LinearCKA.merge", "the two accumulators have different shifts", "give every part the same shift= (e.g. the first batch's mean)")
        self.total += other.total
        self.cross += other.cross
        self.samples += other.samples

    def update(self, features: Sequence[torch.Tensor]) -> None:
        """Add samples: per feature set a (samples, channels) matrix, same samples in the same order."""
        z = torch.cat([f.double().cpu() for f in features], dim=1)
        if self.shift is None:
            self.shift = z.mean(dim=0)
        z = z - self.shift
        self.total += z.sum(dim=0)
        self.cross += z.T @ z
        self.samples += int(z.shape[0])

    def compute(self) -> np.ndarray:
        """The (L, L) CKA matrix; NaN where a feature set is constant."""
        if self.samples < 2:
            raise CKAError("CKA", f"got {self.samples} samples", "compare at least 2 test images")
        covariance = self.cross - torch.outer(self.total, self.total) / self.samples
        n = len(self.offsets) - 1
        blocks = [[covariance[self.offsets[i] : self.offsets[i + 1], self.offsets[j] : self.offsets[j + 1]] for j in range(n)] for i in range(n)]
        squared = np.array([[float(blocks[i][j].pow(2).sum()) for j in range(n)] for i in range(n)])
        return _normalised(squared)


def _normalised(cross: np.ndarray) -> np.ndarray:
    """``cross_ij / sqrt(cross_ii cross_jj)``, NaN where a diagonal term is zero."""
    diagonal = np.sqrt(np.clip(np.diag(cross), 0.0, None))
    denominator = np.outer(diagonal, diagonal)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, cross / np.where(denominator > 0, denominator, 1.0), np.nan)


def layer_features(activations: torch.Tensor, geometries: Sequence[Geometry], mode: str, grid: tuple[int, int]) -> torch.Tensor:
    """Turn a batch of activations (B, C, h, w) into CKA samples.

    ``pooled``: one sample per image, the mean over the cells that lie on the image (padding left
    out, as ``reduce='mean'`` does), (B, C). ``spatial``: the map sampled on a common grid over
    each original image, one sample per (image, cell), (B·Gh·Gw, C).
    """
    samples = _image_samples(activations, geometries, mode, grid)
    return samples.reshape(-1, samples.shape[-1])


def _image_samples(activations: torch.Tensor, geometries: Sequence[Geometry], mode: str, grid: tuple[int, int]) -> torch.Tensor:
    """Per image its CKA samples: (B, 1, C) pooled, (B, Gh·Gw, C) spatial, (B, 1, C) for pooled entries."""
    if activations.dim() == 2:
        return activations.float()[:, None]
    if mode not in ("pooled", "spatial"):
        raise CKAError(f"mode={mode!r}", "is not a CKA mode", "use 'pooled' or 'spatial'")
    activations = activations.float()
    if mode == "pooled":
        cells = torch.stack([image_cells(g, tuple(activations.shape[-2:])) for g in geometries])[:, None].to(activations.device)
        return ((activations * cells).sum(dim=(2, 3)) / cells.sum(dim=(2, 3)).clamp(min=1))[:, None]
    sampled = features_to_grid(activations, geometries, grid)
    return sampled.flatten(2).transpose(1, 2)


@dataclass
class CKAStatistics:
    """Linear CKA of every layer pair with its permutation null and bootstrap CI.

    Attributes
    ----------
    cka : ndarray
        (L, L) exact linear CKA over every sample.
    mode : str
        ``pooled`` or ``spatial``.
    n_images : int
        Test images compared.
    null_mean, p_value, ci_low, ci_high : ndarray or None
        (L, L): mean CKA under the null, permutation p-value ``(1 + #{null ≥ s}) / (P + 1)``,
        percentile bootstrap interval; None when that part is off.
    n_permutations, n_bootstrap, seed : int
        Permutations ``P``, bootstrap replicates ``B``, seed of both.
    level : float
        Level of the CI.
    null_images, null_cells : int
        Images and cells per image the null and the bootstrap use (at most ``max_samples`` samples).
    uncertainty : SimilarityNull or None
        The draws: ``score`` is the CKA on those samples (the p-value's statistic; equal to
        ``cka`` when every sample is used), ``null`` (P, L, L), ``bootstrap`` (B, L, L).
    """

    cka: np.ndarray
    mode: str
    n_images: int
    null_mean: np.ndarray | None = None
    p_value: np.ndarray | None = None
    ci_low: np.ndarray | None = None
    ci_high: np.ndarray | None = None
    n_permutations: int = 0
    n_bootstrap: int = 0
    seed: int = 0
    level: float = 0.95
    null_images: int = 0
    null_cells: int = 0
    uncertainty: SimilarityNull | None = field(default=None, repr=False)

    def corrected(self) -> np.ndarray | None:
        """Chance-corrected CKA ``(s − null) / (1 − null)``; None without a null."""
        if self.null_mean is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.null_mean < 1, (self.cka - self.null_mean) / (1 - self.null_mean), np.nan)


def cka_matrix(
    entries: Sequence[StoreEntry], indices: Sequence[int], mode: str = "pooled", grid: tuple[int, int] = (8, 8), batch_size: int = 32
) -> np.ndarray:
    """Exact linear CKA between the activations of every pair of store entries (see :func:`cka_statistics`)."""
    return cka_statistics(entries, indices, mode=mode, grid=grid, batch_size=batch_size).cka


def cka_statistics(
    entries: Sequence[StoreEntry],
    indices: Sequence[int],
    mode: str = "pooled",
    grid: tuple[int, int] = (8, 8),
    batch_size: int = 32,
    *,
    n_permutations: int = 0,
    n_bootstrap: int = 0,
    seed: int = 0,
    level: float = 0.95,
    max_samples: int = MAX_NULL_SAMPLES,
    progress: bool = False,
    runner: ShardRunner | None = None,
) -> CKAStatistics:
    """Linear CKA of every pair of store entries on ``indices``, with an optional null and CIs.

    Parameters
    ----------
    entries : sequence of StoreEntry
        Activation entries of the same dataset items (maps of any padded size, or pooled vectors).
    indices : sequence of int
        Items compared (e.g. the test split), read ``batch_size`` at a time, shard by shard (shards
        of different padded map sizes are fine).
    mode : {'pooled', 'spatial'}
        One sample per image (mean over its own cells) or one per (image, cell of ``grid``).
    grid : (int, int)
        Grid of the spatial samples.
    batch_size : int
        Images read at a time; the value does not depend on it (exact streamed CKA).
    n_permutations : int
        ``P`` permutations of the test images of one layer against the other; 0: no null.
    n_bootstrap : int
        ``B`` bootstrap replicates over test images; 0: no CI.
    seed : int
        Seed of the permutations and the bootstrap (drawn as in
        :mod:`~conceptlens.concepts.compare.nulls`) and of the sample subset.
    level : float
        CI level.
    max_samples : int
        Most samples the null and the bootstrap use: every image and every cell when they fit,
        else a seeded subset of grid cells (the same cells in every image) and, if still too
        many, of images. The p-value compares the CKA *on that subset* with its null; the CI is
        the subset's bootstrap interval shifted by the difference of the two CKA values.
    progress : bool
        Progress bar over batches.
    runner : ShardRunner, optional
        Sums shards of the compared items on workers and adds them here (None: one range, here).

    Returns
    -------
    CKAStatistics

    Raises
    ------
    CKAError
        Fewer than 2 items, entries with a different number of samples per image.
    """
    indices = np.asarray([int(i) for i in indices], dtype=np.int64)
    null_on = n_permutations > 0 or n_bootstrap > 0
    if len(indices) < 2:
        raise CKAError("CKA", f"got {len(indices)} test images", "compare at least 2 test images")
    readers = [EntryReader(entry) for entry in entries]
    whole = [entry.manifest().get("request", {}).get("reduce") == "grid" for entry in entries]
    first = [_read_samples(reader, indices[:batch_size], mode, grid, w) for reader, w in zip(readers, whole)]
    _check_samples(first, entries)
    widths, n_cells = [int(s.shape[-1]) for s in first], int(first[0].shape[1])
    shift = torch.cat([s.reshape(-1, s.shape[-1]).double().cpu() for s in first], dim=1).mean(dim=0)  # LinearCKA's own shift
    images_kept = cells_kept = None
    if null_on:
        images_kept, cells_kept = _null_subset(len(indices), n_cells, max_samples, torch.Generator().manual_seed(int(seed)))
    common = {"entries": [entry_reference(e) for e in entries] if runner is not None else [], "whole": whole, "indices": indices, "mode": mode,
              "grid": list(grid), "batch_size": batch_size, "widths": widths, "shift": shift.numpy(),
              "keep": None if images_kept is None else images_kept.numpy(), "cells": None if cells_kept is None else cells_kept.numpy()}
    parts = map_rows(runner, "cka", len(indices), common, f"CKA {mode} (images)", lambda rows: cka_sums(
        readers, entries, whole, indices, rows, mode, grid, batch_size, widths, shift, images_kept, cells_kept, progress))
    accumulator = _accumulator(parts[0], widths, shift)
    for part in parts[1:]:
        accumulator.merge(_accumulator(part, widths, shift))
    result = CKAStatistics(accumulator.compute(), mode, len(indices), n_permutations=int(n_permutations), n_bootstrap=int(n_bootstrap), seed=int(seed), level=float(level))
    if null_on:
        held = [torch.cat([torch.from_numpy(part["held"][l]) for part in parts]) for l in range(len(entries))]
        subset = bool(images_kept.sum() < len(indices) or len(cells_kept) < n_cells)
        _add_null(result, held, n_permutations, n_bootstrap, level, subset)
    return result


def cka_sums(
    readers: Sequence[EntryReader], entries: Sequence[StoreEntry], whole: Sequence[bool], indices: np.ndarray, rows: range, mode: str,
    grid: tuple[int, int], batch_size: int, widths: Sequence[int], shift: torch.Tensor,
    images_kept: torch.Tensor | None = None, cells_kept: torch.Tensor | None = None, progress: bool = False,
) -> dict[str, Any]:
    """The streamed sums of :func:`cka_statistics` over the compared items ``indices[rows]``.

    Parameters
    ----------
    readers, entries, whole
        Per entry its reader, the entry (for error messages) and whether its maps are already on the concept grid.
    indices : ndarray
        Every compared item; ``rows`` selects this part's positions in it (read ``batch_size`` at a time).
    mode, grid, batch_size
        As for :func:`cka_statistics`.
    widths : sequence of int
        Channels per entry.
    shift : Tensor
        The :class:`LinearCKA` shift every part uses (the first batch's mean).
    images_kept, cells_kept : Tensor, optional
        The null's sample subset (a bool mask over all compared items, and cells); None without a null.
    progress : bool
        Progress bar over batches.

    Returns
    -------
    dict
        ``total`` (Σz), ``cross`` (Σzzᵀ), ``samples`` and, with a null, ``held``: per entry the
        kept samples of this part's kept images, (images, cells, C) float64.
    """
    accumulator, held = LinearCKA(widths, shift), [[] for _ in readers]
    for start in progress_bar(range(rows.start, rows.stop, batch_size), desc=f"CKA {mode}", unit="batch", show=progress):
        chosen = indices[start : min(start + batch_size, rows.stop)]
        samples = [_read_samples(reader, chosen, mode, grid, w) for reader, w in zip(readers, whole)]
        _check_samples(samples, entries)
        accumulator.update([s.reshape(-1, s.shape[-1]) for s in samples])
        if images_kept is not None:
            keep = images_kept[start : start + len(chosen)]
            for store, s in zip(held, samples):
                store.append(s[keep][:, cells_kept].double())
    out: dict[str, Any] = {"total": accumulator.total.numpy(), "cross": accumulator.cross.numpy(), "samples": accumulator.samples}
    if images_kept is not None:
        out["held"] = [torch.cat(h).numpy() for h in held]
    return out


def cka_shard(
    entries: list[dict[str, Any]], whole: list[bool], indices: np.ndarray, rows: list[int], mode: str, grid: list[int], batch_size: int,
    widths: list[int], shift: np.ndarray, keep: np.ndarray | None, cells: np.ndarray | None,
) -> dict[str, Any]:
    """:func:`cka_sums` of the positions ``range(*rows)`` of ``indices`` on a worker (``entries``: references)."""
    opened = [open_reference(reference) for reference in entries]
    return cka_sums([EntryReader(entry) for entry in opened], opened, whole, np.asarray(indices), range(*rows), mode, tuple(grid), batch_size, widths,
                    torch.from_numpy(np.asarray(shift)), None if keep is None else torch.from_numpy(np.asarray(keep)),
                    None if cells is None else torch.from_numpy(np.asarray(cells)))


def _accumulator(part: dict[str, Any], widths: Sequence[int], shift: torch.Tensor) -> LinearCKA:
    """A :class:`LinearCKA` holding the sums of one part, accumulated with ``shift`` (its tensors share the part's memory)."""
    accumulator = LinearCKA(widths, shift)
    accumulator.total, accumulator.cross, accumulator.samples = torch.from_numpy(part["total"]), torch.from_numpy(part["cross"]), int(part["samples"])
    return accumulator


def _read_samples(reader: EntryReader, rows: np.ndarray, mode: str, grid: tuple[int, int], whole: bool) -> torch.Tensor:
    """Per image of ``rows`` its samples (B, S, C), read shard by shard (padded map sizes may differ)."""
    shards = np.asarray([reader.shard_of(int(i)) for i in rows])
    out = None
    for number in np.unique(shards):
        where = np.nonzero(shards == number)[0]
        tensors = reader.rows(rows[where].tolist())
        activations = tensors["activations"]
        samples = _image_samples(activations, _geometries(tensors, activations, whole), mode, grid)
        if out is None:
            out = samples.new_empty((len(rows), *samples.shape[1:]))
        out[torch.from_numpy(where)] = samples
    return out


def _geometries(tensors: dict[str, torch.Tensor], activations: torch.Tensor, whole: bool) -> list[Geometry]:
    """The stored geometries; a map already on the concept grid (or without geometry) covers its whole canvas."""
    if activations.dim() != 4 or whole or "geometry" not in tensors:
        size = tuple(int(v) for v in activations.shape[-2:]) if activations.dim() == 4 else (1, 1)
        return [Geometry(size, size, (0, 0), size)] * int(activations.shape[0])
    return [Geometry.from_list(g.tolist()) for g in tensors["geometry"]]


def _check_samples(samples: list[torch.Tensor], entries: Sequence[StoreEntry]) -> None:
    counts = [int(s.shape[1]) for s in samples]
    if len(set(counts)) > 1:
        odd = entries[counts.index(min(counts))]
        raise CKAError(str(odd.path), f"gives {min(counts)} sample(s) per image where another entry gives {max(counts)}", "spatial CKA needs maps (embed with reduce='native' or 'grid'), or use mode='pooled'")


def _null_subset(n_images: int, cells: int, max_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (bool mask over the compared images) and cells the null and the bootstrap use."""
    per_image = max(1, min(cells, max_samples // n_images))
    cells_kept = torch.sort(torch.randperm(cells, generator=generator)[:per_image]).values
    n_kept = min(n_images, max(2, max_samples // per_image))
    images = torch.zeros(n_images, dtype=torch.bool)
    images[torch.randperm(n_images, generator=generator)[:n_kept]] = True
    return images, cells_kept


def _add_null(result: CKAStatistics, features: list[torch.Tensor], n_permutations: int, n_bootstrap: int, level: float, subset: bool) -> None:
    """Fill the null and the CI of ``result`` from the held samples (images, cells, C) of every layer.

    ``subset``: the samples are a subset of all; the CI is then the subset's percentile interval
    shifted by ``s − s'`` (the reported CKA minus the subset's), so that it lies around ``s``.

    Works on the centred Gram matrices of the samples (float32, (L, n, n)): a permutation of the
    test images is a gather of the column layer's Gram, ``⟨K_i, P L_j Pᵀ⟩`` one dot product.
    """
    n_images, n_cells = int(features[0].shape[0]), int(features[0].shape[1])
    grams = np.stack([_centred_gram(f.reshape(-1, f.shape[-1])) for f in features])  # (L, n, n)
    flat = grams.reshape(len(grams), -1)
    observed_cross = (flat @ flat.T).astype(np.float64)
    norms = np.sqrt(np.clip(np.diag(observed_cross), 0.0, None))
    outer = np.where(np.outer(norms, norms) > 0, np.outer(norms, norms), np.nan)
    null = None
    if n_permutations > 0:
        null = np.stack([
            _upper_mirrored(flat @ _permuted(grams, order, n_cells).reshape(len(grams), -1).T) / outer
            for order in random_permutations(n_images, n_permutations, result.seed)
        ])
    bootstrap = None
    if n_bootstrap > 0:
        counts = bootstrap_counts(n_images, n_bootstrap, result.seed).astype(np.int64)
        bootstrap = np.stack([_bootstrap_cka(grams, np.repeat(c, n_cells)) for c in counts])
    draws = SimilarityNull(_normalised(observed_cross), null, bootstrap, result.seed, level)
    result.uncertainty, result.null_images, result.null_cells = draws, n_images, n_cells
    if null is not None:
        result.null_mean, result.p_value = draws.null_mean(), draws.p_value()
    if bootstrap is not None:
        shift = result.cka - draws.score if subset else 0.0
        low, high = draws.interval()
        result.ci_low, result.ci_high = low + shift, high + shift


def _centred_gram(x: torch.Tensor) -> np.ndarray:
    x = (x - x.mean(dim=0)).double()
    return (x @ x.T).float().numpy()


def _permuted(grams: np.ndarray, image_order: np.ndarray, n_cells: int) -> np.ndarray:
    """Grams (L, n, n) with their samples reordered image by image (each image's cells move with it)."""
    layers, n_images = len(grams), len(image_order)
    blocks = grams.reshape(layers, n_images, n_cells, n_images, n_cells)
    return np.take(np.take(blocks, image_order, axis=1), image_order, axis=3).reshape(grams.shape)


def _upper_mirrored(matrix: np.ndarray) -> np.ndarray:
    """Keep the upper triangle (a permutation applied to the column layer) and mirror it."""
    upper = np.triu(matrix)
    return upper + np.triu(matrix, 1).T


def _bootstrap_cka(grams: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """CKA of every pair on a resample given as sample multiplicities ``w`` (no gather).

    For the resample's Grams ``K'``, ``L'`` (samples repeated ``w`` times, ``n = Σw``), re-centred:
    ``⟨HK'H, L'⟩ = Σ w_a w_b K_ab L_ab − (2/n) Σ_a w_a (Kw)_a (Lw)_a + (wᵀKw)(wᵀLw)/n²``.
    """
    n = float(weights.sum())
    weights = weights.astype(np.float32)
    root = np.sqrt(weights)
    flat = (grams * (root[:, None] * root[None, :])).reshape(len(grams), -1)
    rows = (grams @ weights).astype(np.float64)  # (L, n): K w
    totals = rows @ weights.astype(np.float64)
    cross = (flat @ flat.T).astype(np.float64) - 2.0 / n * (rows * weights) @ rows.T + np.outer(totals, totals) / n**2
    return _normalised(cross)

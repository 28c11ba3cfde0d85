"""Permutation nulls, chance correction and bootstrap CIs for layer × layer similarity.

A layer similarity (set IoU of binarised concept maps, or the NCAV best-match mean) has a floor set
by the maps' spatial statistics: two layers that predict centred blobs overlap even on unrelated
images. The null keeps each layer's own maps and breaks the correspondence the score measures by
pairing test image ``t`` of one layer with image ``π(t)`` of the other (``π`` uniform random
permutations of the test images, seeded). Everything derives from *overlap counts*:

* :func:`paired_overlaps` streams over pairs of item batches and accumulates, for every channel
  pair, ``Σ_t |b_x(t) ∧ b_y(π_p(t))|`` for every permutation ``p`` (a gather from the item × item
  overlap block, so the number of permutations costs almost nothing; the work is one binary
  product per pair of item batches, O(n²) in the test images), the true-pairing overlaps per
  item and the binarised map sizes per item (for the bootstrap over test images);
* scores under the null or under a bootstrap resample are recomputed from these counts (the union
  ``|x| + |y| − |x ∧ y|`` only needs the map sizes, which a permutation does not change);
* :class:`SimilarityNull` turns a score matrix, its null draws and its bootstrap draws into the
  null mean, the chance-corrected score ``(s − null)/(1 − null)``, the permutation p-value
  ``(1 + #{null_p ≥ s})/(P + 1)`` and the percentile CI; :func:`holm` corrects a family of
  p-values.

docs/METHODS.md §5 gives the formulas and defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from conceptlens.concepts.progress import progress_bar

__all__ = [
    "DEFAULT_N_PERMUTATIONS",
    "DEFAULT_N_BOOTSTRAP",
    "DEFAULT_ALPHA",
    "PairedOverlaps",
    "SimilarityNull",
    "combine_overlaps",
    "overlap_sums",
    "paired_overlaps",
    "random_permutations",
    "bootstrap_counts",
    "holm",
    "percentile_interval",
]

#: Null draws per cell: p-values are multiples of 1/1000, small enough for Holm over a block.
DEFAULT_N_PERMUTATIONS = 499
#: Bootstrap resamples of the test images.
DEFAULT_N_BOOTSTRAP = 200
#: Family-wise error rate of the Holm correction over a block's cells.
DEFAULT_ALPHA = 0.05


def random_permutations(n_items: int, n_permutations: int, seed: int) -> np.ndarray:
    """``(P, n)`` uniform random permutations of ``range(n_items)`` from a seeded generator."""
    rng = np.random.default_rng([seed, 0])
    return rng.permuted(np.tile(np.arange(n_items), (n_permutations, 1)), axis=1)


def bootstrap_counts(n_items: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """``(B, n)`` multiplicities of the test images in ``B`` resamples with replacement (seeded)."""
    rng = np.random.default_rng([seed, 1])
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_bootstrap).astype(np.float64)


@dataclass
class PairedOverlaps:
    """Overlap counts of binarised maps, channels grouped (one group per concept, or one for all).

    Attributes
    ----------
    observed : ndarray, (g, c, c)
        ``Σ_t |b_x(t) ∧ b_y(t)|`` for channels x (rows) and y (columns) of each group.
    permuted : ndarray, (P, g, c, c)
        ``Σ_t |b_x(t) ∧ b_y(π_p(t))|``: the row channel at image t, the column channel at π_p(t).
    per_item : ndarray, (n, g, c, c)
        The true-pairing overlaps of each test image (their sum over images is ``observed``).
    sizes : ndarray, (n, g, c)
        ``|b_x(t)|``, cells of each binarised map per image.
    """

    observed: np.ndarray
    permuted: np.ndarray
    per_item: np.ndarray
    sizes: np.ndarray


def paired_overlaps(
    read_binary: Callable[[range], torch.Tensor],
    n_items: int,
    permutations: np.ndarray,
    batch_size: int = 64,
    progress: bool = False,
) -> PairedOverlaps:
    """Accumulate true-pairing and permuted overlaps, streaming over pairs of item batches.

    Parameters
    ----------
    read_binary : callable
        ``read_binary(rows)`` returns the binarised maps (0/1 floats) of those test images,
        shape ``(g, c, len(rows), cells)``: g groups of c channels.
    n_items : int
        Number of test images.
    permutations : ndarray, (P, n)
        Pairings to evaluate (P may be 0).
    batch_size : int
        Images per batch; memory holds two batches and one ``(g, c·b, c·b)`` overlap block.
    progress : bool
        A progress bar over the outer batches.

    Returns
    -------
    PairedOverlaps
        :func:`combine_overlaps` of the single range :func:`overlap_sums` of every image.
    """
    return combine_overlaps([overlap_sums(read_binary, n_items, permutations, range(n_items), batch_size, progress)])


def overlap_sums(
    read_binary: Callable[[range], torch.Tensor],
    n_items: int,
    permutations: np.ndarray,
    outer: range,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """The share of :func:`paired_overlaps` of the row-channel images ``outer`` (a shard of the test images).

    Parameters
    ----------
    read_binary, n_items, permutations, batch_size, progress
        As for :func:`paired_overlaps`.
    outer : range
        The images ``t`` whose row-channel maps this share pairs with every image's column maps.

    Returns
    -------
    dict
        ``permuted`` (P, g, c, c): ``Σ_{t ∈ outer} |b_x(t) ∧ b_y(π_p(t))|``; ``per_item``
        (len(outer), g, c, c) and ``sizes`` (len(outer), g, c) of those images. Every entry is
        an integer count (exact in float64), so the shares' sum does not depend on the split.
    """
    batches = _ranges(range(n_items), batch_size)
    permuted = per_item = sizes = None
    for rows in progress_bar(_ranges(outer, batch_size), desc="similarity null (image permutations)", unit="batch", show=progress):
        x = read_binary(rows)
        g, c, b, cells = x.shape
        if permuted is None:
            permuted = torch.zeros((len(permutations), g, c, c), dtype=torch.float64)
            per_item = np.zeros((len(outer), g, c, c))
            sizes = np.zeros((len(outer), g, c))
        here = slice(rows.start - outer.start, rows.stop - outer.start)
        sizes[here] = x.sum(dim=-1, dtype=torch.float64).permute(2, 0, 1).numpy()
        by_item = x.permute(2, 0, 1, 3)  # (b, g, c, cells)
        per_item[here] = (by_item @ by_item.transpose(2, 3)).double().numpy()  # each image's true-pairing overlaps
        if not len(permutations):
            continue
        flat_x, targets = x.reshape(g, c * b, cells), permutations[:, rows.start : rows.stop]
        for inner in batches:
            y = x if inner == rows else read_binary(inner)
            block = (flat_x @ y.reshape(g, -1, cells).transpose(1, 2)).view(g, c, b, c, len(inner))
            _gather_permuted(permuted, block, targets, inner)
    return {"permuted": permuted.numpy(), "per_item": per_item, "sizes": sizes}


def combine_overlaps(parts: Sequence[dict[str, np.ndarray]]) -> PairedOverlaps:
    """The :class:`PairedOverlaps` of every test image from the :func:`overlap_sums` of consecutive shards, in image order."""
    permuted = parts[0]["permuted"]
    for part in parts[1:]:
        permuted = permuted + part["permuted"]
    per_item = np.concatenate([part["per_item"] for part in parts]) if len(parts) > 1 else parts[0]["per_item"]
    sizes = np.concatenate([part["sizes"] for part in parts]) if len(parts) > 1 else parts[0]["sizes"]
    return PairedOverlaps(per_item.sum(axis=0), permuted, per_item, sizes)


def _ranges(rows: range, batch_size: int) -> list[range]:
    """``rows`` cut into consecutive ranges of ``batch_size`` (the last one shorter)."""
    return [range(s, min(s + batch_size, rows.stop)) for s in range(rows.start, rows.stop, batch_size)]


def _gather_permuted(permuted: torch.Tensor, block: torch.Tensor, targets: np.ndarray, inner: range) -> None:
    """Add ``block[:, x, t, y, π_p(t)]`` to ``permuted[p]`` for every (p, t) with π_p(t) in ``inner``.

    One sparse product: a (P, b_outer·b_inner) selection matrix with a 1 at (p, t·b_inner + u)
    where π_p(t) = u, times the block laid out as (b_outer·b_inner, g·c·c).
    """
    hit = (targets >= inner.start) & (targets < inner.stop)
    p_index, t_local = np.nonzero(hit)
    if not len(p_index):
        return
    g, c, b_outer, _, b_inner = block.shape
    columns = t_local * b_inner + (targets[p_index, t_local] - inner.start)
    selection = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([p_index, columns])), torch.ones(len(p_index), dtype=block.dtype), (permuted.shape[0], b_outer * b_inner),
        check_invariants=True,
    )
    laid_out = block.permute(2, 4, 0, 1, 3).reshape(b_outer * b_inner, g * c * c)
    permuted += torch.sparse.mm(selection, laid_out).view(-1, g, c, c).double()


def holm(p_values: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Holm's step-down rejections of a family of p-values (NaN entries are not in the family).

    Returns a bool array of the same shape: True where the hypothesis is rejected at
    family-wise error rate ``alpha``.
    """
    p = np.asarray(p_values, dtype=float)
    flat = p.ravel()
    tested = np.flatnonzero(np.isfinite(flat))
    rejected = np.zeros(flat.shape, dtype=bool)
    order = tested[np.argsort(flat[tested], kind="stable")]
    m = len(order)
    for rank, index in enumerate(order):
        if flat[index] > alpha / (m - rank):
            break
        rejected[index] = True
    return rejected.reshape(p.shape)


@dataclass
class SimilarityNull:
    """A layer × layer score matrix with its permutation null and bootstrap draws.

    Attributes
    ----------
    score : ndarray, (n, n)
        The reported similarity (NaN where undefined).
    null : ndarray, (P, n, n) or None
        The score under each permutation of the test images (None: no null computed).
    bootstrap : ndarray, (B, n, n) or None
        The score on each bootstrap resample of the test images (None: no CI computed).
    seed : int
        Seed of the permutations and resamples.
    level : float
        Confidence level of the percentile CI.
    """

    score: np.ndarray
    null: np.ndarray | None
    bootstrap: np.ndarray | None
    seed: int = 0
    level: float = 0.95

    @property
    def n_permutations(self) -> int:
        return 0 if self.null is None else int(self.null.shape[0])

    @property
    def n_bootstrap(self) -> int:
        return 0 if self.bootstrap is None else int(self.bootstrap.shape[0])

    def null_mean(self) -> np.ndarray:
        """Mean of the null draws (NaN where the score is undefined)."""
        return _nanmean(self.null, self.score.shape)

    def corrected(self) -> np.ndarray:
        """Chance-corrected score ``(s − null)/(1 − null)``: 0 at chance, 1 for identical maps."""
        null = self.null_mean()
        out = np.full(self.score.shape, np.nan)
        np.divide(self.score - null, 1.0 - null, out=out, where=np.isfinite(null) & (null < 1.0 - 1e-12))
        return out

    def p_value(self) -> np.ndarray:
        """``(1 + #{null_p ≥ s})/(P + 1)`` (ties count against the score; NaN where undefined)."""
        score = self.score
        at_least = (self.null >= score[None] - 1e-9 * np.maximum(1.0, np.abs(score[None]))).sum(axis=0)
        out = (1.0 + at_least) / (self.n_permutations + 1.0)
        return np.where(np.isfinite(score) & np.isfinite(self.null).all(axis=0), out, np.nan)

    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap CI ``(low, high)`` of the score at ``level``."""
        return percentile_interval(self.bootstrap, self.level)


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis, ignoring NaN draws (NaN where all are NaN)."""
    tail = 50.0 * (1.0 - level)
    finite = np.isfinite(draws).any(axis=0)
    filled = np.where(finite[None], draws, 0.0)  # cells without any finite draw: no warning, NaN below
    low, high = np.nanpercentile(filled, [tail, 100.0 - tail], axis=0)
    return np.where(finite, low, np.nan), np.where(finite, high, np.nan)


def _nanmean(draws: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    finite = np.isfinite(draws)
    counts = finite.sum(axis=0)
    sums = np.where(finite, draws, 0.0).sum(axis=0)
    out = np.full(shape, np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out

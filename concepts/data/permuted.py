"""The permuted-masks control: the same images, each given the concept masks of another image.

A probe trained and tested on masks moved to the wrong images can only learn where concepts
usually are (their spatial prior, their area), not what they look like; its IoU is the floor a
real probe must clear (docs/METHODS.md §2, probe controls). :class:`PermutedMasks` is that view.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from conceptlens.concepts.data.dataset import SPLITS, ConceptDataset

__all__ = ["PermutedMasks", "derangement", "split_derangement"]


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn permutation of ``range(n)`` with no fixed point (rejection sampling).

    Parameters
    ----------
    n : int
        Length; 0 and 1 have no derangement, so they return the identity.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    ndarray
        ``int64`` permutation ``p`` with ``p[i] != i`` for every ``i`` (when ``n >= 2``).

    Examples
    --------
    >>> p = derangement(5, np.random.default_rng(0))
    >>> sorted(p.tolist()), bool((p != np.arange(5)).all())
    ([0, 1, 2, 3, 4], True)
    """
    if n < 2:
        return np.arange(n, dtype=np.int64)
    while True:  # a random permutation is a derangement with probability ≈ 1/e: ~2.7 draws
        permutation = rng.permutation(n).astype(np.int64)
        if (permutation != np.arange(n)).all():
            return permutation


def split_derangement(dataset: ConceptDataset, seed: int) -> np.ndarray:
    """``source[i]``: the item whose masks item ``i`` gets — a derangement within each split.

    Parameters
    ----------
    dataset : ConceptDataset
        The dataset whose split is kept.
    seed : int
        Seed; splits draw in the order train, val, test from one generator.

    Returns
    -------
    ndarray
        ``int64`` array of length ``len(dataset)``.
    """
    source = np.arange(len(dataset), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for split in SPLITS:
        members = dataset.split_indices(split)
        source[members] = members[derangement(len(members), rng)]
    return source


class PermutedMasks(ConceptDataset):
    """A view of ``parent`` whose masks for item ``i`` are those of item ``source[i]`` (same split).

    Images, ids, concepts and split are the parent's, so activations embedded for the parent are
    reused; the masks (and their validity) move. A mask of another size is resized to item ``i``'s
    image with nearest-neighbour sampling. The name and the mask fingerprint record the seed, so
    the masks' store entries differ from the parent's.

    Parameters
    ----------
    parent : ConceptDataset
        The dataset with the true masks.
    seed : int
        Seed of the derangement (:func:`split_derangement`).

    Examples
    --------
    >>> from conceptlens.concepts.data.dataset import ArrayDataset
    >>> images = [np.full((4, 4, 3), i, dtype=np.uint8) for i in range(10)]
    >>> masks = [np.eye(4, dtype=bool)[None] * (i % 2) for i in range(10)]
    >>> view = PermutedMasks(ArrayDataset(images, masks, ["diag"]), seed=0)
    >>> bool((view.source != np.arange(10)).all()), view.image(3).tolist() == images[3].tolist()
    (True, True)
    """

    def __init__(self, parent: ConceptDataset, seed: int = 0) -> None:
        self.parent, self.seed = parent, int(seed)
        self.name = f"{parent.name}~permuted-masks-{self.seed}"
        self.concepts, self.ids, self.splits = parent.concepts, parent.ids, parent.splits
        self.source = split_derangement(parent, self.seed)

    def image(self, index: int) -> np.ndarray:
        return self.parent.image(index)

    def image_size(self, index: int) -> tuple[int, int]:
        return self.parent.image_size(index)

    def masks(self, index: int) -> np.ndarray:
        index = self.check_index(index)
        masks = self.parent.masks(int(self.source[index]))
        return _resize_nearest(masks, self.parent.image_size(index))

    def mask_valid(self, index: int) -> np.ndarray:
        return self.parent.mask_valid(int(self.source[self.check_index(index)]))

    def image_fingerprint(self) -> str:
        return self.parent.image_fingerprint()

    def mask_fingerprint(self) -> str:
        digest = hashlib.sha256(self.parent.mask_fingerprint().encode())
        digest.update(json.dumps({"control": "permuted_masks", "seed": self.seed}).encode())
        return digest.hexdigest()


def _resize_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(K, h, w)`` masks resampled to ``(K, *size)``, nearest neighbour (cell centres)."""
    height, width = masks.shape[-2:]
    if (height, width) == tuple(size):
        return masks
    rows = np.minimum(((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64), width - 1)
    return masks[:, rows[:, None], cols[None, :]]

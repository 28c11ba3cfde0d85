"""Image-level concept sets drawn from a dataset with masks, for image-level CAVs and TCAV.

A concept's set holds images where the concept covers at least ``min_fraction`` of the image;
random sets are uniform draws. Both come from the train and val splits, so the test split stays
free for scoring. Folders of ready-made sets are read by
:class:`conceptlens.concepts.data.image_sets.ImageSets` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.errors import DataError, closest_names

__all__ = ["concept_image_sets", "concept_set_indices", "mask_coverage"]


def mask_coverage(dataset: ConceptDataset) -> np.ndarray:
    """``(N, K)``: the fraction of each image every concept covers."""
    return np.stack([dataset.masks(i).reshape(len(dataset.concepts), -1).mean(1) for i in range(len(dataset))])


def concept_set_indices(
    dataset: ConceptDataset,
    concepts: Sequence[str] | None = None,
    *,
    min_fraction: float = 0.02,
    images_per_set: int = 40,
    random_sets: int = 10,
    seed: int = 0,
    coverage: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Item indices of each concept set and of ``random_sets`` random sets.

    Parameters
    ----------
    dataset : ConceptDataset
        A dataset with concept masks and a train/val/test split.
    concepts : sequence of str, optional
        Concepts to draw sets for (default: every concept of the dataset).
    min_fraction : float
        An image joins a concept's set when the concept covers at least this fraction of it.
    images_per_set : int
        At most this many images per set.
    random_sets : int
        Number of random sets (``random_0``, ``random_1``, ...).
    seed : int
        Seed of the draws.
    coverage : ndarray, optional
        :func:`mask_coverage` of ``dataset`` when the caller already has it.

    Returns
    -------
    dict of str to ndarray
        Sorted indices per set name: the concepts (in the given order), then ``random_<r>``.

    Raises
    ------
    DataError
        When a concept is unknown or fewer than two train/val images show it.
    """
    rng = np.random.default_rng(seed)
    pool = np.sort(np.concatenate([dataset.split_indices("train"), dataset.split_indices("val")]))
    coverage = mask_coverage(dataset) if coverage is None else coverage
    sets: dict[str, np.ndarray] = {}
    for concept in concepts or dataset.concepts:
        if concept not in dataset.concepts:
            raise DataError(f"concept {concept!r}", f"is not a concept of {dataset.name!r}", closest_names(concept, dataset.concepts))
        showing = pool[coverage[pool, dataset.concepts.index(concept)] >= min_fraction]
        if len(showing) < 2:
            raise DataError(f"concept {concept!r}", f"only {len(showing)} training images show it (≥ {min_fraction:g} of the image)",
                            "lower min_fraction or drop the concept")
        sets[concept] = np.sort(rng.choice(showing, min(len(showing), images_per_set), replace=False))
    for r in range(random_sets):
        sets[f"random_{r}"] = np.sort(rng.choice(pool, min(len(pool), images_per_set), replace=False))
    return sets


def concept_image_sets(
    dataset: ConceptDataset,
    concepts: Sequence[str] | None = None,
    *,
    min_fraction: float = 0.02,
    images_per_set: int = 40,
    random_sets: int = 10,
    seed: int = 0,
) -> dict[str, ConceptDataset]:
    """Concept and random image sets of ``dataset`` as dataset views (see :func:`concept_set_indices`).

    Returns
    -------
    dict of str to ConceptDataset
        One view per set, ready for :func:`conceptlens.probes.image_cavs.set_activations`.

    Examples
    --------
    >>> from conceptlens.concepts.data.synthetic import SyntheticWorld
    >>> sets = concept_image_sets(SyntheticWorld(40), ["car"], images_per_set=5, random_sets=2)
    >>> {name: len(images) for name, images in sets.items()}
    {'car': 5, 'random_0': 5, 'random_1': 5}
    """
    indices = concept_set_indices(dataset, concepts, min_fraction=min_fraction, images_per_set=images_per_set, random_sets=random_sets, seed=seed)
    return {name: dataset.subset(rows) for name, rows in indices.items()}

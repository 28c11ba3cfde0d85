"""Write image-level concept sets drawn from a dataset with masks as folders of PNGs, for ``conceptlens tcav``.

The folders are the layout :class:`conceptlens.concepts.data.image_sets.ImageSets` reads:
``<root>/<concept>/<id>.png`` for each concept and ``<root>/random_<r>/<id>.png`` for each random
set. The sets are drawn by :func:`conceptlens.concepts.data.concept_sets.concept_set_indices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from conceptlens.concepts.data.concept_sets import concept_set_indices, mask_coverage
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.progress import progress_bar
from PIL import Image

__all__ = ["draw_image_sets", "shown_concepts", "write_image_sets"]


def shown_concepts(dataset: ConceptDataset, coverage: np.ndarray, min_fraction: float = 0.02) -> list[str]:
    """The concepts that at least two train/val images show (each covering ``min_fraction`` or more of the image).

    Parameters
    ----------
    dataset : ConceptDataset
        A dataset with concept masks and a train/val/test split.
    coverage : ndarray
        ``(N, K)`` :func:`conceptlens.concepts.data.concept_sets.mask_coverage` of ``dataset``.
    min_fraction : float
        The smallest covered fraction that counts as showing the concept.

    Returns
    -------
    list of str
        The concepts in the dataset's order.
    """
    pool = np.concatenate([dataset.split_indices("train"), dataset.split_indices("val")]).astype(int)
    counts = (coverage[pool] >= min_fraction).sum(axis=0)
    return [concept for concept, count in zip(dataset.concepts, counts) if count >= 2]


def draw_image_sets(
    dataset: ConceptDataset,
    concepts: Sequence[str] | None = None,
    *,
    random_sets: int = 10,
    images_per_set: int = 40,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Item indices of concept and random image sets of ``dataset`` (from its train and val splits).

    Parameters
    ----------
    dataset : ConceptDataset
        A dataset with concept masks and a train/val/test split.
    concepts : sequence of str, optional
        The concepts to draw sets for (default: every concept that two or more train/val images show).
    random_sets : int
        Number of random sets, ``random_0`` … ``random_<R-1>``.
    images_per_set : int
        At most this many images per set.
    seed : int
        Seed of the draws.

    Returns
    -------
    dict of str to ndarray
        Sorted item indices per set name: the concepts first, then the random sets.

    Raises
    ------
    DataError
        When a named concept is unknown or fewer than two train/val images show it.

    Examples
    --------
    >>> from conceptlens.concepts.data.synthetic import SyntheticWorld
    >>> sets = draw_image_sets(SyntheticWorld(30), ["car", "sky"], random_sets=2, images_per_set=4)
    >>> {name: len(rows) for name, rows in sets.items()}
    {'car': 4, 'sky': 4, 'random_0': 4, 'random_1': 4}
    """
    coverage = mask_coverage(dataset)
    chosen = list(concepts) if concepts else shown_concepts(dataset, coverage)
    return concept_set_indices(dataset, chosen, images_per_set=images_per_set, random_sets=random_sets, seed=seed, coverage=coverage)


def write_image_sets(dataset: ConceptDataset, sets: dict[str, np.ndarray], root: str | Path, progress: bool = False) -> dict[str, int]:
    """Write each set of :func:`draw_image_sets` as a folder of PNGs, ``<root>/<set>/<item id>.png``.

    Parameters
    ----------
    dataset : ConceptDataset
        The dataset the sets were drawn from.
    sets : dict of str to ndarray
        Item indices per set name.
    root : str or Path
        The folder to write the set folders into (created if missing).
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict of str to int
        The number of images written per set.
    """
    root = Path(root)
    total = sum(len(rows) for rows in sets.values())
    with progress_bar(total=total, desc=f"writing image sets of {dataset.name}", unit="image", show=progress) as bar:
        for name, rows in sets.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            for index in rows:
                Image.fromarray(dataset.image(int(index))).save(root / name / f"{dataset.ids[int(index)]}.png")
                bar.update(1)
    return {name: len(rows) for name, rows in sets.items()}

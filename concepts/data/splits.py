"""The train/val/test split a store entry recorded: item indices of a split, read from its manifest.

A mask entry (:func:`conceptlens.concepts.embedding.masks.embed_masks`) records its dataset's ids and
split, so probes, comparisons and concept maps can select a split from stored data alone, without
the dataset object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from conceptlens.concepts.errors import DataError

if TYPE_CHECKING:
    from conceptlens.concepts.store.activations import StoreEntry

__all__ = ["split_indices"]


def split_indices(mask_entry: StoreEntry, split: str) -> np.ndarray:
    """Sorted item indices of ``split``, from the dataset split recorded in a mask entry.

    Parameters
    ----------
    mask_entry : StoreEntry
        A complete entry whose manifest records ``dataset.ids`` and ``dataset.splits``.
    split : str
        ``train``, ``val`` or ``test``.

    Returns
    -------
    ndarray of int64

    Raises
    ------
    DataError
        When the entry records no such split.
    """
    dataset = mask_entry.manifest()["dataset"]
    if split not in dataset.get("splits", {}):
        raise DataError(f"split {split!r}", f"not recorded for dataset {dataset['name']!r}", "use train, val or test")
    position = {item_id: i for i, item_id in enumerate(dataset["ids"])}
    return np.array(sorted(position[i] for i in dataset["splits"][split]), dtype=np.int64)

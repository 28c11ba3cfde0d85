"""The concept dataset contract: images, one binary mask per (image, concept), and a split.

Every loader (folder layout, COCO, image-level sets, the synthetic world) returns a
:class:`ConceptDataset`. Downstream code (embedding, probes, comparison) only uses this contract.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conceptlens.concepts.errors import DataError, closest_names

__all__ = ["SPLITS", "ArrayDataset", "ConceptDataset", "ConceptSelection", "SubsetDataset", "assign_splits", "read_split_file", "read_splits", "write_splits"]

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


class ConceptDataset(ABC):
    """Images with one binary mask per (image, concept) and a deterministic train/val/test split.

    Subclasses set ``name``, ``concepts`` (concept names, possibly empty for image-only data),
    ``ids`` (unique item ids) and ``splits`` (split name -> list of ids), and implement
    :meth:`image`, :meth:`masks` and :meth:`image_fingerprint`.
    """

    name: str
    concepts: list[str]
    ids: list[str]
    splits: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def image(self, index: int) -> np.ndarray:
        """Return image ``index`` as ``uint8`` array of shape (H, W, 3)."""

    @abstractmethod
    def masks(self, index: int) -> np.ndarray:
        """Return the concept masks of image ``index`` as ``bool`` array (K, H, W).

        ``K = len(self.concepts)``; a concept absent from the image has an all-zero mask.
        """

    def mask_valid(self, index: int) -> np.ndarray:
        """Return which concept masks of image ``index`` are usable, ``bool`` array (K,).

        A loader marks a (image, concept) pair invalid when it was filtered out (for example by
        the COCO area-fraction filter); such pairs are neither positives nor negatives.
        """
        return np.ones(len(self.concepts), dtype=bool)

    def image_size(self, index: int) -> tuple[int, int]:
        """Return (height, width) of image ``index``."""
        height, width = self.image(index).shape[:2]
        return height, width

    def check_index(self, index: int) -> int:
        """Return ``index`` as int; TypeError for a non-integer, IndexError when out of range."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} ({len(self)} items)")
        return int(index)

    @abstractmethod
    def image_fingerprint(self) -> str:
        """Return a hex digest that changes whenever an item id or image content changes.

        The activation store uses it in its keys; masks do not enter it because activations do
        not depend on them.
        """

    def mask_fingerprint(self) -> str:
        """Return a hex digest that changes whenever the masks (or ids) change.

        The default suits generated datasets, whose masks follow from what makes the images;
        loaders that read masks from separate files override it.
        """
        digest = hashlib.sha256(self.image_fingerprint().encode())
        digest.update(json.dumps(list(self.concepts)).encode())
        return digest.hexdigest()

    def split_indices(self, split: str) -> np.ndarray:
        """Return the sorted item indices of ``split`` ('train', 'val' or 'test')."""
        if split not in SPLITS:
            raise DataError(f"split {split!r}", "unknown split", f"use one of {', '.join(SPLITS)}")
        position = {item_id: index for index, item_id in enumerate(self.ids)}
        return np.array(sorted(position[item_id] for item_id in self.splits[split]), dtype=np.int64)

    def subset(self, indices: Sequence[int]) -> SubsetDataset:
        """Return a view of the items at ``indices`` (in that order)."""
        return SubsetDataset(self, indices)

    def select_concepts(self, names: Sequence[str]) -> ConceptSelection:
        """Return a view that keeps only the concepts ``names`` (in that order)."""
        return ConceptSelection(self, names)


class SubsetDataset(ConceptDataset):
    """A view of some items of another dataset, in a given order."""

    def __init__(self, parent: ConceptDataset, indices: Sequence[int]) -> None:
        self.parent = parent
        self.indices = [int(i) for i in indices]
        self.name = parent.name
        self.concepts = parent.concepts
        self.ids = [parent.ids[i] for i in self.indices]
        kept = set(self.ids)
        self.splits = {split: [i for i in parent.splits[split] if i in kept] for split in SPLITS}

    def image(self, index: int) -> np.ndarray:
        return self.parent.image(self.indices[index])

    def masks(self, index: int) -> np.ndarray:
        return self.parent.masks(self.indices[index])

    def mask_valid(self, index: int) -> np.ndarray:
        return self.parent.mask_valid(self.indices[index])

    def image_size(self, index: int) -> tuple[int, int]:
        return self.parent.image_size(self.indices[index])

    def image_fingerprint(self) -> str:
        digest = hashlib.sha256(self.parent.image_fingerprint().encode())
        digest.update(json.dumps(self.indices).encode())
        return digest.hexdigest()

    def mask_fingerprint(self) -> str:
        digest = hashlib.sha256(self.parent.mask_fingerprint().encode())
        digest.update(json.dumps(self.indices).encode())
        return digest.hexdigest()


class ConceptSelection(ConceptDataset):
    """A view of another dataset with a subset of its concepts (same images, ids and split)."""

    def __init__(self, parent: ConceptDataset, names: Sequence[str]) -> None:
        for name in names:
            if name not in parent.concepts:
                raise DataError(f"concept {name!r}", f"not in dataset {parent.name!r}", closest_names(name, parent.concepts))
        if len(set(names)) != len(names):
            raise DataError(f"concepts {list(names)}", "a concept is listed twice", "list each concept once")
        self.parent = parent
        self.columns = [parent.concepts.index(name) for name in names]
        self.name, self.ids, self.splits = parent.name, parent.ids, parent.splits
        self.concepts = list(names)

    def image(self, index: int) -> np.ndarray:
        return self.parent.image(index)

    def masks(self, index: int) -> np.ndarray:
        return self.parent.masks(index)[self.columns]

    def mask_valid(self, index: int) -> np.ndarray:
        return self.parent.mask_valid(index)[self.columns]

    def image_size(self, index: int) -> tuple[int, int]:
        return self.parent.image_size(index)

    def image_fingerprint(self) -> str:
        return self.parent.image_fingerprint()

    def mask_fingerprint(self) -> str:
        digest = hashlib.sha256(self.parent.mask_fingerprint().encode())
        digest.update(json.dumps(self.concepts).encode())
        return digest.hexdigest()


def assign_splits(
    ids: Sequence[str], seed: int = 0, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
) -> dict[str, list[str]]:
    """Split ``ids`` into train/val/test deterministically from ``seed``.

    The result depends only on the set of ids, the seed and the fractions (not on id order).
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise DataError("split fractions", f"got {list(fractions)}", "give three non-negative numbers summing to 1")
    ordered = sorted(ids)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    n_train = int(round(fractions[0] * len(ordered)))
    n_val = int(round(fractions[1] * len(ordered)))
    shuffled = [ordered[i] for i in permutation]
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }


def write_splits(path: Path, splits: dict[str, list[str]], seed: int) -> None:
    """Write ``splits`` as JSON to ``path`` atomically."""
    from conceptlens.concepts.store.atomic import atomic_write_text

    atomic_write_text(Path(path), json.dumps({"seed": seed, **{s: splits[s] for s in SPLITS}}, indent=1))


def read_splits(path: Path, ids: Sequence[str]) -> dict[str, list[str]]:
    """Read a splits JSON written by :func:`write_splits` and check it covers ``ids`` exactly."""
    return read_split_file(path, ids)[0]


def read_split_file(path: Path, ids: Sequence[str]) -> tuple[dict[str, list[str]], int]:
    """The split and the seed (-1: unknown) of a splits JSON written by :func:`write_splits`.

    The file is read strictly (:func:`conceptlens.concepts.store.artifacts.read_json`): each split
    is a list of unique ids, all strings or all integers, the seed an integer >= -1, and together
    the splits list exactly ``ids``.

    Raises
    ------
    DataError
        Naming the file and the key path (``splits.json: train[3]``) and saying to delete the file.
    """
    from conceptlens.concepts.store.artifacts import read_json
    from conceptlens.concepts.store.schema import Ids, Int, Record

    path = Path(path)
    schema = Record({split: Ids() for split in SPLITS}, optional={"seed": Int(min=-1)})
    stored = read_json(path, DataError, fix="delete it to recompute the split", schema=schema)
    splits = {split: list(stored[split]) for split in SPLITS}
    listed = [item for split in SPLITS for item in splits[split]]
    if len(listed) != len(set(listed)) or set(listed) != set(ids):
        raise DataError(
            str(path),
            "the stored split does not list exactly the dataset's ids (images were added or removed)",
            "delete the file to recompute the split",
        )
    return splits, stored.get("seed", -1)


class ArrayDataset(ConceptDataset):
    """A concept dataset held in memory: a list of images and, optionally, their masks.

    Parameters
    ----------
    images : sequence of ndarray
        uint8 (H, W, 3) images.
    masks : sequence of ndarray, optional
        bool (K, H, W) masks per image; omitted for image-only data.
    concepts : sequence of str
        Concept names (K of them).
    ids : sequence of str, optional
        Item ids (default: zero-padded positions).
    name : str
        Dataset name.
    seed : int
        Split seed.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray] | None = None,
        concepts: Sequence[str] = (),
        ids: Sequence[str] | None = None,
        name: str = "arrays",
        seed: int = 0,
    ) -> None:
        self.name = name
        self.concepts = list(concepts)
        self.ids = list(ids) if ids is not None else [f"{i:06d}" for i in range(len(images))]
        if len(set(self.ids)) != len(self.ids):
            raise DataError(f"dataset {name!r}", "duplicate item ids", "give every image a unique id")
        self._images = [np.asarray(image, dtype=np.uint8) for image in images]
        self._masks = [np.asarray(m, dtype=bool) for m in masks] if masks is not None else None
        self.splits = assign_splits(self.ids, seed)

    def image(self, index: int) -> np.ndarray:
        return self._images[index]

    def masks(self, index: int) -> np.ndarray:
        if self._masks is None:
            return np.zeros((0, *self._images[index].shape[:2]), dtype=bool)
        return self._masks[index]

    def image_fingerprint(self) -> str:
        digest = hashlib.sha256()
        for item_id, image in zip(self.ids, self._images):
            digest.update(item_id.encode())
            digest.update(str(image.shape).encode())
            digest.update(image.tobytes())
        return digest.hexdigest()

    def mask_fingerprint(self) -> str:
        digest = hashlib.sha256(self.image_fingerprint().encode())
        digest.update(json.dumps(self.concepts).encode())
        for masks in self._masks or []:
            digest.update(np.packbits(masks).tobytes())
        return digest.hexdigest()

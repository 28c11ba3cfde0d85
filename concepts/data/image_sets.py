"""Image-level concept sets (TCAV): ``<root>/<concept>/*`` plus random/negative folders ``random_*``."""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conceptlens.concepts.data.dataset import ConceptDataset, assign_splits
from conceptlens.concepts.errors import DataError, closest_names
from conceptlens.concepts.data.imageio import index_by_stem, list_image_files, read_image, read_image_size

__all__ = ["ImageFolderDataset", "ImageSets"]

RANDOM_PREFIX = "random"


class ImageFolderDataset(ConceptDataset):
    """Images without masks, from a list of files: the positives or randoms of a TCAV set.

    Parameters
    ----------
    files : sequence of str or Path
        The image files. Item ids are the file stems, so stems must be unique.
    name : str
        The dataset name (the set's folder name).
    seed : int
        Seed of the train/val/test split.

    Raises
    ------
    DataError
        If ``files`` is empty or two files share a stem.
    """

    def __init__(self, files: Sequence[str | Path], name: str, seed: int = 0) -> None:
        self.name = name
        self.concepts = []
        self.files = _index_by_stem([Path(f) for f in files], name)
        self.ids = sorted(self.files)
        self.splits = assign_splits(self.ids, seed)

    def image(self, index: int) -> np.ndarray:
        return read_image(self.files[self.ids[index]])

    def image_size(self, index: int) -> tuple[int, int]:
        return read_image_size(self.files[self.ids[index]])

    def masks(self, index: int) -> np.ndarray:
        return np.zeros((0, *self.image_size(index)), dtype=bool)

    def image_fingerprint(self) -> str:
        """Return sha256 over the sorted (id, sha256 of the image file's bytes)."""
        digest = hashlib.sha256()
        for item_id in self.ids:
            file_digest = hashlib.sha256(self.files[item_id].read_bytes()).hexdigest()
            digest.update(f"{item_id}\0{file_digest}\n".encode())
        return digest.hexdigest()


def _index_by_stem(files: list[Path], name: str) -> dict[str, Path]:
    """Map file stem to file; duplicate stems and an empty list are errors."""
    if not files:
        raise DataError(name, "image set has no image files", "add images to the set")
    return index_by_stem(files, repr(name))


class ImageSets:
    """Folders of concept images and of random (negative) images, for image-level CAVs (TCAV).

    The layout is ``<root>/<concept>/*`` for each concept and ``<root>/random_0/``,
    ``<root>/random_1/``, ... for the random sets. Every set folder must hold image files only.

    Parameters
    ----------
    root : str or Path
        The folder holding one subfolder per set.
    concepts : list of str, optional
        Concept folders to use. Default: every subfolder whose name does not start with
        'random', sorted.
    random_sets : list of str, optional
        Random folders to use. Default: every subfolder whose name starts with 'random', sorted.
    seed : int
        Seed of the train/val/test split of every set.

    Attributes
    ----------
    concepts : list of str
        The concept set names.
    random_sets : list of str
        The random set names.

    Raises
    ------
    DataError
        If the root, a named folder or any random folder is missing, or a set folder is empty or
        holds a non-image file.
    """

    def __init__(
        self,
        root: str | Path,
        concepts: list[str] | None = None,
        random_sets: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.seed = seed
        if not self.root.is_dir():
            raise DataError(str(self.root), "image-set folder does not exist", "create <root>/<concept>/ folders")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.concepts = _pick(concepts, [f for f in folders if not f.startswith(RANDOM_PREFIX)], folders, self.root)
        self.random_sets = _pick(random_sets, [f for f in folders if f.startswith(RANDOM_PREFIX)], folders, self.root)
        _check_sets(self.concepts, self.random_sets, self.root)
        self.files = {name: _set_files(self.root / name) for name in self.concepts + self.random_sets}

    def dataset(self, name: str) -> ImageFolderDataset:
        """Return the images of set ``name`` (a concept or a random set) as a dataset.

        Parameters
        ----------
        name : str
            A name from :attr:`concepts` or :attr:`random_sets`.

        Returns
        -------
        ImageFolderDataset
            The set's images, without masks.
        """
        if name not in self.files:
            raise DataError(name, f"no such image set in {self.root}", f"use a concept or random set name: {closest_names(name, self.files)}")
        return ImageFolderDataset(self.files[name], name=name, seed=self.seed)


def _pick(requested: list[str] | None, default: list[str], folders: list[str], root: Path) -> list[str]:
    """Return the requested set names (each must be a folder), or the default ones."""
    if requested is None:
        return default
    for name in requested:
        if name not in folders:
            close = difflib.get_close_matches(name, folders, n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise DataError(str(root / name), f"image-set folder does not exist{hint}", "create it or fix the name")
    if len(set(requested)) != len(requested):
        raise DataError(", ".join(requested), "a set is named twice", "name each set once")
    return list(requested)


def _check_sets(concepts: list[str], random_sets: list[str], root: Path) -> None:
    """Raise unless there is at least one concept set and one random set, and no name is both."""
    if not random_sets:
        raise DataError(str(root), "no random image set", "create random_0/ with random images (and random_1/, ...)")
    if not concepts:
        raise DataError(str(root), "no concept image set", "create <root>/<concept>/ with images of the concept")
    both = sorted(set(concepts) & set(random_sets))
    if both:
        raise DataError(", ".join(both), "used as both a concept and a random set", "use each folder for one role")


def _set_files(folder: Path) -> list[Path]:
    """Return the image files of a set folder: at least one, and nothing but images."""
    files = list_image_files(folder, f"the image set {folder.name}/")
    if not files:
        raise DataError(str(folder), "image-set folder holds no image files", "add images or remove the folder")
    _index_by_stem(files, folder.name)
    return files

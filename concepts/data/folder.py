"""The folder layout of segmentation concepts: ``root/images/<id>.<ext>`` + ``root/masks/<concept>/<id>.png``.

Optional files in ``root``:

- ``splits.json`` — the train/val/test split (:func:`conceptlens.concepts.data.dataset.write_splits` format); when
  absent the split is computed from the seed and nothing is written.
- ``concepts.json`` — a JSON list of the concept names, fixing their order (else sorted names).
- ``invalid_masks.json`` — ``{concept: [ids]}``: (image, concept) pairs that were filtered out
  (for example by the COCO area filter) and are neither positives nor negatives.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from conceptlens.concepts.progress import progress_bar

from conceptlens.concepts.store.artifacts import read_json
from conceptlens.concepts.store.atomic import atomic_write_bytes, atomic_write_text
from conceptlens.concepts.store.schema import Ids, ListOf, MapOf, Str, culprit
from conceptlens.concepts.data.dataset import ConceptDataset, assign_splits, read_split_file, write_splits
from conceptlens.concepts.errors import DataError, closest_names
from conceptlens.concepts.data.imageio import index_by_stem, list_image_files, read_image, read_image_size, read_mask

__all__ = ["FolderDataset", "write_folder_dataset"]

SPLITS_FILE = "splits.json"
CONCEPTS_FILE = "concepts.json"
INVALID_FILE = "invalid_masks.json"
_LAYOUT = "root/images/<id>.<ext> and root/masks/<concept>/<id>.png"


class FolderDataset(ConceptDataset):
    """Segmentation concepts stored as one folder of images and one folder of masks per concept.

    A missing mask file means the concept is absent from that image (all-zero mask).

    Parameters
    ----------
    root : str or Path
        The dataset folder, holding ``images/`` and ``masks/``.
    concepts : list of str, optional
        The concepts to load, in this order. Default: all concept folders (in the order of
        ``concepts.json`` when present, else sorted by name).
    seed : int
        Seed of the train/val/test split, used when ``root/splits.json`` does not exist.
    validate : bool
        Read every image header and every mask of the chosen concepts now, so that bad files fail
        at construction rather than halfway through an embedding run.
    progress : bool
        Show a progress bar while validating.

    Raises
    ------
    DataError
        If the layout is wrong or a file is bad; the message names the file or concept.
    """

    def __init__(
        self,
        root: str | Path,
        concepts: list[str] | None = None,
        seed: int = 0,
        validate: bool = True,
        progress: bool = False,
    ) -> None:
        self.root = Path(root)
        self.name = self.root.name
        self.image_files = _index_images(self.root / "images")
        self.ids = sorted(self.image_files)
        available = _concept_folders(self.root)
        self.concepts = _select_concepts(available, concepts, self.root / "masks")
        self.mask_files = {c: _index_masks(self.root / "masks" / c, self.image_files) for c in self.concepts}
        self.invalid = _read_invalid(self.root / INVALID_FILE, self.concepts, self.ids, available)
        self.splits, self.split_seed = self._load_splits(seed)
        self._digests: dict[str, tuple[tuple[int, int], str]] = {}
        if validate:
            self._validate(progress)

    def _load_splits(self, seed: int) -> tuple[dict[str, list[str]], int]:
        """Return the stored split and its seed, or a fresh split from ``seed``."""
        path = self.root / SPLITS_FILE
        if not path.is_file():
            return assign_splits(self.ids, seed), seed
        return read_split_file(path, self.ids)

    def _validate(self, progress: bool) -> None:
        """Check every image header and every mask of the chosen concepts."""
        total = len(self.ids) + sum(len(files) for files in self.mask_files.values())
        with progress_bar(total=total, desc=f"checking {self.name}", unit="file", show=progress) as bar:
            sizes = {}
            for item_id in self.ids:
                sizes[item_id] = read_image_size(self.image_files[item_id])
                bar.update()
            for concept, files in self.mask_files.items():
                positive = False
                for item_id, path in files.items():
                    positive |= bool(read_mask(path, sizes[item_id], self.image_files[item_id]).any())
                    bar.update()
                if not positive:
                    raise DataError(
                        concept,
                        f"no mask in {self.root / 'masks' / concept} has a positive pixel",
                        "add positive examples or remove the folder",
                    )

    def save_splits(self) -> Path:
        """Write the current split to ``root/splits.json`` (atomically) and return its path."""
        path = self.root / SPLITS_FILE
        write_splits(path, self.splits, self.split_seed)
        return path

    def image(self, index: int) -> np.ndarray:
        return read_image(self.image_files[self.ids[index]])

    def image_size(self, index: int) -> tuple[int, int]:
        return read_image_size(self.image_files[self.ids[index]])

    def masks(self, index: int) -> np.ndarray:
        item_id = self.ids[index]
        size = self.image_size(index)
        masks = np.zeros((len(self.concepts), *size), dtype=bool)
        for k, concept in enumerate(self.concepts):
            path = self.mask_files[concept].get(item_id)
            if path is not None:
                masks[k] = read_mask(path, size, self.image_files[item_id])
        return masks

    def mask_valid(self, index: int) -> np.ndarray:
        item_id = self.ids[index]
        return np.array([item_id not in self.invalid[c] for c in self.concepts], dtype=bool)

    def image_fingerprint(self) -> str:
        """Return sha256 over the sorted (id, sha256 of the image file's bytes).

        File digests are cached per (size, modification time), so a second call only reads the
        files that changed.
        """
        digest = hashlib.sha256()
        for item_id in self.ids:
            digest.update(f"{item_id}\0{self._file_digest(self.image_files[item_id])}\n".encode())
        return digest.hexdigest()

    def mask_fingerprint(self) -> str:
        """Return sha256 over the image fingerprint, concepts, every mask file and the invalid list."""
        digest = hashlib.sha256(self.image_fingerprint().encode())
        for concept in self.concepts:
            for item_id, path in sorted(self.mask_files[concept].items()):
                digest.update(f"{concept}\0{item_id}\0{self._file_digest(path)}\n".encode())
        invalid = self.root / INVALID_FILE
        if invalid.is_file():
            digest.update(invalid.read_bytes())
        return digest.hexdigest()

    def _file_digest(self, path: Path) -> str:
        """Return the sha256 of a file's bytes, cached while its size and mtime do not change."""
        stat = path.stat()
        key = (stat.st_size, stat.st_mtime_ns)
        cached = self._digests.get(str(path))
        if cached is None or cached[0] != key:
            cached = (key, hashlib.sha256(path.read_bytes()).hexdigest())
            self._digests[str(path)] = cached
        return cached[1]


def _index_images(folder: Path) -> dict[str, Path]:
    """Map image id (file stem) to image file; the folder must exist and hold images only."""
    if not folder.is_dir():
        raise DataError(str(folder), "images folder is missing", f"use the layout {_LAYOUT}")
    files = index_by_stem(list_image_files(folder, "images/"), "images/")
    if not files:
        raise DataError(str(folder), "images folder holds no image files", f"use the layout {_LAYOUT}")
    return files


def _concept_folders(root: Path) -> list[str]:
    """Return the concept folder names of ``root/masks``, ordered by ``concepts.json`` or by name."""
    masks = root / "masks"
    if not masks.is_dir():
        raise DataError(str(masks), "masks folder is missing", f"use the layout {_LAYOUT}")
    names = []
    for entry in sorted(masks.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DataError(str(entry), "file directly inside masks/", "put masks in masks/<concept>/<id>.png")
        names.append(entry.name)
    _check_case_duplicates(names, masks)
    listed = _read_concepts_file(root / CONCEPTS_FILE, names)
    if listed is None and not names:
        raise DataError(str(masks), "no concept folders", "create masks/<concept>/<id>.png for each concept")
    return names if listed is None else listed


def _check_case_duplicates(names: Sequence[str], where: Path | str) -> None:
    """Raise if two concept names differ only in case."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise DataError(
                f"{other}, {name}",
                f"concept names in {where} differ only in case",
                "merge the two folders or rename one of them",
            )


def _read_concepts_file(path: Path, folders: list[str]) -> list[str] | None:
    """Return the concept order of ``concepts.json``, checked against the folders, or None."""
    if not path.is_file():
        return None
    listed = read_json(path, DataError, fix="make it a JSON list of the concept folder names, or delete it", schema=ListOf(Str(non_empty=True)))
    twice = sorted({name for name in listed if listed.count(name) > 1})
    if twice:
        raise DataError(str(path), f"lists {', '.join(repr(n) for n in twice)} more than once", "list each concept once, or delete concepts.json to use the sorted folder names")
    if set(listed) != set(folders):
        missing = sorted(set(listed) - set(folders))
        extra = sorted(set(folders) - set(listed))
        raise DataError(
            str(path),
            f"does not match the folders in masks/ (listed without folder: {missing}, folders not listed: {extra})",
            "update concepts.json or delete it to use the sorted folder names",
        )
    return listed


def _select_concepts(available: list[str], requested: list[str] | None, masks: Path) -> list[str]:
    """Return the requested concepts (checked against the available ones), or all of them."""
    if requested is None:
        return list(available)
    for name in requested:
        if name not in available:
            raise DataError(name, f"no concept folder {masks / name}; {closest_names(name, available)}", "use one of the available concept names")
    if len(set(requested)) != len(requested):
        raise DataError(", ".join(requested), "a concept is requested twice", "list each concept once")
    return list(requested)


def _index_masks(folder: Path, images: dict[str, Path]) -> dict[str, Path]:
    """Map image id to mask file for one concept folder; every mask must match an image."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() or path.suffix.lower() != ".png":
            raise DataError(str(path), "not a mask file; masks are PNG files named <image id>.png", "move it out")
        if path.stem not in images:
            raise DataError(
                str(path), f"mask has no image with id {path.stem!r} in images/", "add the image or delete the mask"
            )
        if path.stem in files:
            raise DataError(f"{files[path.stem]}, {path}", "two masks for the same image", "delete one of them")
        files[path.stem] = path
    return files


def _read_invalid(path: Path, concepts: list[str], ids: list[str], available: list[str]) -> dict[str, set[str]]:
    """Read ``invalid_masks.json`` (concept -> ids of filtered-out pairs); empty sets if absent.

    Every concept must be a concept folder (``available``) and every id an image's.
    """
    invalid: dict[str, set[str]] = {concept: set() for concept in concepts}
    if not path.is_file():
        return invalid
    fix = "fix or delete it"
    pairs = read_json(path, DataError, fix="make it a JSON object {concept: [image ids]}, or delete it", schema=MapOf(Ids()))
    stray = sorted(set(pairs) - set(available))
    if stray:
        raise DataError(culprit(path, (stray[0],)), f"is not a concept folder in masks/ ({closest_names(stray[0], available)})", fix)
    known = set(ids)
    pairs = {concept: [str(item) for item in items] for concept, items in pairs.items()}  # ids are file names
    for concept, items in pairs.items():
        unknown = next((i for i, item in enumerate(items) if item not in known), None)
        if unknown is not None:
            raise DataError(culprit(path, (concept, unknown)), f"lists ids without image: {items[unknown]!r}", fix)
    for concept in concepts:
        invalid[concept] = set(pairs.get(concept, []))
    return invalid


def _check_file_name(name: str, what: str) -> None:
    """Raise if ``name`` cannot be used as a plain, visible file or folder name."""
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise DataError(repr(name), f"{what} cannot be used as a file name", f"rename the {what}")


def _png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) or (H, W, 3) array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _prepare_root(root: Path, overwrite: bool, dataset: ConceptDataset) -> None:
    """Make sure ``root`` can be written: new, empty, or (with ``overwrite``) cleared of our files."""
    if root.exists() and not root.is_dir():
        raise DataError(str(root), "exists and is not a folder", "choose another output folder")
    if not root.exists() or not any(root.iterdir()):
        return
    if not overwrite:
        raise DataError(str(root), "output folder is not empty", "choose a new folder or pass overwrite=True")
    source = getattr(dataset, "root", None)
    if source is not None and Path(source).resolve() == root.resolve():
        raise DataError(str(root), "is the folder the dataset is read from", "write to another folder")
    for folder in ("images", "masks"):
        shutil.rmtree(root / folder, ignore_errors=True)
    for name in (SPLITS_FILE, CONCEPTS_FILE, INVALID_FILE):
        (root / name).unlink(missing_ok=True)


def _write_item(dataset: ConceptDataset, index: int, root: Path, invalid: dict[str, list[str]]) -> None:
    """Write image ``index`` as PNG and its non-empty masks as 0/255 PNGs; note invalid pairs."""
    item_id = dataset.ids[index]
    _check_file_name(item_id, "item id")
    image = dataset.image(index)
    masks, valid = dataset.masks(index), dataset.mask_valid(index)
    if masks.shape != (len(dataset.concepts), *image.shape[:2]):
        raise DataError(
            f"{dataset.name}: {item_id}",
            f"masks have shape {masks.shape}, expected {(len(dataset.concepts), *image.shape[:2])}",
            "fix the dataset's masks() so that it returns one mask per concept at the image size",
        )
    atomic_write_bytes(root / "images" / f"{item_id}.png", _png_bytes(image))
    for k, concept in enumerate(dataset.concepts):
        if masks[k].any():
            atomic_write_bytes(root / "masks" / concept / f"{item_id}.png", _png_bytes(masks[k] * np.uint8(255)))
        if not valid[k]:
            invalid[concept].append(item_id)


def write_folder_dataset(
    dataset: ConceptDataset,
    root: str | Path,
    progress: bool = False,
    seed: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write any :class:`ConceptDataset` in the folder layout read by :class:`FolderDataset`.

    Images are written as PNG, one mask PNG (mode 'L', values 0/255) per non-empty mask, plus
    ``splits.json``, ``concepts.json`` (the concept order) and, when some pairs are marked invalid,
    ``invalid_masks.json``. Every file is written atomically.

    Parameters
    ----------
    dataset : ConceptDataset
        The dataset to write.
    root : str or Path
        The output folder; it must be new or empty unless ``overwrite`` is set.
    progress : bool
        Show a progress bar.
    seed : int, optional
        Seed recorded in ``splits.json``; -1 (unknown) when not given.
    overwrite : bool
        Allow a non-empty ``root``: its ``images/``, ``masks/`` and the three JSON files are
        deleted first; other files are left alone.

    Returns
    -------
    Path
        ``root``.

    Raises
    ------
    DataError
        If ``root`` is not empty (without ``overwrite``), or an id or concept name cannot be a
        file name.
    """
    root = Path(root)
    for concept in dataset.concepts:
        _check_file_name(concept, "concept name")
    _check_case_duplicates(dataset.concepts, dataset.name)
    _prepare_root(root, overwrite, dataset)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for concept in dataset.concepts:
        (root / "masks" / concept).mkdir(parents=True, exist_ok=True)
    invalid: dict[str, list[str]] = {concept: [] for concept in dataset.concepts}
    for index in progress_bar(range(len(dataset)), desc=f"writing {dataset.name}", unit="image", show=progress):
        _write_item(dataset, index, root, invalid)
    atomic_write_text(root / CONCEPTS_FILE, json.dumps(list(dataset.concepts), indent=1))
    if any(invalid.values()):
        atomic_write_text(root / INVALID_FILE, json.dumps({c: ids for c, ids in invalid.items() if ids}, indent=1))
    write_splits(root / SPLITS_FILE, dataset.splits, -1 if seed is None else seed)
    return root

"""COCO instance annotations as concept data: one concept per category, mask = union of instances."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from conceptlens.concepts.data.coco_checks import (
    DROP_FIX,
    check_ids,
    check_image_entry,
    segmentation_problem,
)
from conceptlens.concepts.data.dataset import ConceptDataset, assign_splits
from conceptlens.concepts.data.imageio import read_image
from conceptlens.concepts.errors import DataError, closest_names
from conceptlens.concepts.store.artifacts import file_sha256, read_json
from conceptlens.concepts.store.schema import Int, ListOf, Record, Str, Where, check
from conceptlens.concepts.store.strict_json import render_path
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

__all__ = ["REFERENCE_AREA_RANGE", "CocoDataset"]

REFERENCE_AREA_RANGE = (0.025, 0.8)
MAX_COCO_BYTES = 2 * 1024**3
"""The largest COCO annotation file read (train2017's instances file is about 450 MB)."""
_DROP_FIX = DROP_FIX
# The shape of a COCO instances file: the sections first, then what every entry needs before
# pycocotools indexes it (sizes, file names and geometry are checked per image by coco_checks).
COCO_FILE = Record({section: ListOf() for section in ("images", "annotations", "categories")})
COCO_ENTRIES = Record({
    "images": ListOf(Record({"id": Int()})),
    "annotations": ListOf(Record({"id": Int(), "image_id": Int(), "category_id": Int()})),
    "categories": ListOf(Record({"id": Int(), "name": Str(non_empty=True)})),
})


class CocoDataset(ConceptDataset):
    """COCO instance segmentations as concept masks: one concept per category.

    The mask of a category in an image is the union of its instance masks (polygons,
    uncompressed and compressed RLE; ``iscrowd`` annotations included). Images are read without
    applying their EXIF orientation, as pycocotools and torchvision do, because COCO coordinates
    refer to the stored pixels.

    Nothing unchecked reaches pycocotools' native code
    (:mod:`conceptlens.concepts.data.coco_checks`): ids must be unique integers, image sizes
    positive integers within the pixel bound, ``file_name`` a relative path inside
    ``images_dir`` (no absolute path, no ``..``), polygons finite and within one image size of
    the image, RLE runs (list or compressed string) must cover exactly height x width pixels.

    Parameters
    ----------
    annotation_file : str or Path
        A COCO instances JSON file (``instances_val2017.json``).
    images_dir : str or Path
        The folder holding the images named by ``file_name``.
    categories : list of str, optional
        Category names to use as concepts, in this order. Default: all categories sorted by id.
    area_range : tuple of float, optional
        ``(lo, hi)``: keep an (image, category) pair only when its mask covers a fraction of the
        image in ``[lo, hi]``. A pair with a non-empty mask outside the range is marked invalid
        by :meth:`mask_valid` (neither positive nor negative); empty masks stay valid negatives.
        Off by default; the reference experiments use ``(0.025, 0.8)``
        (:data:`REFERENCE_AREA_RANGE`).
    seed : int
        Seed of the train/val/test split.
    image_ids : list of int, optional
        COCO image ids to use (default: all images, sorted by id).

    Raises
    ------
    DataError
        If the annotation file, a category name, an image entry or an annotation is bad.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        images_dir: str | Path,
        categories: list[str] | None = None,
        area_range: tuple[float, float] | None = None,
        seed: int = 0,
        image_ids: list[int] | None = None,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.images_dir = Path(images_dir)
        self.area_range = _check_area_range(area_range)
        self.coco = _load_coco(self.annotation_file)
        if not self.images_dir.is_dir():
            raise DataError(str(self.images_dir), "images folder does not exist", "point images_dir at the COCO images")
        self.name = self.annotation_file.stem
        self.category_ids = _select_categories(self.coco, categories, self.annotation_file)
        self.concepts = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.image_entries = _select_images(self.coco, image_ids, self.annotation_file)
        self.ids = [str(entry["id"]) for entry in self.image_entries]
        self.annotations = [self._image_annotations(entry) for entry in self.image_entries]
        self.splits = assign_splits(self.ids, seed)
        self._cached_masks = lru_cache(maxsize=8)(self._category_masks)

    def _image_annotations(self, entry: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        """Return (concept index, annotation) for the chosen categories of one image, checked."""
        position = {category_id: k for k, category_id in enumerate(self.category_ids)}
        chosen = []
        for annotation in self.coco.imgToAnns.get(entry["id"], []):
            k = position.get(annotation.get("category_id"))
            if k is not None:
                _check_segmentation(annotation, entry)
                chosen.append((k, annotation))
        return chosen

    def image_path(self, index: int) -> Path:
        """Return the file of image ``index``; a missing file is a DataError naming it."""
        path = self.images_dir / self.image_entries[index]["file_name"]
        if not path.is_file():
            raise DataError(
                str(path),
                f"image listed in {self.annotation_file.name} is missing from {self.images_dir}",
                "download the images into images_dir, or pass image_ids without it",
            )
        return path

    def image(self, index: int) -> np.ndarray:
        path = self.image_path(index)
        image = read_image(path, orient=False)
        expected = self.image_size(index)
        if image.shape[:2] != expected:
            raise DataError(
                str(path),
                f"image is {image.shape[0]}x{image.shape[1]} (HxW) but {self.annotation_file.name} says "
                f"{expected[0]}x{expected[1]}",
                "use the image files the annotations were made for",
            )
        return image

    def image_size(self, index: int) -> tuple[int, int]:
        entry = self.image_entries[index]
        return int(entry["height"]), int(entry["width"])

    def masks(self, index: int) -> np.ndarray:
        return self._cached_masks(index).copy()

    def mask_valid(self, index: int) -> np.ndarray:
        if self.area_range is None:
            return np.ones(len(self.concepts), dtype=bool)
        masks = self._cached_masks(index)
        fractions = masks.reshape(len(masks), -1).mean(axis=1)
        low, high = self.area_range
        return (fractions == 0) | ((fractions >= low) & (fractions <= high))

    def _category_masks(self, index: int) -> np.ndarray:
        """Return the union mask of each chosen category in image ``index``, bool (K, H, W)."""
        height, width = self.image_size(index)
        masks = np.zeros((len(self.concepts), height, width), dtype=bool)
        for k, annotation in self.annotations[index]:
            masks[k] |= _annotation_mask(annotation, self.image_entries[index], height, width)
        return masks

    def image_fingerprint(self) -> str:
        """Return sha256 over the sorted (id, file name, file size) of the images.

        File sizes stand in for contents: reading every COCO image fully would be too slow.
        """
        digest = hashlib.sha256()
        for index in sorted(range(len(self)), key=lambda i: self.ids[i]):
            file_name = self.image_entries[index]["file_name"]
            digest.update(f"{self.ids[index]}\0{file_name}\0{self.image_path(index).stat().st_size}\n".encode())
        return digest.hexdigest()

    def mask_fingerprint(self) -> str:
        """Return sha256 over the image fingerprint, the annotation file, categories and area filter."""
        digest = hashlib.sha256(self.image_fingerprint().encode())
        digest.update(file_sha256(self.annotation_file).encode())
        digest.update(json.dumps([self.concepts, self.area_range]).encode())
        return digest.hexdigest()


def _check_area_range(area_range: tuple[float, float] | None) -> tuple[float, float] | None:
    """Check that ``area_range`` is None or ``0 <= lo <= hi <= 1``."""
    if area_range is None:
        return None
    try:
        low, high = (float(value) for value in area_range)
    except (TypeError, ValueError) as error:
        raise DataError("area_range", f"got {area_range!r}", "give two numbers (lo, hi)") from error
    if not 0 <= low <= high <= 1:
        raise DataError("area_range", f"got ({low}, {high})", "use 0 <= lo <= hi <= 1, e.g. (0.025, 0.8)")
    return low, high


def _load_coco(path: Path) -> COCO:
    """Read and check the annotation JSON, then index it with pycocotools (silenced)."""
    if path.is_dir():
        raise DataError(str(path), "is a folder, not a COCO annotation file", "give the instances_*.json file inside it (e.g. annotations/instances_val2017.json)")
    if not path.is_file():
        raise DataError(str(path), "annotation file does not exist", "check the path to the COCO JSON file")
    try:
        data = read_json(path, DataError, fix="re-download or re-export it", max_bytes=MAX_COCO_BYTES)
    except DataError as error:
        raise DataError(error.culprit, f"not a valid JSON file: {error.problem}", error.fix) from None
    missing = [key for key in COCO_FILE.required if key not in data]
    if missing:
        raise DataError(str(path), f"not a COCO instances file: missing {', '.join(missing)}", "use an instances_*.json file")
    check(data, COCO_FILE, path, DataError, "use an instances_*.json file as written by COCO tools")
    check(data, COCO_ENTRIES, path, DataError, _DROP_FIX.replace("annotation", "entry"), label=_entry_label)
    check_ids(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _entry_label(data: dict[str, Any], where: Where) -> str:
    """A key path that names the entry's id too: ``annotations[0] (id 7).image_id``."""
    text = render_path(where)
    if len(where) >= 2 and isinstance(where[1], int):
        entry = data[where[0]][where[1]]
        if isinstance(entry, dict) and isinstance(entry.get("id"), (int, str)):
            head = render_path(where[:2])
            text = f"{head} (id {entry['id']!r})" + text[len(head):]
    return text


def _select_categories(coco: COCO, names: Sequence[str] | None, path: Path) -> list[int]:
    """Return the category ids of ``names`` (in order), or all ids sorted."""
    by_name: dict[str, int] = {}
    for category_id in sorted(coco.cats):
        name = coco.cats[category_id].get("name")
        if name in by_name:
            raise DataError(f"category {name!r}", f"appears twice in {path}", "give each category a unique name")
        by_name[name] = category_id
    if names is None:
        return list(by_name.values())
    for name in names:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            fix = f"use {' or '.join(repr(c) for c in close)}" if close else "use a category name of the file"
            raise DataError(f"category {name!r}", f"not in {path.name}; {closest_names(name, by_name)}", fix)
    if len(set(names)) != len(names):
        raise DataError(", ".join(names), "a category is requested twice", "list each category once")
    return [by_name[name] for name in names]


def _select_images(coco: COCO, image_ids: Sequence[int] | None, path: Path) -> list[dict[str, Any]]:
    """Return the image entries of ``image_ids`` (in order), or all sorted by id; each checked."""
    if image_ids is None:
        image_ids = sorted(coco.imgs)
    elif len(set(image_ids)) != len(image_ids):
        raise DataError("image_ids", "an image id is listed twice", "list each id once")
    entries = []
    for image_id in image_ids:
        if image_id not in coco.imgs:
            raise DataError(f"image id {image_id}", f"not in {path.name}", "use ids of the annotation file")
        entry = coco.imgs[image_id]
        check_image_entry(entry, path)
        entries.append(entry)
    if not entries:
        raise DataError(str(path), "lists no images", "use an annotation file with images")
    return entries


def _check_segmentation(annotation: dict[str, Any], entry: dict[str, Any]) -> None:
    """Raise a DataError naming the annotation and image when its segmentation is unusable."""
    problem = segmentation_problem(annotation.get("segmentation"), int(entry["height"]), int(entry["width"]))
    if problem:
        raise DataError(f"annotation {annotation.get('id')}", f"{problem} (image {entry['file_name']})", _DROP_FIX)


def _annotation_mask(annotation: dict[str, Any], entry: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Rasterise one annotation (polygons, uncompressed or compressed RLE) to bool (H, W)."""
    segmentation = annotation["segmentation"]
    try:
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        with warnings.catch_warnings():
            # pycocotools' decode trips numpy 2's copy-keyword deprecation; harmless
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError, KeyError, IndexError) as error:
        raise DataError(
            f"annotation {annotation.get('id')}",
            f"segmentation cannot be decoded ({error}; image {entry['file_name']})",
            _DROP_FIX,
        ) from error

"""Loaders: folder layout (and writing it), COCO instances, image-level concept sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conceptlens.concepts.data.coco import CocoDataset
from conceptlens.concepts.data.dataset import ArrayDataset, ConceptDataset, assign_splits
from conceptlens.concepts.errors import DataError
from conceptlens.concepts.data.folder import FolderDataset, write_folder_dataset
from conceptlens.concepts.data.image_sets import ImageFolderDataset, ImageSets

# --------------------------------------------------------------------------- folder layout

SIZES = {"a": (8, 10), "b": (12, 6), "c": (5, 7), "d": (6, 6)}
EXTENSIONS = {"a": "png", "b": "jpg", "c": "png", "d": "png"}


def _rect(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


MASKS = {
    ("a", "wheel"): _rect((8, 10), slice(1, 4), slice(2, 7)),
    ("b", "wheel"): _rect((12, 6), slice(5, 12), slice(0, 2)),
    ("a", "door"): _rect((8, 10), slice(6, 8), slice(0, 10)),
    ("d", "door"): _rect((6, 6), slice(0, 1), slice(5, 6)),
}


def _save_mask(mask: np.ndarray, path: Path, scale: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * scale).save(path)


def make_folder(root: Path) -> Path:
    """Four images of different sizes (one JPEG), masks for 'wheel' and 'door'; 'c' has none."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for item_id, size in SIZES.items():
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{item_id}.{EXTENSIONS[item_id]}")
    for (item_id, concept), mask in MASKS.items():
        _save_mask(mask, root / "masks" / concept / f"{item_id}.png", scale=1 if item_id == "b" else 255)
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "parts")


def _expected_masks(item_id: str, concepts: list[str]) -> np.ndarray:
    empty = np.zeros(SIZES[item_id], dtype=bool)
    return np.stack([MASKS.get((item_id, concept), empty) for concept in concepts])


def test_folder_dataset_loads_ids_concepts_images_and_exact_masks(folder):
    dataset = FolderDataset(folder)
    assert dataset.name == "parts"
    assert dataset.ids == ["a", "b", "c", "d"]
    assert dataset.concepts == ["door", "wheel"]
    for index, item_id in enumerate(dataset.ids):
        masks = dataset.masks(index)
        assert masks.dtype == bool and masks.shape == (2, *SIZES[item_id])
        np.testing.assert_array_equal(masks, _expected_masks(item_id, ["door", "wheel"]))
        assert dataset.image(index).shape == (*SIZES[item_id], 3)
        assert dataset.image_size(index) == SIZES[item_id]
        assert dataset.mask_valid(index).tolist() == [True, True]
    assert not dataset.masks(2).any()  # 'c' has no mask file: all-zero masks
    jpeg = np.asarray(Image.open(folder / "images" / "b.jpg").convert("RGB"))
    np.testing.assert_array_equal(dataset.image(1), jpeg)
    png = np.asarray(Image.open(folder / "images" / "a.png"))
    np.testing.assert_array_equal(dataset.image(0), png)


def test_folder_dataset_concept_subset_keeps_the_given_order(folder):
    dataset = FolderDataset(folder, concepts=["wheel", "door"])
    assert dataset.concepts == ["wheel", "door"]
    np.testing.assert_array_equal(dataset.masks(0), _expected_masks("a", ["wheel", "door"]))
    only = FolderDataset(folder, concepts=["wheel"])
    np.testing.assert_array_equal(only.masks(1), _expected_masks("b", ["wheel"]))


def test_folder_dataset_unknown_concept_lists_close_matches(folder):
    with pytest.raises(DataError, match="wheal") as error:
        FolderDataset(folder, concepts=["wheal"])
    assert "closest: wheel" in error.value.problem and "door" in error.value.problem


def test_folder_splits_are_deterministic_and_not_written(folder):
    first, second = FolderDataset(folder, seed=5), FolderDataset(folder, seed=5)
    assert first.splits == second.splits == assign_splits(["a", "b", "c", "d"], 5)
    assert not (folder / "splits.json").exists()


def test_folder_stored_splits_are_honoured_and_saved(folder):
    stored = {"seed": 42, "train": ["c"], "val": ["a", "d"], "test": ["b"]}
    (folder / "splits.json").write_text(json.dumps(stored))
    dataset = FolderDataset(folder, seed=0)
    assert dataset.splits == {"train": ["c"], "val": ["a", "d"], "test": ["b"]}
    assert dataset.split_indices("val").tolist() == [0, 3]
    (folder / "splits.json").unlink()
    fresh = FolderDataset(folder, seed=7)
    path = fresh.save_splits()
    assert json.loads(path.read_text())["seed"] == 7
    assert FolderDataset(folder, seed=0).splits == assign_splits(fresh.ids, 7)


def test_folder_stored_splits_must_cover_the_ids(folder):
    (folder / "splits.json").write_text(json.dumps({"seed": 0, "train": ["a"], "val": [], "test": []}))
    with pytest.raises(DataError, match="splits.json"):
        FolderDataset(folder)


def test_folder_fingerprint_tracks_ids_and_bytes(folder):
    before = FolderDataset(folder).image_fingerprint()
    assert FolderDataset(folder).image_fingerprint() == before
    image = np.asarray(Image.open(folder / "images" / "c.png")).copy()
    image[0, 0, 0] ^= 1
    Image.fromarray(image).save(folder / "images" / "c.png")
    changed = FolderDataset(folder).image_fingerprint()
    assert changed != before
    (folder / "images" / "c.png").rename(folder / "images" / "e.png")
    assert FolderDataset(folder).image_fingerprint() != changed


def test_folder_missing_images_folder(tmp_path):
    (tmp_path / "masks" / "wheel").mkdir(parents=True)
    with pytest.raises(DataError, match="images folder is missing"):
        FolderDataset(tmp_path)


def test_folder_empty_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="images.*no image files"):
        FolderDataset(tmp_path)


def test_folder_non_image_file_is_named(folder):
    (folder / "images" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        FolderDataset(folder)


def test_folder_file_with_image_extension_but_no_image_is_named(folder):
    (folder / "images" / "e.png").write_text("hello")
    with pytest.raises(DataError, match="e.png.*not a readable image"):
        FolderDataset(folder)


def test_folder_duplicate_ids_name_both_files(folder):
    Image.new("RGB", (3, 3)).save(folder / "images" / "a.jpg")
    with pytest.raises(DataError, match="a.jpg") as error:
        FolderDataset(folder)
    assert "a.png" in error.value.culprit and "rename one" in error.value.fix


def test_folder_mask_without_image_is_named(folder):
    _save_mask(np.ones((2, 2), dtype=bool), folder / "masks" / "wheel" / "zzz.png")
    with pytest.raises(DataError, match="zzz.png.*no image"):
        FolderDataset(folder)


def test_folder_mask_of_wrong_size_is_named(folder):
    _save_mask(np.ones((8, 9), dtype=bool), folder / "masks" / "wheel" / "a.png")
    with pytest.raises(DataError, match=r"wheel/a.png.*8x9.*8x10"):
        FolderDataset(folder)


def test_folder_mask_with_bad_values_is_named(folder):
    Image.fromarray(np.full((6, 6), 7, dtype=np.uint8)).save(folder / "masks" / "door" / "d.png")
    with pytest.raises(DataError, match=r"door/d.png.*found 7"):
        FolderDataset(folder)


def test_folder_rgb_mask_is_named(folder):
    Image.new("RGB", (10, 8)).save(folder / "masks" / "door" / "a.png")
    with pytest.raises(DataError, match=r"door/a.png.*not single-channel"):
        FolderDataset(folder)


def test_folder_without_validation_fails_when_the_mask_is_read(folder):
    Image.fromarray(np.full((6, 6), 7, dtype=np.uint8)).save(folder / "masks" / "door" / "d.png")
    dataset = FolderDataset(folder, validate=False, progress=True)
    np.testing.assert_array_equal(dataset.masks(0), _expected_masks("a", ["door", "wheel"]))
    with pytest.raises(DataError, match=r"door/d.png"):
        dataset.masks(3)


def test_folder_concept_without_positive_pixel_is_named(folder):
    _save_mask(np.zeros((8, 10), dtype=bool), folder / "masks" / "roof" / "a.png")
    with pytest.raises(DataError, match="roof") as error:
        FolderDataset(folder)
    assert error.value.culprit == "roof" and "remove the folder" in error.value.fix
    assert FolderDataset(folder, concepts=["wheel"]).concepts == ["wheel"]  # only chosen concepts are checked


def test_folder_concepts_differing_only_in_case(folder):
    _save_mask(MASKS[("a", "wheel")], folder / "masks" / "Wheel" / "a.png")
    with pytest.raises(DataError, match="Wheel, wheel.*differ only in case"):
        FolderDataset(folder)


def test_folder_concepts_json_must_match_the_folders(folder):
    (folder / "concepts.json").write_text(json.dumps(["wheel", "door", "roof"]))
    with pytest.raises(DataError, match="concepts.json.*roof"):
        FolderDataset(folder)


class _ToyDataset(ConceptDataset):
    """Two images, concepts in a non-sorted order, one pair marked invalid."""

    def __init__(self) -> None:
        self.name = "toy"
        self.concepts = ["zeta", "alpha"]
        self.ids = ["p", "q"]
        self.splits = {"train": ["p"], "val": [], "test": ["q"]}
        rng = np.random.default_rng(1)
        self.images = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)]
        self.mask_arrays = [
            np.stack([_rect((4, 5), slice(0, 2), slice(0, 2)), _rect((4, 5), slice(3, 4), slice(1, 5))]),
            np.stack([np.zeros((3, 3), bool), _rect((3, 3), slice(1, 2), slice(1, 2))]),
        ]

    def image(self, index: int) -> np.ndarray:
        return self.images[index]

    def masks(self, index: int) -> np.ndarray:
        return self.mask_arrays[index]

    def mask_valid(self, index: int) -> np.ndarray:
        return np.array([True, index == 0])

    def image_fingerprint(self) -> str:
        return "toy"


def _assert_same_data(first: ConceptDataset, second: ConceptDataset) -> None:
    assert first.ids == second.ids and first.concepts == second.concepts and first.splits == second.splits
    for index in range(len(first)):
        np.testing.assert_array_equal(first.image(index), second.image(index))
        np.testing.assert_array_equal(first.masks(index), second.masks(index))
        np.testing.assert_array_equal(first.mask_valid(index), second.mask_valid(index))


def test_write_folder_dataset_round_trip_is_exact(folder, tmp_path):
    source = FolderDataset(folder, seed=3)
    out = write_folder_dataset(source, tmp_path / "copy", seed=3)
    copy = FolderDataset(out)
    _assert_same_data(source, copy)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png", "b.png", "c.png", "d.png"]
    assert sorted(p.name for p in (out / "masks" / "door").iterdir()) == ["a.png", "d.png"]  # non-empty only
    written = Image.open(out / "masks" / "wheel" / "b.png")
    assert written.mode == "L" and set(np.unique(np.asarray(written)).tolist()) == {0, 255}
    assert json.loads((out / "splits.json").read_text())["seed"] == 3
    assert json.loads((out / "concepts.json").read_text()) == ["door", "wheel"]
    assert not (out / "invalid_masks.json").exists()
    assert not list(out.rglob("*.tmp"))


def test_write_folder_dataset_keeps_concept_order_and_invalid_pairs(tmp_path):
    toy = _ToyDataset()
    out = write_folder_dataset(toy, tmp_path / "toy")
    copy = FolderDataset(out)
    assert copy.concepts == ["zeta", "alpha"]
    _assert_same_data(toy, copy)
    assert json.loads((out / "splits.json").read_text())["seed"] == -1
    assert json.loads((out / "invalid_masks.json").read_text()) == {"alpha": ["q"]}


def test_write_folder_dataset_round_trips_image_only_data(tmp_path):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (3 + i, 4, 3), dtype=np.uint8) for i in range(3)]
    source = ArrayDataset(images, ids=["x", "y", "z"], name="plain")
    copy = FolderDataset(write_folder_dataset(source, tmp_path / "plain"))
    assert copy.concepts == [] and copy.masks(2).shape == (0, 5, 4)
    _assert_same_data(source, copy)


def test_write_folder_dataset_refuses_bad_ids(tmp_path):
    source = ArrayDataset([np.zeros((2, 2, 3), np.uint8)], ids=["../escape"], name="bad")
    with pytest.raises(DataError, match="escape"):
        write_folder_dataset(source, tmp_path / "bad")


def test_write_folder_dataset_refuses_a_non_empty_root(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="out.*not empty") as error:
        write_folder_dataset(FolderDataset(folder), out)
    assert "overwrite=True" in error.value.fix
    _save_mask(np.ones((2, 2), bool), out / "masks" / "stale" / "old.png")
    write_folder_dataset(FolderDataset(folder, concepts=["door"]), out, overwrite=True)
    assert FolderDataset(out).concepts == ["door"]  # stale concept folder removed
    assert (out / "keep.txt").exists()
    with pytest.raises(DataError, match="read from"):
        write_folder_dataset(FolderDataset(out), out, overwrite=True)


# --------------------------------------------------------------------------- COCO

COCO_IMAGES = [
    {"id": 1, "file_name": "one.png", "height": 10, "width": 12},
    {"id": 2, "file_name": "two.png", "height": 8, "width": 8},
    {"id": 5, "file_name": "five.png", "height": 6, "width": 4},
]
COCO_CATEGORIES = [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "person"}]
RLE_MASK = _rect((10, 12), slice(7, 9), slice(8, 11))  # 6 pixels, stored as compressed RLE
# Uncompressed RLE of rows 1-3, cols 2-3 of an 8x8 image, counted by hand in column-major order:
# 17 zeros (columns 0-1 and row 0 of column 2), 3 ones, 5 zeros, 3 ones, 36 zeros.
UNCOMPRESSED_COUNTS = [17, 3, 5, 3, 36]


def _annotation(ann_id: int, image_id: int, category_id: int, segmentation, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "iscrowd": iscrowd, "area": 0.0, "bbox": [0, 0, 1, 1]}


def coco_annotations() -> list[dict]:
    compressed = mask_utils.encode(np.asfortranarray(RLE_MASK.astype(np.uint8)))
    return [
        # Integer rectangle polygons rasterise (pycocotools) to rows y0..y1-1 and columns x0..x1-1.
        _annotation(10, 1, 1, [[2, 2, 6, 2, 6, 5, 2, 5]]),
        _annotation(11, 1, 1, {"size": [10, 12], "counts": compressed["counts"].decode("ascii")}, iscrowd=1),
        _annotation(15, 1, 1, [[4, 3, 8, 3, 8, 4, 4, 4]]),  # overlaps annotation 10 on row 3, cols 4-5
        _annotation(14, 1, 3, [[0, 0, 1, 0, 1, 1, 0, 1]]),  # one pixel: 1/120 of the image
        _annotation(12, 2, 3, {"size": [8, 8], "counts": UNCOMPRESSED_COUNTS}, iscrowd=1),
        _annotation(13, 2, 2, [[0, 0, 8, 0, 8, 7, 0, 7]]),  # 56/64 of the image
    ]


def make_coco(tmp_path: Path, annotations: list[dict] | None = None, **overrides) -> tuple[Path, Path]:
    images_dir = tmp_path / "val2017"
    images_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for entry in COCO_IMAGES:
        pixels = rng.integers(0, 256, (entry["height"], entry["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / entry["file_name"])
    data = {"images": COCO_IMAGES, "annotations": coco_annotations() if annotations is None else annotations,
            "categories": COCO_CATEGORIES, **overrides}
    path = tmp_path / "instances_tiny.json"
    path.write_text(json.dumps(data))
    return path, images_dir


def _expected_coco_masks() -> dict[str, np.ndarray]:
    one = np.zeros((3, 10, 12), dtype=bool)  # concepts: cat, person, dog
    one[0, 2:5, 2:6] = True
    one[0, 3, 6:8] = True
    one[0, 7:9, 8:11] = True
    one[2, 0, 0] = True
    two = np.zeros((3, 8, 8), dtype=bool)
    two[2, 1:4, 2:4] = True
    two[1, 0:7, :] = True
    return {"1": one, "2": two, "5": np.zeros((3, 6, 4), dtype=bool)}


def test_coco_union_masks_are_exact(tmp_path, capsys):
    dataset = CocoDataset(*make_coco(tmp_path))
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert dataset.name == "instances_tiny"
    assert dataset.ids == ["1", "2", "5"]
    assert dataset.concepts == ["cat", "person", "dog"]  # sorted by category id
    expected = _expected_coco_masks()
    for index, item_id in enumerate(dataset.ids):
        np.testing.assert_array_equal(dataset.masks(index), expected[item_id])
        assert dataset.mask_valid(index).all()
    assert dataset.masks(0)[0].sum() == 12 + 2 + 6
    assert dataset.image(1).shape == (8, 8, 3) and dataset.image_size(2) == (6, 4)


def test_coco_category_subset_order_and_image_ids(tmp_path):
    dataset = CocoDataset(*make_coco(tmp_path), categories=["dog", "cat"], image_ids=[2, 1])
    assert dataset.concepts == ["dog", "cat"] and dataset.ids == ["2", "1"]
    expected = _expected_coco_masks()
    np.testing.assert_array_equal(dataset.masks(0), expected["2"][[2, 0]])
    np.testing.assert_array_equal(dataset.masks(1), expected["1"][[2, 0]])
    assert sorted(sum(dataset.splits.values(), [])) == ["1", "2"]


def test_coco_area_filter_marks_pairs_outside_the_range_invalid(tmp_path):
    dataset = CocoDataset(*make_coco(tmp_path), area_range=(0.025, 0.8))
    # cat 20/120 valid, person empty (valid negative), dog 1/120 too small
    assert dataset.mask_valid(0).tolist() == [True, True, False]
    # cat empty, person 56/64 too large, dog 6/64 valid
    assert dataset.mask_valid(1).tolist() == [True, False, True]
    assert dataset.mask_valid(2).tolist() == [True, True, True]
    np.testing.assert_array_equal(dataset.masks(1), _expected_coco_masks()["2"])  # masks are left as they are


def test_coco_area_filter_bounds_are_inclusive(tmp_path):
    paths = make_coco(tmp_path)
    assert CocoDataset(*paths, area_range=(20 / 120, 1.0)).mask_valid(0)[0]
    assert not CocoDataset(*paths, area_range=(20 / 120 + 1e-9, 1.0)).mask_valid(0)[0]
    assert CocoDataset(*paths, area_range=(0.0, 56 / 64)).mask_valid(1)[1]


def test_coco_bad_area_range(tmp_path):
    with pytest.raises(DataError, match="area_range"):
        CocoDataset(*make_coco(tmp_path), area_range=(0.5, 0.1))


def test_coco_round_trips_through_the_folder_layout(tmp_path):
    dataset = CocoDataset(*make_coco(tmp_path), area_range=(0.025, 0.8))
    copy = FolderDataset(write_folder_dataset(dataset, tmp_path / "folder"), validate=True)
    _assert_same_data(dataset, copy)


def test_coco_fingerprint_tracks_file_sizes(tmp_path):
    paths = make_coco(tmp_path)
    before = CocoDataset(*paths).image_fingerprint()
    assert CocoDataset(*paths).image_fingerprint() == before
    with open(paths[1] / "two.png", "ab") as file:
        file.write(b"\0")
    assert CocoDataset(*paths).image_fingerprint() != before


def test_coco_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="nothere.json.*does not exist"):
        CocoDataset(tmp_path / "nothere.json", tmp_path)


def test_coco_annotation_file_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="broken.json.*not a valid JSON"):
        CocoDataset(path, tmp_path)


def test_coco_annotation_file_missing_keys(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="captions.json.*missing categories"):
        CocoDataset(path, tmp_path)


def test_coco_unknown_category_lists_closest(tmp_path):
    with pytest.raises(DataError, match="dgo") as error:
        CocoDataset(*make_coco(tmp_path), categories=["dgo"])
    assert "closest: dog" in error.value.problem


def test_coco_annotation_without_segmentation_names_it_and_the_image(tmp_path):
    annotations = coco_annotations()
    del annotations[3]["segmentation"]
    with pytest.raises(DataError, match="annotation 14") as error:
        CocoDataset(*make_coco(tmp_path, annotations))
    assert "one.png" in error.value.problem and "drop" in error.value.fix


@pytest.mark.parametrize("segmentation", [[], [[]], [[1, 2, 3, 4]]], ids=["no-polygon", "empty", "two-points"])
def test_coco_empty_polygon_names_the_annotation(tmp_path, segmentation):
    annotations = coco_annotations()
    annotations[5]["segmentation"] = segmentation
    with pytest.raises(DataError, match="annotation 13.*polygon.*two.png"):
        CocoDataset(*make_coco(tmp_path, annotations))


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [("size", [8, 9], "RLE size"), ("counts", [17, 3, 5, 3, 35], "summing to height"), ("counts", None, "lacks")],
)
def test_coco_bad_rle_names_the_annotation(tmp_path, key, value, problem):
    annotations = coco_annotations()
    if value is None:
        del annotations[4]["segmentation"][key]
    else:
        annotations[4]["segmentation"][key] = value
    with pytest.raises(DataError, match=f"annotation 12.*{problem}.*two.png"):
        CocoDataset(*make_coco(tmp_path, annotations))


def test_coco_missing_image_file_names_it_and_the_folder(tmp_path):
    paths = make_coco(tmp_path)
    (paths[1] / "two.png").unlink()
    dataset = CocoDataset(*paths)  # checked lazily
    np.testing.assert_array_equal(dataset.masks(1), _expected_coco_masks()["2"])
    with pytest.raises(DataError, match="two.png") as error:
        dataset.image(1)
    assert str(paths[1]) in error.value.problem


def test_coco_image_size_mismatch_is_named(tmp_path):
    paths = make_coco(tmp_path)
    Image.new("RGB", (11, 10)).save(paths[1] / "one.png")
    with pytest.raises(DataError, match=r"one.png.*10x11.*10x12"):
        CocoDataset(*paths).image(0)


def test_coco_images_ignore_exif_orientation_like_pycocotools(tmp_path):
    paths = make_coco(tmp_path)
    pixels = np.asarray(Image.open(paths[1] / "one.png")).copy()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(paths[1] / "one.png", exif=exif)
    np.testing.assert_array_equal(CocoDataset(*paths).image(0), pixels)  # stored pixels, no rotation


def test_coco_unknown_image_id(tmp_path):
    with pytest.raises(DataError, match="image id 7"):
        CocoDataset(*make_coco(tmp_path), image_ids=[7])


# --------------------------------------------------------------------------- image-level sets


def make_sets(root: Path, folders: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in folders.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            size = (5 + i, 6)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"img{i}.png")
    return root


@pytest.fixture
def sets_root(tmp_path) -> Path:
    return make_sets(tmp_path / "tcav", {"stripes": 3, "dots": 2, "random_0": 4, "random_1": 2})


def test_image_sets_discovery(sets_root):
    (sets_root / "README.txt").write_text("files in the root are not sets")
    sets = ImageSets(sets_root)
    assert sets.concepts == ["dots", "stripes"]
    assert sets.random_sets == ["random_0", "random_1"]
    stripes = sets.dataset("stripes")
    assert isinstance(stripes, ImageFolderDataset)
    assert stripes.name == "stripes" and stripes.ids == ["img0", "img1", "img2"] and stripes.concepts == []
    assert stripes.masks(2).shape == (0, 7, 6) and stripes.masks(2).dtype == bool
    np.testing.assert_array_equal(stripes.image(1), np.asarray(Image.open(sets_root / "stripes" / "img1.png")))
    assert sorted(sum(sets.dataset("random_0").splits.values(), [])) == ["img0", "img1", "img2", "img3"]


def test_image_sets_explicit_names(sets_root):
    sets = ImageSets(sets_root, concepts=["stripes"], random_sets=["random_1"])
    assert sets.concepts == ["stripes"] and sets.random_sets == ["random_1"]
    with pytest.raises(DataError, match="dots"):
        sets.dataset("dots")


def test_image_folder_dataset_fingerprint_tracks_bytes(sets_root):
    files = sorted((sets_root / "dots").iterdir())
    before = ImageFolderDataset(files, name="dots").image_fingerprint()
    Image.new("RGB", (6, 5)).save(files[0])
    assert ImageFolderDataset(files, name="dots").image_fingerprint() != before


def test_image_folder_dataset_duplicate_stems(sets_root):
    files = [sets_root / "dots" / "img0.png", sets_root / "stripes" / "img0.png"]
    with pytest.raises(DataError, match="img0"):
        ImageFolderDataset(files, name="mixed")


def test_image_sets_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        ImageSets(tmp_path / "nowhere")


def test_image_sets_missing_named_folder_lists_close_matches(sets_root):
    with pytest.raises(DataError, match="stripse.*closest: stripes"):
        ImageSets(sets_root, concepts=["stripse"])
    with pytest.raises(DataError, match="random_9"):
        ImageSets(sets_root, random_sets=["random_9"])


def test_image_sets_empty_folder(sets_root):
    (sets_root / "plaid").mkdir()
    with pytest.raises(DataError, match="plaid.*no image files"):
        ImageSets(sets_root)


def test_image_sets_without_random_folder(tmp_path):
    root = make_sets(tmp_path / "tcav", {"stripes": 2})
    with pytest.raises(DataError, match="no random image set") as error:
        ImageSets(root)
    assert "random_0/" in error.value.fix


def test_image_sets_non_image_file_is_named(sets_root):
    (sets_root / "random_1" / "list.csv").write_text("x")
    with pytest.raises(DataError, match="list.csv"):
        ImageSets(sets_root)


def test_image_sets_duplicate_stems_in_a_folder(sets_root):
    Image.new("RGB", (4, 4)).save(sets_root / "dots" / "img0.jpg")
    with pytest.raises(DataError, match="img0.jpg"):
        ImageSets(sets_root)


# --- generated worlds named by a spec ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "n_images", "world_seed"),
    [
        ("synthetic", "synthetic", 200, 5),
        ("synthetic:12", "synthetic", 12, 5),
        ("synthetic:12:4", "synthetic", 12, 4),
        ("real-textures:6:2", "real-textures", 6, 2),
    ],
)
def test_generated_spec_opens_its_world(spec, kind, n_images, world_seed):
    from conceptlens.data_spec import GENERATED_WORLDS, open_dataset

    if kind == "real-textures":
        pytest.importorskip("skimage.data", reason="scikit-image is not installed (pip install scikit-image)")
    world = open_dataset(spec, seed=5)
    assert type(world) is GENERATED_WORLDS[kind] and world.kind == kind
    assert (world.n_images, world.seed, len(world)) == (n_images, world_seed, n_images)
    assert world.name == f"{kind}-s{world_seed}-n{n_images}"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("synthetic:x", "must be integers"),
        ("synthetic:10:y", "must be integers"),
        ("synthetic:1:2:3", "at most N and SEED"),
        ("real-textures:2:y", "must be integers"),
    ],
)
def test_bad_generated_spec_names_spec_and_form(spec, problem):
    from conceptlens.data_spec import open_dataset

    with pytest.raises(DataError, match=problem) as error:
        open_dataset(spec)
    name = spec.split(":")[0]
    assert error.value.culprit == spec and f"{name}:N:SEED" in error.value.fix and f"{name}:200:0" in error.value.fix

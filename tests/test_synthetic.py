"""The synthetic concept world: determinism, geometry, exact masks, boxes, dataset contract."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

import conceptlens.concepts.data.synthetic as synthetic
from conceptlens.concepts.data.dataset import assign_splits
from conceptlens.concepts.data.generated import GeneratedDataset
from conceptlens.concepts.errors import DataError
from conceptlens.concepts.data.synthetic import (
    COLOUR_JITTER,
    CONCEPTS,
    OBJECT_CLASSES,
    PAINT_COLOURS,
    TEXTURE_SHADE,
    Scene,
    SceneObject,
    SyntheticWorld,
    _render,
    render_scene,
)

K = {name: k for k, name in enumerate(CONCEPTS)}
PARTS_OF = {
    "car": ("body", "wheel", "window"),
    "house": ("wall", "roof", "door", "window"),
    "tree": ("trunk", "crown"),
    "boat": ("hull", "sail", "mast"),
}
PAINTED = ("body", "wall", "roof", "door", "hull", "sail")
COLOURS = ("red", "green", "blue", "yellow", "white")
TEXTURES = ("stripes", "dots", "checker")
BACKGROUNDS = ("sky", "ground", "water")


def _m(scene: Scene, *names: str) -> np.ndarray:
    """Union of the masks of ``names``."""
    return scene.masks[[K[n] for n in names]].any(axis=0)


@pytest.fixture(scope="module")
def scenes() -> list[tuple[Scene, np.ndarray]]:
    return [_render(11, i, (96, 128), with_instances=True) for i in range(120)]


# ------------------------------------------------------------------------------ concept list


def test_concept_list_is_complete_and_ordered() -> None:
    assert OBJECT_CLASSES == ("car", "house", "tree", "boat")
    assert CONCEPTS[:4] == OBJECT_CLASSES
    expected = set(OBJECT_CLASSES) | {p for ps in PARTS_OF.values() for p in ps} | set(COLOURS) | set(TEXTURES)
    assert set(CONCEPTS) == expected | set(BACKGROUNDS)
    assert len(CONCEPTS) == len(set(CONCEPTS)) == 26
    assert set(PAINT_COLOURS) == set(COLOURS)


# ------------------------------------------------------------------------------ determinism


def test_same_seed_and_index_give_identical_scenes() -> None:
    a, b = render_scene(7, 3), render_scene(7, 3)
    assert a is not b
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.masks, b.masks)
    assert a.objects == b.objects


def test_item_does_not_depend_on_dataset_size_and_seeds_differ() -> None:
    small, large = SyntheticWorld(n_images=5, seed=7), SyntheticWorld(n_images=40, seed=7)
    for index in range(5):
        assert np.array_equal(small.image(index), large.image(index))
        assert np.array_equal(small.masks(index), large.masks(index))
        assert small.objects(index) == large.objects(index)
    other = SyntheticWorld(n_images=5, seed=8)
    assert any(
        other.image(i).shape != small.image(i).shape or not np.array_equal(other.image(i), small.image(i))
        for i in range(5)
    )
    # different indices of one world differ too
    assert not np.array_equal(small.image(0)[:20, :20], small.image(1)[:20, :20])


def test_identical_bytes_in_another_process() -> None:
    code = (
        "import hashlib; from conceptlens.concepts.data.synthetic import render_scene; s = render_scene(5, 17); "
        "print(hashlib.sha256(s.image.tobytes() + s.masks.tobytes()).hexdigest())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    scene = render_scene(5, 17)
    assert result.stdout.strip() == hashlib.sha256(scene.image.tobytes() + scene.masks.tobytes()).hexdigest()


def test_scene_bytes_and_fingerprint_are_pinned() -> None:
    # scene 17 of world 5 and the fingerprint of a 30-scene world, as GENERATOR_VERSION
    # "synthetic-world-1" draws them; change both (and bump the version) only when the drawing changes
    scene = render_scene(5, 17)
    digest = hashlib.sha256(scene.image.tobytes() + scene.masks.tobytes()).hexdigest()
    assert digest == "1f22aced30f4f7cb484f5c702cc8a8c7dbe2653d13cbd2c86de086b81218c98f"
    fingerprint = SyntheticWorld(n_images=30, seed=3).image_fingerprint()
    assert fingerprint == "d508415967907e323c07e617bddf46ed3eeccafa429bb25ba1d208b118a4c670"


# ------------------------------------------------------------------------------ shapes, sizes


def test_shapes_and_dtypes() -> None:
    world = SyntheticWorld(n_images=4, seed=1)
    for index in range(4):
        image, masks = world.image(index), world.masks(index)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert masks.dtype == np.bool_ and masks.shape == (len(CONCEPTS), *image.shape[:2])
        assert world.image_size(index) == image.shape[:2]
        assert world.mask_valid(index).shape == (len(CONCEPTS),)
        assert 1 <= len(world.objects(index)) <= 4
        assert all(isinstance(o, SceneObject) and o.label in OBJECT_CLASSES for o in world.objects(index))


def test_size_range_is_respected() -> None:
    sizes = [render_scene(2, i, (96, 128)).image.shape[:2] for i in range(40)]
    assert all(96 <= h <= 128 and 96 <= w <= 128 for h, w in sizes)
    assert len({h for h, _ in sizes}) > 5 and any(h != w for h, w in sizes)  # drawn independently
    assert all(render_scene(2, i, (112, 112)).image.shape == (112, 112, 3) for i in range(10))
    world = SyntheticWorld(n_images=10, seed=2, size_range=(16, 20))
    for index in range(10):  # tiny scenes still render valid objects
        h, w = world.image(index).shape[:2]
        assert 16 <= h <= 20 and 16 <= w <= 20
        assert world.image_size(index) == (h, w)
        assert len(world.objects(index)) >= 1


# ------------------------------------------------------------------------------ exact masks


def test_parts_lie_inside_their_objects(scenes) -> None:
    for scene, _ in scenes:
        car, house, tree, boat = (_m(scene, c) for c in OBJECT_CLASSES)
        assert not (_m(scene, "body", "wheel") & ~car).any()
        assert not (_m(scene, "window") & ~(car | house)).any()
        assert not (_m(scene, "wall", "roof", "door") & ~house).any()
        assert not (_m(scene, "trunk", "crown") & ~tree).any()
        assert not (_m(scene, "hull", "sail", "mast") & ~boat).any()


def test_object_masks_are_unions_of_their_parts(scenes) -> None:
    for scene, _ in scenes:
        car, house = _m(scene, "car"), _m(scene, "house")
        assert np.array_equal(car, _m(scene, *PARTS_OF["car"]) & ~house)
        assert np.array_equal(house, _m(scene, *PARTS_OF["house"]) & ~car)
        assert np.array_equal(_m(scene, "tree"), _m(scene, *PARTS_OF["tree"]))
        assert np.array_equal(_m(scene, "boat"), _m(scene, *PARTS_OF["boat"]))
        parts = sorted({p for ps in PARTS_OF.values() for p in ps})
        # every object pixel belongs to exactly one part and one object class
        objects = _m(scene, *OBJECT_CLASSES)
        assert np.array_equal(scene.masks[[K[p] for p in parts]].sum(axis=0), objects.astype(int))
        assert scene.masks[:4].sum(axis=0).max() <= 1


def test_background_partitions_the_rest_of_the_image(scenes) -> None:
    for scene, _ in scenes:
        objects = _m(scene, *OBJECT_CLASSES)
        background = scene.masks[[K[b] for b in BACKGROUNDS]]
        assert not (background.any(axis=0) & objects).any()
        assert np.array_equal(background.sum(axis=0) + objects, np.ones(objects.shape, dtype=int))
        assert background[0].any()  # sky
        assert not (background[1].any() and background[2].any())  # ground or water, not both
        water = background[2].any()
        labels = {o.label for o in scene.objects}
        assert labels <= {"boat"} if water else not labels & {"boat"}


def test_background_is_a_mildly_noisy_gradient(scenes) -> None:
    noisy = 0
    for scene, _ in scenes:
        image = scene.image.astype(int)
        for name in BACKGROUNDS:
            mask = scene.masks[K[name]]
            pairs = mask[:, 1:] & mask[:, :-1]  # horizontal neighbours: same gradient row
            if not pairs.any():
                continue
            step = np.abs(image[:, 1:] - image[:, :-1])[pairs]
            assert step.max() <= 2 * synthetic._NOISE, name
            noisy += int((step > 0).sum())
        sky = image[scene.masks[K["sky"]]]
        assert sky[:, 2].mean() > sky[:, 0].mean() + 20  # blue sky
    assert noisy > 0


def test_attribute_masks_cover_exactly_the_painted_surfaces(scenes) -> None:
    for scene, _ in scenes:
        painted = _m(scene, *PAINTED)
        colours = scene.masks[[K[c] for c in COLOURS]]
        textures = scene.masks[[K[t] for t in TEXTURES]]
        assert np.array_equal(colours.sum(axis=0), painted.astype(int))  # one colour per painted pixel
        assert textures.sum(axis=0).max() <= 1
        assert not (textures.any(axis=0) & ~painted).any()
        assert not (_m(scene, "crown", "trunk", "wheel", "window", "mast") & colours.any(axis=0)).any()


def test_plain_painted_pixels_have_their_colour(scenes) -> None:
    table = {c: np.array(PAINT_COLOURS[c], dtype=int) for c in COLOURS}
    checked = dict.fromkeys(COLOURS, 0)
    for scene, _ in scenes:
        image = scene.image.astype(int)
        textured = _m(scene, *TEXTURES)
        for colour in COLOURS:
            pixels = image[scene.masks[K[colour]] & ~textured]
            checked[colour] += len(pixels)
            assert (np.abs(pixels - table[colour]) <= COLOUR_JITTER).all(), colour
            # ... and the nearest palette colour is that colour (colours stay distinguishable)
            distances = np.stack([np.abs(pixels - table[c]).sum(axis=1) for c in COLOURS])
            assert (distances.argmin(axis=0) == COLOURS.index(colour)).all(), colour
    assert all(n > 500 for n in checked.values()), checked


def test_textures_are_drawn_in_a_second_colour(scenes) -> None:
    shaded = dict.fromkeys(TEXTURES, 0)
    total = dict.fromkeys(TEXTURES, 0)
    for scene, _ in scenes:
        image = scene.image.astype(int)
        for colour in COLOURS:
            base = np.array(PAINT_COLOURS[colour])
            for texture in TEXTURES:
                pixels = image[scene.masks[K[colour]] & scene.masks[K[texture]]]
                is_base = (np.abs(pixels - base) <= COLOUR_JITTER).all(axis=1)
                is_shade = (np.abs(pixels - base * TEXTURE_SHADE) <= COLOUR_JITTER * TEXTURE_SHADE + 1).all(axis=1)
                assert (is_base | is_shade).all()
                shaded[texture] += int(is_shade.sum())
                total[texture] += len(pixels)
    for texture in TEXTURES:
        assert total[texture] > 500 and 0.1 < shaded[texture] / total[texture] < 0.9, texture


# ------------------------------------------------------------------------------ boxes


def test_boxes_are_tight_around_visible_pixels(scenes) -> None:
    for scene, instances in scenes:
        h, w = scene.image.shape[:2]
        assert instances.shape == (h, w)
        assert np.array_equal(instances >= 0, _m(scene, *OBJECT_CLASSES))
        assert set(np.unique(instances)) - {-1} == set(range(len(scene.objects)))
        for j, obj in enumerate(scene.objects):
            mask = instances == j
            assert not (mask & ~scene.masks[K[obj.label]]).any()
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert obj.box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            # objects are reasonably sized and mostly visible
            assert max((x1 - x0) / w, (y1 - y0) / h) >= 0.12
            assert mask.sum() >= 0.2 * (x1 - x0) * (y1 - y0)


def test_detection_target_matches_objects() -> None:
    world = SyntheticWorld(n_images=6, seed=4)
    for index in range(6):
        target = world.detection_target(index)
        objects = world.objects(index)
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(objects), 4)
        assert target["labels"].dtype == torch.int64 and target["labels"].shape == (len(objects),)
        assert target["boxes"].tolist() == [list(o.box) for o in objects]
        assert target["labels"].tolist() == [OBJECT_CLASSES.index(o.label) + 1 for o in objects]
        assert target["labels"].min() >= 1


# ------------------------------------------------------------------------------ part shapes


def _single(label: str, count: int) -> list[Scene]:
    found = []
    for index in range(400):
        scene = render_scene(21, index, (112, 128))
        if [o.label for o in scene.objects] == [label]:
            found.append(scene)
            if len(found) == count:
                break
    assert len(found) == count
    return found


def test_part_shapes_of_unoccluded_objects() -> None:
    for scene in _single("car", 4):
        wheels, n = ndimage.label(_m(scene, "wheel"))
        assert n == 2
        for region in ndimage.find_objects(wheels):
            box_h, box_w = region[0].stop - region[0].start, region[1].stop - region[1].start
            area = (wheels[region] > 0).sum()
            assert abs(box_h - box_w) <= 1 and 0.65 < area / (box_h * box_w) < 0.9  # discs
        _assert_rectangles(_m(scene, "window"))
        body_rows = np.flatnonzero(_m(scene, "body").any(axis=1))
        wheel_rows = np.flatnonzero(_m(scene, "wheel").any(axis=1))
        assert wheel_rows[-1] > body_rows[-1]  # wheels stick out below the body
    for scene in _single("house", 4):
        wall, roof, door = (_m(scene, n) for n in ("wall", "roof", "door"))
        _assert_rectangles(_m(scene, "window"))
        _assert_rectangles(door)
        wall_rows, roof_rows = np.flatnonzero(wall.any(axis=1)), np.flatnonzero(roof.any(axis=1))
        assert roof_rows[0] < wall_rows[0]  # roof on top
        widths = roof.sum(axis=1)[roof_rows]
        assert widths[-1] > 3 * widths[0]  # a triangle, wide at the bottom
        assert np.flatnonzero(door.any(axis=1))[-1] == wall_rows[-1]  # door touches the wall bottom
    for scene in _single("tree", 3):
        trunk, crown = _m(scene, "trunk"), _m(scene, "crown")
        assert trunk.any(axis=0).sum() < 0.4 * crown.any(axis=0).sum()  # thin trunk
        assert np.flatnonzero(trunk.any(axis=1))[-1] > np.flatnonzero(crown.any(axis=1))[-1]
        green = scene.image[crown].astype(int)
        assert (green[:, 1] > green[:, 0]).all() and (green[:, 1] > green[:, 2]).all()
    for scene in _single("boat", 3):
        mast, sail, hull = (_m(scene, n) for n in ("mast", "sail", "hull"))
        assert mast.any(axis=0).sum() <= 3  # thin line
        assert np.flatnonzero(mast.any(axis=1)).size > 0.5 * np.flatnonzero(_m(scene, "boat").any(axis=1)).size
        assert np.flatnonzero(hull.any(axis=1))[0] > np.flatnonzero(sail.any(axis=1))[-1]  # sail above hull
        widths = hull.sum(axis=1)[hull.any(axis=1)]
        assert widths[0] > widths[-1]  # trapezoid, narrower at the keel


def _assert_rectangles(mask: np.ndarray) -> None:
    labels, n = ndimage.label(mask)
    assert n >= 1
    for k, region in enumerate(ndimage.find_objects(labels), start=1):
        assert (labels[region] == k).all()


# ------------------------------------------------------------------------------ coverage


def test_every_concept_appears_in_200_scenes() -> None:
    present = np.zeros(len(CONCEPTS), dtype=int)
    labels = set()
    for index in range(200):
        scene = render_scene(0, index, (96, 96))
        present += scene.masks.any(axis=(1, 2))
        labels |= {o.label for o in scene.objects}
    missing = [c for c, n in zip(CONCEPTS, present) if n == 0]
    assert not missing
    assert labels == set(OBJECT_CLASSES)
    assert (present >= 20).all(), dict(zip(CONCEPTS, present.tolist()))


# ------------------------------------------------------------------------------ dataset contract


def test_dataset_metadata_splits_and_fingerprint(monkeypatch) -> None:
    world = SyntheticWorld(n_images=30, seed=3)
    assert world.name == "synthetic-s3-n30" and len(world) == 30
    assert world.concepts == list(CONCEPTS)
    assert world.ids[:2] == ["000000", "000001"]
    assert sorted(sum(world.splits.values(), [])) == world.ids
    assert world.splits == SyntheticWorld(n_images=30, seed=3, split_seed=3).splits
    assert world.splits != SyntheticWorld(n_images=30, seed=3, split_seed=4).splits
    fingerprint = world.image_fingerprint()
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert fingerprint == SyntheticWorld(n_images=30, seed=3, split_seed=9).image_fingerprint()
    for other in (
        SyntheticWorld(n_images=31, seed=3),
        SyntheticWorld(n_images=30, seed=4),
        SyntheticWorld(n_images=30, seed=3, size_range=(96, 96)),
    ):
        assert other.image_fingerprint() != fingerprint
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", "changed")
    assert world.image_fingerprint() != fingerprint
    subset = world.subset([4, 2])
    assert np.array_equal(subset.image(0), world.image(4))


def test_world_is_a_generated_dataset_with_its_own_split_seed() -> None:
    world = SyntheticWorld(n_images=10, seed=2, split_seed=7)
    assert isinstance(world, GeneratedDataset) and world.kind == "synthetic"
    assert world.split_seed == 7 and world.splits == assign_splits(world.ids, 7)
    assert SyntheticWorld(n_images=10, seed=2).split_seed == 2


def test_scene_cache_and_returned_copies() -> None:
    world = SyntheticWorld(n_images=3, seed=6)
    assert world.scene(1) is world.scene(1)  # image() + masks() render once
    assert not world.scene(1).image.flags.writeable and not world.scene(1).masks.flags.writeable
    image = world.image(1)
    image[:] = 0
    masks = world.masks(1)
    masks[:] = True
    assert world.image(1).any() and not world.masks(1).all()
    with pytest.raises(IndexError):
        world.image(3)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"n_images": 0}, "n_images"),
        ({"n_images": -5}, "n_images"),
        ({"n_images": 2.5}, "n_images"),
        ({"size_range": (8, 8)}, "size_range"),
        ({"size_range": (15, 40)}, "size_range"),
        ({"size_range": (100, 90)}, "size_range"),
        ({"size_range": (96,)}, "size_range"),
        ({"size_range": ("a", "b")}, "size_range"),
        ({"seed": -1}, "seed"),
        ({"split_seed": -2}, "split_seed"),
    ],
)
def test_bad_arguments_raise_data_error(kwargs, culprit) -> None:
    with pytest.raises(DataError) as info:
        SyntheticWorld(**kwargs)
    assert info.value.culprit.startswith(culprit + "=")
    assert info.value.fix


def test_render_scene_validates_arguments() -> None:
    with pytest.raises(DataError, match="size_range"):
        render_scene(0, 0, (10, 12))
    with pytest.raises(DataError, match="index"):
        render_scene(0, -1)

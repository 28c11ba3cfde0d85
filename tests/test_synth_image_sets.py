"""``conceptlens synth --image-sets``: TCAV image sets drawn from the synthetic world, and ``synth --concepts``.

Every expectation is recomputed here from the world's own masks and splits (scene by scene, with
numpy), not from the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conceptlens.concepts.data.image_sets import ImageSets
from conceptlens.concepts.data.synthetic import SyntheticWorld
from PIL import Image

from conceptlens.cli import main

N_SCENES = 30
MIN_FRACTION = 0.02  # the covered fraction that puts a scene into a concept's set


def _world() -> SyntheticWorld:
    return SyntheticWorld(n_images=N_SCENES, seed=0)


def _train_val(world: SyntheticWorld) -> set[int]:
    return {int(i) for split in ("train", "val") for i in world.split_indices(split)}


def _folders(root) -> list[str]:
    return sorted(entry.name for entry in root.iterdir())


def test_image_sets_hold_scenes_that_show_the_concept(tmp_path, capsys):
    out = tmp_path / "sets"
    argv = ["synth", str(out), "--n", str(N_SCENES), "--image-sets", "--concepts", "car", "sky", "--random-sets", "2",
            "--images-per-set", "4", "--quiet"]
    assert main(argv) == 0
    assert _folders(out) == ["car", "random_0", "random_1", "sky"]
    world, pool = _world(), _train_val(_world())
    for name in _folders(out):
        files = sorted((out / name).iterdir())
        assert len(files) == 4 and all(f.suffix == ".png" for f in files)
        for file in files:
            index = int(file.stem)  # scene i has id f"{i:06d}"
            assert index in pool, f"{name}/{file.name} is a test scene"
            assert np.array_equal(np.asarray(Image.open(file).convert("RGB")), world.image(index))
            if not name.startswith("random_"):
                assert world.masks(index)[world.concepts.index(name)].mean() >= MIN_FRACTION
    sets = ImageSets(out)
    assert (sets.concepts, sets.random_sets) == (["car", "sky"], ["random_0", "random_1"])
    assert "car (4), sky (4) and 2 random sets" in capsys.readouterr().out


def test_default_concepts_are_those_two_train_val_scenes_show(tmp_path):
    out = tmp_path / "sets"
    assert main(["synth", str(out), "--n", str(N_SCENES), "--image-sets", "--random-sets", "2", "--images-per-set", "2", "--quiet"]) == 0
    world = _world()
    pool = sorted(_train_val(world))
    expected = {concept for k, concept in enumerate(world.concepts)
                if sum(world.masks(i)[k].mean() >= MIN_FRACTION for i in pool) >= 2}
    assert "mast" not in expected and {"car", "sky"} <= expected  # some concepts are left out, the common ones kept
    assert set(_folders(out)) == expected | {"random_0", "random_1"}


def test_overwrite_replaces_the_sets_and_removes_older_random_sets(tmp_path):
    out = tmp_path / "sets"
    common = ["synth", str(out), "--n", str(N_SCENES), "--image-sets", "--images-per-set", "3", "--quiet"]
    assert main([*common, "--concepts", "car", "sky", "--random-sets", "3"]) == 0
    assert main([*common, "--concepts", "car", "--random-sets", "2", "--seed", "1", "--overwrite"]) == 0
    assert _folders(out) == ["car", "random_0", "random_1", "sky"]  # random_2 is gone; sky, not rewritten, stays
    redrawn = SyntheticWorld(n_images=N_SCENES, seed=1)
    first = min((out / "car").iterdir())
    assert np.array_equal(np.asarray(Image.open(first).convert("RGB")), redrawn.image(int(first.stem)))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--random-sets", "3"], "error: --random-sets 3: applies to image sets only — fix: add --image-sets"),
        (["--images-per-set", "5"], "error: --images-per-set 5: applies to image sets only — fix: add --image-sets"),
        (["--image-sets", "--random-sets", "1"], "error: --random-sets 1: must be between 2 and 1000 — fix: pass e.g. --random-sets 10"),
        (["--image-sets", "--concepts", "zebra"], "error: concept 'zebra': is not a concept of 'synthetic-s0-n30' — fix: closest:"),
    ],
)
def test_bad_set_options_are_one_line_and_write_nothing(tmp_path, capsys, argv, expected):
    assert main(["synth", str(tmp_path / "sets"), "--n", str(N_SCENES), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and "\n" not in err
    assert _folders(tmp_path) == []  # no output folder, no partial folder left behind


def test_concepts_narrow_the_folder_layout(tmp_path):
    out = tmp_path / "world"
    assert main(["synth", str(out), "--n", "6", "--concepts", "sky", "car", "--quiet"]) == 0
    assert json.loads((out / "concepts.json").read_text()) == ["sky", "car"]
    assert _folders(out / "masks") == ["car", "sky"]
    world = SyntheticWorld(n_images=6, seed=0)
    with_car = sorted(f"{i:06d}.png" for i in range(6) if world.masks(i)[world.concepts.index("car")].any())
    assert sorted(path.name for path in (out / "masks" / "car").iterdir()) == with_car

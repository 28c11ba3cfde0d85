"""TCAV on detectors: raw images through the model's adapter, padding-aware gradients, missing targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from conceptlens.attribution.gradients import GradientError, iter_layer_gradients
from conceptlens.attribution.targets import TopDetection
from conceptlens.attribution.tcav import sensitivities, tcav_scores
from conceptlens.concepts.models.adapters import DetectorAdapter
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.geometry import image_cells
from conceptlens.concepts.models.loading import LoadedModel, load_model
from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.concepts.data.synthetic import OBJECT_CLASSES, SyntheticWorld
from conceptlens.probes.linear import pooled_activations, train_cavs

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyDetector(nn.Module):
    """Detector-shaped: torchvision's resize+pad transform, a conv 'backbone', one box per image whose
    score is a sigmoid of the mean head response over the *whole padded canvas* — so the raw layer
    gradient is non-zero on padding cells, and only the padding-aware pooling gives the directional
    derivative of the image's own cells."""

    def __init__(self) -> None:
        super().__init__()
        self.transform = GeneralizedRCNNTransform(64, 128, [0.5] * 3, [0.25] * 3, size_divisible=32)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, images):
        image_list, _ = self.transform(images)
        scores = torch.sigmoid(self.head(self.backbone(image_list.tensors)).mean((1, 2, 3)))
        return [
            {"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "scores": s[None], "labels": torch.tensor([1])}
            for s in scores
        ]


@pytest.fixture
def tiny_detector() -> LoadedModel:
    torch.manual_seed(3)
    module = TinyDetector().eval()
    return LoadedModel(module, DetectorAdapter(module.transform), "test:tiny-detector")


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _shifted_scores(model: LoadedModel, images, direction: torch.Tensor, epsilon: float, cells: torch.Tensor) -> torch.Tensor:
    """Target values with every image cell ``(B, h, w)`` of the backbone output moved by ``epsilon * direction``."""

    def shift(_module, _args, output):
        return output + epsilon * direction.view(1, -1, 1, 1) * cells[:, None].to(output.dtype)

    handle = model.module.backbone.register_forward_hook(shift)
    try:
        with torch.no_grad():
            tensors = model.adapter.prepare(images, torch.device("cpu"))
            output, _ = model.adapter.forward(model.module, tensors, [im.shape[:2] for im in images])
    finally:
        handle.remove()
    return torch.stack([d["scores"][0] for d in output]).double()


def test_padding_aware_sensitivity_is_the_directional_derivative_over_image_cells(tiny_detector):
    # two images of different widths: in a batch, the narrow one is padded on the right
    images = _images([(64, 64), (64, 120)])
    direction = torch.tensor([0.7, -0.4, 0.2, 0.5])
    (batch,) = iter_layer_gradients(tiny_detector, images, ["backbone"], TopDetection(1), batch_size=2)
    gradient = batch.gradients["backbone"]
    cells = torch.stack([image_cells(g, tuple(gradient.shape[-2:])) for g in batch.geometries])
    assert not cells[0].all(), "the first image must be padded"
    assert gradient[0][:, ~cells[0]].abs().max() == 0  # padding cells zeroed
    assert gradient[0][:, cells[0]].abs().sum() > 0

    ours = sensitivities(gradient, direction[None], pooling="sum")[:, 0].double()
    epsilon = 1e-2
    finite_difference = (_shifted_scores(tiny_detector, images, direction, epsilon, cells)
                         - _shifted_scores(tiny_detector, images, direction, -epsilon, cells)) / (2 * epsilon)
    torch.testing.assert_close(ours, finite_difference, rtol=2e-3, atol=1e-6)


def test_padding_cells_would_change_the_answer(tiny_detector):
    """Guard for the test above: summing the raw gradient over the whole canvas gives another number."""
    images = _images([(64, 64), (64, 120)])
    module = tiny_detector.module
    captured = {}

    def keep(_m, _a, output):
        output.retain_grad()
        captured["a"] = output

    handle = module.backbone.register_forward_hook(keep)
    tensors = tiny_detector.adapter.prepare(images, torch.device("cpu"))
    output = module(tensors)
    handle.remove()
    output[0]["scores"].sum().backward()
    raw = captured["a"].grad[0].sum((1, 2))
    (batch,) = iter_layer_gradients(tiny_detector, images, ["backbone"], TopDetection(1), batch_size=2)
    masked = batch.gradients["backbone"][0].sum((1, 2))
    assert not torch.allclose(raw, masked, rtol=1e-3)


def test_loaded_model_needs_raw_images(tiny_detector):
    with pytest.raises(GradientError, match="raw images"):
        next(iter_layer_gradients(tiny_detector, torch.zeros(2, 3, 64, 64), ["backbone"], TopDetection(1)))


@pytest.fixture(scope="module")
def zoo_cavs(tmp_path_factory):
    """Pooled CAVs of two synthetic concepts at one layer of the shipped VGG detector."""
    model = load_model("zoo:synthetic_vgg_centernet")
    world = SyntheticWorld(60, seed=11)
    store = ActivationStore(tmp_path_factory.mktemp("store"))
    layer = "backbone.block3"
    result = embed(model, world, [layer], store, reduce="mean", batch_size=20, device="cpu", progress=False)
    pooled = pooled_activations(result.entries[layer])
    concepts = {}
    for name in ("wheel", "sky"):
        c = world.concepts.index(name)
        has = [i for i in range(len(world)) if world.masks(i)[c].mean() > 0.01]
        concepts[name] = pooled[has[:15]]
    rng = np.random.default_rng(0)
    randoms = {f"random_{r}": pooled[rng.choice(len(world), 15, replace=False)] for r in range(4)}
    return model, world, layer, train_cavs(concepts, randoms, layer=layer, seed=0)


def test_tcav_on_a_zoo_detector_reports_images_without_detection(zoo_cavs):
    model, world, layer, cavs = zoo_cavs
    car = OBJECT_CLASSES.index("car") + 1
    images = [world.image(i) for i in range(12)]
    ids = [f"scene_{i}" for i in range(12)]
    target = TopDetection(car, min_score=0.3)
    result = tcav_scores(model, images, None, {layer: cavs}, {"car": target}, batch_size=5, n_bootstrap=50, input_ids=ids)

    output, _ = model.adapter.forward(model.module, model.adapter.prepare(images, torch.device("cpu")), [im.shape[:2] for im in images])
    expected_missing = [ids[i] for i, tv in enumerate(target(output).valid) if not tv]
    assert result.missing["car"] == expected_missing
    assert 0 < len(expected_missing) < len(images), "the scenes must mix cars and no cars"
    record = result.get("wheel", layer, "car")
    assert record.n_inputs == len(images) - len(expected_missing)
    assert result.sensitivities[(layer, "car")].shape[0] == record.n_inputs
    assert result.missing_lines()[0].startswith(f"{len(expected_missing)} of {len(images)} inputs have no valid target for car")
    assert result.to_dict()["missing"]["car"] == expected_missing

    # batch size does not change sensitivities (fixed-size classifier-style adapter, no padding)
    single = tcav_scores(model, images, None, {layer: cavs}, {"car": target}, batch_size=1, n_bootstrap=0)
    torch.testing.assert_close(single.sensitivities[(layer, "car")], result.sensitivities[(layer, "car")], rtol=1e-4, atol=1e-6)


def test_tcav_with_no_valid_target_fails_clearly(zoo_cavs):
    model, world, layer, cavs = zoo_cavs
    images = [world.image(i) for i in range(3)]
    with pytest.raises(Exception, match="no input has a valid target"):
        tcav_scores(model, images, None, {layer: cavs}, {"nothing": TopDetection(99)}, n_bootstrap=0)


@pytest.mark.parametrize("builder", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_layer_gradients_through_torchvision_detectors(builder):
    model = load_model(f"torchvision:{builder}")
    if hasattr(model.module, "roi_heads"):
        model.module.roi_heads.score_thresh = 0.0
    else:
        model.module.score_thresh = 0.0
    images = _images([(120, 160), (160, 120)], seed=4)
    with torch.no_grad():
        output, _ = model.adapter.forward(model.module, model.adapter.prepare(images, torch.device("cpu")), [im.shape[:2] for im in images])
    label = int(output[0]["labels"][0])
    layer = "backbone.body.3" if builder.startswith("faster") else "backbone.features.0.3"
    (batch,) = iter_layer_gradients(model, images, [layer], TopDetection(label), batch_size=2)
    gradient = batch.gradients[layer]
    for i, geometry in enumerate(batch.geometries):
        cells = image_cells(geometry, tuple(gradient.shape[-2:]))
        assert gradient[i][:, ~cells].abs().sum() == 0
        if batch.valid[i]:
            assert torch.isfinite(gradient[i]).all() and gradient[i][:, cells].abs().sum() > 0
    assert batch.valid[0]

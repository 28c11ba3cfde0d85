"""Concept maps of single images (attribution/maps.py) and their overlay plot (conceptlens/report/figures.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conceptlens.attribution.gradients import iter_layer_gradients
from conceptlens.attribution.maps import (
    MapError,
    concept_directions,
    concept_maps,
    concept_maps_batch,
    gradient_cav_maps,
)
from conceptlens.attribution.targets import ClassLogit, TopDetection
from conceptlens.attribution.tcav import sensitivities
from conceptlens.report.figures import (
    FIGURE_TITLE_PX,
    PANEL_COLORBAR_PX,
    PANEL_MARGIN_PX,
    PANEL_TITLE_PX,
    overlay_concept_maps,
)
from conceptlens.concepts.models.adapters import ClassifierAdapter, DetectorAdapter
from conceptlens.concepts.geometry import Geometry, features_to_grid
from conceptlens.concepts.models.hooks import LayerCapture, resolve_layers
from conceptlens.concepts.models.loading import LoadedModel, load_model
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.probes.linear import CAVSet
from tests.conftest import PoolingDetector

pytestmark = pytest.mark.usefixtures("one_thread")

RED, BLUE = (1.0, 0.0, 0.0), (0.2, 0.4, 0.8)


class ColourNet(nn.Module):
    """``features`` = the RGB channels and R − G (a 1×1 conv), then a smooth head to a 2-class output."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.bias.zero_()
            for c in range(3):
                self.features.weight[c, c] = 1.0
            self.features.weight[3, 0], self.features.weight[3, 1] = 1.0, -1.0
        self.mix = nn.Conv2d(4, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.features(x))).mean(dim=(2, 3)))


def _colour_model(input_size: tuple[int, int] = (32, 32)) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(ColourNet().eval(), ClassifierAdapter(input_size=input_size, mean=(0, 0, 0), std=(1, 1, 1)), spec="test")


def _scene(height: int, width: int, square: tuple[int, int, int, int]) -> np.ndarray:
    """A blue image with a red rectangle (top, bottom, left, right)."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = (np.array(BLUE) * 255).round().astype(np.uint8)
    top, bottom, left, right = square
    image[top:bottom, left:right] = (255, 0, 0)
    return image


def _red_bank(layer: str = "features", channels: int = 4) -> ConceptBank:
    # red: logit 8·(R − G) + 2·R − 6·B − 3 → ≈ +7 on red pixels, ≈ −8.9 on the blue background
    weights = torch.zeros(2, channels)
    weights[0, 3], weights[0, 0], weights[0, 2] = 8.0, 2.0, -6.0
    weights[1, 2] = 8.0  # blue: 8·B − 3 → +3.4 on the background, −3 on red
    return ConceptBank("net2vec", layer, ["red", "blue"], weights, torch.tensor([-3.0, -3.0]))


def _hand_maps(model: LoadedModel, bank: ConceptBank, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """σ(w·a + b) of ColourNet's ``features``, the logits resized bilinearly onto ``size``."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=model.adapter.input_size, mode="bilinear", align_corners=False, antialias=True)
    activations = model.module.features(x).detach()
    logits = torch.einsum("kc,bchw->bkhw", bank.vectors, activations) + bank.biases.view(1, -1, 1, 1)
    return torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))[0]


# ------------------------------------------------------------------------------------------------
# bank maps on a classifier


def test_net2vec_map_equals_hand_computation_and_finds_the_planted_square() -> None:
    model, bank = _colour_model(), _red_bank()
    image = _scene(48, 64, (12, 30, 36, 60))
    result = concept_maps(model, image, bank)
    expected = _hand_maps(model, bank, image, (48, 64))
    assert result.maps.shape == (2, 48, 64) and result.maps.dtype == torch.float32
    torch.testing.assert_close(result.maps, expected, atol=1e-5, rtol=0)
    assert (result.kind, result.method, result.concepts, result.labels) == ("probability", "net2vec", ["red", "blue"], ["red", "blue"])
    red, blue = result.maps
    inside = np.zeros((48, 64), dtype=bool)
    inside[15:27, 39:57] = True  # the square without a 3-pixel rim (resampling blurs its edge)
    outside = np.ones((48, 64), dtype=bool)
    outside[9:33, 33:63] = False
    assert red[inside].min() > 0.99 and red[outside].max() < 0.01
    assert blue[outside].min() > 0.9 and blue[inside].max() < 0.1
    torch.testing.assert_close(result.scores, result.maps.mean(dim=(1, 2)))


def test_map_size_option_and_batch_of_different_sizes() -> None:
    model, bank = _colour_model(), _red_bank()
    first, second = _scene(48, 64, (12, 30, 36, 60)), _scene(40, 30, (0, 10, 0, 10))
    small = concept_maps(model, first, bank, size=(12, 16))
    full = concept_maps(model, first, bank)
    assert small.size == (12, 16)
    torch.testing.assert_close(small.maps, _hand_maps(model, bank, first, (12, 16)), atol=1e-5, rtol=0)
    batch = concept_maps_batch(model, [first, second], bank, batch_size=2)
    assert [b.size for b in batch] == [(48, 64), (40, 30)]
    torch.testing.assert_close(batch[0].maps, full.maps)
    assert batch[1].maps[0, :8, :8].min() > 0.9 and batch[1].maps[0, 20:, 20:].max() < 0.01


def test_nmf_bank_gives_nnls_maps_labelled_with_matched_concepts() -> None:
    model = _colour_model()
    bank = ConceptBank(
        "nmf", "features", ["ncav_0", "ncav_1"], torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0]]), torch.zeros(2),
        metrics={"ncav_0": {"matched_concept": "red", "set_iou": 0.9}},
    )
    image = _scene(32, 32, (0, 16, 0, 32))  # red top half, blue bottom half; no resize at 32×32
    result = concept_maps(model, image, bank)
    assert (result.kind, result.labels) == ("ncav", ["red", "ncav_1"])
    # red pixels (1, 0, 0, 1) = 1·ncav_0; blue pixels (0.2, 0.4, 0.8, −0.2 → clamped 0): NNLS gives
    # ncav_1 = 0.8 and ncav_0 = 0.2/2 (the best non-negative fit of the R channel and the clamped R − G)
    assert torch.allclose(result.maps[:, 2, 5], torch.tensor([1.0, 0.0]), atol=1e-4)
    assert torch.allclose(result.maps[:, 29, 5], torch.tensor([0.1, 0.8]), atol=2e-3)


# ------------------------------------------------------------------------------------------------
# detector geometry


def _pooling_model() -> LoadedModel:
    module = PoolingDetector().eval()  # min_size 64, max_size 120: 72×100 → 64×88 on a 64×96 canvas
    return LoadedModel(module, DetectorAdapter(module.transform), spec="test")


def test_detector_padding_never_reaches_the_map() -> None:
    model = _pooling_model()
    bank = ConceptBank("net2vec", "backbone", ["red"], torch.tensor([[6.0, -4.0, -4.0]]), torch.tensor([-1.0]))
    image = np.zeros((72, 100, 3), dtype=np.uint8)
    image[..., 0] = 255  # all red: every cell on the image has the same features (1, 0, 0)
    result = concept_maps(model, image, bank)
    assert result.maps.shape == (1, 72, 100)
    torch.testing.assert_close(result.maps, torch.full((1, 72, 100), float(torch.sigmoid(torch.tensor(5.0)))), atol=1e-6, rtol=0)
    # the check above does see padding: the canvas has a zero column next to the image, and a map
    # upsampled from the whole canvas would mix it into the image's last columns
    canvas = model.module(model.adapter.prepare([image], torch.device("cpu")))
    assert canvas.shape[-1] * 8 == 96 and float(canvas[0, :, :, -1].abs().max()) == 0.0
    naive = torch.sigmoid(F.interpolate(bank.logits(canvas), size=(72, 100 * 96 // 88), mode="bilinear", align_corners=False))
    assert float(naive[0, 0, :, 99].max()) < 0.95


@pytest.fixture(scope="module")
def mobilenet_detector() -> LoadedModel:
    return load_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")


def test_torchvision_detector_maps_fit_the_image_and_ignore_batch_padding(mobilenet_detector: LoadedModel) -> None:
    # backbone.body.3: stride 4, before any squeeze-excitation (whose global pooling sees the padding)
    model, layer = mobilenet_detector, "backbone.body.3"
    rng = np.random.default_rng(0)
    image, tall = rng.integers(0, 256, (90, 150, 3), dtype=np.uint8), rng.integers(0, 256, (300, 150, 3), dtype=np.uint8)
    bank = ConceptBank("net2vec", layer, ["a", "b", "c"], torch.randn(3, 24, generator=torch.Generator().manual_seed(1)), torch.zeros(3))
    alone = concept_maps(model, image, bank)
    together = concept_maps_batch(model, [image, tall], bank)
    assert alone.maps.shape == (3, 90, 150) and together[1].maps.shape == (3, 300, 150)

    refs = resolve_layers(model.module, [layer])
    with LayerCapture(model.module, refs) as capture, torch.no_grad():
        features, geometries = [], []
        for batch in ([image], [image, tall]):
            capture.reset()
            _, found = model.adapter.forward(model.module, model.adapter.prepare(batch, torch.device("cpu")), [b.shape[:2] for b in batch])
            features.append(capture.outputs[layer][:1])
            geometries.append(found[0])
    # alone: resized to 320×533 on a 320×544 canvas; next to the tall image, the canvas is 640×544 and
    # the image fills only its top half (the rest is padding)
    assert geometries[0].resized_size == geometries[1].resized_size == (320, 533)
    assert geometries[0].canvas_size == (320, 544) and geometries[1].canvas_size == (640, 544)
    # the map does not move or stretch. Only the bottom rows may change: there the features of the
    # padded canvas differ from those at the canvas border (the first conv turns zero padding into
    # nonzero activations), within the layer's receptive field (≈ 20 canvas px ≈ 6 image px)
    torch.testing.assert_close(together[0].maps[:, :82], alone.maps[:, :82], atol=1e-5, rtol=0)
    # sampling each whole canvas as if it were the image would disagree everywhere
    whole = [Geometry(g.image_size, g.canvas_size, (0, 0), g.canvas_size) for g in geometries]
    wrong = [torch.sigmoid(features_to_grid(bank.logits(f), [g], (90, 150)))[0] for f, g in zip(features, whole)]
    spread = (alone.maps[:, :82] - alone.maps[:, :82].mean()).abs().mean()
    assert (wrong[0][:, :82] - wrong[1][:, :82]).abs().mean() > 0.5 * spread


def test_invalid_detector_target_raises_map_error(mobilenet_detector: LoadedModel) -> None:
    image = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    with pytest.raises(MapError, match=r"no detection of class 1 with score ≥ 0.99.*lower the detection threshold"):
        gradient_cav_maps(mobilenet_detector, image, "backbone.body.3", torch.randn(2, 24), TopDetection(1, min_score=0.99))


# ------------------------------------------------------------------------------------------------
# gradient × CAV maps


def _shifted_target(model: LoadedModel, image: np.ndarray, shift: torch.Tensor) -> float:
    """The class-1 logit with ``shift`` (C, h, w) added to the ``features`` output."""
    handle = model.module.features.register_forward_hook(lambda _m, _a, output: output + shift)
    try:
        with torch.no_grad():
            x = model.adapter.prepare([image], torch.device("cpu"))
            return float(model.module(x)[0, 1])
    finally:
        handle.remove()


def test_gradient_cav_map_is_the_per_cell_sensitivity_and_sums_to_tcav() -> None:
    model = _colour_model()
    image = _scene(32, 32, (8, 20, 10, 26))  # 32×32: no resize, features and maps share the grid
    vectors = torch.nn.functional.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(3)), dim=1)
    result = gradient_cav_maps(model, image, "features", vectors, ClassLogit(1), names=["u", "v"])
    assert (result.kind, result.concepts, result.target) == ("gradient×cav", ["u", "v"], "logit:1")
    assert result.maps.shape == (2, 32, 32)

    gradient = next(iter_layer_gradients(model, [image], ["features"], ClassLogit(1))).gradients["features"]
    torch.testing.assert_close(result.scores, sensitivities(gradient, vectors, pooling="sum")[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.maps.sum(dim=(1, 2)), result.scores, atol=1e-5, rtol=1e-4)

    # flattened (K, C, h, w) vectors are dotted cell by cell: constant ones give the same maps
    flattened = gradient_cav_maps(model, image, "features", vectors[:, :, None, None].expand(2, 4, 32, 32), ClassLogit(1))
    torch.testing.assert_close(flattened.maps, result.maps)

    # finite differences: shifting every cell along v_k changes h by ε·score_k; one cell (y, x), by ε·map
    eps = 1e-2
    for k in range(2):
        shift = eps * vectors[k].view(4, 1, 1).expand(4, 32, 32)
        derivative = (_shifted_target(model, image, shift) - _shifted_target(model, image, -shift)) / (2 * eps)
        assert derivative == pytest.approx(float(result.scores[k]), rel=1e-3, abs=1e-5)
        for y, x in ((10, 12), (25, 3)):
            cell = torch.zeros(4, 32, 32)
            cell[:, y, x] = eps * vectors[k]
            derivative = (_shifted_target(model, image, cell) - _shifted_target(model, image, -cell)) / (2 * eps)
            assert derivative == pytest.approx(float(result.maps[k, y, x]), rel=1e-2, abs=1e-6)


def test_gradient_cav_maps_on_a_zoo_detector_take_a_cav_set() -> None:
    from conceptlens.concepts.data.synthetic import SyntheticWorld

    model = load_model("zoo:synthetic_vgg_centernet")
    image = SyntheticWorld(n_images=8, seed=0).image(0)  # 124×117, a car (label 1) and a house (label 2)
    generator = torch.Generator().manual_seed(0)
    cavs = CAVSet(
        concepts=["x", "y"], random_sets=["r0", "r1"], vectors=torch.randn(2, 2, 64, generator=generator),
        biases=torch.zeros(2, 2), accuracies=torch.ones(2, 2), random_pairs=[("r0", "r1"), ("r1", "r0")],
        random_vectors=torch.randn(2, 64, generator=generator), random_biases=torch.zeros(2), random_accuracies=torch.ones(2),
        layer="backbone.block3", feature_shape=[64],
    )
    names, directions = concept_directions(cavs)
    mean = cavs.vectors.mean(dim=1)
    torch.testing.assert_close(directions, mean / mean.norm(dim=1, keepdim=True))
    result = gradient_cav_maps(model, image, "backbone.block3", cavs, TopDetection(2), size=(62, 58))
    assert result.concepts == names == ["x", "y"] and result.maps.shape == (2, 62, 58)
    assert result.target_value is not None and result.target_value > 0.3
    batch = next(iter_layer_gradients(model, [image], ["backbone.block3"], TopDetection(2)))
    torch.testing.assert_close(result.scores, sensitivities(batch.gradients["backbone.block3"], directions, "sum")[0], atol=1e-6, rtol=1e-5)


def test_bank_directions_undo_the_standardisation() -> None:
    bank = ConceptBank(
        "net2vec", "features", ["a"], torch.tensor([[3.0, 0.0, 4.0, 0.0]]), torch.zeros(1),
        channel_mean=torch.zeros(4), channel_std=torch.tensor([1.0, 1.0, 2.0, 1.0]),
    )
    _, directions = concept_directions(bank)
    torch.testing.assert_close(directions, torch.tensor([[3.0, 0.0, 2.0, 0.0]]) / 13**0.5)


# ------------------------------------------------------------------------------------------------
# overlay plot


@pytest.mark.parametrize("kind", ["probability", "gradient×cav"])
def test_overlay_writes_a_png_of_the_layout_size(tmp_path, kind: str) -> None:
    model, bank = _colour_model(), _red_bank()
    image = _scene(60, 60, (10, 30, 10, 30))
    if kind == "probability":
        maps = concept_maps(model, image, bank, size=(30, 30))
    else:
        maps = gradient_cav_maps(model, image, "features", torch.eye(4), ClassLogit(0), names=["R", "G", "B", "R−G"])
    path = overlay_concept_maps(image, maps, tmp_path / "out" / "maps.png", columns=2, top=3, panel=200)
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    with Image.open(path) as png:
        png.load()
        size = png.size
    map_side = 200 - 2 * PANEL_MARGIN_PX
    rows = 2  # image + min(top, K) panels in 2 columns
    panels = 1 + min(3, maps.maps.shape[0])
    assert panels in (3, 4)
    assert size == (2 * 200, FIGURE_TITLE_PX + rows * (PANEL_TITLE_PX + map_side + PANEL_COLORBAR_PX))


def test_bad_inputs_raise_map_errors() -> None:
    model, bank = _colour_model(), _red_bank()
    with pytest.raises(MapError, match="uint8"):
        concept_maps(model, np.zeros((8, 8, 3), dtype=np.float32), bank)
    with pytest.raises(MapError, match="size"):
        concept_maps(model, _scene(8, 8, (0, 1, 0, 1)), bank, size=(0, 4))
    with pytest.raises(MapError, match="4 channels"):
        gradient_cav_maps(model, _scene(8, 8, (0, 1, 0, 1)), "features", torch.ones(1, 5), ClassLogit(0))

"""The two shipped synthetic-world detectors: weights, output format, gradients, training, cards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conceptlens.concepts.models.adapters import ClassifierAdapter
from conceptlens.concepts.errors import ModelSpecError
from conceptlens.concepts.models.loading import list_layers, load_model
from conceptlens.concepts.data.synthetic import OBJECT_CLASSES, SyntheticWorld
from conceptlens.concepts.models.zoo import detectors
from conceptlens.concepts.models.zoo.detectors import ARCHITECTURES, INPUT_SIZE, build_detector, encode_targets, weights_path
from conceptlens.concepts.training.zoo import EVAL_SEED, TRAIN_SEED, evaluate_detector, train_detector, train_zoo, training_batch

NAMES = list(ARCHITECTURES)
MAP_BAR = 0.7
#: Fresh scenes for the test: a world seed used neither for training nor for the model cards.
TEST_SEED = 4242


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    return load_model(f"zoo:{request.param}")


@pytest.fixture(scope="module")
def canvas_batch():
    world = SyntheticWorld(n_images=3, seed=TEST_SEED)
    adapter = ClassifierAdapter((INPUT_SIZE, INPUT_SIZE), detectors.MEAN, detectors.STD)
    return adapter.prepare([world.image(i) for i in range(3)], torch.device("cpu"))


def test_shipped_weights_reach_the_map_bar(loaded):
    assert TEST_SEED not in (TRAIN_SEED, EVAL_SEED)
    result = evaluate_detector(loaded.module, seed=TEST_SEED, n_scenes=150)
    assert result["map"] >= MAP_BAR, result
    assert set(result["per_class"]) == set(OBJECT_CLASSES)


def test_adapter_and_eval_mode(loaded):
    assert isinstance(loaded.adapter, ClassifierAdapter)
    assert loaded.adapter.input_size == (INPUT_SIZE, INPUT_SIZE)
    assert not loaded.module.training


def test_torchvision_style_output(loaded, canvas_batch):
    with torch.no_grad():
        detections = loaded.module(canvas_batch)
        heat = loaded.module.class_scores(canvas_batch)
    assert isinstance(detections, list) and len(detections) == len(canvas_batch)
    for det in detections:
        assert set(det) == {"boxes", "scores", "labels"}
        n = len(det["scores"])
        assert 1 <= n <= 20
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64 and det["labels"].shape == (n,)
        assert det["scores"].dtype == torch.float32
        assert bool((det["scores"] > 0.05).all()) and bool((det["scores"] <= 1).all())
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())
        assert bool((det["labels"] >= 1).all()) and bool((det["labels"] <= len(OBJECT_CLASSES)).all())
        boxes = det["boxes"]
        assert bool((boxes[:, 2] >= boxes[:, 0]).all()) and bool((boxes[:, 3] >= boxes[:, 1]).all())
        assert bool((boxes >= 0).all()) and bool((boxes <= INPUT_SIZE).all())
    assert heat.shape == (len(canvas_batch), len(OBJECT_CLASSES), INPUT_SIZE // 4, INPUT_SIZE // 4)
    assert float(heat.min()) >= 0 and float(heat.max()) <= 1
    # the top score is the heatmap's maximum
    assert float(detections[0]["scores"][0]) == pytest.approx(float(heat[0].max()), abs=1e-6)


def test_top_score_is_differentiable(loaded, canvas_batch):
    x = canvas_batch[:1].clone().requires_grad_(True)
    detections = loaded.module(x)
    detections[0]["scores"][0].backward()
    assert x.grad is not None
    assert float(x.grad.abs().sum()) > 0


def test_probe_stages_are_listed_in_order(loaded):
    layers = [info.name for info in list_layers(loaded, (INPUT_SIZE, INPUT_SIZE))]
    stages = loaded.module.stages
    assert 5 <= len(stages) <= 8
    positions = [layers.index(stage) for stage in stages]
    assert positions == sorted(positions)


@pytest.mark.parametrize("name", NAMES)
def test_model_card(name):
    card = json.loads(weights_path(name).with_suffix(".json").read_text())
    for key in ("architecture", "layers", "data", "training", "evaluation", "parameters", "torch_version", "weights"):
        assert key in card, key
    assert card["name"] == name
    assert [layer["name"] for layer in card["layers"]] == list(build_detector(name).stages)
    assert card["parameters"] == sum(p.numel() for p in build_detector(name).parameters())
    assert card["training"]["steps"] > 0 and card["training"]["batch_size"] > 0 and card["training"]["time_s"] > 0
    assert card["data"]["world_seed"] == TRAIN_SEED
    evaluation = card["evaluation"]
    assert evaluation["seed"] == EVAL_SEED != card["data"]["world_seed"]
    assert evaluation["n_scenes"] >= 300
    assert evaluation["map50"] >= MAP_BAR
    assert set(evaluation["per_class_ap"]) == set(OBJECT_CLASSES)
    assert evaluation["map50"] == pytest.approx(np.mean(list(evaluation["per_class_ap"].values())), abs=1e-3)
    size = weights_path(name).stat().st_size
    assert size == card["weights"]["bytes"] and size <= 5 * 1024 * 1024


def test_missing_weights_name_the_path_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(detectors, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ModelSpecError) as error:
        load_model("zoo:synthetic_resnet_fpn")
    message = str(error.value)
    assert str(tmp_path / "synthetic_resnet_fpn.safetensors") in message
    assert "conceptlens train-zoo" in message


def test_training_batch_flip_mirrors_boxes():
    x, targets = training_batch([0, 1], flips=[False, False])
    xf, targets_f = training_batch([0, 1], flips=[True, False])
    assert torch.equal(xf[0], x[0].flip(-1)) and torch.equal(xf[1], x[1])
    boxes, flipped = targets[0]["boxes"], targets_f[0]["boxes"]
    assert torch.allclose(flipped[:, 0], INPUT_SIZE - boxes[:, 2])
    assert torch.allclose(flipped[:, 3], boxes[:, 3])
    assert bool((boxes >= 0).all()) and bool((boxes <= INPUT_SIZE).all())


def test_encoded_targets_peak_at_box_centres():
    targets = [{"boxes": torch.tensor([[8.0, 16.0, 40.0, 48.0]]), "labels": torch.tensor([3])}]
    encoded = encode_targets(targets, len(OBJECT_CLASSES), (32, 32), 4)
    heat = encoded["heatmap"][0]
    assert float(heat[2, 8, 6]) == 1.0 and float(heat.max()) == 1.0
    assert float(heat[[0, 1, 3]].max()) == 0.0
    assert encoded["size"].tolist() == [[8.0, 8.0]] and encoded["offset"].tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("name", NAMES)
def test_short_training_lowers_the_loss(name):
    model, info = train_detector(name, steps=30, batch_size=4, seed=0, progress=False)
    losses = info["losses"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert not model.training


def test_training_is_reproducible():
    a, _ = train_detector("synthetic_vgg_centernet", steps=2, batch_size=2, seed=3, progress=False)
    b, _ = train_detector("synthetic_vgg_centernet", steps=2, batch_size=2, seed=3, progress=False)
    for (key, value), other in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(value, other), key


def test_train_zoo_writes_loadable_weights_and_cards(tmp_path, monkeypatch):
    cards = train_zoo(tmp_path, steps=2, seed=0, progress=False, batch_size=2, eval_scenes=4, num_threads=1)
    assert set(cards) == set(NAMES)
    monkeypatch.setattr(detectors, "WEIGHTS_DIR", tmp_path)
    for name in NAMES:
        card = json.loads((tmp_path / f"{name}.json").read_text())
        assert card["training"]["steps"] == 2 and card["evaluation"]["n_scenes"] == 4
        module, adapter = getattr(detectors, name)()
        assert isinstance(adapter, ClassifierAdapter) and not module.training

"""Bring your own detector: a spec's decode, and adapters' channel order and value range.

The planted detector is :class:`TinyYolo` with a hand-set head: at every cell the objectness
logit and the logit of class 1 both equal ``a`` (channel ``J`` of the ``backbone`` output), the
other logits and the box offsets 0. The label-1 score of a cell is then ``σ(a) · softmax(a, 0)_1 =
σ(a)²``, so ``TopDetection(1)`` picks the cell with the largest ``a`` and its gradient w.r.t. the
``backbone`` output is ``2 σ(a)² (1 − σ(a))`` at that cell and channel, 0 everywhere else.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conceptlens.attribution.gradients import iter_layer_gradients
from conceptlens.attribution.maps import gradient_cav_maps
from conceptlens.attribution.ncav import ncav_importance
from conceptlens.attribution.targets import TargetError, TopDetection, target_from_spec
from conceptlens.attribution.tcav import sensitivities
from conceptlens.concepts.errors import ModelSpecError
from conceptlens.concepts.models.adapters import AdapterError, ClassifierAdapter
from conceptlens.concepts.models.decode import DecodeError
from conceptlens.concepts.models.loading import LoadedModel, list_layers, load_model
from conceptlens.concepts.models.zoo.tiny_yolo import GridDecoder, TinyYolo
from conceptlens.concepts.vectors.bank import ConceptBank

from conceptlens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
SPEC = "conceptlens.concepts.models.zoo.tiny_yolo:build"
J, K = 2, 5  # the planted channel, and one the head ignores
SIZE = 64


def planted_model(decode=None) -> LoadedModel:
    torch.manual_seed(0)
    module = TinyYolo(num_classes=2, width=4).eval()
    with torch.no_grad():
        module.head.weight.zero_()
        module.head.bias.zero_()
        module.head.weight[4, J] = 1.0  # objectness logit = a
        module.head.weight[5, J] = 1.0  # class-1 logit = a (class 2: 0)
    adapter = ClassifierAdapter((SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), decode=decode or GridDecoder(per_class=3))
    return LoadedModel(module, adapter, "test:planted-yolo")


def images(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


def backbone_output(model: LoadedModel, batch: list[np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        return model.module.backbone(model.adapter.prepare(batch, torch.device("cpu"))).double()


def expected_top(model: LoadedModel, batch: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Per image: the label-1 score σ(a)², its derivative 2σ(a)²(1 − σ(a)) and the cell (y, x) of the largest a."""
    a = backbone_output(model, batch)[:, J]  # (B, h, w)
    flat = a.reshape(len(batch), -1)
    best, cell = flat.max(dim=1)
    assert ((flat == best[:, None]).sum(dim=1) == 1).all(), "the planted maximum must be unique"
    sigma = torch.sigmoid(best)
    width = a.shape[-1]
    return sigma**2, 2 * sigma**2 * (1 - sigma), [(int(c) // width, int(c) % width) for c in cell]


# ------------------------------------------------------------------------------ decode applied


def test_forward_returns_the_decoded_detections_that_targets_read():
    model, batch = planted_model(), images()
    raw = model.module(model.adapter.prepare(batch, torch.device("cpu")))
    assert raw.shape == (3, 7, SIZE // 8, SIZE // 8)  # the module itself stays raw
    output, geometries = model.adapter.forward(model.module, model.adapter.prepare(batch, torch.device("cpu")), [(SIZE, SIZE)] * 3)
    assert len(output) == 3 and len(geometries) == 3
    assert output[0]["labels"].tolist() == [1, 1, 1, 2, 2, 2]  # 3 best cells per class
    score, _, _ = expected_top(model, batch)
    values = TopDetection(1)(output)
    torch.testing.assert_close(values.values.double(), score, atol=1e-6, rtol=0)
    assert values.valid.all() and values.values.requires_grad


def test_top_detection_gradient_flows_through_decode_to_the_planted_cell():
    model, batch = planted_model(), images()
    _, derivative, cells = expected_top(model, batch)
    (result,) = iter_layer_gradients(model, batch, ["backbone"], TopDetection(1), batch_size=3)
    gradient = result.gradients["backbone"].double()
    expected = torch.zeros_like(gradient)
    for b, (y, x) in enumerate(cells):
        expected[b, J, y, x] = derivative[b]
    torch.testing.assert_close(gradient, expected, atol=1e-6, rtol=0)
    # TCAV sensitivities (pooled CAVs): +g along channel J, -g against it, 0 along an ignored channel
    cavs = torch.zeros(3, gradient.shape[1])
    cavs[0, J], cavs[1, J], cavs[2, K] = 1.0, -1.0, 1.0
    sens = sensitivities(result.gradients["backbone"], cavs).double()
    torch.testing.assert_close(sens, torch.stack([derivative, -derivative, torch.zeros_like(derivative)], dim=1), atol=1e-6, rtol=0)
    assert (derivative > 1e-3).all()


def test_gradient_cav_maps_on_the_decoded_detector():
    model, image = planted_model(), images(1)
    _, derivative, [(y, x)] = expected_top(model, image)
    directions = torch.zeros(2, 16)
    directions[0, J], directions[1, K] = 1.0, 1.0
    maps = gradient_cav_maps(model, image[0], "backbone", directions, TopDetection(1), names=["planted", "ignored"])
    torch.testing.assert_close(maps.scores.double(), torch.tensor([float(derivative[0]), 0.0], dtype=torch.float64), atol=1e-6, rtol=0)
    assert maps.maps.shape == (2, SIZE, SIZE) and maps.target == "top:1"
    assert float(maps.maps[1].abs().max()) == 0.0
    peak_y, peak_x = divmod(int(maps.maps[0].argmax()), SIZE)
    assert (peak_y // 8, peak_x // 8) == (y, x)  # the 8-pixel cell of the chosen detection
    assert float(maps.maps[0].min()) >= 0.0


def test_ncav_importance_on_the_decoded_detector():
    model, batch = planted_model(), images()
    score, derivative, _ = expected_top(model, batch)
    vectors = torch.zeros(2, 16)
    vectors[0, J], vectors[1, K] = 1.0, 1.0
    bank = ConceptBank("nmf", "backbone", ["ncav_0", "ncav_1"], vectors, torch.zeros(2), metrics={})
    result = ncav_importance(model, batch, "backbone", bank, TopDetection(1), batch_size=2)
    np.testing.assert_allclose(result.importance, torch.stack([derivative, torch.zeros_like(derivative)], 1).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(result.target_values, score.numpy(), atol=1e-6, rtol=0)


def test_the_example_spec_loads_with_its_decode():
    model = load_model(SPEC)
    assert isinstance(model.adapter, ClassifierAdapter) and isinstance(model.adapter.decode, GridDecoder)
    assert model.own_preprocessing and model.hash == load_model(SPEC).hash  # seeded random weights
    batch = images(2)
    output, _ = model.adapter.forward(model.module, model.adapter.prepare(batch, torch.device("cpu")), [(SIZE, SIZE)] * 2)
    detections = output[1]
    assert detections["labels"].tolist() == [label for label in (1, 2, 3, 4) for _ in range(10)]
    assert ((detections["scores"] > 0) & (detections["scores"] < 1)).all()
    boxes = detections["boxes"]
    assert (boxes[:, 2:] >= boxes[:, :2]).all() and float(boxes.detach().min()) >= 0 and float(boxes.detach().max()) <= 128
    values = target_from_spec("top:1")(output)
    torch.testing.assert_close(values.values, torch.stack([d["scores"][:10].max() for d in output]))
    layers = {layer.name: layer.shape for layer in list_layers(model, (128, 128))}
    assert layers["backbone.stage3"] == (1, 64, 32, 32) and layers["head"] == (1, 9, 16, 16)


# ------------------------------------------------------------------------------ bad decodes


def _with_decode(returned: str):
    def decode(raw):
        return eval(returned, {"torch": torch, "raw": raw})  # test-only fixed strings

    return decode


@pytest.mark.parametrize(("returned", "problem"), [
    ("raw", "returned a Tensor, not a list of 2 dicts (one per image)"),
    ("[{'boxes': torch.zeros(0, 4), 'scores': raw.sum() * torch.zeros(0), 'labels': torch.zeros(0, dtype=torch.int64)}]",
     "returned 1 items for a batch of 2 images"),
    ("[raw[0], raw[1]]", "image 0: is a Tensor, not a dict of boxes, scores and labels"),
    ("[{'boxes': torch.zeros(1, 4), 'labels': torch.ones(1, dtype=torch.int64)}] * 2", "image 0: the dict has no 'scores' (it has ['boxes', 'labels'])"),
    ("[{'boxes': torch.zeros(2, 4), 'scores': raw[b, 0, 0, :2], 'labels': torch.ones(3, dtype=torch.int64)} for b in range(2)]",
     "image 0: boxes (2, 4), scores (2,) and labels (3,) do not describe one set of n detections"),
    ("[{'boxes': torch.zeros(2, 2), 'scores': raw[b, 0, 0, :2], 'labels': torch.ones(2, dtype=torch.int64)} for b in range(2)]",
     "image 0: boxes (2, 2), scores (2,) and labels (2,)"),
    ("[{'boxes': torch.zeros(2, 4), 'scores': raw[b, 0, 0, :2], 'labels': torch.ones(2)} for b in range(2)]",
     "image 0: labels are torch.float32, not integer class ids"),
    ("[{'boxes': torch.zeros(2, 4), 'scores': [0.5, 0.4], 'labels': torch.ones(2, dtype=torch.int64)} for b in range(2)]",
     "image 0: scores is a list, not a tensor"),
    ("raw.reshape(5)", "failed on the model's output (RuntimeError: shape '[5]' is invalid"),
])
def test_decode_returning_garbage_is_one_line_naming_the_decode(returned, problem):
    model, batch = planted_model(_with_decode(returned)), images(2)
    with pytest.raises(DecodeError) as info:
        model.adapter.forward(model.module, model.adapter.prepare(batch, torch.device("cpu")), [(SIZE, SIZE)] * 2)
    message = str(info.value)
    assert "\n" not in message and info.value.culprit == f"decode {__name__}._with_decode.<locals>.decode"
    assert problem in message and " — fix: " in message
    assert isinstance(info.value, ModelSpecError)


def test_a_bad_decode_in_a_spec_is_one_cli_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "my_yolo.py"
    path.write_text(textwrap.dedent("""
        from conceptlens.concepts.models.zoo.tiny_yolo import TinyYolo

        def build():
            return TinyYolo(), {"input_size": (64, 64), "decode": lambda raw: raw.sigmoid()}
    """))
    monkeypatch.chdir(tmp_path)
    assert main(["layers", "my_yolo.py:build"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: decode my_yolo.py:build.<locals>.<lambda>: returned a Tensor"), err
    assert "<lambda>: returned a Tensor, not a list of 1 dicts (one per image) — fix: return one dict per image: boxes (n, 4)" in err


def test_detached_scores_are_the_check_differentiable_one_liner():
    def detached(raw):
        return [{**d, "scores": d["scores"].detach()} for d in GridDecoder(per_class=3)(raw)]

    model = planted_model(detached)
    with pytest.raises(TargetError) as info:
        next(iter_layer_gradients(model, images(2), ["backbone"], TopDetection(1), batch_size=2))
    message = str(info.value)
    assert message.startswith("top:1: target values are not differentiable") and "\n" not in message
    assert "your decode" in message and "no .detach(), .item(), .numpy() or torch.no_grad()" in message


# ------------------------------------------------------------------------------ channel order and value range


IMAGE = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 250]]], dtype=np.uint8)  # (2, 2, 3) RGB


def test_bgr_reverses_the_channels_before_normalising():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    adapter = ClassifierAdapter((2, 2), mean=mean, std=std, channel_order="bgr")
    prepared = adapter.prepare([IMAGE], torch.device("cpu"))[0].double()
    for channel, rgb in enumerate((2, 1, 0)):  # the model's channel 0 is blue
        expected = (IMAGE[..., rgb] / 255.0 - mean[channel]) / std[channel]
        np.testing.assert_allclose(prepared[channel].numpy(), expected, atol=1e-6, rtol=0)
    assert adapter.channel_order == "BGR"


def test_value_range_scales_pixels_before_normalising():
    caffe_mean = (103.939, 116.779, 123.68)  # BGR means of a Caffe-style model, on 0..255 pixels
    adapter = ClassifierAdapter((2, 2), mean=caffe_mean, std=(1.0, 1.0, 1.0), channel_order="BGR", value_range=(0, 255))
    prepared = adapter.prepare([IMAGE], torch.device("cpu"))[0].double()
    for channel, rgb in enumerate((2, 1, 0)):
        np.testing.assert_allclose(prepared[channel].numpy(), IMAGE[..., rgb].astype(float) - caffe_mean[channel], atol=1e-4, rtol=0)
    symmetric = ClassifierAdapter((2, 2), mean=(0, 0, 0), std=(1, 1, 1), value_range=(-1, 1)).prepare([IMAGE], torch.device("cpu"))[0]
    np.testing.assert_allclose(symmetric.permute(1, 2, 0).numpy(), IMAGE / 127.5 - 1.0, atol=1e-6, rtol=0)


DEFAULT_SETTINGS = {
    "adapter": "classifier", "input_size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "antialias": True,
}


def test_defaults_keep_settings_and_numbers_as_before():
    assert ClassifierAdapter().settings() == DEFAULT_SETTINGS
    explicit = ClassifierAdapter(channel_order="RGB", value_range=(0.0, 1.0), decode=GridDecoder())
    assert explicit.settings() == DEFAULT_SETTINGS  # decode never changes activations: not in store keys
    small = ClassifierAdapter((2, 2), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    tensor = torch.from_numpy(IMAGE).permute(2, 0, 1).float() / 255  # the pre-existing recipe, op for op
    expected = (tensor[None] - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    assert torch.equal(small.prepare([IMAGE], torch.device("cpu")), expected)
    changed = ClassifierAdapter(channel_order="BGR", value_range=(0, 255)).settings()
    assert changed == {**DEFAULT_SETTINGS, "channel_order": "BGR", "value_range": [0.0, 255.0]}


@pytest.mark.parametrize(("kwargs", "key", "problem"), [
    ({"channel_order": "RBG"}, "channel_order", "must be 'RGB' or 'BGR', got 'RBG'"),
    ({"channel_order": 3}, "channel_order", "must be 'RGB' or 'BGR', got 3"),
    ({"value_range": (1, 0)}, "value_range", "two finite numbers (low, high) with low < high, got (1, 0)"),
    ({"value_range": (0,)}, "value_range", "two finite numbers (low, high)"),
    ({"value_range": (0, float("inf"))}, "value_range", "two finite numbers (low, high)"),
    ({"value_range": "0,255"}, "value_range", "two finite numbers (low, high)"),
    ({"decode": 42}, "decode", "must be a callable (raw model output -> list of detection dicts), got a int"),
])
def test_bad_adapter_settings_name_the_key(tmp_path, kwargs, key, problem):
    with pytest.raises(AdapterError) as info:
        ClassifierAdapter(**kwargs)
    assert info.value.key == key and problem in str(info.value) and " — fix: " in str(info.value)
    path = tmp_path / "user_model.py"
    path.write_text(f"from torch import nn\n\ndef build():\n    return nn.Conv2d(3, 4, 3), {{**{kwargs!r}, 'input_size': (32, 32)}}\n"
                    .replace("inf)", "float('inf'))"))
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{path}:build")
    assert f"key {key!r}" in info.value.culprit and problem.split(", got")[0] in str(info.value)


def test_a_spec_dict_sets_channel_order_value_range_and_decode(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent("""
        from torch import nn

        def decode(raw):
            return raw

        def build():
            return nn.Conv2d(3, 4, 3), {"input_size": (32, 32), "channel_order": "BGR", "value_range": (0, 255), "decode": decode}
    """))
    adapter = load_model(f"{path}:build").adapter
    assert (adapter.channel_order, adapter.value_range, adapter.decode.__name__) == ("BGR", (0.0, 255.0), "decode")
    assert adapter.settings()["channel_order"] == "BGR" and adapter.settings()["value_range"] == [0.0, 255.0]


# ------------------------------------------------------------------------------ the README example


def readme_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    (block,) = [code for code in blocks if SPEC in code]
    return block


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    done = subprocess.run([sys.executable, "-c", readme_example()], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records, scores = (ast.literal_eval(line) for line in done.stdout.splitlines()[-2:])
    assert [(concept, layer) for concept, layer, _, _ in records] == [("car", "backbone.stage3")]
    assert 0.0 <= records[0][2] <= 1.0 and isinstance(records[0][3], bool)
    assert list(scores) == ["car"] and np.isfinite(scores["car"]) and scores["car"] != 0.0


def test_readme_shows_the_example_spec_on_the_command_line():
    assert f"conceptlens layers {SPEC}" in README.read_text(encoding="utf-8")

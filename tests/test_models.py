"""Model specs, weights, hashing and layer listing."""

from __future__ import annotations

import pickle
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conceptlens.concepts.models.adapters import ClassifierAdapter, DetectorAdapter
from conceptlens.concepts.errors import LayerError, ModelSpecError
from conceptlens.concepts.models.hooks import resolve_layers
from conceptlens.concepts.models.loading import list_layers, load_model, model_hash


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


def tiny_cnn_with_adapter():
    return tiny_cnn(), {"input_size": (32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def test_classifier_layers_in_execution_order():
    model = load_model("torchvision:resnet18", input_size=(64, 64))
    assert isinstance(model.adapter, ClassifierAdapter)
    layers = {layer.name: layer for layer in list_layers(model, (64, 64))}
    names = list(layers)
    assert names.index("conv1") < names.index("layer1") < names.index("layer4") < names.index("fc")
    assert layers["layer2"].shape == (1, 128, 8, 8) and layers["layer2"].channels == 128
    assert layers["fc"].shape == (1, 1000)


@pytest.mark.parametrize(
    ("builder", "dict_layer", "keys", "shared_head"),
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", "backbone.fpn", ["0", "1", "pool"], None),
        ("ssdlite320_mobilenet_v3_large", "backbone", ["0", "1", "2", "3", "4", "5"], None),
        ("retinanet_resnet50_fpn", "backbone", ["0", "1", "2", "p6", "p7"], "head.classification_head.conv"),
    ],
)
def test_detector_layers(builder, dict_layer, keys, shared_head):
    model = load_model(f"torchvision:{builder}")
    assert isinstance(model.adapter, DetectorAdapter)
    layers = list_layers(model, (96, 128))
    names = [layer.name for layer in layers]
    assert "backbone" in names and "transform" in names
    assert names.index("transform") < names.index("backbone")
    assert [n for n in names if n.startswith(f"{dict_layer}:")] == [f"{dict_layer}:{key}" for key in keys]
    if shared_head:  # RetinaNet's head runs once per FPN level
        assert next(layer for layer in layers if layer.name == shared_head).calls == 5


def test_unknown_layer_lists_closest_names():
    model = load_model("torchvision:resnet18")
    with pytest.raises(LayerError, match=r"layer 'layer5'.*closest names: layer"):
        resolve_layers(model.module, ["layer5"])


def test_unknown_builder_suggests_names():
    with pytest.raises(ModelSpecError, match="resnet18"):
        load_model("torchvision:resnet81")


def test_default_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelSpecError, match=r"resnet18-f37072fd\.pth.*never downloads.*copy"):
        load_model("torchvision:resnet18", weights="default")


def test_default_weights_from_hub_cache_with_sha_check(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    with pytest.raises(ModelSpecError, match="sha256"):
        load_model("torchvision:resnet18", weights="default")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_path_loads_exactly(tmp_path, suffix):
    source = load_model("torchvision:resnet18").module
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)
    path = tmp_path / f"w{suffix}"
    (save_file if suffix == ".safetensors" else lambda s, p: torch.save(s, p))(source.state_dict(), str(path))
    loaded = load_model("torchvision:resnet18", weights=str(path))
    assert model_hash(loaded.module) == model_hash(source)
    assert loaded.hash != load_model("torchvision:resnet18").hash


def test_random_init_is_reproducible_and_leaves_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_model("torchvision:resnet18")
    assert torch.equal(torch.rand(1), expected_next)
    assert first.hash == load_model("torchvision:resnet18").hash


def test_pickle_payload_is_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelSpecError, match="evil.pth"):
        load_model("torchvision:resnet18", weights=str(path))
    assert not (tmp_path / "pwned").exists()


def test_mismatched_weights_name_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ModelSpecError, match=r"other\.pth.*does not match"):
        load_model("torchvision:resnet18", weights=str(path))


def test_module_callable_spec_with_adapter():
    model = load_model("tests.test_models:tiny_cnn_with_adapter")
    assert model.adapter.settings()["input_size"] == [32, 32]
    assert [layer.name for layer in list_layers(model, (32, 32))][:3] == ["0", "1", "2"]


def test_file_callable_spec(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent("""
        from torch import nn
        def build():
            return nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
    """))
    model = load_model(f"{path}:build", input_size=(16, 16))
    assert list_layers(model, (16, 16))[0].shape == (1, 2, 16, 16)
    with pytest.raises(ModelSpecError, match="closest: build"):
        load_model(f"{path}:biuld")


def test_torchscript_and_onnx_become_hookable(tmp_path):
    pytest.importorskip("onnx2torch", reason="the [onnx] extra is not installed")
    module = tiny_cnn().eval()
    scripted = tmp_path / "model.pt"
    torch.jit.script(module).save(str(scripted))
    model = load_model(str(scripted), input_size=(32, 32))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.module(x), module(x), atol=1e-5, rtol=1e-5)
    layers = list_layers(model, (32, 32))
    assert any(layer.module_type == "OnnxConv" or "Conv" in layer.module_type for layer in layers)
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(module, (x,), str(onnx_path), dynamo=False)
    onnx_model = load_model(str(onnx_path), input_size=(32, 32))
    torch.testing.assert_close(onnx_model.module(x), module(x), atol=1e-5, rtol=1e-5)


def test_bad_spec_explains_forms():
    with pytest.raises(ModelSpecError, match="torchvision:<builder>"):
        load_model("resnet18")


def test_hash_changes_with_any_weight():
    a, b = tiny_cnn(), tiny_cnn()
    assert model_hash(a) == model_hash(b)
    with torch.no_grad():
        b[2].weight[0, 0, 0, 0] += 1e-3
    assert model_hash(a) != model_hash(b)

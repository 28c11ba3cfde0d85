"""Hostile model input fails in one line (issue 15): checkpoints whose shapes differ, adapter dicts of
the wrong type or length, devices other than CPU/CUDA, an input size for a model with its own
preprocessing, and unknown names among long lists (cut to the closest few)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conceptlens.attribution.targets import TargetError, target_from_spec
from conceptlens.cli import main
from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.environment import DeviceError, resolve_device
from conceptlens.concepts.errors import ConceptLensError, ModelSpecError, closest_names
from conceptlens.concepts.models.adapters import AdapterError, ClassifierAdapter
from conceptlens.concepts.models.loading import load_model
from conceptlens.concepts.store.activations import ActivationStore


class Tiny(nn.Module):
    """conv(3→4) → pool → fc(4→2): small enough to build in every test."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _model_file(tmp_path: Path, returned: str) -> str:
    """A ``file.py:build`` spec whose ``build()`` returns ``returned`` (Python source)."""
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(f"""
        from torch import nn

        def build():
            return {returned}
    """))
    return f"{path}:build"


def _one_line(error: ConceptLensError) -> str:
    text = str(error)
    assert "\n" not in text and " — fix: " in text
    return text


# -- checkpoints whose keys match but whose shapes do not --------------------------------------


def test_shape_mismatch_names_first_tensor_and_both_shapes(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(Tiny(classes=5).state_dict(), str(path))
    with pytest.raises(ModelSpecError) as info:
        load_model(Tiny(), weights=str(path))
    text = _one_line(info.value)
    assert "tensor fc.weight has shape (5, 4) in the file but (2, 4) in the model" in text
    assert info.value.culprit.startswith(str(path)) and "Tiny" in info.value.culprit


def test_shape_mismatch_of_a_zoo_model_is_one_line(tmp_path):
    reference = load_model("zoo:synthetic_vgg_centernet").module.state_dict()
    name = next(key for key, value in reference.items() if value.dim() == 4)  # the first conv kernel
    state = dict(reference)
    state[name] = torch.zeros(reference[name].shape[0] + 1, *reference[name].shape[1:])
    path = tmp_path / "retrained.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelSpecError) as info:
        load_model("zoo:synthetic_vgg_centernet", weights=str(path))
    expected = "(" + ", ".join(str(s) for s in reference[name].shape) + ")"
    assert f"tensor {name} has shape ({reference[name].shape[0] + 1}, " in _one_line(info.value) and f"but {expected} in the model" in str(info.value)


def test_value_that_is_not_a_tensor_is_named(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({**Tiny().state_dict(), "fc.bias": 3}, path)
    with pytest.raises(ModelSpecError, match=r"entry 'fc.bias' is a int, not a tensor"):
        load_model(Tiny(), weights=str(path))


# -- adapter dicts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter", "key", "problem"),
    [
        ('{"input_size": (32,)}', "input_size", "two positive integers"),
        ('{"input_size": (0, 32)}', "input_size", "two positive integers"),
        ('{"input_size": "224"}', "input_size", "two positive integers"),
        ('{"input_size": (32.5, 32)}', "input_size", "two positive integers"),
        ('{"mean": (0.5, 0.5)}', "mean", "three finite numbers"),
        ('{"mean": (0.5, 0.5, float("nan"))}', "mean", "three finite numbers"),
        ('{"std": (0.2, 0.0, 0.2)}', "std", "three finite positive numbers"),
        ('{"std": "0.2"}', "std", "three finite positive numbers"),
        ('{"antialias": "yes"}', "antialias", "true or false"),
        ('{"input_sise": (32, 32)}', "input_sise", "is not a ClassifierAdapter argument"),
    ],
)
def test_bad_adapter_dict_is_one_line_naming_spec_and_key(tmp_path, adapter, key, problem):
    spec = _model_file(tmp_path, f"nn.Conv2d(3, 4, 3), {adapter}")
    with pytest.raises(ModelSpecError) as info:
        load_model(spec)
    text = _one_line(info.value)
    assert spec in info.value.culprit and f"key {key!r}" in info.value.culprit and problem in text


def test_unknown_adapter_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ModelSpecError, match=r"did you mean 'input_size'\?"):
        load_model(_model_file(tmp_path, 'nn.Conv2d(3, 4, 3), {"input_sise": (32, 32)}'))


def test_classifier_adapter_validates_direct_use():
    with pytest.raises(AdapterError) as info:
        ClassifierAdapter(input_size=(224, -1))
    assert info.value.key == "input_size" and info.value.culprit == "ClassifierAdapter input_size"
    with pytest.raises(AdapterError, match="std"):
        ClassifierAdapter(std=(1.0, 1.0, -1.0))
    valid = ClassifierAdapter(np.array([64, 48]), mean=torch.tensor([0.5, 0.25, 0.0]), std=[1, 2, 4])
    assert valid.settings() == {"adapter": "classifier", "input_size": [64, 48], "mean": [0.5, 0.25, 0.0], "std": [1.0, 2.0, 4.0], "antialias": True}


def test_second_item_that_is_no_adapter_is_refused(tmp_path):
    with pytest.raises(ModelSpecError, match=r"returned \(module, list\): the second item is no adapter"):
        load_model(_model_file(tmp_path, "nn.Conv2d(3, 4, 3), [224, 224]"))


# -- devices -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "meta", "xla", "xpu", "ipu", "cuda:x", "CPU ", "", "gpu", "cpu:1", "cuda:-1"])
def test_unsupported_devices_are_refused(device):
    with pytest.raises(DeviceError) as info:
        resolve_device(device)
    text = _one_line(info.value)
    assert info.value.culprit == f"--device {device}"
    assert ("is not a supported device" in text and "use one of auto, cpu, cuda, cuda:N" in text) or (device == "cpu:1" and "one CPU device" in text)


def test_supported_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match=r"this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_meta_device_never_reaches_embed(tmp_path):
    """torch accepts ``meta`` and would produce tensors without data: embed must refuse it first."""
    from conceptlens.concepts.embedding.embed import embed

    model = load_model(Tiny(), input_size=(16, 16))
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    dataset = ArrayDataset(list(images), masks=[np.zeros((1, 16, 16), dtype=bool)] * 2, concepts=["thing"], name="two")
    store = ActivationStore(tmp_path / "store")
    with pytest.raises(DeviceError, match="'meta' is not a supported device"):
        embed(model, dataset, ["conv"], store, device="meta", progress=False)
    assert not any(path.is_file() for path in (tmp_path / "store").rglob("*.safetensors"))


def test_cli_mps_device_exits_2_with_one_line(tmp_path, capsys):
    from conceptlens.concepts.data.folder import write_folder_dataset

    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    masks = np.zeros((2, 1, 16, 16), dtype=bool)
    masks[:, :, 4:12, 4:12] = True
    write_folder_dataset(ArrayDataset(list(images), masks=list(masks), concepts=["thing"], name="two"), tmp_path / "data")
    code = main(["embed", "torchvision:resnet18", str(tmp_path / "data"), "--layers", "layer1", "--store", str(tmp_path / "store"), "--device", "mps", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --device mps:") and "auto, cpu, cuda, cuda:N" in err[0]


# -- an input size for a model that brings its own preprocessing ----------------------------------


@pytest.mark.parametrize(
    ("spec", "summary"),
    [
        ("zoo:synthetic_vgg_centernet", "classifier adapter: input_size 128x128, mean 0.5/0.5/0.5"),
        ("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "torchvision-detector adapter: min_size 320, max_size 640"),
    ],
)
def test_input_size_with_own_preprocessing_is_refused(spec, summary):
    with pytest.raises(ModelSpecError) as info:
        load_model(spec, input_size=(64, 64))
    text = _one_line(info.value)
    assert spec in info.value.culprit and "drop --input-size (input_size: in a config)" in text
    assert f"{spec} brings its own preprocessing ({summary}" in text


def test_input_size_with_a_callable_adapter_is_refused(tmp_path):
    spec = _model_file(tmp_path, 'nn.Conv2d(3, 4, 3), {"input_size": (32, 32)}')
    assert load_model(spec).adapter.input_size == (32, 32)
    with pytest.raises(ModelSpecError, match=r"brings its own preprocessing \(classifier adapter: input_size 32x32"):
        load_model(spec, input_size=(64, 64))
    assert load_model(_model_file(tmp_path, "nn.Conv2d(3, 4, 3)"), input_size=(48, 40)).adapter.input_size == (48, 40)


def test_cli_input_size_for_a_zoo_model_exits_2(capsys):
    # (`layers` takes --input-size as the size of its dry-run image for any model)
    assert main(["embed", "zoo:synthetic_vgg_centernet", "synthetic:4", "--layers", "backbone.block1", "--input-size", "64", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --input-size" in err[0]


# -- long lists are cut to the closest few --------------------------------------------------------


def test_closest_names_cuts_long_lists():
    names = [f"class_{i}" for i in range(1000)] + ["tabby cat"]
    assert closest_names("tabby", names) == "did you mean 'tabby cat'? closest: tabby cat, class_0, class_1, class_2, class_3 (of 1001)"
    assert closest_names("b", ["a", "b", "c"]) == "did you mean 'b'? closest: b, a, c"
    assert closest_names("x", []) == "none are known"


def test_unknown_imagenet_class_lists_five_closest_of_1000():
    categories = load_model("torchvision:resnet18").categories
    with pytest.raises(TargetError) as info:
        target_from_spec('logit:"egyptain cat"', categories=categories)
    text = _one_line(info.value)
    assert "did you mean 'Egyptian cat'? closest: Egyptian cat, " in text and "(of 1000)" in text
    assert len(text) < 400  # not the 1000 names


def test_unknown_builder_lists_closest_builders():
    with pytest.raises(ModelSpecError) as info:
        load_model("torchvision:resnet81")
    assert "did you mean 'resnet18'? closest: resnet18, " in _one_line(info.value) and "(of " in str(info.value)


def test_unknown_concept_among_eighty_is_cut_to_five():
    concepts = [f"category_{i:02d}" for i in range(80)]
    dataset = ArrayDataset([np.zeros((4, 4, 3), dtype=np.uint8)], masks=[np.zeros((80, 4, 4), dtype=bool)], concepts=concepts, name="many")
    with pytest.raises(ConceptLensError) as info:
        dataset.select_concepts(["category_7"])
    text = _one_line(info.value)
    assert "closest: category_07, " in text and "(of 80)" in text and "category_55" not in text

"""Model specs with builder arguments, DataParallel checkpoints, and class names in targets (issue 16)."""

from __future__ import annotations

import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from conceptlens.attribution.targets import ClassLogit, MatchedDetection, TargetError, TopDetection, check_target_spec, target_from_spec
from conceptlens.attribution.tcav import METRICS, TCAVRecord, TCAVResult
from conceptlens.concepts.errors import ModelSpecError
from conceptlens.concepts.models.loading import load_model
from conceptlens.concepts.models.spec_arguments import split_spec, spec_with_arguments
from conceptlens.config import ConfigError, parse_config
from conceptlens.tcav_step import target_labels, tcav_table, write_tcav


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A resnet18 with 10 classes (a "fine-tuned" checkpoint), saved as safetensors."""
    torch.manual_seed(3)
    module = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path_factory.mktemp("checkpoint") / "resnet18_10.safetensors"
    save_file(module.state_dict(), str(path))
    return module, path


def _same_logits(loaded: torch.nn.Module, reference: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(loaded(x), reference(x))


# -- builder arguments ---------------------------------------------------------------------------


def test_builder_arguments_load_a_fine_tuned_checkpoint(fine_tuned):
    module, path = fine_tuned
    loaded = load_model("torchvision:resnet18?num_classes=10", weights=str(path))
    assert loaded.module.fc.out_features == 10 and _same_logits(loaded.module, module)
    assert loaded.spec == "torchvision:resnet18?num_classes=10"
    assert loaded.categories is None  # 10 classes are not ImageNet's 1000


def test_checkpoint_of_other_shape_names_tensor_and_both_shapes(fine_tuned):
    _, path = fine_tuned
    with pytest.raises(ModelSpecError) as info:
        load_model("torchvision:resnet18", weights=str(path))
    text = str(info.value)
    assert "\n" not in text and info.value.culprit == f"{path} (for torchvision:resnet18)"
    assert "tensor fc.weight has shape (10, 512) in the file but (1000, 512) in the model" in text
    assert "torchvision:resnet18?num_classes=N" in info.value.fix


def test_config_kwargs_equal_spec_arguments(fine_tuned):
    module, path = fine_tuned
    loaded = load_model("torchvision:resnet18", weights=str(path), kwargs={"num_classes": 10})
    assert loaded.spec == "torchvision:resnet18?num_classes=10" and _same_logits(loaded.module, module)
    with pytest.raises(ModelSpecError, match=r"num_classes is 10 in the spec string but 12 in kwargs:"):
        load_model("torchvision:resnet18?num_classes=10", kwargs={"num_classes": 12})


def test_unknown_builder_argument_lists_accepted_ones():
    with pytest.raises(ModelSpecError) as info:
        load_model("torchvision:resnet18?num_clases=10")
    assert "resnet18() has no argument 'num_clases' (from the spec string)" in str(info.value)
    assert info.value.fix.startswith("did you mean 'num_classes'? closest: num_classes, ") and "zero_init_residual" in info.value.fix


@pytest.mark.parametrize("argument", ["weights=DEFAULT", "weights_backbone=x", "progress=true"])
def test_arguments_conceptlens_sets_are_refused(argument):
    builder = "fasterrcnn_mobilenet_v3_large_320_fpn" if argument.startswith("weights_backbone") else "resnet18"
    with pytest.raises(ModelSpecError, match=r"is set by conceptlens .*nothing is downloaded"):
        load_model(f"torchvision:{builder}?{argument}")


def test_bad_argument_value_is_one_line():
    with pytest.raises(ModelSpecError) as info:
        load_model("torchvision:resnet18?num_classes=ten")
    assert info.value.culprit == "torchvision:resnet18?num_classes=ten" and "building the model failed (TypeError" in str(info.value)
    assert "\n" not in str(info.value)


def test_argument_values_are_literals_never_code():
    base, arguments = split_spec("torchvision:x?a=10&b=0.5&c=TRUE&d=false&e='10'&f=__import__('os')&g=1e-3")
    assert base == "torchvision:x"
    assert arguments.values == {"a": 10, "b": 0.5, "c": True, "d": False, "e": "10", "f": "__import__('os')", "g": 0.001}
    assert [type(v) for v in arguments.values.values()] == [int, float, bool, bool, str, str, float]
    assert spec_with_arguments("torchvision:x", {"n": 3, "flag": False, "s": "7"}) == 'torchvision:x?n=3&flag=false&s="7"'
    assert split_spec(spec_with_arguments("torchvision:x", {"n": 3, "flag": False, "s": "7"}))[1].values == {"n": 3, "flag": False, "s": "7"}


@pytest.mark.parametrize(("query", "problem"), [("num_classes", "is not key=value"), ("=3", "is not key=value"), ("a=1&a=2", "given twice"),
                                                ("1a=2", "is not key=value")])
def test_malformed_arguments(query, problem):
    with pytest.raises(ModelSpecError, match=problem):
        load_model(f"torchvision:resnet18?{query}")


def test_callable_specs_take_arguments(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(textwrap.dedent("""
        from torch import nn

        def build(width=4, bias=True):
            return nn.Sequential(nn.Conv2d(3, width, 3, bias=bias), nn.ReLU())
    """))
    loaded = load_model(f"{path}:build?width=7&bias=false")
    assert loaded.module[0].out_channels == 7 and loaded.module[0].bias is None
    assert load_model(f"{path}:build", kwargs={"width": 5}).spec == f"{path}:build?width=5"
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{path}:build?widht=7")
    assert "build() has no argument 'widht'" in str(info.value) and "did you mean 'width'? closest: width, bias" in info.value.fix


def test_specs_without_builders_refuse_arguments():
    with pytest.raises(ModelSpecError, match=r"takes no builder arguments \(zoo models are built as shipped\), got x=1"):
        load_model("zoo:synthetic_vgg_centernet?x=1")
    with pytest.raises(ModelSpecError, match=r"takes no builder arguments .*got num_classes=3 from kwargs:"):
        load_model(torch.nn.Linear(2, 2), kwargs={"num_classes": 3})


def test_config_kwargs_are_typed_scalars():
    data = {"name": "x", "data": {"spec": "synthetic:10"},
            "models": [{"name": "m", "spec": "torchvision:resnet18", "kwargs": {"num_classes": 10, "dropout": 0.5, "flag": True, "mode": "a"},
                        "layers": ["layer1"]}]}
    assert parse_config(data).models[0].kwargs == {"num_classes": 10, "dropout": 0.5, "flag": True, "mode": "a"}
    assert isinstance(parse_config(data).models[0].kwargs["num_classes"], int)
    data["models"][0]["kwargs"] = {"num_classes": [10]}
    with pytest.raises(ConfigError, match=r"models\[0\]\.kwargs\.num_classes: expected an integer or a number or true or false or a string"):
        parse_config(data)


# -- DataParallel checkpoints ----------------------------------------------------------------------


def test_data_parallel_prefix_is_stripped_with_a_warning(fine_tuned, tmp_path):
    module, _ = fine_tuned
    path = tmp_path / "dp.pth"
    torch.save({f"module.{key}": value for key, value in module.state_dict().items()}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model("torchvision:resnet18?num_classes=10", weights=str(path))
    assert _same_logits(loaded.module, module)
    notes = [str(w.message) for w in caught if "DataParallel" in str(w.message)]
    assert notes == [f"{path} (for torchvision:resnet18?num_classes=10): every key starts with 'module.' (a DataParallel checkpoint); loaded with the prefix stripped"]


def test_partial_prefix_is_not_stripped(fine_tuned, tmp_path):
    module, _ = fine_tuned
    state = {f"module.{key}" if key.startswith("fc") else key: value for key, value in module.state_dict().items()}
    path = tmp_path / "half.pth"
    torch.save(state, path)
    with pytest.raises(ModelSpecError, match=r"does not match the model: missing \['fc.weight', 'fc.bias'\] \(2\), unexpected \['module.fc.weight', 'module.fc.bias'\] \(2\)"):
        load_model("torchvision:resnet18?num_classes=10", weights=str(path))


# -- class names ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet():
    return load_model("torchvision:resnet18").categories


@pytest.fixture(scope="module")
def coco():
    return load_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn").categories


def test_models_carry_their_class_names(imagenet, coco):
    assert len(imagenet) == 1000 and imagenet[285] == "Egyptian cat"
    assert coco[:4] == ("__background__", "person", "bicycle", "car")
    assert load_model("zoo:synthetic_resnet_fpn").categories == ("__background__", "car", "house", "tree", "boat")
    assert load_model(torch.nn.Linear(2, 2)).categories is None


@pytest.mark.parametrize("spec", ['logit:"Egyptian cat"', "logit:Egyptian cat", "logit:'egyptian CAT'", "logit:285"])
def test_imagenet_names_resolve(imagenet, spec):
    target = target_from_spec(spec, categories=imagenet)
    assert isinstance(target, ClassLogit) and target.k == 285 and target.name == "logit:285"
    assert target.display == "logit:285 (Egyptian cat)" and repr(target) == "ClassLogit(285, category='Egyptian cat')"
    assert target.what == "logit of class 285 (Egyptian cat)"


def test_coco_names_resolve_for_detectors(coco):
    top = target_from_spec("top:car", categories=coco)
    assert isinstance(top, TopDetection) and top.label == 3 and top.display == "top:3 (car)"
    assert target_from_spec("top:Car:0.5", categories=coco).name == "top:3:0.5"
    box = target_from_spec('box:"dog":0,0,10,10', categories=coco)
    assert isinstance(box, MatchedDetection) and box.label == 18 and box.category == "dog"
    scores = torch.tensor([0.9, 0.7, 0.4], requires_grad=True)
    output = [{"boxes": torch.zeros(3, 4), "scores": scores, "labels": torch.tensor([1, 3, 3])}]
    assert top(output).index.tolist() == [1]  # the best *car* (label 3), not the best detection


def test_unknown_and_placeholder_names(coco):
    with pytest.raises(TargetError) as info:
        target_from_spec("top:cra", categories=coco)
    assert "'cra' is not a class name of this model" in str(info.value) and info.value.fix.startswith("did you mean 'car'? closest: car, ")
    assert "N/A" not in info.value.fix and "__background__" not in info.value.fix
    with pytest.raises(TargetError, match="not a class name"):
        target_from_spec("top:N/A", categories=coco)


def test_ambiguous_name_lists_its_ids():
    with pytest.raises(TargetError, match=r"'crane' names 2 classes \(1, 3\) — fix: use the class id, e.g. logit:1"):
        target_from_spec("logit:crane", categories=["bird", "crane", "machine", "crane"])


def test_names_without_class_names_are_checked_later():
    assert check_target_spec("top:car").cls == "car" and check_target_spec('logit:"a:b"').cls == "a:b"
    with pytest.raises(TargetError, match=r"'car' is not an integer class id, and this model's class names are unknown"):
        target_from_spec("top:car")
    with pytest.raises(TargetError, match="unclosed quote"):
        check_target_spec('logit:"Egyptian cat')


def test_config_accepts_names_and_still_refuses_bad_syntax():
    data = {"name": "x", "data": {"spec": "synthetic:10"}, "models": [{"name": "m", "spec": "zoo:synthetic_vgg_centernet", "layers": ["backbone.block2"]}],
            "tcav": {"targets": [{"spec": 'top:"car"'}]}}
    assert parse_config(data).tcav.targets[0].spec == 'top:"car"'
    data["tcav"]["targets"][0]["spec"] = "top:car:high"
    with pytest.raises(ConfigError, match=r"tcav.targets\[0\].spec: 'high' is not a number"):
        parse_config(data)


def test_tcav_table_and_json_show_class_names(tmp_path, coco):
    targets = {"det:top:3": target_from_spec("top:3", categories=coco), "det:top:car": target_from_spec("top:car", categories=coco),
               "det:top:90": target_from_spec("top:90")}
    labels = target_labels(targets)
    assert labels == {"det:top:3": "det:top:3 (car)", "det:top:car": "det:top:car (top:3)", "det:top:90": "det:top:90"}
    scores, null = np.array([0.9, 0.8]), np.array([0.5, 0.5])
    records = [TCAVRecord("wheel", "backbone", name, "sign_count", 8, {m: scores for m in METRICS}, {m: null for m in METRICS}) for name in targets]
    result = TCAVResult(records, "sign_count", "holm", 0.05, 0, 0, missing={name: [] for name in targets})
    table = tcav_table(result, labels).splitlines()
    assert table[1].startswith("det:top:3 (car)     backbone") and table[2].startswith("det:top:car (top:3) backbone")
    assert table[3].startswith("det:top:90          backbone")
    written = json.loads(write_tcav(result, tmp_path, {}, labels=labels)["json"].read_text())
    assert written["target_labels"] == {"det:top:3": "det:top:3 (car)", "det:top:car": "det:top:car (top:3)"}
    assert [r["target"] for r in written["records"]] == list(targets)  # record names stay as given

"""Pipeline config: schema walker, error messages with key paths, env expansion, paths, shipped configs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from conceptlens.config import (
    CompareConfig,
    ConfigError,
    ControlsConfig,
    EmbedConfig,
    PipelineConfig,
    ReportConfig,
    TcavConfig,
    check_paths,
    config_hash,
    config_to_dict,
    load_config,
    missing_paths,
    parse_config,
    without_controls,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SOURCE = "t.yaml"


def minimal() -> dict[str, Any]:
    return {
        "name": "t",
        "data": {"spec": "synthetic:20:0"},
        "models": [{"name": "vgg", "spec": "zoo:synthetic_vgg_centernet", "layers": ["backbone.block2", "backbone.block3"]}],
    }


def with_value(keys: tuple, value: Any) -> dict[str, Any]:
    """The minimal config with ``data[keys[0]][keys[1]]… = value`` (missing mappings created)."""
    data = minimal()
    node = data
    for key in keys[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        else:
            node = node[key]
    node[keys[-1]] = value
    return data


def without(keys: tuple) -> dict[str, Any]:
    data = minimal()
    node = data
    for key in keys[:-1]:
        node = node[key]
    del node[keys[-1]]
    return data


def parse_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE)
    return info.value


# --- defaults and types -------------------------------------------------------------------------


def test_defaults_filled():
    config = parse_config(minimal(), SOURCE)
    assert isinstance(config, PipelineConfig)
    assert (config.seed, config.device, config.out, config.store) == (0, "auto", None, None)
    assert config.embed == EmbedConfig() and config.embed.grid == (100, 100) and config.embed.dtype == "float16"
    assert config.probes.net2vec.max_epochs == 30 and config.probes.net2vec.lr == 1e-3 and config.probes.nmf.k == 10
    assert config.compare == CompareConfig() and config.compare.methods == ["net2vec", "nmf", "cka"]
    assert config.tcav == TcavConfig() and not config.tcav.enabled and config.tcav.targets == []
    assert config.report == ReportConfig(enabled=True, examples=4, prototypes=5)
    assert config.data.area_range == (0.025, 0.8) and config.data.concepts is None
    assert config.models[0].weights == "none" and config.models[0].input_size is None


def test_empty_section_means_defaults():
    data = with_value(("tcav",), None)
    assert parse_config(data, SOURCE).tcav == TcavConfig()
    data["data"] = None
    assert parse_error(data).culprit == f"{SOURCE}: data.spec"


def test_controls_defaults_and_validation():
    config = parse_config(minimal(), SOURCE)
    assert config.controls == ControlsConfig() and config.controls.enabled
    assert config.controls.probe_controls == ["random_weights", "permuted_masks"]
    assert (config.controls.n_permutations, config.controls.n_bootstrap, config.controls.alpha, config.controls.margin) == (499, 200, 0.05, 0.05)
    chosen = parse_config(with_value(("controls",), {"enabled": False, "probe_controls": ["permuted_masks"], "n_permutations": 50}), SOURCE)
    assert not chosen.controls.enabled and chosen.controls.probe_controls == ["permuted_masks"] and chosen.controls.n_permutations == 50
    error = parse_error(with_value(("controls", "probe_controls"), ["random_weight"]))
    assert error.culprit == f"{SOURCE}: controls.probe_controls[0]" and "random_weights" in error.fix
    assert parse_error(with_value(("controls", "alpha"), 1.5)).culprit == f"{SOURCE}: controls.alpha"
    assert parse_error(with_value(("controls", "n_permutations"), 0)).culprit == f"{SOURCE}: controls.n_permutations"
    assert parse_error(with_value(("controls", "margin"), -0.1)).culprit == f"{SOURCE}: controls.margin"
    assert "allowed keys" in parse_error(with_value(("controls", "permutations"), 10)).fix


def test_no_controls_switch_changes_only_controls_enabled_and_the_hash():
    config = parse_config(minimal(), SOURCE)
    off = without_controls(config)
    assert not off.controls.enabled and config.controls.enabled
    assert off.controls == ControlsConfig(enabled=False) and off.models == config.models and off.probes == config.probes
    assert config_hash(off) != config_hash(config)
    assert config_hash(off) == config_hash(parse_config(with_value(("controls",), {"enabled": False}), SOURCE))


def test_configs_are_frozen():
    config = parse_config(minimal(), SOURCE)
    with pytest.raises(AttributeError):
        config.seed = 3  # type: ignore[misc]


def test_ints_accepted_for_floats():
    data = with_value(("probes", "net2vec", "lr"), 1)
    data["data"]["area_range"] = [0, 1]
    config = parse_config(data, SOURCE)
    assert config.probes.net2vec.lr == 1.0 and isinstance(config.probes.net2vec.lr, float)
    assert config.data.area_range == (0.0, 1.0) and all(isinstance(v, float) for v in config.data.area_range)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_devices_accepted(device):
    assert parse_config(with_value(("device",), device), SOURCE).device == device


# --- errors name the key path ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "value", "culprit", "fragments"),
    [
        (("embed", "bach_size"), 8, "embed.bach_size", ["unknown key 'bach_size'", "did you mean 'batch_size'?", "grid, dtype, batch_size"]),
        (("modles",), [], "modles", ["unknown key", "did you mean 'models'?"]),
        (("probes", "net2vec", "max_epoch"), 3, "probes.net2vec.max_epoch", ["did you mean 'max_epochs'?"]),
        (("embed", "batch_size"), "abc", "embed.batch_size", ["expected an integer, got 'abc' (str)"]),
        (("seed",), True, "seed", ["expected an integer, got True (bool)"]),
        (("probes", "net2vec", "lr"), True, "probes.net2vec.lr", ["expected a number, got True (bool)"]),
        (("tcav", "enabled"), "yes please", "tcav.enabled", ["expected true or false"]),
        (("name",), 12, "name", ["expected a string, got 12 (int)"]),
        (("embed",), 5, "embed", ["expected a mapping"]),
        (("embed", "dtype"), "float64", "embed.dtype", ["'float64' is not an allowed value", "float16, float32"]),
        (("compare", "methods"), ["net2vec", "ckaa"], "compare.methods[1]", ["did you mean 'cka'?", "net2vec, nmf, cka"]),
        (("compare", "methods"), ["nmf", "nmf"], "compare.methods[1]", ["appears twice"]),
        (("tcav", "statistic"), "mean", "tcav.statistic", ["sign_count, magnitude, mean_sensitivity"]),
        (("device",), "gpu", "device", ["'gpu' is not allowed", "auto, cpu, cuda, cuda:N"]),
        (("embed", "batch_size"), 0, "embed.batch_size", ["must be >= 1, got 0"]),
        (("embed", "grid"), [40, 0], "embed.grid[1]", ["must be >= 1"]),
        (("embed", "grid"), [40], "embed.grid", ["expected a list of 2 numbers"]),
        (("probes", "net2vec", "lr"), 0, "probes.net2vec.lr", ["must be > 0.0"]),
        (("tcav", "alpha"), 1.0, "tcav.alpha", ["must be < 1.0"]),
        (("tcav", "min_fraction"), 0.0, "tcav.min_fraction", ["must be > 0.0"]),
        (("tcav", "images_per_set"), 1, "tcav.images_per_set", ["must be >= 2"]),
        (("tcav", "n_bootstrap"), -1, "tcav.n_bootstrap", ["must be >= 0"]),
        (("report", "examples"), -2, "report.examples", ["must be >= 0"]),
        (("data", "area_range"), [0.1, 1.5], "data.area_range[1]", ["must be <= 1.0"]),
        (("data", "area_range"), [0.5, 0.5], "data.area_range", ["not below upper bound"]),
        (("data", "concepts"), ["car", "tree", "car"], "data.concepts[2]", ["'car' appears twice (also at index 0)"]),
        (("data", "concepts"), [], "data.concepts", ["the list is empty"]),
        (("models",), [], "models", ["the list is empty"]),
        (("models", 0, "name"), "my model", "models[0].name", ["letters, digits, _ and - only"]),
        (("models", 0, "layers"), ["a", "b", "a"], "models[0].layers[2]", ["'a' appears twice"]),
        (("models", 0, "layers"), [], "models[0].layers", ["the list is empty"]),
        (("models", 0, "layers"), "backbone.block2", "models[0].layers", ["expected a list"]),
        (("models", 0, "input_size"), [224, 224.5], "models[0].input_size[1]", ["expected an integer"]),
        (("tcav", "targets"), [{"spec": "top:1:x"}], "tcav.targets[0].spec", ["'x'"]),  # top:x is a class name, looked up at run time
        (("tcav", "targets"), [{"spec": "logits:1"}], "tcav.targets[0].spec", ["unknown target kind"]),
        (("tcav", "targets"), [{"inputs": "car"}], "tcav.targets[0].spec", ["required key 'spec' is missing"]),
        (("tcav", "targets"), [{"spec": "top:1", "models": ["vgx"]}], "tcav.targets[0].models[0]", ["no model is named 'vgx'", "did you mean 'vgg'?"]),
        (("tcav", "targets"), [{"spec": "top:1", "max_inputs": 0}], "tcav.targets[0].max_inputs", ["must be >= 1"]),
        (("tcav", "layers"), ["backbone.blok3"], "tcav.layers[0]", ["not a layer of any model", "did you mean 'backbone.block3'?"]),
    ],
)
def test_value_errors_name_the_key(keys, value, culprit, fragments):
    error = parse_error(with_value(keys, value))
    assert error.culprit == f"{SOURCE}: {culprit}"
    message = str(error)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("keys", "culprit"),
    [(("name",), "name"), (("data",), "data"), (("models",), "models"), (("data", "spec"), "data.spec"), (("models", 0, "layers"), "models[0].layers"), (("models", 0, "spec"), "models[0].spec")],
)
def test_missing_required_key(keys, culprit):
    error = parse_error(without(keys))
    assert error.culprit == f"{SOURCE}: {culprit}"
    assert f"required key {keys[-1]!r} is missing" in str(error)


def test_duplicate_model_names():
    data = minimal()
    data["models"].append(dict(data["models"][0], spec="zoo:synthetic_resnet_fpn"))
    error = parse_error(data)
    assert error.culprit == f"{SOURCE}: models[1].name"
    assert "'vgg' is used twice" in str(error)


def test_tcav_concepts_must_be_in_data_concepts():
    data = with_value(("data", "concepts"), ["car", "wheel", "window"])
    data["tcav"] = {"concepts": ["wheel", "windw"], "targets": [{"spec": "top:1", "inputs": "car"}]}
    error = parse_error(data)
    assert error.culprit == f"{SOURCE}: tcav.concepts[1]"
    assert "did you mean 'window'?" in str(error)
    data["tcav"] = {"targets": [{"spec": "top:1", "inputs": "cars"}]}
    assert parse_error(data).culprit == f"{SOURCE}: tcav.targets[0].inputs"


# --- environment variables and ~ ---------------------------------------------------------------------


def test_env_and_home_expansion_in_path_fields(monkeypatch, tmp_path):
    monkeypatch.setenv("CL_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", "/home/someone")
    data = with_value(("data", "spec"), "${CL_DATA}/annotations/x.json")
    data["data"]["coco_images"] = "${CL_DATA}/images"
    data["out"] = "~/results"
    data["models"][0]["weights"] = "${CL_DATA}/w.pth"
    data["models"][0]["layers"] = ["${CL_DATA}"]  # not a path field: kept as written (a name may not hold $ at all)
    config = parse_config(data, SOURCE)
    assert config.data.spec == f"{tmp_path}/annotations/x.json"
    assert config.data.coco_images == f"{tmp_path}/images"
    assert config.out == "/home/someone/results"
    assert config.models[0].weights == f"{tmp_path}/w.pth"
    assert config.models[0].layers == ["${CL_DATA}"]


def test_unset_env_variable(monkeypatch):
    monkeypatch.delenv("CL_NOT_SET", raising=False)
    data = minimal()
    data["models"][0]["weights"] = "${CL_NOT_SET}/w.pth"
    error = parse_error(data)
    assert error.culprit == f"{SOURCE}: models[0].weights"
    assert "CL_NOT_SET is not set" in error.problem
    assert error.fix == "export CL_NOT_SET=... or edit the file"


# --- provenance: dict round trip and hash ----------------------------------------------------------


def full_config() -> dict[str, Any]:
    data = minimal()
    data["models"][0]["input_size"] = [128, 128]
    data["data"]["concepts"] = ["car", "wheel"]
    data["tcav"] = {"enabled": True, "concepts": ["wheel"], "targets": [{"spec": "top:1", "inputs": "car", "models": ["vgg"]}]}
    return data


def test_round_trip_through_dict():
    config = parse_config(full_config(), SOURCE)
    plain = config_to_dict(config)
    assert json.loads(json.dumps(plain)) == plain
    assert plain["models"][0]["input_size"] == [128, 128] and plain["embed"]["grid"] == [100, 100]
    assert parse_config(plain, SOURCE) == config


def test_hash_is_stable_and_tracks_values():
    config = parse_config(full_config(), SOURCE)
    reordered = dict(reversed(list(full_config().items())))
    digest = config_hash(config)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert config_hash(parse_config(reordered, SOURCE)) == digest
    assert config_hash(parse_config(config_to_dict(config), SOURCE)) == digest
    changed = copy.deepcopy(full_config())
    changed["embed"] = {"batch_size": 31}
    assert config_hash(parse_config(changed, SOURCE)) != digest


# --- files ---------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_config_reads_yaml(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  spec: synthetic:20:0\nmodels:\n  - {name: a, spec: 'zoo:x', layers: [l1]}\nembed: {batch_size: 4}\n")
    config = load_config(path)
    assert config.embed.batch_size == 4 and config.models[0].layers == ["l1"]


def test_error_culprit_is_the_file(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  spec: synthetic\n  concept: [car]\nmodels: [{name: a, spec: 'zoo:x', layers: [l1]}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.culprit == f"{path}: data.concept"
    assert "did you mean 'concepts'?" in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: t\ndata: [unclosed\n", "line 3"),
        ("name: t\n  bad: indent\n", "line 2"),
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- name: t\n", "top level must be a mapping"),
        ("just a string\n", "top level must be a mapping"),
    ],
)
def test_bad_files(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.culprit == str(path)
    assert fragment in str(info.value)


def test_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in str(info.value) and "python/object" in str(info.value)
    assert "Python objects are never constructed" in info.value.fix
    assert not marker.exists()


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder") as info:
        load_config(tmp_path)
    assert info.value.culprit == str(tmp_path)
    write(tmp_path, "name: t\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(tmp_path)


# --- paths the config needs ----------------------------------------------------------------------------


def test_missing_paths(tmp_path):
    (tmp_path / "present.pth").write_bytes(b"")
    data = with_value(("data", "spec"), str(tmp_path / "folder"))
    data["data"]["image_sets"] = str(tmp_path / "sets")
    data["models"] = [
        {"name": "a", "spec": str(tmp_path / "m.onnx"), "layers": ["l"]},
        {"name": "b", "spec": f"{tmp_path}/build.py:make", "weights": str(tmp_path / "present.pth"), "layers": ["l"]},
        {"name": "c", "spec": "torchvision.models:resnet18", "weights": "default", "layers": ["l"]},
        {"name": "d", "spec": "torchvision:resnet18", "weights": str(tmp_path / "r18.pth"), "layers": ["l"]},
    ]
    config = parse_config(data, SOURCE)
    expected = ["folder", "sets", "m.onnx", "build.py", "r18.pth"]
    assert missing_paths(config) == [str(tmp_path / name) for name in expected]
    with pytest.raises(ConfigError) as info:
        check_paths(config, SOURCE)
    for key in ["data.spec", "data.image_sets", "models[0].spec", "models[1].spec", "models[3].weights"]:
        assert key in str(info.value)
    assert "download.pytorch.org/models/r18.pth" in str(info.value)


@pytest.mark.parametrize("spec", ["synthetic", "synthetic:20:0", "real-textures:50:1"])
def test_generated_data_needs_no_files(spec):
    config = parse_config(with_value(("data", "spec"), spec), SOURCE)
    assert missing_paths(config) == []
    check_paths(config, SOURCE)


# --- shipped configs -----------------------------------------------------------------------------------


@pytest.fixture
def coco_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "coco"))
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "weights"))
    return tmp_path


@pytest.mark.parametrize("name", ["demo", "imagenet_backbones", "coco_detectors"])
def test_shipped_configs_load(name, coco_env):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert parse_config(config_to_dict(config), name) == config
    assert len(config.models) >= 2 and all(3 <= len(model.layers) <= 4 for model in config.models)
    if name != "coco_detectors":
        check_paths(config)


def test_demo_config_values():
    config = load_config(CONFIGS / "demo.yaml")
    assert config.data.spec == "synthetic:240:0" and config.embed.grid == (40, 40)
    assert [model.name for model in config.models] == ["vgg", "resnet"]
    assert config.tcav.enabled and config.tcav.targets[0].spec == "top:1" and config.tcav.targets[0].inputs == "car"


def test_coco_config_names_missing_files(coco_env):
    config = load_config(CONFIGS / "coco_detectors.yaml")
    assert config.data.spec == str(coco_env / "coco" / "annotations" / "instances_val2017.json")
    with pytest.raises(ConfigError) as info:
        check_paths(config, "configs/coco_detectors.yaml")
    message = str(info.value)
    assert info.value.culprit == "configs/coco_detectors.yaml"
    for fragment in ["instances_val2017.json", "val2017", "COCO_ROOT", "ssd300_vgg16_coco-b556d3b4.pth", "models[2].weights"]:
        assert fragment in message, message


def test_coco_config_without_environment(monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "coco_detectors.yaml")
    assert info.value.culprit.endswith("coco_detectors.yaml: data.spec")
    assert "export COCO_ROOT=" in str(info.value)


@pytest.mark.parametrize("name", ["demo", "imagenet_backbones", pytest.param("coco_detectors", marks=pytest.mark.slow)])
def test_shipped_layer_names_exist(name, coco_env):
    from conceptlens.concepts.models.hooks import resolve_layers
    from conceptlens.concepts.models.loading import load_model

    config = load_config(CONFIGS / f"{name}.yaml")
    for model in config.models:
        loaded = load_model(model.spec, "none", model.input_size)
        assert [ref.name for ref in resolve_layers(loaded.module, model.layers)] == model.layers


def test_cka_alone_is_refused():
    from conceptlens.config import ConfigError, parse_config

    data = {"name": "x", "data": {"spec": "synthetic:10"}, "models": [{"name": "m", "spec": "zoo:synthetic_vgg_centernet", "layers": ["backbone.block2"]}],
            "compare": {"methods": ["cka"]}}
    with pytest.raises(ConfigError, match=r"compare.methods.*add net2vec"):
        parse_config(data, "c.yaml")

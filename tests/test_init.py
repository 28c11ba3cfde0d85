"""`conceptlens init`: layers proposed at evenly spread relative depths, a config that loads and runs."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.models.loading import load_model
from conceptlens.config import parse_config
from conceptlens.scaffold import propose_layers, scaffold_config, write_scaffold


def test_resnet_blocks_are_proposed():
    assert propose_layers(load_model("torchvision:resnet18")) == ["layer1", "layer2", "layer3", "layer4"]


def test_evenly_spread_over_many_blocks():
    # 19 blocks features.0 … features.18: relative depths 1/4 … 4/4 → positions round(19·i/4) − 1
    assert propose_layers(load_model("torchvision:mobilenet_v2")) == ["features.4", "features.9", "features.13", "features.18"]


class _Plain(nn.Module):
    """A VGG-like stack without blocks: three resolutions, then an adaptive pool."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 0 1 at 32², 2 at 16²
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 3 4 at 16², 5 at 8²
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),                    # 6 7 at 8²
        )
        self.pool = nn.AdaptiveAvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def test_without_blocks_the_end_of_each_stage_is_proposed():
    model = load_model(_Plain(), input_size=(32, 32))
    # last leaf at 32² is features.1 (ReLU), at 16² features.4, at 8² features.7; the adaptive pool is left out
    assert propose_layers(model, (32, 32), n_layers=4) == ["features.1", "features.4", "features.7"]
    assert propose_layers(model, (32, 32), n_layers=2) == ["features.4", "features.7"]


def test_detectors_are_probed_in_their_backbone():
    layers = propose_layers(load_model("zoo:synthetic_resnet_fpn"), (128, 128))
    assert layers and all(name.startswith("backbone.") for name in layers)


def test_a_model_without_feature_maps_is_refused():
    model = load_model(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), input_size=(8, 8))
    with pytest.raises(ConceptLensError, match="no layer outputs a spatial feature map"):
        propose_layers(model, (8, 8))


def _scaffold(**options) -> str:
    model = load_model("torchvision:resnet18")
    return scaffold_config(model, "photos", ["cat", "sky"], ["layer2", "layer4"], **options)


def test_the_scaffold_is_a_valid_config_with_what_it_was_given():
    config = parse_config(yaml.safe_load(_scaffold(n_images=100)))
    assert config.name == "resnet18"
    assert config.data.spec == "photos" and config.data.concepts == ["cat", "sky"]
    (model,) = config.models
    assert (model.spec, model.weights, model.layers) == ("torchvision:resnet18", "none", ["layer2", "layer4"])
    assert not config.tcav.enabled and config.controls.enabled


def test_a_target_switches_tcav_on_with_sets_sized_to_the_data():
    config = parse_config(yaml.safe_load(_scaffold(target="logit:3", n_images=60)))
    assert config.tcav.enabled
    assert [t.spec for t in config.tcav.targets] == ["logit:3"]
    assert config.tcav.images_per_set == 15  # a quarter of 60 images


def test_odd_names_are_quoted_and_names_made_plain():
    model = load_model("torchvision:resnet18")
    text = scaffold_config(model, "my photos: 2024", ["a: b", "#tag"], ["layer1"], n_images=10)
    config = parse_config(yaml.safe_load(text))
    assert config.data.spec == "my photos: 2024" and config.data.concepts == ["a: b", "#tag"]
    assert config.name == "resnet18"


def test_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "cfg.yaml"
    write_scaffold(_scaffold(), path)
    first = path.read_text()
    with pytest.raises(ConceptLensError, match="--overwrite"):
        write_scaffold(_scaffold(target="logit:1"), path)
    assert path.read_text() == first
    write_scaffold(_scaffold(target="logit:1"), path, overwrite=True)
    assert "logit:1" in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]  # no temporary file left

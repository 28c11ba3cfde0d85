"""Comparison on real models: invariance to a channel-permuted, rescaled copy; semantic flow."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conceptlens.concepts.models.loading import LoadedModel, load_model
from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.concepts.data.synthetic import SyntheticWorld
from conceptlens.concepts.compare.workflow import compare_models
from conceptlens.probes.workflow import probe_model

GRID = (24, 24)
CONCEPTS = ["car", "house", "tree", "boat", "wheel", "window", "roof", "door", "crown", "hull", "sail", "sky", "ground", "water"]


pytestmark = pytest.mark.usefixtures("one_thread")


def permuted_rescaled_copy(model: LoadedModel, seed: int = 0) -> LoadedModel:
    """The same function with block3's output channels permuted and positively rescaled.

    Block3 ends conv → BN → ReLU: permuting the conv's output channels, the BN parameters and
    block4's input weights, and scaling the BN affine by s > 0 while dividing block4's input
    weights by s, changes block3's activations but not the network's output.
    """
    module = copy.deepcopy(model.module)
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(64, generator=generator)
    scale = torch.rand(64, generator=generator) * 4 + 0.25
    conv, norm, following = module.backbone.block3[4], module.backbone.block3[5], module.backbone.block4[1]
    with torch.no_grad():
        conv.weight.copy_(conv.weight[permutation])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(norm, name).copy_(getattr(norm, name)[permutation])
        norm.weight.mul_(scale)
        norm.bias.mul_(scale)
        following.weight.copy_(following.weight[:, permutation] / scale.view(1, -1, 1, 1))
    return LoadedModel(module, model.adapter, spec=f"{model.spec} (block3 permuted+rescaled)")


@pytest.mark.slow
def test_channel_permuted_rescaled_copy_scores_one(tmp_path):
    original = load_model("zoo:synthetic_vgg_centernet")
    twin = permuted_rescaled_copy(original)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(twin.module.class_scores(x), original.module.class_scores(x), atol=1e-4, rtol=1e-4)
    world, store = SyntheticWorld(n_images=100, seed=5).select_concepts(CONCEPTS), ActivationStore(tmp_path / "store")
    params = {"max_epochs": 4, "standardize": True}
    layers = ["backbone.block3", "backbone.block4"]
    probed = [probe_model(model, world, layers, "net2vec", store, banks_dir=tmp_path / "banks", label=label, grid=GRID, params=params)
              for label, model in (("A", original), ("B", twin))]
    assert probed[0].activations["backbone.block3"].key != probed[1].activations["backbone.block3"].key
    result = compare_models(probed, world, store, "net2vec", GRID)
    matrix = np.array(result["matrix"], dtype=float)
    assert matrix[0, 2] == pytest.approx(1.0, abs=2e-3)  # A:block3 vs B:block3
    assert matrix[1, 3] == pytest.approx(1.0, abs=2e-3)  # block4 is unchanged
    np.testing.assert_allclose(matrix[:2, :2], matrix[2:, 2:], atol=2e-3)
    cka = np.array(result["cka"]["pooled"])
    assert cka[0, 2] < 0.999  # CKA is not invariant to per-channel rescaling; the concept similarity is


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "layers"),
    [
        ("zoo:synthetic_vgg_centernet", ["backbone.block2", "backbone.block3", "backbone.block4", "backbone.block5", "neck.up1"]),
        ("zoo:synthetic_resnet_fpn", ["backbone.stem", "backbone.block1", "backbone.block2", "backbone.block3", "backbone.block4"]),
    ],
)
def test_adjacent_layers_are_more_similar_than_distant_ones(tmp_path, spec, layers):
    world, store = SyntheticWorld(n_images=160, seed=6).select_concepts(CONCEPTS), ActivationStore(tmp_path / "store")
    probed = probe_model(load_model(spec), world, layers, "net2vec", store, banks_dir=tmp_path / "banks", label="M", grid=GRID, params={"max_epochs": 6})
    matrix = np.array(compare_models([probed], world, store, "net2vec", GRID)["matrix"], dtype=float)
    n = len(layers)
    by_distance = {d: np.mean([matrix[i, j] for i in range(n) for j in range(n) if abs(i - j) == d]) for d in range(1, n)}
    distant = np.mean([by_distance[d] for d in range(3, n)])
    # similarity decays with layer distance on average (a U-shaped net's decoder may still resemble
    # the encoder layer of the same resolution, so single rows are not required to be monotone)
    assert by_distance[1] > by_distance[2] > distant, (by_distance, matrix.round(3))
    assert by_distance[1] > distant + 0.05, (by_distance, matrix.round(3))

"""The concept-method registry: built-in entries, lookups, and a toy method added from outside."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conceptlens.concepts.compare.workflow import compare_models
from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.store.activations import ActivationStore, StoreEntry
from conceptlens.concepts.vectors import projections
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.concepts.vectors.projections import (
    Projection,
    ProjectionError,
    get_projection,
    register_projection,
)
from conceptlens.probes import registry
from conceptlens.probes.data import split_indices
from conceptlens.probes.linear import LinearCAV
from conceptlens.probes.net2vec import Net2VecProbe
from conceptlens.probes.nmf import NMFConcepts
from conceptlens.probes.registry import (
    ConceptMethod,
    MethodError,
    fit_bank,
    get_method,
    method_names,
    methods,
    register_method,
)
from conceptlens.probes.workflow import probe_model
from torch import nn

from tests.planted import planted_entries


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test disappear after it."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(projections, "_PROJECTIONS", dict(projections._PROJECTIONS))


# ---------------------------------------------------------------------------------- a toy method
class MeanDifferenceProbe:
    """Toy concept method: per concept, the direction from the mean outside cell to the mean inside cell.

    The bias puts the decision boundary half-way between the two means.
    """

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def fit(self, activations: torch.Tensor, masks: torch.Tensor) -> MeanDifferenceProbe:
        cells = activations.float().movedim(1, -1).reshape(-1, activations.shape[1])
        inside = masks.float().movedim(1, -1).reshape(-1, masks.shape[1]) >= 0.5
        vectors, biases = [], []
        for k in range(masks.shape[1]):
            mean_in, mean_out = cells[inside[:, k]].mean(0), cells[~inside[:, k]].mean(0)
            vector = self.scale * (mean_in - mean_out)
            vectors.append(vector)
            biases.append(-vector @ (mean_in + mean_out) / 2)
        self.vectors_, self.biases_ = torch.stack(vectors), torch.stack(biases)
        return self


def relu_logits(bank: ConceptBank, activations: torch.Tensor) -> torch.Tensor:
    return bank.logits(activations)


RELU_AFFINE = Projection("relu_affine", relu_logits, torch.relu, "score", "max(0, w·a + b) per cell")


def fit_toy_bank(layer: str, activations: StoreEntry, masks: StoreEntry, params: dict[str, Any], device: str, progress: bool) -> ConceptBank:
    train = torch.as_tensor(split_indices(masks, "train"))
    probe = MeanDifferenceProbe(**params).fit(activations.read_all()[train], masks.read_all("masks")[train])
    return ConceptBank(
        "toy", layer, masks.manifest()["dataset"]["concepts"], probe.vectors_, probe.biases_, projection="relu_affine",
        provenance={"activations_key": activations.key, "masks_key": masks.key, "params": params},
    )


TOY = {"name": "toy", "estimator": MeanDifferenceProbe, "fit_bank": fit_toy_bank, "projection": "relu_affine",
       "comparison": "supervised", "level": "pixel", "label": "mean difference", "similarity_label": "mean concept set IoU"}


def planted(root) -> tuple[StoreEntry, StoreEntry, torch.Tensor]:
    """Concept 'spot' lights channel 1 (by 3) where its mask is on; noise elsewhere."""
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(40, 1, 6, 6, generator=generator) > 0.7).float()
    activations = 0.1 * torch.randn(40, 3, 6, 6, generator=generator)
    activations[:, 1] += 3 * masks[:, 0]
    entries = planted_entries(root, activations, masks, ["spot"])
    return *entries, activations


# ------------------------------------------------------------------------------------ built-ins
def test_builtin_methods():
    assert method_names() == ("net2vec", "linear", "nmf")
    assert method_names("pixel") == ("net2vec", "nmf") and method_names("image") == ("linear",)
    net2vec, linear, nmf = (get_method(name) for name in ("net2vec", "linear", "nmf"))
    assert (net2vec.estimator, linear.estimator, nmf.estimator) == (Net2VecProbe, LinearCAV, NMFConcepts)
    assert (net2vec.projection, linear.projection, nmf.projection) == ("sigmoid_affine", "sigmoid_affine", "nnls_codes")
    assert (net2vec.comparison, linear.comparison, nmf.comparison) == ("supervised", "supervised", "unsupervised")
    assert (net2vec.report_name, nmf.report_name) == ("supervised, Net2Vec", "unsupervised, NMF")
    assert (net2vec.similarity_label, nmf.similarity_label) == ("mean concept set IoU", "NCAV best-match set IoU")
    assert linear.fit_bank is None and methods("image") == (linear,)


def test_unknown_method_names_the_closest_and_lists_all():
    with pytest.raises(MethodError, match=r"concept method 'net2ve'.*closest: net2vec.*use one of net2vec, linear, nmf"):
        get_method("net2ve")
    with pytest.raises(MethodError, match=r"concept method 'pca': is not registered — fix: use one of"):
        get_method("pca")
    with pytest.raises(MethodError, match="level 'voxel'"):
        methods("voxel")


def test_image_level_method_is_not_fitted_from_masks(tmp_path):
    activations, masks, _ = planted(tmp_path)
    with pytest.raises(MethodError, match="'linear'.*image-level.*use one of net2vec, nmf.*fit_image_cavs"):
        fit_bank("linear", "conv", activations, masks)


def test_malformed_entries_are_refused(isolated_registry):
    with pytest.raises(MethodError, match="comparison 'both'"):
        ConceptMethod(**{**TOY, "comparison": "both"})
    with pytest.raises(MethodError, match="level 'region'"):
        ConceptMethod(**{**TOY, "level": "region"})
    with pytest.raises(MethodError, match="projection 'relu_affine', which is not registered"):
        ConceptMethod(**TOY)
    register_projection(RELU_AFFINE)
    with pytest.raises(MethodError, match="'nmf': is already registered"):
        register_method(ConceptMethod(**{**TOY, "name": "nmf"}))
    with pytest.raises(ProjectionError, match="projection 'nnls_codes': is already registered"):
        register_projection(Projection("nnls_codes", relu_logits, torch.relu, "score", "not NNLS"))


def test_fit_bank_checks_what_a_method_returns(tmp_path, isolated_registry):
    activations, masks, _ = planted(tmp_path)

    def wrong_projection(layer, activations, masks, params, device, progress):
        return ConceptBank("toy", layer, ["spot"], torch.ones(1, 3), torch.zeros(1), projection="sigmoid_affine")

    register_projection(RELU_AFFINE)
    register_method(ConceptMethod(**{**TOY, "fit_bank": wrong_projection}))
    with pytest.raises(MethodError, match="returned a bank of method 'toy' with projection 'sigmoid_affine'.*projection='relu_affine'"):
        fit_bank("toy", "conv", activations, masks)


# ---------------------------------------------------------------------------- a method added here
def test_registered_toy_method_fits_banks_whose_maps_use_its_projection(tmp_path, isolated_registry):
    register_projection(RELU_AFFINE)
    register_method(ConceptMethod(**TOY))
    assert "toy" in method_names("pixel") and get_method("toy").estimator is MeanDifferenceProbe
    activations, masks, planted_activations = planted(tmp_path)
    bank = fit_bank("toy", "conv", activations, masks, {"scale": 2.0})
    assert (bank.method, bank.projection, bank.concepts, bank.map_kind) == ("toy", "relu_affine", ["spot"], "score")
    assert bank.vectors[0, 1] > 10 * bank.vectors[0, [0, 2]].abs().max()  # the planted channel (2 × a mean gap of 3)
    expected = torch.relu(torch.einsum("kc,bchw->bkhw", bank.vectors, planted_activations) + bank.biases.view(1, -1, 1, 1))
    maps = bank.concept_maps(planted_activations)
    torch.testing.assert_close(maps, expected)
    assert maps.min() == 0 and (maps > 0).float().mean() < 0.5  # the ReLU cut the cells outside the spots
    loaded = ConceptBank.load(bank.save(tmp_path / "toy_bank"))
    assert (loaded.method, loaded.projection) == ("toy", "relu_affine")
    torch.testing.assert_close(loaded.concept_maps(planted_activations), expected)
    assert get_projection("relu_affine") is RELU_AFFINE


def red_spot_dataset(n: int = 20) -> ArrayDataset:
    """16 × 16 grey-noise images with a pure red square (the concept 'red') at a random place."""
    rng = np.random.default_rng(0)
    images, masks = [], []
    for _ in range(n):
        image = rng.integers(90, 160, (16, 16, 3), dtype=np.uint8)
        mask = np.zeros((1, 16, 16), dtype=bool)
        top, left = rng.integers(0, 11, 2)
        image[top : top + 5, left : left + 5] = (255, 0, 0)
        mask[0, top : top + 5, left : left + 5] = True
        images.append(image)
        masks.append(mask)
    return ArrayDataset(images, masks, ["red"], name="red-spots")


def test_toy_method_goes_through_the_probe_workflow_and_the_comparison(tmp_path, isolated_registry):
    calls = []

    def counted_fit(*args):
        calls.append(args[0])
        return fit_toy_bank(*args)

    register_projection(RELU_AFFINE)
    register_method(ConceptMethod(**{**TOY, "fit_bank": counted_fit}))
    pixels = nn.Conv2d(3, 3, 1)  # the layer's activations are the normalised pixels
    with torch.no_grad():
        pixels.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        pixels.bias.zero_()
    model, dataset, store = nn.Sequential(pixels).eval(), red_spot_dataset(), ActivationStore(tmp_path / "store")
    arguments = {"banks_dir": tmp_path / "banks", "label": "pixels", "grid": (16, 16), "input_size": (16, 16), "device": "cpu"}
    probed = probe_model(model, dataset, "0", "toy", store, **arguments)
    bank = probed.banks["0"]
    assert calls == ["0"] and probed.comparison == "supervised"
    assert (bank.method, bank.projection, bank.concepts) == ("toy", "relu_affine", ["red"])
    assert bank.vectors[0, 0] > 0 > max(bank.vectors[0, 1], bank.vectors[0, 2])  # more red, less green and blue
    activations = probed.activations["0"].read_all().float()
    expected = torch.relu(torch.einsum("kc,bchw->bkhw", bank.vectors, activations) + bank.biases.view(1, -1, 1, 1))
    maps = bank.concept_maps(activations)
    torch.testing.assert_close(maps, expected)
    truth = torch.stack([torch.from_numpy(dataset.masks(i)) for i in range(len(dataset))])
    assert bool((maps[truth] > 0).all()) and float((maps[~truth] > 0).float().mean()) < 0.05
    again = probe_model(model, dataset, "0", "toy", store, **arguments)
    assert calls == ["0"] and torch.equal(again.banks["0"].vectors, bank.vectors)  # the saved bank is reused
    assert ConceptBank.load(tmp_path / "banks" / "pixels__0.toy").projection == "relu_affine"
    result = compare_models([probed], dataset, store)
    assert result["method"] == "toy" and result["matrix"] == [[1.0]]

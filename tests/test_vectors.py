"""ConceptBank files and projections, NNLS, grid mask entries, and probe batch streaming."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from conceptlens.concepts.data.dataset import ArrayDataset
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.errors import DataError
from conceptlens.concepts.geometry import Geometry, masks_to_grid
from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.concepts.store.artifacts import write_artifact
from conceptlens.concepts.vectors.bank import BankError, ConceptBank, nnls
from conceptlens.concepts.vectors.concept_maps import bank_fingerprint
from conceptlens.probes.data import iter_batches, split_indices

from tests.planted import activation_entry, planted_entries


def make_bank(method: str = "net2vec", channels: int = 6, standardized: bool = True) -> ConceptBank:
    g = torch.Generator().manual_seed(1)
    return ConceptBank(
        method=method,
        layer="layer2",
        concepts=["wheel", "window"],
        vectors=torch.rand(2, channels, generator=g) if method == "nmf" else torch.randn(2, channels, generator=g),
        biases=torch.zeros(2) if method == "nmf" else torch.randn(2, generator=g),
        channel_mean=torch.randn(channels, generator=g) if standardized else None,
        channel_std=torch.rand(channels, generator=g) + 0.5 if standardized else None,
        metrics={"wheel": {"set_iou": 0.81}},
        provenance={"model_hash": "a" * 64, "seed": 0},
    )


def test_nnls_matches_scipy():
    g = torch.Generator().manual_seed(0)
    basis, targets = torch.rand(4, 10, generator=g, dtype=torch.float64), torch.randn(50, 10, generator=g, dtype=torch.float64)
    expected = np.stack([scipy.optimize.nnls(basis.T.numpy(), t.numpy())[0] for t in targets])
    np.testing.assert_allclose(nnls(targets, basis).numpy(), expected, atol=1e-6)


def test_bank_round_trip_is_exact(tmp_path):
    bank = make_bank()
    json_path = bank.save(tmp_path / "bank")
    loaded = ConceptBank.load(json_path, expected_channels=6, model_hash="a" * 64)
    for name in ("vectors", "biases", "channel_mean", "channel_std"):
        assert torch.equal(getattr(bank, name), getattr(loaded, name))
    assert loaded.concepts == bank.concepts and loaded.metrics == bank.metrics and loaded.provenance == bank.provenance


def test_linear_maps_standardize_then_project():
    bank = make_bank()
    activations = torch.randn(3, 6, 4, 5)
    standardized = (activations - bank.channel_mean.view(1, -1, 1, 1)) / bank.channel_std.view(1, -1, 1, 1)
    expected = torch.sigmoid(torch.einsum("kc,bchw->bkhw", bank.vectors, standardized) + bank.biases.view(1, -1, 1, 1))
    torch.testing.assert_close(bank.concept_maps(activations), expected)


def test_grid_maps_upsample_logits():
    bank = make_bank(standardized=False)
    activations = torch.randn(2, 6, 4, 5)
    geometries = [Geometry((40, 50), (32, 32), (0, 0), (32, 32))] * 2
    expected = torch.sigmoid(F.interpolate(bank.logits(activations), size=(8, 10), mode="bilinear", align_corners=False))
    torch.testing.assert_close(bank.concept_maps(activations, geometries, (8, 10)), expected, atol=1e-6, rtol=0)


def test_nmf_maps_reconstruct_exact_combinations():
    bank = make_bank("nmf", standardized=False)
    coefficients = torch.rand(2, 2, 3, 3)
    activations = torch.einsum("bkhw,kc->bchw", coefficients, bank.vectors)
    torch.testing.assert_close(bank.concept_maps(activations), coefficients, atol=1e-4, rtol=0)


def test_wrong_width_and_model_are_refused(tmp_path):
    path = make_bank().save(tmp_path / "bank")
    with pytest.raises(BankError, match=r"6 channels, this layer has 8.*'layer2'"):
        ConceptBank.load(path, expected_channels=8)
    with pytest.raises(BankError, match="trained on model aaaaaaaaaaaa"):
        ConceptBank.load(path, model_hash="b" * 64)
    with pytest.raises(BankError, match="expects 6 channels"):
        make_bank().logits(torch.randn(1, 8, 2, 2))


def test_corrupt_and_malicious_files_are_rejected(tmp_path):
    json_path = make_bank().save(tmp_path / "bank")
    tensors = tmp_path / "bank.safetensors"
    original = tensors.read_bytes()
    tensors.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(BankError, match="checksum"):
        ConceptBank.load(json_path)
    # a pickle payload renamed to .safetensors, with a JSON that vouches for it: still not loaded
    payload = pickle.dumps({"vectors": [1.0]})
    tensors.write_bytes(payload)
    metadata = json.loads(json_path.read_text())
    metadata["tensors_sha256"] = hashlib.sha256(payload).hexdigest()
    json_path.write_text(json.dumps(metadata))
    with pytest.raises(BankError, match="not a safetensors file"):
        ConceptBank.load(json_path)
    metadata["format_version"] = 99
    json_path.write_text(json.dumps(metadata))
    with pytest.raises(BankError, match="format version 99"):
        ConceptBank.load(json_path)


def test_bank_validation():
    with pytest.raises(BankError, match="duplicate concept names"):
        ConceptBank("linear", "l", ["a", "a"], torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(BankError, match="unknown method 'pca' with no projection.*pass projection="):
        ConceptBank("pca", "l", ["a"], torch.zeros(1, 3), torch.zeros(1))
    with pytest.raises(BankError, match="projection 'softmax', which is not registered.*sigmoid_affine, nnls_codes"):
        ConceptBank("net2vec", "l", ["a"], torch.zeros(1, 3), torch.zeros(1), projection="softmax")


def test_builtin_methods_keep_their_projection_and_others_must_name_one():
    assert make_bank("net2vec").projection == "sigmoid_affine" and make_bank("linear").projection == "sigmoid_affine"
    assert make_bank("nmf", standardized=False).projection == "nnls_codes"
    bank = ConceptBank("pca", "l", ["a"], torch.ones(1, 3), torch.zeros(1), projection="nnls_codes")
    assert (bank.method, bank.projection, bank.map_kind) == ("pca", "nnls_codes", "ncav")
    assert make_bank().map_kind == "probability"


def test_projection_not_method_decides_the_maps():
    """A bank of any learner with the nnls_codes projection gives NNLS codes; with sigmoid_affine, probabilities."""
    vectors = torch.rand(2, 6, generator=torch.Generator().manual_seed(3))
    coefficients = torch.rand(2, 2, 3, 3, generator=torch.Generator().manual_seed(4))
    activations = torch.einsum("bkhw,kc->bchw", coefficients, vectors)
    codes = ConceptBank("net2vec", "l", ["a", "b"], vectors, torch.zeros(2), projection="nnls_codes")
    torch.testing.assert_close(codes.concept_maps(activations), coefficients, atol=1e-4, rtol=0)
    affine = ConceptBank("nmf", "l", ["a", "b"], vectors, torch.tensor([0.5, -1.0]), projection="sigmoid_affine")
    expected = torch.sigmoid(torch.einsum("kc,bchw->bkhw", vectors, activations) + torch.tensor([0.5, -1.0]).view(1, 2, 1, 1))
    torch.testing.assert_close(affine.concept_maps(activations), expected)
    assert bank_fingerprint(codes) != bank_fingerprint(ConceptBank("net2vec", "l", ["a", "b"], vectors, torch.zeros(2)))


def test_projection_round_trips_through_the_bank_file(tmp_path):
    bank = ConceptBank("pca", "l", ["a", "b"], torch.rand(2, 4), torch.zeros(2), projection="nnls_codes")
    json_path = bank.save(tmp_path / "bank")
    assert json.loads(json_path.read_text())["projection"] == "nnls_codes"
    loaded = ConceptBank.load(json_path)
    assert (loaded.method, loaded.projection) == ("pca", "nnls_codes")
    activations = torch.rand(1, 4, 2, 3)
    torch.testing.assert_close(loaded.concept_maps(activations), bank.concept_maps(activations))


def _old_format_bank(path, method: str, vectors: torch.Tensor) -> None:
    """A bank file exactly as written before banks recorded their projection (no ``projection`` key)."""
    metadata = {"method": method, "layer": "layer2", "concepts": ["wheel", "window"], "n_channels": vectors.shape[1],
                "standardized": False, "metrics": {}, "provenance": {"seed": 0}}
    write_artifact(path, "concept bank", 1, {"vectors": vectors, "biases": torch.zeros(2)}, metadata)


def test_old_bank_files_load_with_their_methods_projection(tmp_path):
    vectors = torch.rand(2, 6, generator=torch.Generator().manual_seed(5))
    _old_format_bank(tmp_path / "old.nmf", "nmf", vectors)
    _old_format_bank(tmp_path / "old.net2vec", "net2vec", vectors)
    assert "projection" not in json.loads((tmp_path / "old.nmf.json").read_text())
    nmf, net2vec = ConceptBank.load(tmp_path / "old.nmf"), ConceptBank.load(tmp_path / "old.net2vec")
    assert (nmf.projection, net2vec.projection) == ("nnls_codes", "sigmoid_affine")
    coefficients = torch.rand(1, 2, 2, 2)
    activations = torch.einsum("bkhw,kc->bchw", coefficients, vectors)
    torch.testing.assert_close(nmf.concept_maps(activations), coefficients, atol=1e-4, rtol=0)
    torch.testing.assert_close(net2vec.concept_maps(activations), torch.sigmoid(torch.einsum("kc,bchw->bkhw", vectors, activations)))
    _old_format_bank(tmp_path / "old.pca", "pca", vectors)
    with pytest.raises(BankError, match="unknown method 'pca' with no projection"):
        ConceptBank.load(tmp_path / "old.pca")


def test_mask_entry_holds_grid_masks_and_is_reused(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(7)]
    masks = [rng.random((2, 30, 40)) > 0.7 for _ in range(7)]
    dataset = ArrayDataset(images, masks, ["a", "b"])
    store = ActivationStore(tmp_path)
    entry = embed_masks(dataset, store, grid=(6, 8), batch_size=3)
    expected = torch.stack([masks_to_grid(m, (6, 8)) for m in masks])
    torch.testing.assert_close(entry.read_all("masks").float(), expected, atol=1e-3, rtol=0)
    stamps = [s.path.stat().st_mtime_ns for s in entry.shards()]
    assert embed_masks(dataset, store, grid=(6, 8)).key == entry.key
    assert [s.path.stat().st_mtime_ns for s in entry.shards()] == stamps
    changed = ArrayDataset(images, [~m for m in masks], ["a", "b"])
    assert embed_masks(changed, store, grid=(6, 8)).key != entry.key


def test_iter_batches_covers_split_once_and_shuffles_deterministically(tmp_path):
    activations = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 2, 3, 3).contiguous()
    act, masks = planted_entries(tmp_path, activations, torch.zeros(40, 1, 4, 4), ["c"], shard_size=7)
    train = split_indices(masks, "train")
    batches = list(iter_batches(act, masks, train, batch_size=4, shuffle=True, seed=3))
    seen = torch.cat([b.indices for b in batches])
    assert sorted(seen.tolist()) == sorted(train.tolist())
    for batch in batches:  # activations and masks belong to the same items
        assert torch.equal(batch.activations[:, 0, 0, 0], batch.indices.float())
        assert batch.masks.shape[1:] == (1, 4, 4)
    again = torch.cat([b.indices for b in iter_batches(act, masks, train, batch_size=4, shuffle=True, seed=3)])
    assert torch.equal(seen, again)
    other = torch.cat([b.indices for b in iter_batches(act, masks, train, batch_size=4, shuffle=True, seed=4)])
    assert not torch.equal(seen, other)


def test_misaligned_entries_are_refused(tmp_path):
    act, masks = planted_entries(tmp_path / "a", torch.zeros(10, 2, 2, 2), torch.zeros(10, 1, 2, 2), ["c"])
    other = activation_entry(tmp_path / "b", torch.zeros(12, 2, 2, 2), [f"x{i}" for i in range(12)])
    with pytest.raises(DataError, match="different items"):
        next(iter_batches(other, masks))


def test_bank_names_with_dots_keep_methods_apart(tmp_path):
    make_bank("net2vec").save(tmp_path / "A__layer2.net2vec")
    make_bank("nmf", standardized=False).save(tmp_path / "A__layer2.nmf")
    assert ConceptBank.load(tmp_path / "A__layer2.net2vec").method == "net2vec"
    assert ConceptBank.load(tmp_path / "A__layer2.nmf.json").method == "nmf"


def test_select_concepts_keeps_chosen_masks_and_names_unknown_ones(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    masks = [rng.random((3, 8, 8)) > 0.5 for _ in range(3)]
    dataset = ArrayDataset(images, masks, ["wheel", "window", "roof"])
    chosen = dataset.select_concepts(["roof", "wheel"])
    assert chosen.concepts == ["roof", "wheel"] and np.array_equal(chosen.masks(1), masks[1][[2, 0]])
    assert chosen.image_fingerprint() == dataset.image_fingerprint()
    assert chosen.mask_fingerprint() != dataset.mask_fingerprint()
    with pytest.raises(DataError, match="concept 'weel'.*closest: wheel"):
        dataset.select_concepts(["weel"])

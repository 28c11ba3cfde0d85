"""Net2Vec pixel probes (conceptlens.probes.net2vec) recover concepts planted in activations.

The planted layer: C=16 channels on an 8×8 map. Concept j moves the activations along a known
unit direction ``w*_j`` by ``±strength`` inside/outside its native mask (a random rectangle); a
distractor direction carries a third, unrelated rectangle; all directions are orthonormal, the
noise is isotropic and every channel has its own offset. The grid masks are the native masks
upsampled ×2 to 16×16, so ``w*_j`` is the best linear probe. The tests use a larger learning rate
and smaller batches than the defaults: the planted set is tiny.

The original variant binarises each channel at its top 0.5 %, which only suits sparse units, so
it gets its own planted layer: 48 of 64 ReLU channels fire, at random half of the cells, inside
the concept.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError

from conceptlens.concepts.errors import ConceptLensError, DataError, LayerError
from conceptlens.concepts.geometry import Geometry
from conceptlens.concepts.vectors.bank import BankError, ConceptBank
from conceptlens.probes.data import iter_batches, split_indices
from conceptlens.probes.net2vec import Net2VecProbe, _EarlyStopping
from conceptlens.probes.params import ParameterError
from tests.planted import activation_entry, planted_entries

CONCEPTS = ["door", "wheel"]
FAST = {"lr": 0.05, "batch_size": 8, "patience": 10, "progress": False}


def _rectangles(generator: torch.Generator, n: int, k: int, size: int = 8) -> torch.Tensor:
    masks = torch.zeros(n, k, size, size)
    for i in range(n):
        for j in range(k):
            height, width = torch.randint(2, 6, (2,), generator=generator).tolist()
            top = int(torch.randint(0, size - height + 1, (1,), generator=generator))
            left = int(torch.randint(0, size - width + 1, (1,), generator=generator))
            masks[i, j, top : top + height, left : left + width] = 1
    return masks


def _planted(n: int = 120, channels: int = 16, k: int = 2, strength: float = 2.5, seed: int = 0):
    """Activations (n, C, 8, 8), grid masks (n, k, 16, 16) and the concept directions (k, C)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(channels, channels, generator=generator))[0].T
    native = _rectangles(generator, n, k + 1)  # the last one drives the distractor
    offsets = 2 * torch.rand(channels, generator=generator).view(1, -1, 1, 1)
    activations = torch.randn(n, channels, 8, 8, generator=generator) + offsets
    for j in range(k + 1):
        activations += strength * directions[j].view(1, -1, 1, 1) * (2 * native[:, j : j + 1] - 1)
    grid_masks = native[:, :k].repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    return activations, grid_masks, directions[:k]


def _planted_units(n: int = 120, channels: int = 64, concept_units: int = 48, seed: int = 0):
    """Sparse-unit activations (n, C, 8, 8) and grid masks (n, 1, 16, 16) of one concept."""
    generator = torch.Generator().manual_seed(seed)
    native = _rectangles(generator, n, 1)
    activations = torch.randn(n, channels, 8, 8, generator=generator).clamp(min=0)
    fires = (torch.rand(n, concept_units, 8, 8, generator=generator) < 0.5).float()
    activations[:, :concept_units] += 3 * native * fires
    return activations, native.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tensors here are tiny: one thread is faster, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted():
    return _planted()


@pytest.fixture(scope="module")
def entries(planted, tmp_path_factory):
    activations, masks, _ = planted
    return planted_entries(tmp_path_factory.mktemp("planted"), activations, masks, CONCEPTS, shard_size=64)


@pytest.fixture(scope="module")
def shuffled_entries(planted, tmp_path_factory):
    """The same activations with every image's masks taken from another image: the control."""
    activations, masks, _ = planted
    permutation = torch.randperm(len(masks), generator=torch.Generator().manual_seed(5))
    return planted_entries(tmp_path_factory.mktemp("shuffled"), activations, masks[permutation], CONCEPTS, shard_size=64)


@pytest.fixture(scope="module")
def fitted(entries):
    return Net2VecProbe(**FAST).fit(*entries)


@pytest.fixture(scope="module")
def fitted_standardized(entries):
    return Net2VecProbe(standardize=True, **FAST).fit(*entries)


def _cosines(probe: Net2VecProbe, directions: torch.Tensor) -> torch.Tensor:
    """Cosine of each concept's direction in activation space (undoing standardisation) with w*."""
    weight = probe.weight_ if probe.channel_std_ is None else probe.weight_ / probe.channel_std_
    return F.cosine_similarity(weight, directions, dim=1)


def _set_ious(probe: Net2VecProbe, entries, split: str = "test") -> list[float]:
    return [result["set_iou"] for result in probe.evaluate(*entries, split=split).values()]


def _train_pixels(entries) -> torch.Tensor:
    activations, masks = entries
    return activations.read_all()[split_indices(masks, "train")].movedim(1, -1).reshape(-1, 16)


# ------------------------------------------------------------------------------ recovery
def test_recovers_planted_concepts(fitted, entries, planted):
    _, masks, directions = planted
    assert min(_set_ious(fitted, entries)) >= 0.9
    assert _cosines(fitted, directions).min() >= 0.95
    assert fitted.concepts_ == CONCEPTS and fitted.grid_ == (16, 16) and fitted.n_channels_ == 16
    assert fitted.weight_.shape == (2, 16) and fitted.bias_.shape == (2,)
    assert fitted.channel_mean_ is None and fitted.channel_std_ is None
    train_fraction = masks[split_indices(entries[1], "train")].mean(dim=(2, 3)).mean(dim=0)
    assert torch.allclose(fitted.alpha_, 1 - train_fraction, atol=1e-6)
    assert set(fitted.history_[0]) >= {"epoch", "train_loss", "val_set_iou", "val_set_iou_by_concept"}


def test_recovers_planted_concepts_standardized(fitted_standardized, entries, planted):
    probe = fitted_standardized
    assert min(_set_ious(probe, entries)) >= 0.9
    assert _cosines(probe, planted[2]).min() >= 0.95
    pixels = _train_pixels(entries).double()
    assert torch.allclose(probe.channel_mean_.double(), pixels.mean(dim=0), atol=1e-5)
    assert torch.allclose(probe.channel_std_.double(), pixels.std(dim=0, unbiased=False), atol=1e-5)


def test_predictions_have_grid_shape(fitted, entries):
    batch = next(iter_batches(*entries, indices=[0, 1, 2]))
    probabilities = fitted.predict_proba(batch.activations, batch.geometries)
    assert probabilities.shape == (3, 2, 16, 16) and probabilities.dtype == torch.float32
    assert torch.equal(fitted.predict(batch.activations, batch.geometries), probabilities > 0.5)
    assert fitted.predict_proba(batch.activations, batch.geometries, grid=(5, 7)).shape == (3, 2, 5, 7)


def test_concepts_train_independently(fitted, planted, tmp_path):
    activations, masks, _ = planted
    for k, concept in enumerate(CONCEPTS):
        single = planted_entries(tmp_path / concept, activations, masks[:, k : k + 1], [concept], shard_size=64)
        probe = Net2VecProbe(**FAST).fit(*single)
        assert probe.best_epoch_ == [fitted.best_epoch_[k]]
        assert torch.allclose(probe.weight_[0], fitted.weight_[k], atol=1e-5)
        assert torch.allclose(probe.bias_[0], fitted.bias_[k], atol=1e-5)


def test_invalid_pairs_are_ignored(planted, tmp_path):
    activations, masks, directions = planted
    corrupted, valid = masks.clone(), torch.ones(len(masks), 2, dtype=torch.bool)
    valid[::3, 0] = False
    corrupted[::3, 0] = 1 - corrupted[::3, 0]  # inverted masks, but marked invalid
    entries = planted_entries(tmp_path, activations, corrupted, CONCEPTS, valid=valid, shard_size=64)
    probe = Net2VecProbe(**FAST).fit(*entries)
    assert min(_set_ious(probe, entries)) >= 0.9
    assert _cosines(probe, directions).min() >= 0.95
    train = split_indices(entries[1], "train")
    kept = train[valid[train, 0].numpy()]
    assert probe.alpha_[0] == pytest.approx(1 - float(masks[kept, 0].mean()), abs=1e-6)


def test_concept_absent_from_val_and_test_is_flagged(planted, tmp_path):
    activations, masks, _ = planted
    probe_masks = masks.clone()
    splits = planted_entries(tmp_path / "splits", activations, masks, CONCEPTS, shard_size=64)[1]
    held_out = np.concatenate([split_indices(splits, "val"), split_indices(splits, "test")])
    probe_masks[held_out, 1] = 0  # 'wheel' only appears in training images
    entries = planted_entries(tmp_path / "entries", activations, probe_masks, CONCEPTS, shard_size=64)
    with pytest.warns(UserWarning, match=r"\['wheel'\] have no positive pixel in the val split"):
        probe = Net2VecProbe(max_epochs=3, **FAST).fit(*entries)
    assert probe.history_[-1]["val_set_iou_by_concept"]["wheel"] is None
    assert probe.history_[-1]["val_set_iou"] == probe.history_[-1]["val_set_iou_by_concept"]["door"]
    result = probe.evaluate(*entries)["wheel"]
    assert result["set_iou"] is None and result["flag"] == "no positive pixels"


# ------------------------------------------------------------------------------ determinism
def test_same_seed_same_weights_other_seed_other_weights(entries):
    first = Net2VecProbe(max_epochs=4, **FAST).fit(*entries)
    again = Net2VecProbe(max_epochs=4, **FAST).fit(*entries)
    assert torch.equal(again.weight_, first.weight_) and torch.equal(again.bias_, first.bias_)
    other = Net2VecProbe(max_epochs=4, seed=1, **FAST).fit(*entries)
    assert not torch.allclose(other.weight_, first.weight_, atol=1e-3)


# ------------------------------------------------------------------------------ losses and variants
@pytest.mark.parametrize("loss", ["net2vec", "bce", "dice", "tversky"])
def test_each_loss_trains_and_beats_shuffled_control(loss, entries, shuffled_entries):
    settings = {**FAST, "loss": loss, "max_epochs": 8}
    probe = Net2VecProbe(**settings).fit(*entries)
    control = Net2VecProbe(**settings).fit(*shuffled_entries)
    assert probe.history_[-1]["train_loss"] < probe.history_[0]["train_loss"]
    ious, control_ious = _set_ious(probe, entries), _set_ious(control, shuffled_entries)
    assert min(ious) >= 0.8
    assert min(ious) > max(control_ious) + 0.4


def test_original_variant_beats_shuffled_control(tmp_path):
    activations, masks = _planted_units()
    entries = planted_entries(tmp_path / "units", activations, masks, ["door"], shard_size=64)
    permutation = torch.randperm(len(masks), generator=torch.Generator().manual_seed(5))
    control_entries = planted_entries(tmp_path / "control", activations, masks[permutation], ["door"], shard_size=64)
    probe = Net2VecProbe(variant="original", max_epochs=10, progress=False).fit(*entries)
    control = Net2VecProbe(variant="original", max_epochs=10, progress=False).fit(*control_entries)
    iou, control_iou = _set_ious(probe, entries)[0], _set_ious(control, control_entries)[0]
    assert iou >= 0.5 and iou > control_iou + 0.3
    assert torch.equal(probe.bias_, torch.zeros(1))
    pixels = activations[split_indices(entries[1], "train")].movedim(1, -1).reshape(-1, 64)
    above = (pixels > probe.channel_threshold_).float().mean(dim=0)
    assert torch.allclose(above, torch.full((64,), 0.005), atol=0.0015)  # the top 0.5 % of each channel
    with pytest.raises(BankError, match="binarised"):
        probe.to_bank("layer")


# ------------------------------------------------------------------------------ early stopping
def test_early_stopping_keeps_the_best_epoch(entries):
    patience = 2
    probe = Net2VecProbe(lr=1.0, batch_size=8, patience=patience, max_epochs=30, progress=False).fit(*entries)
    scores = np.array([[h["val_set_iou_by_concept"][c] for c in CONCEPTS] for h in probe.history_])
    assert len(probe.history_) < 30
    assert len(probe.history_) == max(probe.best_epoch_) + patience + 1
    assert probe.best_epoch_ == [int(np.argmax(scores[: e + patience + 1, k])) for k, e in enumerate(probe.best_epoch_)]
    assert any(best < len(probe.history_) - 1 for best in probe.best_epoch_)
    val = probe.evaluate(*entries, split="val")
    for k, concept in enumerate(CONCEPTS):
        assert val[concept]["set_iou"] == pytest.approx(scores[probe.best_epoch_[k], k], abs=1e-9)


def test_early_stopping_per_concept_by_hand():
    weight, bias = torch.zeros(2, 1), torch.zeros(2)
    stopping = _EarlyStopping(weight, bias, patience=2)
    for epoch, scores in enumerate([[0.1, 0.1], [0.5, 0.2], [0.4, 0.3], [0.3, 0.2], [0.9, 0.1], [0.9, 0.9]]):
        weight.fill_(epoch)
        stopping.update(epoch, torch.tensor(scores, dtype=torch.float64), weight, bias)
        if stopping.done:
            break
    # concept 0 peaks at epoch 1 and stops at 3 (its 0.9 at epoch 4 comes too late);
    # concept 1 peaks at epoch 2 and stops at 4
    assert epoch == 4
    assert stopping.best_epoch.tolist() == [1, 2]
    assert stopping.weight[:, 0].tolist() == [1.0, 2.0]


# ------------------------------------------------------------------------------ errors
def test_concept_without_positive_train_pixels_is_named(planted, tmp_path):
    activations, masks, _ = planted
    ghost = torch.cat([masks, torch.zeros_like(masks[:, :1])], dim=1)
    entries = planted_entries(tmp_path, activations, ghost, [*CONCEPTS, "ghost"], shard_size=64)
    with pytest.raises(DataError, match="'ghost'.*train split.*add training images"):
        Net2VecProbe(**FAST).fit(*entries)


def test_entries_of_different_datasets_are_refused(planted, entries, tmp_path):
    activations = activation_entry(tmp_path, planted[0], [f"other-{i}" for i in range(120)])
    with pytest.raises(DataError, match="different items"):
        Net2VecProbe(**FAST).fit(activations, entries[1])


def test_empty_split_is_refused(planted, tmp_path):
    activations, masks, _ = planted
    entries = planted_entries(tmp_path, activations[:2], masks[:2], CONCEPTS)  # 60/20/20 of 2: no val image
    with pytest.raises(DataError, match="split 'val'.*holds no image"):
        Net2VecProbe(**FAST).fit(*entries)


def test_pooled_activations_are_refused(planted, tmp_path):
    activations, masks, _ = planted
    entries = planted_entries(tmp_path, activations.mean(dim=(2, 3)), masks, CONCEPTS)
    with pytest.raises(LayerError, match="reduce='native'"):
        Net2VecProbe(**FAST).fit(*entries)


@pytest.mark.parametrize(
    "params, message",
    [({"loss": "focal"}, r"loss='focal'\): must be one of 'net2vec', 'bce', 'dice', 'tversky' — fix: pass loss as one of"),
     ({"variant": "paper"}, r"variant='paper'\): must be one of 'default', 'original' — fix: pass variant as"),
     ({"patience": 0}, r"patience=0\): must be an integer >= 1 — fix: pass patience as an integer >= 1"),
     ({"batch_size": 2.5}, r"batch_size=2\.5\): must be an integer >= 1 or one of None — fix: pass batch_size as"),
     ({"validation_fraction": 1.0}, r"validation_fraction=1\.0\): must be a number with 0 < value < 1 — fix"),
     ({"variant": "original", "standardize": True}, r"standardize=True, variant='original'\): .*cannot be standardised — fix: drop one"),
     ({"tversky_alpha": 0.0, "tversky_beta": 0.0}, r"tversky_alpha=0\.0, tversky_beta=0\.0\): need non-negative weights, not both zero — fix"),
     ({"lr": -1.0}, r"lr=-1\.0\): must be a number > 0 or one of None — fix: pass lr as a number > 0")],
)
def test_bad_hyper_parameters_are_refused(params, message, entries):
    with pytest.raises(ParameterError, match=message) as caught:
        Net2VecProbe(**params).fit(*entries)
    assert isinstance(caught.value, ConceptLensError) and isinstance(caught.value, ValueError)


def test_prediction_needs_a_fit_and_the_right_layer(fitted):
    geometries = [Geometry((8, 8), (8, 8), (0, 0), (8, 8))]
    with pytest.raises(NotFittedError):
        Net2VecProbe().predict_proba(torch.zeros(1, 16, 8, 8), geometries)
    with pytest.raises(LayerError, match="expects"):
        fitted.predict_proba(torch.zeros(1, 15, 8, 8), geometries)


# ------------------------------------------------------------------------------ export
@pytest.mark.parametrize("which", ["fitted", "fitted_standardized"])
def test_bank_round_trip_reproduces_predictions(which, entries, tmp_path, request):
    probe = request.getfixturevalue(which)
    metrics = probe.evaluate(*entries)
    bank = probe.to_bank("layer3", metrics=metrics, provenance={"note": "test"})
    loaded = ConceptBank.load(bank.save(tmp_path / "bank"))
    assert loaded.method == "net2vec" and loaded.concepts == CONCEPTS
    for batch in iter_batches(*entries, batch_size=50):
        expected = probe.predict_proba(batch.activations, batch.geometries)
        assert torch.equal(loaded.concept_maps(batch.activations, batch.geometries, probe.grid_), expected)
    provenance = loaded.provenance
    activations, masks = entries
    assert provenance["activations_key"] == activations.key and provenance["masks_key"] == masks.key
    assert provenance["model_hash"] is None  # planted entries record no model
    assert provenance["params"]["standardize"] == probe.standardize and provenance["seed"] == 0
    assert {"torch", "numpy", "conceptlens"} <= set(provenance["versions"]) and provenance["note"] == "test"
    assert loaded.metrics["door"]["set_iou"] == pytest.approx(metrics["door"]["set_iou"])
    json.dumps(provenance)  # plain JSON all the way down


# ------------------------------------------------------------------------------ initialisation
def test_lda_start_is_fisher_direction_and_converges_in_one_epoch(entries, planted):
    _, _, directions = planted
    lda = Net2VecProbe(max_epochs=1, seed=0).fit(*entries)
    zeros = Net2VecProbe(max_epochs=1, seed=0, init="zeros").fit(*entries)
    assert min(_set_ious(lda, entries)) >= 0.85
    assert _cosines(lda, directions).min() >= 0.9
    assert max(_set_ious(zeros, entries)) < min(_set_ious(lda, entries))
    with pytest.raises(ConceptLensError, match="init='pca'"):
        Net2VecProbe(init="pca").fit(*entries)

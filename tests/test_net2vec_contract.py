"""Net2VecProbe follows scikit-learn's estimator contract (conceptlens.probes.net2vec).

scikit-learn's own checks run on 2-D inputs (pixel vectors ``(N, C)``, masks ``(N,)``); the tests
below add what they cannot see: a planted concept recovered from plain arrays, the array form and
the store form giving the same weights, and the errors of the array form.

The planted arrays: C=8 channels with distinct offsets and unit noise on a 6×6 map; channel 3
rises by ``STRENGTH`` inside the mask of concept "up", channel 5 falls by ``STRENGTH`` inside the
mask of concept "down". The best probe of "up" is therefore +channel 3 thresholded between its
two class means, that of "down" −channel 5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from conceptlens.concepts.errors import ConceptLensError, DataError, LayerError
from conceptlens.probes.data import ArrayInputError, as_activations, holdout_split, identity_geometries, split_indices
from conceptlens.probes.net2vec import ChannelMismatchError, Net2VecProbe, ProbeNotFittedError
from tests.planted import planted_entries

CHANNELS, SIZE, STRENGTH = 8, 6, 6.0
OFFSETS = 0.5 * torch.arange(CHANNELS)  # channel 3 sits at 1.5, channel 5 at 2.5 outside the masks
CONCEPTS = ["up", "down"]
FAST = {"lr": 0.05, "batch_size": 16, "max_epochs": 10, "progress": False, "device": "cpu"}


def _planted(n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (n, C, 6, 6) and binary masks (n, 2, 6, 6) of the concepts "up" and "down"."""
    generator = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n, 2, SIZE, SIZE, generator=generator) < 0.3).float()
    activations = torch.randn(n, CHANNELS, SIZE, SIZE, generator=generator) + OFFSETS.view(1, -1, 1, 1)
    activations[:, 3] += STRENGTH * masks[:, 0]
    activations[:, 5] -= STRENGTH * masks[:, 1]
    return activations, masks


def _pixels(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N·h·w, C) pixel vectors."""
    return maps.movedim(1, -1).reshape(-1, maps.shape[1])


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
def fitted(planted):
    activations, masks = planted
    return Net2VecProbe(**FAST).fit(activations[:60], masks[:60], concepts=CONCEPTS)


# ------------------------------------------------------------------------------ scikit-learn's checks
# Each entry is a check that does not apply, and why. They run as strict xfails: a check that
# starts passing fails the suite, so the list stays true.
NOT_APPLICABLE = {
    "check_estimators_dtypes": (
        "its y is [1, 2] * 10, class labels rather than masks; masks are covered fractions in [0, 1] "
        "and the probe refuses other values. The dtypes of X it varies are tested in "
        "test_any_real_dtype_of_x_fits"
    ),
    "check_fit2d_1feature": (
        "its y is X[:, 0] cast to int (labels 1 and 2 after the binary-target tag), not masks in "
        "[0, 1]; a single-channel fit is tested in test_a_single_channel_fits"
    ),
}


@parametrize_with_checks(
    # CPU: bilinear resampling's backward pass is not bitwise reproducible on CUDA (idempotence checks)
    [Net2VecProbe(max_epochs=2, patience=1, progress=False, device="cpu")],
    expected_failed_checks=lambda estimator: NOT_APPLICABLE,
    xfail_strict=True,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_any_real_dtype_of_x_fits(planted):
    activations, masks = planted
    reference = Net2VecProbe(**FAST).fit(activations[:40].round(), masks[:40])
    for dtype in (np.float64, np.float32, np.int64, np.int32):
        probe = Net2VecProbe(**FAST).fit(activations[:40].round().numpy().astype(dtype), masks[:40].numpy().astype(np.int64))
        assert torch.equal(probe.weight_, reference.weight_)
        assert probe.transform(activations[:2].numpy().astype(dtype)).dtype == np.float32
    double = Net2VecProbe(**FAST).fit(activations[:40].round().double(), masks[:40].bool())
    assert torch.equal(double.weight_, reference.weight_)


def test_a_single_channel_fits(planted):
    activations, masks = planted
    probe = Net2VecProbe(**FAST).fit(activations[:60, 3:4], masks[:60, 0])
    assert probe.weight_.shape == (1, 1) and float(probe.weight_[0, 0]) > 0
    assert probe.evaluate(activations[60:, 3:4], masks[60:, 0])["concept_0"]["set_iou"] >= 0.97


# ------------------------------------------------------------------------------ parameters
def test_clone_and_params_round_trip(fitted):
    params = fitted.get_params()
    assert params["lr"] == 0.05 and params["validation_fraction"] == 0.2 and params["seed"] == 0
    twin = clone(fitted)
    assert twin.get_params() == params
    assert not hasattr(twin, "weight_") and not hasattr(twin, "concepts_")
    assert twin.set_params(lr=0.01, standardize=True) is twin
    assert twin.get_params()["lr"] == 0.01 and twin.standardize is True and fitted.lr == 0.05
    with pytest.raises(ValueError, match="Invalid parameter 'learning_rate'"):
        twin.set_params(learning_rate=0.1)


def test_a_clone_refits_to_the_same_weights(fitted, planted):
    activations, masks = planted
    again = clone(fitted).fit(activations[:60], masks[:60], concepts=CONCEPTS)
    assert torch.equal(again.weight_, fitted.weight_) and torch.equal(again.bias_, fitted.bias_)
    assert again.best_epoch_ == fitted.best_epoch_ and again.history_ == fitted.history_


@pytest.mark.parametrize("method", ["transform", "predict", "predict_proba", "evaluate", "to_bank"])
def test_not_fitted_error_names_method_and_fix(method, planted):
    activations, masks = planted
    arguments = {"evaluate": (activations, masks), "to_bank": ("layer3",)}.get(method, (activations,))
    with pytest.raises(NotFittedError, match=rf"Net2VecProbe\.{method}: this probe is not fitted yet — fix: call fit\(X, y\) first") as caught:
        getattr(Net2VecProbe(), method)(*arguments)
    assert isinstance(caught.value, ProbeNotFittedError) and isinstance(caught.value, ConceptLensError)


# ------------------------------------------------------------------------------ plain arrays
def test_recovers_planted_concepts_from_arrays(fitted, planted):
    activations, masks = planted
    held_out = fitted.evaluate(activations[60:], masks[60:])  # items the probe never saw
    assert min(result["set_iou"] for result in held_out.values()) >= 0.97
    assert fitted.concepts_ == CONCEPTS and fitted.grid_ == (SIZE, SIZE) and fitted.n_features_in_ == CHANNELS
    weight, bias = fitted.weight_, fitted.bias_
    # "up" rides on +channel 3, "down" on −channel 5, and each weight dwarfs the other seven
    assert float(weight[0, 3]) > 0 and float(weight[1, 5]) < 0
    others = torch.ones(CHANNELS, dtype=torch.bool)
    assert weight[0, 3].abs() > 5 * weight[0, others.index_fill(0, torch.tensor(3), False)].abs().max()
    assert weight[1, 5].abs() > 5 * weight[1, others.index_fill(0, torch.tensor(5), False)].abs().max()
    # the decision threshold on the carrying channel lies between its two class means
    assert 1.5 < float(-bias[0] / weight[0, 3]) < 1.5 + STRENGTH
    assert 2.5 - STRENGTH < float(-bias[1] / weight[1, 5]) < 2.5
    assert fitted.training_data_ == {
        "activations_key": None, "masks_key": None, "model_hash": None, "layer": None, "dataset": None, "n_train": 48, "n_val": 12,
    }


def test_pixel_vectors_fit_and_transform(planted):
    activations, masks = planted
    pixels, labels = _pixels(activations[:60]).numpy(), masks[:60, 0].reshape(-1).numpy()
    probe = Net2VecProbe(**FAST).fit(pixels, labels)
    assert probe.concepts_ == ["concept_0"] and probe.grid_ == (1, 1)
    test_pixels, test_labels = _pixels(activations[60:]).numpy(), masks[60:, 0].reshape(-1).numpy() > 0.5
    probabilities = probe.transform(test_pixels)
    assert isinstance(probabilities, np.ndarray) and probabilities.shape == (len(test_pixels), 1) and probabilities.dtype == np.float32
    assert (probe.predict(test_pixels)[:, 0] == test_labels).mean() >= 0.99
    assert int(probe.weight_[0].argmax()) == 3


def test_transform_shapes_types_and_fit_transform(fitted, planted):
    activations, masks = planted
    maps = fitted.transform(activations[60:])
    assert isinstance(maps, torch.Tensor) and maps.shape == (20, 2, SIZE, SIZE) and maps.dtype == torch.float32
    as_numpy = fitted.transform(activations[60:].numpy())
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, maps.numpy())
    # the geometry-aware form with each map as its own image is the same computation
    same = fitted.predict_proba(activations[60:], identity_geometries(20, (SIZE, SIZE)), (SIZE, SIZE))
    assert torch.equal(same, maps)
    assert torch.equal(fitted.predict(activations[60:]), maps > 0.5)
    assert fitted.predict_proba(activations[60:], identity_geometries(20, (SIZE, SIZE)), (3, 4)).shape == (20, 2, 3, 4)
    # one pixel of a map is a pixel vector
    assert torch.allclose(fitted.transform(_pixels(activations[60:61])), _pixels(maps[:1]), atol=1e-6)
    fresh = Net2VecProbe(**FAST).fit_transform(activations[:60], masks[:60], concepts=CONCEPTS)
    assert torch.equal(fresh, fitted.transform(activations[:60]))


def test_validation_split_is_seeded_and_can_be_given(planted):
    activations, masks = planted
    train, val = holdout_split(80, 0.2, seed=0)
    assert len(val) == 16 and len(train) == 64 and set(train) | set(val) == set(range(80)) and not set(train) & set(val)
    assert np.array_equal(holdout_split(80, 0.2, seed=0)[1], val)
    assert not np.array_equal(holdout_split(80, 0.2, seed=1)[1], val)
    assert holdout_split(2, 0.9, seed=0)[0].size == 1  # one item of each, whatever the fraction
    given = Net2VecProbe(**FAST).fit(activations[:60], masks[:60], validation=(activations[60:70], masks[60:70]))
    assert given.training_data_["n_train"] == 60 and given.training_data_["n_val"] == 10
    other_seed = Net2VecProbe(**{**FAST, "seed": 3}).fit(activations[:60], masks[:60])
    assert other_seed.training_data_["n_val"] == 12


# ------------------------------------------------------------------------------ the store form
@pytest.mark.parametrize("standardize", [False, True])
def test_array_and_store_forms_give_the_same_weights(standardize, planted, tmp_path):
    activations, masks = planted
    # one shard: a store batch never spans two shards, so equal batches need a single one
    entries = planted_entries(tmp_path, activations, masks, CONCEPTS, shard_size=len(activations))
    train, val, test = (split_indices(entries[1], split) for split in ("train", "val", "test"))
    settings = {**FAST, "standardize": standardize}
    stored = Net2VecProbe(**settings).fit(*entries)
    in_memory = Net2VecProbe(**settings).fit(activations[train], masks[train], concepts=CONCEPTS, validation=(activations[val], masks[val]))
    assert torch.equal(in_memory.weight_, stored.weight_) and torch.equal(in_memory.bias_, stored.bias_)
    assert in_memory.history_ == stored.history_ and in_memory.best_epoch_ == stored.best_epoch_
    assert torch.equal(in_memory.alpha_, stored.alpha_)
    assert in_memory.evaluate(activations[test], masks[test]) == stored.evaluate(*entries, split="test")
    assert stored.training_data_["activations_key"] == entries[0].key and stored.training_data_["layer"] == "planted"


def test_store_form_refuses_array_only_options(planted, tmp_path):
    activations, masks = planted
    entries = planted_entries(tmp_path, activations, masks, CONCEPTS, shard_size=80)
    with pytest.raises(DataError, match=r"concepts=.*a mask entry records its concepts.*fix: drop concepts="):
        Net2VecProbe(**FAST).fit(*entries, concepts=CONCEPTS)
    with pytest.raises(DataError, match=r"fit\(StoreEntry, Tensor\).*both from the store or both from memory.*fix"):
        Net2VecProbe(**FAST).fit(entries[0], masks)
    with pytest.raises(ArrayInputError, match=rf"store entry {entries[0].key}.*fix: read its items"):
        Net2VecProbe(**FAST).fit(activations, masks).transform(entries[0])


# ------------------------------------------------------------------------------ errors of the array form
@pytest.mark.parametrize(
    "make_y, message",
    [
        (lambda masks: None, r"y=None: requires y to be passed, but the target y is None.*fix: pass the masks as y"),
        (lambda masks: 2 * masks, r"y in \[0, 2\]: mask values must lie in \[0, 1\].*fix: pass binary masks"),
        (lambda masks: masks[:50], r"y of shape \(50, 2, 6, 6\): holds 50 items, X holds 60.*fix: pass one mask per item"),
        (lambda masks: masks[:, :, :3], r"y of shape \(60, 2, 3, 6\): masks must lie on the activations' grid \(6, 6\).*fix: resample"),
        (lambda masks: masks[:, 0, 0, 0], r"y of shape \(60,\): masks must be \(N, K, h, w\) or \(N, h, w\).*fix: Reshape your data"),
        (lambda masks: masks.masked_fill(masks > 0, float("nan")), r"y: contains NaN or inf values.*fix: remove"),
    ],
)
def test_bad_masks_are_refused(make_y, message, planted):
    activations, masks = planted
    with pytest.raises(ArrayInputError, match=message) as caught:
        Net2VecProbe(**FAST).fit(activations[:60], make_y(masks[:60]))
    assert isinstance(caught.value, ValueError)


def test_bad_activations_and_names_are_refused(fitted, planted):
    activations, masks = planted
    with pytest.raises(ArrayInputError, match=r"X of shape \(60, 8, 6\).*fix: Reshape your data"):
        Net2VecProbe(**FAST).fit(activations[:60, :, 0], masks[:60])
    with pytest.raises(ArrayInputError, match=r"X of dtype complex64: Complex data not supported"):
        as_activations(np.ones((2, 3), dtype=np.complex64))
    with pytest.raises(ArrayInputError, match=r"concepts=\['up'\]: the masks hold 2 concepts.*fix: pass 2 distinct strings"):
        Net2VecProbe(**FAST).fit(activations[:60], masks[:60], concepts=["up"])
    with pytest.raises(ArrayInputError, match=r"n_samples=1.*one sample is not enough.*fix: pass 2 items or more"):
        Net2VecProbe(**FAST).fit(activations[:1], masks[:1])
    with pytest.raises(ArrayInputError, match=r"X_val, y_val of shapes .* do not match X, y.*fix"):
        Net2VecProbe(**FAST).fit(activations[:60], masks[:60], validation=(activations[60:, :4], masks[60:]))
    with pytest.raises(DataError, match=r"masks y: holds concepts \['a', 'b'\], the probe was trained on \['up', 'down'\].*fix"):
        fitted.evaluate(activations[60:], masks[60:], concepts=["a", "b"])
    with pytest.raises(ChannelMismatchError, match=r"X has 7 features, but Net2VecProbe is expecting 8 features as input.*fix") as caught:
        fitted.transform(activations[:2, :7])
    assert isinstance(caught.value, LayerError) and isinstance(caught.value, ValueError)

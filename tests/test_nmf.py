"""NMF / ICE NCAVs: planted factors, agreement with scikit-learn and scipy, store streaming,
clamping, fidelity, labelling with planted concept masks, and the concept-bank round trip."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.probes.data import iter_batches, split_indices
from conceptlens.probes.nmf import MiniBatchNMFConcepts, NMFConcepts, NMFError
from conceptlens.probes.params import ParameterError
from tests.planted import activation_entry, planted_entries


@pytest.fixture(autouse=True)
def _one_thread():
    # The matrices here are tiny: thread synchronisation dominates, and on a busy 2-core machine
    # OpenMP spin-waiting slows these small products by 10-100×.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def estimator(solver: str = "hals", batch_size: int | None = None, **settings):
    """The full-batch estimator, or the online one when ``batch_size`` is given."""
    if batch_size is None:
        return NMFConcepts(solver=solver, **settings)
    return MiniBatchNMFConcepts(solver=solver, batch_size=batch_size, **settings)


def planted_factors(n: int = 3000, channels: int = 24, k: int = 5, noise: float = 0.01, seed: int = 0):
    """V = S*·P* + noise with sparse non-negative codes and peaked non-negative components."""
    g = torch.Generator().manual_seed(seed)
    components = torch.rand(k, channels, generator=g) ** 3
    codes = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.4)
    return codes @ components + noise * torch.rand(n, channels, generator=g), components


def relu_features(n: int = 5000, channels: int = 64, latent: int = 24, seed: int = 0) -> torch.Tensor:
    """Realistic, not low-rank: ReLU of sparse latent parts mixed by Gaussian weights, plus noise."""
    g = torch.Generator().manual_seed(seed)
    parts = torch.rand(n, latent, generator=g) * (torch.rand(n, latent, generator=g) < 0.3)
    return torch.relu(parts @ torch.randn(latent, channels, generator=g) + 0.3 * torch.randn(n, channels, generator=g))


def matched_cosines(found: torch.Tensor, planted: torch.Tensor) -> np.ndarray:
    found, planted = found / found.norm(dim=1, keepdim=True), planted / planted.norm(dim=1, keepdim=True)
    cosines = (found @ planted.T).numpy()
    rows, cols = scipy.optimize.linear_sum_assignment(-cosines)
    return cosines[rows, cols]


def padded_entry(root, activations: torch.Tensor, image_width: int, request: dict, shard_size: int = 7):
    """Activations (N, C, 8, 8) of images resized to 64×image_width on a 64×64 canvas (padding on the right)."""
    n = activations.shape[0]
    geometry = torch.tensor([[64, image_width, 64, image_width, 0, 0, 64, 64]] * n, dtype=torch.int64)
    entry = ActivationStore(root).entry(request)
    for start in range(0, n, shard_size):
        end = min(start + shard_size, n)
        entry.write_shard(start, end, {"activations": activations[start:end].float(), "geometry": geometry[start:end]})
    entry.finalize({"request": request, "item_shape": list(activations.shape[1:]), "dataset": {"name": "padded", "ids": [str(i) for i in range(n)]}}, n)
    return entry


def planted_concept_world(n: int = 50, channels: int = 12, size: int = 8, seed: int = 0):
    """Three concepts drive activations along planted directions inside their masks; a fourth
    ('sky') has masks but no signal. Returns activations (N, C, h, w), masks (N, 4, h, w), directions."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.rand(3, channels, generator=g) ** 2
    masks = torch.zeros(n, 4, size, size)
    for i in range(n):
        for c in range(4):
            top, left = (int(x) for x in torch.randint(0, size - 3, (2,), generator=g))
            height, width = (int(x) for x in torch.randint(2, 4, (2,), generator=g))
            masks[i, c, top : top + height, left : left + width] = 1
    strength = 0.8 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)  # ≥ half the maximum: survives max-normalisation
    activations = torch.einsum("nkhw,kc->nchw", masks[:, :3] * strength, directions)
    return activations + 0.01 * torch.rand(activations.shape, generator=g), masks, directions


# --------------------------------------------------------------------------------- solvers
@pytest.mark.parametrize(("solver", "batch_size"), [("hals", None), ("mu", None), ("hals", 500), ("mu", 500), ("sklearn", None)])
def test_planted_factors_are_recovered(solver, batch_size):
    pixels, components = planted_factors()
    model = estimator(solver, batch_size, n_components=5, device="cpu").fit(pixels)
    assert model.components_.shape == (5, 24) and model.n_features_in_ == 24 and model.n_pixels_ == 3000
    assert matched_cosines(model.components_, components).min() >= 0.95
    torch.testing.assert_close(model.components_.norm(dim=1), torch.ones(5))
    assert model.relative_error_ < 0.02 and model.reconstruction_err_ == pytest.approx(model.relative_error_ * float(pixels.norm()), rel=1e-4)


@pytest.fixture(scope="module")
def sklearn_reference():
    torch.set_num_threads(1)
    pixels = relu_features()
    return pixels, NMFConcepts(n_components=10, solver="sklearn").fit(pixels)


@pytest.mark.parametrize(("solver", "batch_size"), [("hals", None), ("mu", None), ("hals", 1000)])
def test_torch_error_within_two_percent_of_sklearn(sklearn_reference, solver, batch_size):
    pixels, reference = sklearn_reference
    model = estimator(solver, batch_size, n_components=10, device="cpu").fit(pixels)
    assert 0.3 < reference.relative_error_ < 0.9  # realistic: far from exactly low rank
    assert model.relative_error_ <= 1.02 * reference.relative_error_


def test_error_curve_descends_to_the_exact_error():
    pixels = relu_features(n=2000, channels=32)
    ours = NMFConcepts(n_components=6, max_iter=30, tol=0.0, device="cpu").fit(pixels)
    error_curve = ours.error_curve_
    assert len(error_curve) == 30 and all(b <= a + 1e-6 for a, b in zip(error_curve, error_curve[1:]))  # HALS descends
    assert error_curve[-1] == pytest.approx(ours.relative_error_, rel=1e-4)


def test_transform_matches_scipy_nnls():
    g = torch.Generator().manual_seed(3)
    model = NMFConcepts(n_components=4, device="cpu").fit(torch.rand(200, 10, generator=g))
    pixels = torch.rand(40, 10, generator=g) * (torch.rand(40, 10, generator=g) < 0.7)
    basis = model.components_.double().numpy()
    expected = np.stack([scipy.optimize.nnls(basis.T, row)[0] for row in pixels.double().numpy()])
    np.testing.assert_allclose(model.transform(pixels).numpy(), expected, atol=1e-4)


def test_same_seed_gives_identical_components():
    pixels = relu_features(n=1500, channels=20)
    for batch_size in (None, 300):
        first = estimator(batch_size=batch_size, n_components=4, seed=7, device="cpu").fit(pixels)
        second = estimator(batch_size=batch_size, n_components=4, seed=7, device="cpu").fit(pixels)
        assert torch.equal(first.components_, second.components_) and first.n_iter_ == second.n_iter_


# ------------------------------------------------------------------------- clamping, input
def test_clamp_records_fraction_and_equals_fitting_clamped_data():
    pixels = torch.randn(800, 12, generator=torch.Generator().manual_seed(0)) + 0.5
    model = NMFConcepts(n_components=3, device="cpu").fit(pixels)
    assert model.clamped_fraction_ == pytest.approx(float((pixels < 0).float().mean()))
    assert torch.equal(model.components_, NMFConcepts(n_components=3, device="cpu").fit(pixels.clamp(min=0)).components_)
    bank = model.to_bank("layer1")
    assert bank.provenance["clamp"] == {"clamp": True, "clamped_fraction": model.clamped_fraction_}


def test_negative_input_without_clamp_is_refused(tmp_path):
    pixels = torch.randn(100, 6)
    with pytest.raises(NMFError, match="clamp=True") as caught:
        NMFConcepts(n_components=2, clamp=False, device="cpu").fit(pixels)
    assert isinstance(caught.value, ConceptLensError)
    entry = activation_entry(tmp_path, torch.randn(5, 6, 4, 4), [str(i) for i in range(5)], name="backbone.fpn:0")
    with pytest.raises(NMFError, match=r"backbone\.fpn:0.*clamp=True"):
        NMFConcepts(n_components=2, clamp=False, device="cpu").fit(entry)
    fitted = NMFConcepts(n_components=2, clamp=False, device="cpu").fit(pixels.abs())
    with pytest.raises(NMFError, match="clamp=True"):
        fitted.transform(pixels)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_components": 0}, r"NMFConcepts\(n_components=0\).*fix: pass n_components as an integer >= 1"),
        ({"solver": "als"}, r"NMFConcepts\(solver='als'\).*fix: pass solver as one of 'hals', 'mu', 'sklearn'"),
        ({"max_iter": 0}, r"NMFConcepts\(max_iter=0\).*fix: pass max_iter"),
        ({"tol": -1.0}, r"NMFConcepts\(tol=-1.0\).*fix: pass tol as a number >= 0"),
        ({"batch_size": 2, "n_components": 3}, r"MiniBatchNMFConcepts\(batch_size=2\).*fix: pass batch_size as an integer ≥ n_components \(3\)"),
        ({"solver": "sklearn", "batch_size": 100}, r"MiniBatchNMFConcepts\(solver='sklearn'\).*fix: pass solver as one of 'hals', 'mu'$"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ParameterError, match=message) as caught:
        estimator(**{"device": "cpu", **settings}).fit(torch.rand(50, 8))
    assert isinstance(caught.value, ConceptLensError) and isinstance(caught.value, ValueError)


def test_bad_input_is_refused():
    with pytest.raises(NMFError, match="not fitted"):
        NMFConcepts().transform(torch.rand(3, 4))
    with pytest.raises(NMFError, match="shape"):
        NMFConcepts(device="cpu").fit(torch.rand(3, 4, 5))
    with pytest.raises(NMFError, match="NaN"):
        NMFConcepts(n_components=1, device="cpu").fit(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(NMFError, match="zero"):
        NMFConcepts(n_components=1, device="cpu").fit(-torch.rand(10, 3))
    model = NMFConcepts(n_components=2, device="cpu").fit(torch.rand(30, 4))
    with pytest.raises(NMFError, match=r"\(N, 4\)"):
        model.transform(torch.rand(3, 5))


# ------------------------------------------------------------------------------- the store
def test_fit_from_store_equals_fit_on_image_pixels(tmp_path):
    g = torch.Generator().manual_seed(1)
    activations = torch.relu(torch.randn(30, 10, 8, 8, generator=g))
    request = {"layer": "layer3", "model_hash": "ab" * 32, "reduce": "native"}
    entry = padded_entry(tmp_path, activations, image_width=48, request=request)
    on_image = activations[:, :, :, :6]  # cell centres (j + 0.5)·8 < 48: the rest is padding
    indices = [3, 4, 10, 17, 29, 22]
    for subset in (None, indices):
        chosen = on_image if subset is None else on_image[sorted(subset)]
        expected = NMFConcepts(n_components=4, device="cpu").fit(chosen.movedim(1, -1).reshape(-1, 10))
        model = NMFConcepts(n_components=4, device="cpu").fit(entry, indices=subset)
        assert torch.equal(model.components_, expected.components_) and model.n_pixels_ == chosen[:, 0].numel()
    assert model.data_["store_key"] == entry.key and model.data_["model_hash"] == "ab" * 32 and model.data_["n_images"] == 6
    online = MiniBatchNMFConcepts(n_components=4, batch_size=256, device="cpu").fit(entry)
    assert online.n_pixels_ == on_image[:, 0].numel()
    assert online.relative_error_ <= 1.02 * NMFConcepts(n_components=4, device="cpu").fit(entry).relative_error_


def test_fidelity_on_held_out_images(tmp_path):
    activations, masks, _ = planted_concept_world()
    act_entry, mask_entry = planted_entries(tmp_path, activations, masks, ["wheel", "door", "window", "sky"])
    train, test = split_indices(mask_entry, "train"), split_indices(mask_entry, "test")
    model = NMFConcepts(n_components=3, device="cpu").fit(act_entry, indices=train)
    held_out = activations[test].movedim(1, -1).reshape(-1, activations.shape[1])
    expected = float((held_out - model.inverse_transform(model.transform(held_out))).norm() / held_out.norm())
    assert model.fidelity(act_entry, test) == pytest.approx(expected, rel=1e-4)
    assert model.fidelity_ < 0.05  # three planted concepts explain the layer
    too_few = NMFConcepts(n_components=1, device="cpu").fit(act_entry, indices=train)
    assert too_few.fidelity(act_entry, test) > 5 * model.fidelity_


class _Head(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 3, 3, padding=1)
        self.out = nn.Linear(3, 1)

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(activations)).mean(dim=(2, 3)))[:, 0]


def test_output_fidelity_is_zero_for_identity_components():
    torch.manual_seed(0)
    activations = torch.relu(torch.randn(6, 5, 4, 4))
    model = NMFConcepts(n_components=5, device="cpu").fit(activations.movedim(1, -1).reshape(-1, 5))
    model.components_ = torch.eye(5)  # k = C, identity NCAVs: the reconstruction is exact
    assert torch.equal(model.reconstruct(activations), activations)
    # zero up to the head's float rounding (the rebuilt tensor's memory layout may differ)
    assert model.output_fidelity([activations[:3], activations[3:]], _Head(5).eval()) == pytest.approx(0.0, abs=1e-6)


def test_output_fidelity_hand_computed():
    model = NMFConcepts(n_components=1, device="cpu").fit(torch.rand(20, 2))
    model.components_ = torch.tensor([[1.0, 0.0]])  # keeps channel 0, drops channel 1
    activations = torch.rand(4, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    head = lambda a: a[:, 1].sum(dim=(1, 2))  # noqa: E731  (y depends on channel 1 only)
    outputs = activations[:, 1].sum(dim=(1, 2)).double()
    expected = float(outputs.abs().mean() / (outputs.mean().abs() + 1e-4))
    assert model.output_fidelity(iter([activations]), head) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(NMFError, match="one scalar per image"):
        model.output_fidelity([activations], lambda a: a.mean(dim=(2, 3)))


# ------------------------------------------------------------------------ labels and bank
@pytest.fixture
def labelled(tmp_path):
    activations, masks, directions = planted_concept_world()
    concepts = ["wheel", "door", "window", "sky"]
    act_entry, mask_entry = planted_entries(tmp_path, activations, masks, concepts)
    train, test = split_indices(mask_entry, "train"), split_indices(mask_entry, "test")
    model = NMFConcepts(n_components=3, device="cpu").fit(act_entry, indices=train)
    labels = model.label(act_entry, mask_entry, test)
    return model, labels, directions, act_entry, mask_entry, test


def test_label_recovers_the_planted_concept_of_each_ncav(labelled):
    model, labels, directions, *_ = labelled
    assert sorted(label["concept"] for label in labels.values()) == ["door", "wheel", "window"]
    for index, label in labels.items():
        assert label["set_iou"] > 0.8 and label["all"]["sky"] < 0.3
        assert set(label["all"]) == {"wheel", "door", "window", "sky"}
        planted = directions[["wheel", "door", "window"].index(label["concept"])]
        assert torch.cosine_similarity(model.components_[index], planted, dim=0) > 0.95


def test_label_counts_only_valid_pairs(tmp_path):
    activations, masks, _ = planted_concept_world(n=20)
    valid = torch.ones(20, 4, dtype=torch.uint8)
    valid[:, 0] = 0  # no image may count for 'wheel'
    act_entry, mask_entry = planted_entries(tmp_path, activations, masks, ["wheel", "door", "window", "sky"], valid=valid)
    labels = NMFConcepts(n_components=3, device="cpu").fit(act_entry).label(act_entry, mask_entry)
    assert all(label["all"]["wheel"] is None for label in labels.values())  # no pair counts: undefined
    assert {"door", "window"} <= {label["concept"] for label in labels.values()}


def test_bank_round_trip_keeps_maps_metrics_and_provenance(labelled, tmp_path):
    model, labels, _, act_entry, _, test = labelled
    model.fidelity(act_entry, test)
    bank = model.to_bank("layer3", labels, provenance={"split": "train"})
    loaded = ConceptBank.load(bank.save(tmp_path / "ncavs"), expected_channels=12)
    assert loaded.method == "nmf" and loaded.concepts == ["ncav_0", "ncav_1", "ncav_2"]
    assert torch.equal(loaded.biases, torch.zeros(3)) and torch.equal(loaded.vectors, model.components_)
    for batch in iter_batches(act_entry, indices=test, batch_size=8):
        assert torch.equal(loaded.concept_maps(batch.activations), model.concept_maps(batch.activations))
    metrics = loaded.metrics["ncav_0"]
    assert metrics["matched_concept"] == labels[0]["concept"] and metrics["set_iou"] == labels[0]["set_iou"]
    assert metrics["fidelity"] == model.fidelity_ and metrics["relative_error"] == model.relative_error_
    provenance = loaded.provenance
    assert provenance["store_key"] == act_entry.key and provenance["split"] == "train" and provenance["seed"] == 0
    assert provenance["nmf"]["solver"] == "hals" and provenance["nmf"]["n_components"] == 3
    assert {"torch", "scikit-learn", "numpy"} <= set(provenance["versions"])


def test_bank_records_the_model_hash(tmp_path):
    activations = torch.relu(torch.randn(8, 6, 8, 8, generator=torch.Generator().manual_seed(0)))
    entry = padded_entry(tmp_path, activations, 64, {"layer": "features.4", "model_hash": "cd" * 32})
    model = NMFConcepts(n_components=2, device="cpu").fit(entry)
    path = model.to_bank("features.4").save(tmp_path / "bank")
    assert ConceptBank.load(path, model_hash="cd" * 32).provenance["model_hash"] == "cd" * 32


def test_indices_outside_the_entry_are_refused(tmp_path):
    entry = activation_entry(tmp_path, torch.rand(6, 4, 3, 3), [str(i) for i in range(6)])
    with pytest.raises(NMFError, match="holds 6 items"):
        NMFConcepts(n_components=2, device="cpu").fit(entry, indices=[0, 6])


def test_more_components_than_channels_is_refused():
    pixels = torch.rand(50, 4)
    with pytest.raises(NMFError, match=r"4 channels, fewer than n_components=8.*n_components ≤ 4"):
        NMFConcepts(n_components=8, device="cpu").fit(pixels)

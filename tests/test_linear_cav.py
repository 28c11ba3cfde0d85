"""Image-level CAVs (TCAV): planted directions, backend agreement, batching, CAV sets, errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from conceptlens.concepts.store.activations import ActivationStore
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.probes.linear import CAVError, CAVSet, LinearCAV, pooled_activations, train_cavs, train_layer_cavs
from conceptlens.probes.linear_solvers import newton
from conceptlens.probes.params import ParameterError
from tests.planted import activation_entry

CHANNELS = 32
CLASSIFIERS = ["logistic", "svm"]
SOLVERS = ["torch", "sklearn"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def unit_direction(seed: int = 123, channels: int = CHANNELS) -> torch.Tensor:
    direction = torch.randn(channels, generator=torch.Generator().manual_seed(seed))
    return direction / direction.norm()


def planted_sets(
    direction: torch.Tensor, n: int, strength: float, seed: int = 0, distractor: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept = noise + distractors + strength·w*, random = noise + distractors.

    The distractors vary strongly (std ``distractor``) along four directions orthogonal to w* in
    both sets, so that a learner following variance instead of the class difference fails.
    """
    generator = torch.Generator().manual_seed(seed)
    channels = direction.numel()
    basis = torch.linalg.qr(torch.cat([direction[:, None], torch.randn(channels, 4, generator=generator)], 1))[0][:, 1:]

    def sample() -> torch.Tensor:
        return torch.randn(n, channels, generator=generator) + distractor * torch.randn(n, 4, generator=generator) @ basis.T

    return sample() + strength * direction, sample()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def random_sets(n_sets: int, n: int = 20, shape: tuple[int, ...] = (CHANNELS,), seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"random_{i}": torch.randn(n, *shape, generator=generator) for i in range(n_sets)}


# ------------------------------------------------------------------------------ one CAV
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_recovers_planted_direction_and_points_to_the_concept(classifier, solver):
    direction = unit_direction()
    concept, random = planted_sets(direction, n=800, strength=3.0)
    cav = LinearCAV(classifier=classifier, solver=solver).fit_sets(concept, random)
    assert cav.vector_.shape == (CHANNELS,) and cav.n_features_in_ == CHANNELS
    assert abs(float(cav.vector_.norm()) - 1) < 1e-12
    assert cosine(cav.vector_, direction) >= 0.95
    assert cav.accuracy_ >= 0.9
    assert cav.converged_
    swapped = LinearCAV(classifier=classifier, solver=solver).fit_sets(random, concept)
    assert cosine(swapped.vector_, direction) <= -0.95
    # bias_ makes vector_·a + bias_ the signed distance: positive on the concept side
    distance = concept @ cav.vector_.float() + cav.bias_
    assert (distance > 0).float().mean() > 0.9
    assert torch.equal(cav.predict(concept), (cav.decision_function(concept) > 0).long())


@pytest.mark.parametrize("features", ["pooled", "flattened"])
@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_torch_and_sklearn_backends_agree_on_overlapping_data(classifier, features):
    if features == "pooled":  # D < n: the Newton system in feature space
        concept, random = planted_sets(unit_direction(), n=90, strength=0.7, seed=3)
    else:  # (N, C, h, w) maps, D = 128 > n: the Newton system in the span of the rows
        concept, random = planted_sets(unit_direction(channels=128), n=40, strength=0.7, seed=3)
        concept, random = concept.reshape(-1, 8, 4, 4), random.reshape(-1, 8, 4, 4)
    fits = {solver: LinearCAV(classifier=classifier, solver=solver).fit_sets(concept, random) for solver in SOLVERS}
    assert fits["torch"].accuracy_ < 0.95  # overlapping classes: the boundary is not trivial
    assert cosine(fits["torch"].vector_, fits["sklearn"].vector_) >= 0.99
    assert abs(fits["torch"].bias_ - fits["sklearn"].bias_) < 0.05
    assert fits["torch"].feature_shape_ == tuple(concept.shape[1:])


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_standardized_fit_is_reported_in_raw_space_and_backends_agree(classifier):
    concept, random = planted_sets(unit_direction(), n=90, strength=1.0, seed=4)
    scales = torch.logspace(-1, 1, CHANNELS)
    concept, random = concept * scales, random * scales
    fits = {solver: LinearCAV(classifier=classifier, solver=solver, standardize=True).fit_sets(concept, random) for solver in SOLVERS}
    assert cosine(fits["torch"].vector_, fits["sklearn"].vector_) >= 0.99
    logits = fits["torch"].decision_function(concept)
    expected = concept.double() @ fits["torch"].coef_ + fits["torch"].intercept_
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_fit_many_equals_solving_each_problem_alone(classifier):
    generator = torch.Generator().manual_seed(5)
    sizes = [(10, 14, CHANNELS), (25, 30, CHANNELS), (60, 45, CHANNELS), (20, 18, 128), (12, 30, 128)]
    problems = [(torch.randn(a, d, generator=generator) + 0.5, torch.randn(b, d, generator=generator)) for a, b, d in sizes]
    seeds = [0, 1, 2, 3, 4]
    batched = LinearCAV(classifier=classifier).fit_many(problems, seeds=seeds)
    for (concept, random), seed, result in zip(problems, seeds, batched):
        alone = LinearCAV(classifier=classifier, seed=seed).fit_sets(concept, random)
        assert cosine(result.vector, alone.vector_) >= 1 - 1e-6
        assert abs(result.bias - alone.bias_) < 1e-5
        assert result.accuracy == alone.accuracy_
        assert result.n_train + result.n_test == len(concept) + len(random)


@pytest.mark.parametrize("loss", ["logistic", "squared_hinge"])
def test_newton_in_feature_space_and_in_row_span_agree(loss):
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(3, 30, 40, generator=generator, dtype=torch.float64)
    labels = torch.where(torch.arange(30) < 14, 1.0, -1.0).double().expand(3, 30).clone()
    features[:, :14] += 0.3
    weights = torch.full((3, 30), 1 / 30, dtype=torch.float64)
    weights[2, 25:] = 0  # a padded problem
    features[2, 25:] = 0
    weights[2, :25] = 1 / 25
    primal = newton(features, labels, weights, loss, 1e-2, 100, 1e-10, space="primal")
    kernel = newton(features, labels, weights, loss, 1e-2, 100, 1e-10, space="kernel")
    assert primal.converged.all() and kernel.converged.all()
    torch.testing.assert_close(primal.weights, kernel.weights, atol=1e-8, rtol=0)
    torch.testing.assert_close(primal.bias, kernel.bias, atol=1e-8, rtol=0)


def test_same_seed_is_identical_and_the_seed_sets_the_split():
    concept, random = planted_sets(unit_direction(), n=60, strength=1.0, seed=7)
    first, second = (LinearCAV(seed=0).fit_sets(concept, random) for _ in range(2))
    assert torch.equal(first.vector_, second.vector_) and first.bias_ == second.bias_ and first.accuracy_ == second.accuracy_
    other = LinearCAV(seed=1).fit_sets(concept, random)
    assert not torch.equal(first.vector_, other.vector_)


@pytest.mark.parametrize("device", DEVICES)
def test_device_runs_and_matches_cpu(device):
    concept, random = planted_sets(unit_direction(), n=60, strength=1.0, seed=8)
    on_device = LinearCAV(device=device).fit_sets(concept.to(device), random.to(device))
    on_cpu = LinearCAV(device="cpu").fit_sets(concept, random)
    assert on_device.vector_.device.type == "cpu"
    assert cosine(on_device.vector_, on_cpu.vector_) >= 1 - 1e-9


def test_unconverged_solver_warns():
    concept, random = planted_sets(unit_direction(), n=60, strength=1.0, seed=9)
    with pytest.warns(ConvergenceWarning, match="did not reach tol"):
        cav = LinearCAV(max_iter=1, tol=1e-12).fit_sets(concept, random)
    assert not cav.converged_


def test_sklearn_conventions():
    cav = LinearCAV(classifier="svm", regularization=0.1)
    assert cav.get_params()["regularization"] == 0.1
    assert cav.set_params(seed=3).seed == 3
    with pytest.raises(CAVError, match="not fitted"):
        cav.decision_function(torch.zeros(2, 4))


# ------------------------------------------------------------------------------ CAV sets
def test_train_cavs_runs_pairs_and_shapes():
    direction = unit_direction()
    concepts = {"striped": planted_sets(direction, 30, 2.0, seed=10)[0], "dotted": planted_sets(-direction, 30, 2.0, seed=11)[0]}
    randoms = random_sets(4, n=30)
    cav_set = train_cavs(concepts, randoms, n_runs=3, layer="layer3")
    assert cav_set.concepts == ["striped", "dotted"] and cav_set.random_sets == ["random_0", "random_1", "random_2"]
    assert cav_set.vectors.shape == (2, 3, CHANNELS) and cav_set.biases.shape == (2, 3) and cav_set.accuracies.shape == (2, 3)
    assert cav_set.random_pairs == [("random_0", "random_1"), ("random_1", "random_2"), ("random_2", "random_0")]
    assert cav_set.random_vectors.shape == (3, CHANNELS)
    torch.testing.assert_close(cav_set.vectors.norm(dim=2), torch.ones(2, 3))
    assert cav_set.runs("striped").accuracies.mean() > cav_set.random_runs().accuracies.mean()
    assert cosine(cav_set.runs("striped").vectors.mean(0), direction) > 0.8
    assert train_cavs(concepts, randoms).n_runs == 4


def test_train_cavs_run_r_is_a_fit_against_random_set_r_with_seed_plus_r():
    concepts = {"striped": planted_sets(unit_direction(), 24, 1.5, seed=12)[0]}
    randoms = random_sets(3, n=24)
    cav_set = train_cavs(concepts, randoms, classifier="svm", seed=5)
    for r, name in enumerate(randoms):
        alone = LinearCAV(classifier="svm", seed=5 + r).fit_sets(concepts["striped"], randoms[name])
        assert cosine(cav_set.vectors[0, r], alone.vector_) >= 1 - 1e-6
    null = LinearCAV(classifier="svm", seed=5 + 2).fit_sets(randoms["random_2"], randoms["random_0"])
    assert cosine(cav_set.random_vectors[2], null.vector_) >= 1 - 1e-6
    assert cav_set.settings["classifier"] == "svm" and cav_set.settings["seed"] == 5


def test_one_random_set_gives_no_null_cavs_and_maps_are_flattened():
    shape = (4, 3, 3)
    concepts = {"striped": torch.randn(12, *shape) + 1}
    cav_set = train_cavs(concepts, random_sets(1, n=12, shape=shape), layer="x")
    assert cav_set.vectors.shape == (1, 1, 36) and cav_set.random_vectors.shape == (0, 36)
    assert cav_set.feature_shape == [4, 3, 3]
    assert cav_set.to_bank().provenance["features"] == "flattened"


def test_train_layer_cavs_solves_layers_together_like_one_at_a_time():
    layers = {
        "layer2": ({"striped": torch.randn(20, 16) + 0.7}, random_sets(3, n=20, shape=(16,))),
        "layer3": ({"striped": torch.randn(20, 40) + 0.7}, random_sets(3, n=20, shape=(40,), seed=2)),
    }
    together = train_layer_cavs(layers, n_runs=2)
    for layer, (concepts, randoms) in layers.items():
        alone = train_cavs(concepts, randoms, n_runs=2, layer=layer)
        assert together[layer].layer == layer
        assert torch.allclose(together[layer].vectors, alone.vectors, atol=1e-6)
        assert torch.allclose(together[layer].random_vectors, alone.random_vectors, atol=1e-6)


def test_cav_set_save_load_round_trip_is_exact(tmp_path):
    cav_set = train_cavs(
        {"striped": torch.randn(15, CHANNELS) + 1, "dotted": torch.randn(15, CHANNELS) - 1},
        random_sets(3, n=15),
        layer="layer4",
        provenance={"model_hash": "abc123", "store_keys": ["k1", "k2"]},
    )
    json_path = cav_set.save(tmp_path / "cavs")
    loaded = CAVSet.load(json_path)
    for name in ("vectors", "biases", "accuracies", "random_vectors", "random_biases", "random_accuracies"):
        assert torch.equal(getattr(loaded, name), getattr(cav_set, name))
    assert loaded.concepts == cav_set.concepts and loaded.random_sets == cav_set.random_sets
    assert loaded.random_pairs == cav_set.random_pairs and loaded.layer == "layer4"
    assert loaded.settings == cav_set.settings and loaded.provenance == cav_set.provenance
    assert loaded.feature_shape == cav_set.feature_shape
    assert CAVSet.load(tmp_path / "cavs.safetensors").concepts == cav_set.concepts

    (tmp_path / "cavs.safetensors").write_bytes((tmp_path / "cavs.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CAVError, match="checksum"):
        CAVSet.load(json_path)
    bank_json = ConceptBank("linear", "l", ["a"], torch.ones(1, 3), torch.zeros(1)).save(tmp_path / "bank")
    with pytest.raises(CAVError, match="holds a concept bank, not a linear-cav-set"):
        CAVSet.load(bank_json)


def test_to_bank_gives_mean_direction_cavs_usable_with_logits(tmp_path):
    direction = unit_direction()
    concept, _ = planted_sets(direction, 40, 4.0, seed=13)
    randoms = {name: planted_sets(direction, 40, 4.0, seed=20 + i)[1] for i, name in enumerate(["random_0", "random_1", "random_2"])}
    cav_set = train_cavs({"striped": concept}, randoms, layer="layer3")
    bank = cav_set.to_bank(provenance={"model_hash": "abc"})
    assert bank.method == "linear" and bank.layer == "layer3" and bank.concepts == ["striped"]
    assert abs(float(bank.vectors.norm()) - 1) < 1e-6
    mean = cav_set.vectors[0].double().mean(0)
    assert cosine(bank.vectors[0], mean) > 1 - 1e-6
    metrics = bank.metrics["striped"]
    assert metrics["n_runs"] == 3 and 0 < metrics["direction_consistency"] <= 1
    assert metrics["accuracy_mean"] == pytest.approx(float(cav_set.accuracies.double().mean()))
    assert bank.provenance["model_hash"] == "abc" and bank.provenance["random_sets"] == list(randoms)
    logits = bank.logits(torch.cat([concept, randoms["random_0"]]))
    assert logits.shape == (80, 1)
    correct = torch.cat([logits[:40] > 0, logits[40:] < 0]).float().mean()
    assert correct > 0.85 and logits[:40].mean() > logits[40:].mean()
    assert ConceptBank.load(bank.save(tmp_path / "bank")).vectors.shape == (1, CHANNELS)


# ----------------------------------------------------------------------- store activations
def _entry_with_shards(root, maps: list[torch.Tensor], geometry: list[int], reduce: str = "native"):
    entry = ActivationStore(root).entry({"test": "maps", "sizes": [list(m.shape) for m in maps], "reduce": reduce})
    start = 0
    for activations in maps:
        end = start + len(activations)
        entry.write_shard(start, end, {"activations": activations, "geometry": torch.tensor([geometry] * len(activations))})
        start = end
    entry.finalize({"request": {"reduce": reduce}, "dataset": {"name": "maps", "ids": [str(i) for i in range(start)]}}, start)
    return entry


def test_pooled_activations_pools_maps_flattens_and_passes_pooled_rows(tmp_path):
    maps = torch.randn(10, 6, 4, 5)
    entry = activation_entry(tmp_path, maps, [str(i) for i in range(10)], shard_size=4)
    torch.testing.assert_close(pooled_activations(entry), maps.mean(dim=(2, 3)))
    torch.testing.assert_close(pooled_activations(entry, flatten=True), maps.flatten(1))
    rows = torch.randn(7, 6)
    pooled_entry = activation_entry(tmp_path, rows, [str(i) for i in range(7)], name="pooled")
    torch.testing.assert_close(pooled_activations(pooled_entry, flatten=True), rows)


def test_pooled_activations_excludes_padding(tmp_path):
    maps = torch.randn(3, 2, 4, 4)
    # the image covers the top half of a 32×32 canvas: only feature rows 0 and 1 lie on it
    entry = _entry_with_shards(tmp_path, [maps], [16, 32, 16, 32, 0, 0, 32, 32])
    torch.testing.assert_close(pooled_activations(entry), maps[:, :, :2].mean(dim=(2, 3)))


def test_pooled_activations_rejects_flattening_maps_of_different_sizes(tmp_path):
    entry = _entry_with_shards(tmp_path, [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 5, 4)], [32, 32, 32, 32, 0, 0, 32, 32])
    assert pooled_activations(entry).shape == (4, 3)
    with pytest.raises(CAVError, match="different sizes") as info:
        pooled_activations(entry, flatten=True)
    assert info.value.culprit == str(entry.path) and "reduce='grid'" in info.value.fix


# ------------------------------------------------------------------------------ errors
def test_errors_name_the_culprit_and_the_fix():
    good = torch.randn(10, CHANNELS)
    with pytest.raises(CAVError, match="empty") as info:
        LinearCAV().fit_sets(torch.zeros(0, CHANNELS), good)
    assert info.value.culprit == "concept activations" and info.value.fix
    with pytest.raises(CAVError, match="at least 2 per class"):
        LinearCAV().fit_sets(good, torch.randn(1, CHANNELS))
    with pytest.raises(CAVError, match="constant"):
        LinearCAV().fit_sets(torch.ones(10, CHANNELS), good)
    with pytest.raises(CAVError, match="NaN"):
        LinearCAV().fit_sets(good, torch.full((10, CHANNELS), float("nan")))
    with pytest.raises(CAVError, match=f"{CHANNELS} and 16 features") as info:
        LinearCAV().fit_sets(good, torch.randn(10, 16))
    assert "concept activations" in info.value.culprit and "random activations" in info.value.culprit
    with pytest.raises(ParameterError, match="one of 'logistic', 'svm'") as info:
        LinearCAV(classifier="tree").fit_sets(good, good + 1)
    assert info.value.culprit == "LinearCAV(classifier='tree')" and "'logistic', 'svm'" in info.value.fix
    with pytest.raises(ParameterError, match="one of 'torch', 'sklearn'") as info:
        LinearCAV(solver="adam").fit_sets(good, good + 1)
    assert info.value.culprit == "LinearCAV(solver='adam')" and "'torch', 'sklearn'" in info.value.fix
    with pytest.raises(ParameterError, match="> 0") as info:
        LinearCAV(regularization=0).fit_sets(good, good + 1)
    assert info.value.culprit == "LinearCAV(regularization=0)" and "regularization" in info.value.fix
    with pytest.raises(CAVError, match="one seed per problem"):
        LinearCAV().fit_many([(good, good + 1)], seeds=[1, 2])


def test_train_cavs_errors_name_the_sets():
    concepts = {"striped": torch.randn(10, CHANNELS)}
    randoms = random_sets(2, n=10)
    with pytest.raises(CAVError, match="between 1 and the 2 random sets"):
        train_cavs(concepts, randoms, n_runs=3)
    with pytest.raises(CAVError, match="no random sets"):
        train_cavs(concepts, {})
    with pytest.raises(CAVError, match="no concept sets"):
        train_cavs({}, randoms)
    with pytest.raises(CAVError, match="both as a concept and a random set"):
        train_cavs({"random_0": torch.randn(10, CHANNELS)}, randoms)
    with pytest.raises(CAVError) as info:
        train_cavs(concepts, {**randoms, "random_1": torch.randn(10, 16)}, layer="layer3")
    assert "'striped'" in info.value.culprit and "'random_1'" in info.value.culprit and "layer3" in info.value.culprit
    with pytest.raises(CAVError, match="empty") as info:
        train_cavs({"striped": torch.zeros(0, CHANNELS)}, randoms)
    assert "striped" in info.value.culprit
    with pytest.raises(CAVError, match="constant") as info:
        train_cavs(concepts, {**randoms, "random_1": torch.zeros(10, CHANNELS)})
    assert "random_1" in info.value.culprit


def test_cav_set_json_is_plain_json(tmp_path):
    cav_set = train_cavs({"striped": torch.randn(8, 5) + 1}, random_sets(2, n=8, shape=(5,)), layer="l")
    metadata = json.loads(cav_set.save(tmp_path / "s").read_text())
    assert metadata["kind"] == "linear-cav-set" and metadata["random_pairs"] == [["random_0", "random_1"], ["random_1", "random_0"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CAVSet.load(tmp_path / "s")

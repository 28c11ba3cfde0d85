"""Similarity nulls: permutation overlaps, chance correction, p-values, bootstrap CIs, Holm.

Calibration on the synthetic world: its grid masks compared with the same masks shuffled across
images (concepts that mean nothing) score well above 0 in raw set IoU (sky, ground and water sit
in the same places on every image), yet their chance-corrected score averages 0 and their
p-values are uniform; planted correspondence gets the smallest p-value.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from conceptlens.concepts.compare.nulls import (
    SimilarityNull,
    bootstrap_counts,
    holm,
    paired_overlaps,
    percentile_interval,
    random_permutations,
)
from conceptlens.concepts.compare.similarity import LayerMaps, supervised_similarity, unsupervised_similarity
from conceptlens.concepts.compare.workflow import add_similarity_statistics
from conceptlens.concepts.data.synthetic import SyntheticWorld
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.store.activations import ActivationStore, EntryReader

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD_CONCEPTS = ["car", "house", "tree", "sky", "ground", "water", "wheel"]


def map_entry(root, maps: torch.Tensor, tag: str):
    """A complete concept-map entry holding ``maps`` (n, K, Gh, Gw) in one shard."""
    n = maps.shape[0]
    entry = ActivationStore(root).entry({"maps": tag, "shape": list(maps.shape)})
    entry.write_shard(0, n, {"maps": maps.half()})
    entry.finalize({"request": {"grid": list(maps.shape[-2:])}, "dataset": {"ids": [f"{i:06d}" for i in range(n)]}}, n)
    return entry


def layer(root, name, maps, concepts, model="A"):
    return LayerMaps(model, name, list(concepts), map_entry(root, maps, tag=f"{model}:{name}"), {c: 0.5 for c in concepts})


@pytest.fixture(scope="module")
def world_masks(tmp_path_factory):
    """The synthetic world's masks of 40 scenes on a 12 × 12 grid, (40, 7, 12, 12) in {0, 1}."""
    world = SyntheticWorld(n_images=40, seed=3).select_concepts(WORLD_CONCEPTS)
    entry = embed_masks(world, ActivationStore(tmp_path_factory.mktemp("world")), grid=(12, 12), progress=False)
    return EntryReader(entry).rows(range(40))["masks"].float()


def test_paired_overlaps_match_brute_force():
    g = torch.Generator().manual_seed(0)
    binary = (torch.rand(2, 3, 7, 5, generator=g) > 0.5).float()  # 2 groups, 3 channels, 7 images, 5 cells
    permutations = random_permutations(7, 4, seed=1)
    result = paired_overlaps(lambda rows: binary[:, :, rows.start : rows.stop], 7, permutations, batch_size=3)
    b = binary.numpy()
    expected_items = np.einsum("gxtc,gytc->tgxy", b, b)
    np.testing.assert_array_equal(result.per_item, expected_items)
    np.testing.assert_array_equal(result.observed, expected_items.sum(axis=0))
    np.testing.assert_array_equal(result.sizes, b.sum(axis=-1).transpose(2, 0, 1))
    for p, perm in enumerate(permutations):
        np.testing.assert_array_equal(result.permuted[p], np.einsum("gxtc,gytc->gxy", b, b[:, :, perm]))
    assert sorted(permutations[0]) == list(range(7)) and not np.array_equal(permutations[0], permutations[1])


def test_null_statistics_by_hand():
    score = np.array([[1.0, 0.5], [0.5, np.nan]])
    null = np.array([[[1.0, 0.2], [0.2, np.nan]], [[1.0, 0.4], [0.4, np.nan]], [[1.0, 0.6], [0.6, np.nan]], [[1.0, 0.5], [0.5, np.nan]]])
    stats = SimilarityNull(score, null, None)
    assert stats.null_mean()[0, 1] == pytest.approx(0.425)
    assert stats.corrected()[0, 1] == pytest.approx((0.5 - 0.425) / (1 - 0.425))
    assert stats.p_value()[0, 1] == pytest.approx((1 + 2) / 5)  # 0.6 and the tie 0.5 count against
    assert stats.p_value()[0, 0] == pytest.approx(1.0) and np.isnan(stats.corrected()[0, 0])  # null mean 1: no room above chance
    assert np.isnan(stats.p_value()[1, 1]) and np.isnan(stats.null_mean()[1, 1])
    draws = np.arange(1.0, 101.0)[:, None]
    low, high = percentile_interval(draws, 0.9)
    assert low[0] == pytest.approx(np.percentile(draws, 5)) and high[0] == pytest.approx(np.percentile(draws, 95))


def test_holm_by_hand():
    # five tested (NaN is not): sorted 0.001, 0.01, 0.012, 0.04, 0.5 against 0.05/5, /4, /3, /2, /1:
    # 0.001 <= 0.01, 0.01 <= 0.0125, 0.012 <= 0.0167, then 0.04 > 0.025 stops
    p = np.array([[0.012, 0.001], [np.nan, 0.04], [0.01, 0.5]])
    np.testing.assert_array_equal(holm(p, 0.05), [[True, True], [False, False], [True, False]])
    # a step-down stops at the first failure: 0.03 > 0.05/2 keeps 0.04 <= 0.05/1 from being rejected
    np.testing.assert_array_equal(holm(np.array([0.001, 0.03, 0.04]), 0.05), [True, False, False])


def test_null_and_bootstrap_equal_recomputation_on_permuted_and_resampled_images(tmp_path, world_masks):
    g = torch.Generator().manual_seed(2)
    noisy = torch.where(torch.rand(world_masks.shape, generator=g) < 0.1, 1 - world_masks, world_masks)
    a, b = layer(tmp_path, "a", world_masks, WORLD_CONCEPTS), layer(tmp_path, "b", noisy, WORLD_CONCEPTS, model="B")
    result = supervised_similarity([a, b], n_permutations=5, n_bootstrap=3, seed=4)
    stats = result.uncertainty
    np.testing.assert_array_equal(stats.score, result.matrix)
    for p, perm in enumerate(random_permutations(40, 5, seed=4)):  # B's image π(t) paired with A's image t
        shuffled = layer(tmp_path, f"perm{p}", noisy[torch.from_numpy(perm)], WORLD_CONCEPTS, model="B")
        assert stats.null[p, 0, 1] == pytest.approx(supervised_similarity([a, shuffled]).matrix[0, 1], abs=1e-12)
        assert stats.null[p, 1, 0] == stats.null[p, 0, 1]
    for r, counts in enumerate(bootstrap_counts(40, 3, seed=4)):
        items = torch.from_numpy(np.repeat(np.arange(40), counts.astype(int)))
        resampled = supervised_similarity([layer(tmp_path, f"ra{r}", world_masks[items], WORLD_CONCEPTS), layer(tmp_path, f"rb{r}", noisy[items], WORLD_CONCEPTS, model="B")])
        np.testing.assert_allclose(stats.bootstrap[r], resampled.matrix, atol=1e-12)


def test_shuffled_masks_give_corrected_zero_and_uniform_p_values(tmp_path, world_masks):
    corrected, p_values, raw = [], [], []
    masks = layer(tmp_path, "masks", world_masks, WORLD_CONCEPTS)
    for seed in range(60):
        order = torch.from_numpy(np.random.default_rng(100 + seed).permutation(40))
        shuffled = layer(tmp_path, f"shuffled{seed}", world_masks[order], WORLD_CONCEPTS, model="B")
        stats = supervised_similarity([masks, shuffled], n_permutations=99, seed=seed).uncertainty
        raw.append(stats.score[0, 1])
        corrected.append(stats.corrected()[0, 1])
        p_values.append(stats.p_value()[0, 1])
    assert np.mean(raw) > 0.15  # the floor the raw score has on meaningless concepts
    assert abs(np.mean(corrected)) < 0.05, np.mean(corrected)
    assert kstest(p_values, "uniform").pvalue > 0.05
    assert 0.02 < np.mean(np.array(p_values) <= 0.1) < 0.25


def test_planted_correspondence_has_small_p_and_is_significant(tmp_path, world_masks):
    g = torch.Generator().manual_seed(5)
    noisy = torch.where(torch.rand(world_masks.shape, generator=g) < 0.05, 1 - world_masks, world_masks)
    order = torch.from_numpy(np.random.default_rng(0).permutation(40))
    layers = [
        layer(tmp_path, "m", world_masks, WORLD_CONCEPTS),
        layer(tmp_path, "noisy", noisy, WORLD_CONCEPTS, model="B"),
        layer(tmp_path, "shuf", world_masks[order], WORLD_CONCEPTS, model="B"),
    ]
    stats = supervised_similarity(layers, n_permutations=199, n_bootstrap=50, seed=0).uncertainty
    assert stats.p_value()[0, 1] == pytest.approx(1 / 200)
    assert stats.corrected()[0, 1] > 0.3 and abs(stats.corrected()[0, 2]) < 0.1  # 5 % flips hurt the rare concepts
    low, high = stats.interval()
    assert low[0, 1] <= stats.score[0, 1] <= high[0, 1] and high[0, 1] - low[0, 1] < 0.2
    block: dict = {"ridge": {}}
    add_similarity_statistics(block, stats, slice(0, 1), slice(1, 3), False, [0.0, 0.0, 1.0], 0.05)
    assert block["significant"] == [[True, False]]
    assert block["p_value"][0][0] == pytest.approx(0.005)


def test_channel_permuted_copy_scores_corrected_one(tmp_path, world_masks):
    copy = layer(tmp_path, "copy", world_masks[:, [3, 1, 0, 2, 6, 5, 4]], [WORLD_CONCEPTS[i] for i in (3, 1, 0, 2, 6, 5, 4)], model="B")
    stats = supervised_similarity([layer(tmp_path, "orig", world_masks, WORLD_CONCEPTS), copy], n_permutations=99, n_bootstrap=20).uncertainty
    assert stats.corrected()[0, 1] == pytest.approx(1.0)
    assert stats.p_value()[0, 1] == pytest.approx(0.01)
    assert stats.null_mean()[0, 1] == pytest.approx(stats.null_mean()[0, 0])  # the same maps: the same null


def test_unsupervised_null(tmp_path):
    rng = torch.Generator().manual_seed(1)
    maps = torch.rand(30, 3, 6, 6, generator=rng) ** 4 + torch.linspace(0, 0.6, 6).view(1, 1, 1, 6)  # a spatial prior
    scaled_permuted = maps[:, [2, 0, 1]] * torch.tensor([3.0, 0.5, 7.0]).view(1, 3, 1, 1)
    base = layer(tmp_path, "n1", maps, ("n0", "n1", "n2"))
    result = unsupervised_similarity([base, layer(tmp_path, "n2", scaled_permuted, ("m0", "m1", "m2"), model="B")], n_permutations=99, n_bootstrap=20, seed=3)
    stats = result.uncertainty
    assert stats.corrected()[0, 1] == pytest.approx(1.0, abs=5e-3) and stats.p_value()[0, 1] == pytest.approx(0.01)
    assert 0.1 < stats.null_mean()[0, 1] < 0.9  # the prior makes unrelated NCAVs overlap
    for p, perm in enumerate(random_permutations(30, 3, seed=3)):  # the null is the score of a permuted copy
        shuffled = layer(tmp_path, f"p{p}", scaled_permuted[torch.from_numpy(perm)], ("m0", "m1", "m2"), model="B")
        assert stats.null[p, 0, 1] == pytest.approx(unsupervised_similarity([base, shuffled]).best_match[0, 1], abs=1e-12)
    corrected = []
    for seed in range(12):
        order = torch.from_numpy(np.random.default_rng(seed).permutation(30))
        shuffled = layer(tmp_path, f"s{seed}", scaled_permuted[order], ("m0", "m1", "m2"), model="B")
        corrected.append(unsupervised_similarity([base, shuffled], n_permutations=99, seed=seed).uncertainty.corrected()[0, 1])
    assert abs(np.mean(corrected)) < 0.05, corrected


def test_controls_off_leave_results_unchanged(tmp_path, world_masks):
    layers = [layer(tmp_path, "a", world_masks, WORLD_CONCEPTS), layer(tmp_path, "b", world_masks.flip(-1), WORLD_CONCEPTS, model="B")]
    plain, with_null = supervised_similarity(layers), supervised_similarity(layers, n_permutations=9, n_bootstrap=5)
    assert plain.uncertainty is None
    off, on = plain.to_dict(), with_null.to_dict()
    assert set(on) - set(off) == {"null_mean", "corrected", "p_value", "ci_low", "ci_high"}
    concept_keys = {"set_iou_null_mean", "set_iou_corrected", "set_iou_p_value", "set_iou_ci_low", "set_iou_ci_high"}
    assert plain.concept_uncertainty is None and all(set(entry) == {"set_iou", "soft_iou", "pearson"} for entry in off["per_concept"].values())
    assert all(set(entry) - {"set_iou", "soft_iou", "pearson"} == concept_keys for entry in on["per_concept"].values())
    stripped = {c: {k: v for k, v in entry.items() if k not in concept_keys} for c, entry in on["per_concept"].items()}
    assert {**{key: on[key] for key in off}, "per_concept": stripped} == off
    nmf = unsupervised_similarity(layers)
    assert nmf.uncertainty is None and "p_value" not in nmf.to_dict()


def test_block_statistics_within_one_model():
    # three layers of one model: layer 0 and 1 alike, 2 unrelated; identical bootstrap draws
    score = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, 0.9], [0.2, 0.9, 1.0]])
    null = np.broadcast_to(np.full((3, 3), 0.3), (99, 3, 3)).copy()
    null[:, 0, 1] = null[:, 1, 0] = np.linspace(0.0, 0.5, 99)
    stats = SimilarityNull(score, null, np.broadcast_to(score, (10, 3, 3)).copy())
    block: dict = {"ridge": {}}
    add_similarity_statistics(block, stats, slice(0, 3), slice(0, 3), True, [0.0, 0.5, 1.0], 0.05)
    # (0,1): no null draw reaches 0.8 -> p = 1/100, Holm over the 3 upper cells: 0.01 <= 0.05/3
    assert block["p_value"][0][1] == pytest.approx(0.01)
    assert block["significant"] == [[None, True, False], [True, None, True], [False, True, None]]
    assert block["corrected"][0][1] == pytest.approx((0.8 - 0.25) / 0.75)
    assert block["null_mean"][1][2] == pytest.approx(0.3) and block["p_value"][1][2] == pytest.approx(0.01)
    assert block["corrected"][2][0] == pytest.approx((0.2 - 0.3) / 0.7)
    assert block["ci_low"] == block["ci_high"] == score.tolist()
    # ridge on every draw (diagonal masked): 0 -> 1, 1 -> 2, 2 -> 1, depth pairs (0, .2), (.2, 1), (1, .2):
    # x - mean = (-.4, -.2, .6), y - mean = (-4, 8, -4)/15; r = -.16 / sqrt(.56 · 96/225) = -0.3273
    block = {"ridge": {}}
    add_similarity_statistics(block, stats, slice(0, 3), slice(0, 3), True, [0.0, 0.2, 1.0], 0.05)
    assert block["ridge"]["depth_correlation_ci"] == pytest.approx([-0.16 / np.sqrt(0.56 * 96 / 225)] * 2, abs=1e-6)


@pytest.mark.parametrize("n_items", [1, 2, 5])
def test_tiny_test_splits(tmp_path, n_items):
    maps = (torch.rand(n_items, 1, 3, 3, generator=torch.Generator().manual_seed(n_items)) > 0.3).float()
    stats = supervised_similarity([layer(tmp_path, "a", maps, "c"), layer(tmp_path, "b", maps.flip(-1), "c", model="B")], n_permutations=9, n_bootstrap=9).uncertainty
    assert stats.null.shape == (9, 2, 2) and stats.bootstrap.shape == (9, 2, 2)
    p = stats.p_value()[0, 1]
    assert np.isnan(p) or 0.1 <= p <= 1.0
    assert all(len(set(itertools.chain(perm))) == n_items for perm in random_permutations(n_items, 3, 0))


@pytest.mark.slow
def test_model_and_its_channel_permuted_copy_score_corrected_one(tmp_path):
    from conceptlens.concepts.compare.workflow import compare_models
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.probes.workflow import probe_model
    from tests.test_compare_models import CONCEPTS, GRID, permuted_rescaled_copy

    original = load_model("zoo:synthetic_vgg_centernet")
    world, store = SyntheticWorld(n_images=100, seed=5).select_concepts(CONCEPTS), ActivationStore(tmp_path / "store")
    layers, params = ["backbone.block3", "backbone.block4"], {"max_epochs": 4, "standardize": True}
    probed = [probe_model(model, world, layers, "net2vec", store, banks_dir=tmp_path / "banks", label=label, grid=GRID, params=params)
              for label, model in (("A", original), ("B", permuted_rescaled_copy(original)))]
    result = compare_models(probed, world, store, "net2vec", GRID, cka=False, n_permutations=199, n_bootstrap=50, seed=1)
    assert result["null"] == {"kind": "image_permutation", "n_permutations": 199, "seed": 1}
    assert result["bootstrap"] == {"n": 50, "level": 0.95}
    across = next(block for block in result["blocks"] if (block["a"], block["b"]) == ("A", "B"))
    for i in range(2):  # block3 vs its permuted, rescaled twin; block4 unchanged
        assert across["corrected"][i][i] == pytest.approx(1.0, abs=5e-3)
        assert across["p_value"][i][i] == pytest.approx(1 / 200) and across["significant"][i][i] is True
        assert across["ci_low"][i][i] <= across["similarity"][i][i] <= across["ci_high"][i][i]
    assert 0.0 < across["null_mean"][0][0] < across["similarity"][0][0]
    within = next(block for block in result["blocks"] if (block["a"], block["b"]) == ("A", "A"))
    assert within["significant"][0][0] is None and within["significant"][0][1] == within["significant"][1][0]
    plain = compare_models(probed, world, store, "net2vec", GRID, cka=False, n_permutations=0, n_bootstrap=0)
    assert "null" not in plain and "p_value" not in plain["blocks"][0] and plain["matrix"] == result["matrix"]
    assert [b["similarity"] for b in plain["blocks"]] == [b["similarity"] for b in result["blocks"]]


def test_per_concept_null_and_bootstrap_equal_recomputation(tmp_path, world_masks):
    g = torch.Generator().manual_seed(7)
    noisy = torch.where(torch.rand(world_masks.shape, generator=g) < 0.1, 1 - world_masks, world_masks)
    a, b = layer(tmp_path, "a", world_masks, WORLD_CONCEPTS), layer(tmp_path, "b", noisy, WORLD_CONCEPTS, model="B")
    result = supervised_similarity([a, b], n_permutations=6, n_bootstrap=4, seed=2)
    assert set(result.concept_uncertainty) == set(WORLD_CONCEPTS)
    for concept in ("car", "sky"):
        stats = result.concept_uncertainty[concept]
        np.testing.assert_array_equal(stats.score, result.set_iou[concept])
        for p, perm in enumerate(random_permutations(40, 6, seed=2)):
            shuffled = layer(tmp_path, f"perm{concept}{p}", noisy[torch.from_numpy(perm)], WORLD_CONCEPTS, model="B")
            expected = supervised_similarity([a, shuffled]).set_iou[concept][0, 1]
            assert stats.null[p, 0, 1] == pytest.approx(expected, abs=1e-12) and stats.null[p, 1, 0] == stats.null[p, 0, 1]
        for r, counts in enumerate(bootstrap_counts(40, 4, seed=2)):
            items = torch.from_numpy(np.repeat(np.arange(40), counts.astype(int)))
            resampled = supervised_similarity([layer(tmp_path, f"r{concept}a{r}", world_masks[items], WORLD_CONCEPTS),
                                               layer(tmp_path, f"r{concept}b{r}", noisy[items], WORLD_CONCEPTS, model="B")])
            np.testing.assert_allclose(stats.bootstrap[r], resampled.set_iou[concept], atol=1e-12)
        null_mean = stats.null[:, 0, 1].mean()
        entry = result.to_dict()["per_concept"][concept]
        assert entry["set_iou_null_mean"][0][1] == pytest.approx(null_mean, abs=1e-6)
        assert entry["set_iou_corrected"][0][1] == pytest.approx((stats.score[0, 1] - null_mean) / (1 - null_mean), abs=1e-6)
        at_least = (stats.null[:, 0, 1] >= stats.score[0, 1] - 1e-9).sum()
        assert entry["set_iou_p_value"][0][1] == pytest.approx((1 + at_least) / 7, abs=1e-6)
        low, high = np.percentile(stats.bootstrap[:, 0, 1], [2.5, 97.5])
        assert entry["set_iou_ci_low"][0][1] == pytest.approx(low, abs=1e-6) and entry["set_iou_ci_high"][0][1] == pytest.approx(high, abs=1e-6)
    # the block score is the mean of the per-concept scores on every draw
    stacked = np.stack([result.concept_uncertainty[c].null for c in WORLD_CONCEPTS])
    np.testing.assert_allclose(np.nanmean(stacked, axis=0), result.uncertainty.null, atol=1e-12)


def test_per_concept_controls_reach_the_concepts_csv(tmp_path, world_masks):
    import csv

    from conceptlens.compare_output import CONCEPT_CONTROL_KEYS, _write_tables
    from conceptlens.report.results import Comparison

    layers = [layer(tmp_path, "a", world_masks, WORLD_CONCEPTS), layer(tmp_path, "b", world_masks.flip(-1), WORLD_CONCEPTS, model="B")]
    info = [{"label": f"{m.model}:{m.layer}", "model": m.model, "layer": m.layer, "depth": 0.0} for m in layers]
    written = {}
    for name, kwargs in (("off", {}), ("on", {"n_permutations": 9, "n_bootstrap": 5})):
        similarity = supervised_similarity(layers, **kwargs)
        record = Comparison.from_json({"method": "net2vec", "layers": info, "matrix": _plain(similarity.matrix), "details": similarity.to_dict()})
        _write_tables(record, tmp_path / f"{name}.csv", tmp_path / f"{name}_concepts.csv")
        written[name] = list(csv.DictReader((tmp_path / f"{name}_concepts.csv").open()))
    off, on = written["off"], written["on"]
    assert list(off[0]) == ["concept", "a", "b", "set_iou", "soft_iou", "pearson"]
    assert list(on[0]) == ["concept", "a", "b", "set_iou", "soft_iou", "pearson", *CONCEPT_CONTROL_KEYS]
    assert [{k: row[k] for k in off[0]} for row in on] == off  # the raw columns are as without controls
    details = similarity.to_dict()["per_concept"]
    cell = next(row for row in on if (row["concept"], row["a"], row["b"]) == ("sky", "A:a", "B:b"))
    for key in CONCEPT_CONTROL_KEYS:
        assert float(cell[key]) == details["sky"][key][0][1]


def _plain(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in matrix]

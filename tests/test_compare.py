"""Layer-wise concept similarity and CKA: hand-computed values, invariances, controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptlens.concepts.compare.cka import MinibatchCKA, cka_matrix, linear_cka, unbiased_hsic
from conceptlens.concepts.compare.similarity import (
    CompareError,
    LayerMaps,
    best_match_mean,
    hungarian_mean,
    pairwise_set_iou,
    relative_depths,
    ridge,
    supervised_similarity,
    unsupervised_similarity,
)
from conceptlens.concepts.store.activations import ActivationStore
from tests.planted import activation_entry


def map_entry(root, maps: torch.Tensor, ids=None, tag=""):
    """A complete concept-map entry holding ``maps`` (n, K, Gh, Gw)."""
    n = maps.shape[0]
    ids = ids or [f"{i:06d}" for i in range(n)]
    entry = ActivationStore(root).entry({"maps": tag, "n": n, "shape": list(maps.shape)})
    for start in range(0, n, 3):
        entry.write_shard(start, min(start + 3, n), {"maps": maps[start : start + 3].half()})
    entry.finalize({"request": {"grid": list(maps.shape[-2:])}, "dataset": {"ids": ids}}, n)
    return entry


def layer(root, name, maps, concepts=("c",), iou=0.5, model="A", ids=None):
    return LayerMaps(model, name, list(concepts), map_entry(root, maps, ids, tag=f"{model}{name}"), {c: iou for c in concepts})


def test_hand_computed_supervised_values(tmp_path):
    # Two images on a 2×2 grid. Layer 1 predicts cells {0,1} of image 0 and {0} of image 1;
    # layer 2 predicts {1,2} of image 0 and {0} of image 1.
    p1 = torch.tensor([[[0.9, 0.8], [0.1, 0.0]], [[0.7, 0.2], [0.0, 0.0]]]).unsqueeze(1)
    p2 = torch.tensor([[[0.2, 0.6], [0.9, 0.0]], [[0.6, 0.0], [0.4, 0.0]]]).unsqueeze(1)
    result = supervised_similarity([layer(tmp_path, "l1", p1), layer(tmp_path, "l2", p2)])
    # pooled over the set: intersection = 1 (image 0) + 1 (image 1) = 2; union = 3 + 1 = 4
    assert result.set_iou["c"][0, 1] == pytest.approx(0.5, abs=1e-3)
    a, b = p1.half().float().flatten().numpy(), p2.half().float().flatten().numpy()
    assert result.soft_iou["c"][0, 1] == pytest.approx(np.minimum(a, b).sum() / np.maximum(a, b).sum(), abs=1e-5)
    assert result.pearson["c"][0, 1] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-5)
    np.testing.assert_allclose(np.diag(result.matrix), 1.0)
    np.testing.assert_allclose(np.diag(result.soft_iou["c"]), 1.0)


def test_best_match_and_hungarian_by_hand():
    s = np.array([[0.9, 0.8, 0.0], [0.85, 0.1, 0.0]])
    # rows: max 0.9, 0.85 -> mean 0.875; columns: max 0.9, 0.8, 0.0 -> mean 0.5667
    assert best_match_mean(s) == pytest.approx(0.5 * (0.875 + (0.9 + 0.8 + 0.0) / 3))
    score, pairs = hungarian_mean(s)  # greedy would take 0.9 then 0.1; optimal is 0.8 + 0.85
    assert score == pytest.approx((0.8 + 0.85) / 2)
    assert sorted(pairs) == [(0, 1, 0.8), (1, 0, 0.85)]
    inter = np.array([[2.0, 0.0], [1.0, 3.0]])
    np.testing.assert_allclose(pairwise_set_iou(inter, np.array([4.0, 3.0]), np.array([2.0, 5.0])), [[0.5, 0.0], [0.25, 0.6]])


def test_identity_permutation_and_shuffle_control(tmp_path):
    rng = torch.Generator().manual_seed(0)
    base = (torch.rand(30, 2, 6, 6, generator=rng) > 0.6).float() * 0.8 + 0.1
    same = layer(tmp_path, "copy", base.clone(), concepts=("a", "b"), model="B")
    # the same concepts stored in another order (a channel-permuted bank) change nothing
    permuted = layer(tmp_path, "perm", base[:, [1, 0]].clone(), concepts=("b", "a"), model="B")
    shuffled = layer(tmp_path, "shuf", base[torch.randperm(30, generator=rng)].clone(), concepts=("a", "b"), model="B")
    result = supervised_similarity([layer(tmp_path, "orig", base, concepts=("a", "b")), same, permuted, shuffled])
    assert result.matrix[0, 1] == pytest.approx(1.0) and result.matrix[0, 2] == pytest.approx(1.0)
    assert result.matrix[0, 3] < 0.5


def test_unsupervised_identity_and_matching(tmp_path):
    rng = torch.Generator().manual_seed(1)
    maps = torch.rand(20, 3, 5, 5, generator=rng) ** 4
    scaled_permuted = maps[:, [2, 0, 1]] * torch.tensor([3.0, 0.5, 7.0]).view(1, 3, 1, 1)
    noise = torch.rand(20, 3, 5, 5, generator=rng) ** 4
    result = unsupervised_similarity([
        layer(tmp_path, "n1", maps, concepts=("n0", "n1", "n2")),
        layer(tmp_path, "n2", scaled_permuted, concepts=("m0", "m1", "m2"), model="B"),
        layer(tmp_path, "n3", noise, concepts=("r0", "r1", "r2"), model="B"),
    ])
    assert result.best_match[0, 1] == pytest.approx(1.0, abs=1e-3)  # max-normalisation removes the scale
    assert result.hungarian[0, 1] == pytest.approx(1.0, abs=1e-3)
    assert sorted((i, j) for i, j, _ in result.matched[(0, 1)]) == [(0, 1), (1, 2), (2, 0)]
    assert result.best_match[0, 2] < 0.5
    np.testing.assert_allclose(np.diag(result.best_match), 1.0)


def test_mismatched_inputs_fail_clearly(tmp_path):
    a = layer(tmp_path, "a", torch.rand(4, 1, 2, 2))
    other_images = layer(tmp_path, "b", torch.rand(4, 1, 2, 2), ids=["w", "x", "y", "z"], model="B")
    with pytest.raises(CompareError, match="different test images"):
        supervised_similarity([a, other_images])
    other_concepts = layer(tmp_path, "c", torch.rand(4, 1, 2, 2), concepts=("d",), model="B")
    with pytest.raises(CompareError, match="share no concept"):
        supervised_similarity([a, other_concepts])
    with pytest.raises(CompareError, match="concept 'q'"):
        supervised_similarity([a], concepts=["q"])


def test_empty_predictions_are_flagged_not_nan(tmp_path):
    empty = layer(tmp_path, "e", torch.zeros(4, 1, 2, 2), iou=0.0)
    full = layer(tmp_path, "f", torch.ones(4, 1, 2, 2), model="B")
    result = supervised_similarity([empty, full])
    data = result.to_dict()
    assert data["matrix"][0][0] is None  # empty vs itself: undefined, reported as None
    assert any(u["why"].startswith("neither layer") for u in data["undefined"])
    assert {(b["a"], b["b"]) for b in data["blind_pairs"]} >= {("A:e", "B:f")}
    assert "NaN" not in str(data)


def test_relative_depth_and_ridge():
    assert relative_depths(["a", "b", "c"]) == [0.0, 0.5, 1.0]
    assert relative_depths(["x.conv", "y"], order=["stem", "x.conv", "x", "y", "head"]) == [0.25, 0.75]
    matrix = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.2], [0.1, 0.3, 0.7]])
    result = ridge(matrix, [0, 0.5, 1], [0, 0.5, 1])
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [(0, 0), (1, 1), (2, 2)]
    assert result["depth_correlation"] == pytest.approx(1.0)


def _gram_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + one @ k @ one * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


def test_cka_matches_gram_closed_forms_and_is_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 4, generator=g, dtype=torch.float64) + 0.5 * torch.randn(40, 4, generator=g, dtype=torch.float64)
    kx, ly = (x @ x.T).numpy(), (y @ y.T).numpy()
    assert unbiased_hsic(x, y) == pytest.approx(_gram_unbiased_hsic(kx, ly), rel=1e-9)
    h = np.eye(40) - 1 / 40
    kc, lc = h @ kx @ h, h @ ly @ h
    assert linear_cka(x, y) == pytest.approx(np.trace(kc @ lc) / np.sqrt(np.trace(kc @ kc) * np.trace(lc @ lc)), rel=1e-9)
    accumulator = MinibatchCKA(2)
    accumulator.update([x, y])
    expected = _gram_unbiased_hsic(kx, ly) / np.sqrt(_gram_unbiased_hsic(kx, kx) * _gram_unbiased_hsic(ly, ly))
    assert accumulator.compute()[0, 1] == pytest.approx(expected, rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x @ q * 3.0, y) == pytest.approx(linear_cka(x, y), rel=1e-9)
    rotated = MinibatchCKA(2)
    rotated.update([x @ q, y])
    assert rotated.compute()[0, 1] == pytest.approx(expected, rel=1e-9)


def test_cka_matrix_streams_from_store(tmp_path):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(48, 5, 4, 4, generator=g)
    ids = [f"{i:06d}" for i in range(48)]
    first = activation_entry(tmp_path, acts, ids, tag="1")
    mixed = activation_entry(tmp_path, torch.einsum("bchw,cd->bdhw", acts, torch.randn(5, 5, generator=g)), ids, tag="2")
    noise = activation_entry(tmp_path, torch.randn(48, 5, 4, 4, generator=g), ids, tag="3")
    for mode in ("pooled", "spatial"):
        matrix = cka_matrix([first, mixed, noise], range(48), mode=mode, grid=(4, 4), batch_size=16)
        np.testing.assert_allclose(np.diag(matrix), 1.0)
        assert matrix[0, 1] > 0.5 and abs(matrix[0, 2]) < 0.3

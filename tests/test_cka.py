"""Linear CKA: hand-computed values, an estimator free of the batch size, padding left out, and its
permutation null and bootstrap CIs (docs/METHODS.md §7)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from conceptlens.concepts.compare.cka import (
    CKAError,
    LinearCKA,
    MinibatchCKA,
    cka_matrix,
    cka_statistics,
    linear_cka,
    unbiased_hsic,
)
from conceptlens.concepts.compare.nulls import bootstrap_counts, random_permutations
from conceptlens.concepts.compare.workflow import _add_cka_statistics
from conceptlens.concepts.store.activations import ActivationStore
from tests.planted import activation_entry

STRIDE = 4  # pixels per feature cell in the padded entries below


def _ids(n: int) -> list[str]:
    return [f"{i:06d}" for i in range(n)]


def test_hand_computed_cka_streamed_in_any_batches():
    # 1-D features: linear CKA is the squared correlation. x̃ = (−1.5, −.5, .5, 1.5), ỹ = (−6.5, −3.5, 1.5, 8.5):
    # Σx̃ỹ = 25, Σx̃² = 5, Σỹ² = 129, CKA = 25² / (5 · 129) = 625 / 645.
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = x**2
    assert linear_cka(x, y) == pytest.approx(625 / 645, rel=1e-12)
    streamed = LinearCKA([1, 1])
    streamed.update([x[:1], y[:1]])  # a batch of one sample counts like any other
    streamed.update([x[1:], y[1:]])
    assert streamed.compute() == pytest.approx(np.array([[1, 625 / 645], [625 / 645, 1]]), rel=1e-12)


def test_cka_invariances_orthogonal_and_isotropic_scaling():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64) + 40.0  # a large mean: the shift keeps it exact
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    y = torch.randn(60, 3, generator=g, dtype=torch.float64)
    streamed = LinearCKA([5, 5, 5, 3])
    for rows in (slice(0, 7), slice(7, 8), slice(8, 60)):
        streamed.update([x[rows], x[rows] @ q, -2.5 * x[rows] + 3.0, y[rows]])
    matrix = streamed.compute()
    np.testing.assert_allclose(matrix[:3, :3], 1.0, rtol=1e-10)
    assert matrix[0, 3] == pytest.approx(linear_cka(x, y), rel=1e-10)
    assert matrix[0, 3] < 0.5


def test_minibatch_cka_weights_batches_by_size_and_refuses_tiny_batches():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    accumulator = MinibatchCKA(2)
    accumulator.update([x[:4], y[:4]])
    accumulator.update([x[4:], y[4:]])
    h = {(a, b): 4 * unbiased_hsic(a_[:4], b_[:4]) + 12 * unbiased_hsic(a_[4:], b_[4:]) for a, a_ in (("x", x), ("y", y)) for b, b_ in (("x", x), ("y", y))}
    assert accumulator.compute()[0, 1] == pytest.approx(h["x", "y"] / np.sqrt(h["x", "x"] * h["y", "y"]), rel=1e-12)
    assert accumulator.samples == 16
    with pytest.raises(CKAError, match="at least 4"):
        accumulator.update([x[:3], y[:3]])


def test_cka_matrix_is_exact_for_every_batch_size_and_drops_no_item(tmp_path):
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(49, 5, 4, 4, generator=g)
    other = torch.einsum("bchw,cd->bdhw", acts, torch.randn(5, 6, generator=g)) + torch.randn(49, 6, 4, 4, generator=g)
    entries = [activation_entry(tmp_path, acts, _ids(49), tag="a"), activation_entry(tmp_path, other, _ids(49), tag="b")]
    expected = linear_cka(acts.double().mean(dim=(2, 3)), other.double().mean(dim=(2, 3)))
    spatial = linear_cka(acts.double().permute(0, 2, 3, 1).reshape(-1, 5), other.double().permute(0, 2, 3, 1).reshape(-1, 6))
    for batch_size in (1, 5, 16, 48, 64):  # 49 items: batch 16 or 48 leaves a last batch of one image
        assert cka_matrix(entries, range(49), "pooled", batch_size=batch_size)[0, 1] == pytest.approx(expected, rel=1e-6)  # float32 features
        if batch_size > 1:
            assert cka_matrix(entries, range(49), "spatial", grid=(4, 4), batch_size=batch_size)[0, 1] == pytest.approx(spatial, rel=1e-6)
    without_last = linear_cka(acts.double().mean(dim=(2, 3))[:48], other.double().mean(dim=(2, 3))[:48])
    assert abs(without_last - expected) > 1e-4  # the last image matters: dropping it would show


def _padded_entry(root, maps: list[torch.Tensor], shard_size: int, extra: int, tag: str):
    """Images of their own map sizes (C, h, w), batched ``shard_size`` at a time on padded canvases.

    Each shard's canvas is its largest map plus ``extra`` cells (plus one more every other shard),
    padding filled with a large constant, as a detector pads each batch to its own size.
    """
    n, channels = len(maps), maps[0].shape[0]
    entry = ActivationStore(root).entry({"padded": tag, "n": n})
    for number, start in enumerate(range(0, n, shard_size)):
        batch = maps[start : start + shard_size]
        height = max(m.shape[1] for m in batch) + extra + number % 2
        width = max(m.shape[2] for m in batch) + extra
        canvas = torch.full((len(batch), channels, height, width), 9.0)
        geometry = []
        for i, m in enumerate(batch):
            canvas[i, :, : m.shape[1], : m.shape[2]] = m
            h, w = m.shape[1] * STRIDE, m.shape[2] * STRIDE
            geometry.append([h, w, h, w, 0, 0, height * STRIDE, width * STRIDE])
        entry.write_shard(start, start + len(batch), {"activations": canvas, "geometry": torch.tensor(geometry)})
    entry.finalize({"request": {"layer": tag, "reduce": "native"}, "dataset": {"ids": _ids(n)}}, n)
    return entry


def test_padding_is_left_out_and_mixed_map_sizes_are_read(tmp_path):
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(3, 7, (40, 2), generator=g)
    maps = [torch.randn(4, int(h), int(w), generator=g) for h, w in sizes]
    tight = _padded_entry(tmp_path, maps, shard_size=3, extra=0, tag="tight")
    loose = _padded_entry(tmp_path, maps, shard_size=7, extra=3, tag="loose")
    reference = activation_entry(tmp_path, torch.randn(40, 3, 4, 4, generator=g), _ids(40), tag="ref")
    pooled = torch.stack([m.double().mean(dim=(1, 2)) for m in maps])
    for mode in ("pooled", "spatial"):
        matrix = cka_matrix([tight, loose, reference], range(40), mode, grid=(4, 4), batch_size=16)  # batches span shards of different sizes
        assert matrix[0, 1] == pytest.approx(1.0, abs=1e-6)
        assert matrix[0, 2] == pytest.approx(matrix[1, 2], abs=1e-6)
    assert cka_matrix([tight, reference], range(40), "pooled")[0, 1] == pytest.approx(
        linear_cka(pooled, reference.read_all().double().mean(dim=(2, 3))), rel=1e-6)
    # the test can tell: a mean over whole padded canvases (the old pooling) is not the same feature
    padded = [torch.stack([s["activations"][i].mean(dim=(1, 2)) for i in range(len(s["activations"]))]) for _, _, s in loose.iter_shards()]
    assert linear_cka(pooled, torch.cat(padded).double()) < 0.9


def _entries(root, features: list[torch.Tensor], tag: str):
    return [activation_entry(root, f, _ids(len(f)), tag=f"{tag}{i}") for i, f in enumerate(features)]


def test_null_of_unrelated_features_is_chance_and_p_values_are_uniform(tmp_path):
    raw, corrected, p_values = [], [], []
    for seed in range(40):
        g = torch.Generator().manual_seed(100 + seed)
        entries = _entries(tmp_path, [torch.randn(30, 4, generator=g), torch.randn(30, 3, generator=g)], f"s{seed}-")
        result = cka_statistics(entries, range(30), n_permutations=99, seed=seed)
        raw.append(result.cka[0, 1])
        corrected.append(result.corrected()[0, 1])
        p_values.append(result.p_value[0, 1])
    assert np.mean(raw) > 0.08  # raw CKA of unrelated features sits well above 0 ...
    assert abs(np.mean(corrected)) < 0.05  # ... the corrected one at 0
    assert stats.kstest(p_values, "uniform").pvalue > 0.05
    assert 0.2 < np.mean(np.array(p_values) <= 0.5) < 0.8


def test_planted_relation_is_found_with_a_ci_around_it(tmp_path):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    entries = _entries(tmp_path, [x, x @ q + 0.3 * torch.randn(40, 6, generator=g), torch.randn(40, 5, generator=g)], "planted")
    result = cka_statistics(entries, range(40), n_permutations=199, n_bootstrap=200, seed=0)
    assert result.p_value[0, 1] == pytest.approx(1 / 200)  # no permutation reaches the planted pair
    assert result.corrected()[0, 1] > 0.85
    assert result.ci_low[0, 1] < result.cka[0, 1] < result.ci_high[0, 1]
    assert result.ci_high[0, 2] - result.ci_low[0, 2] > 0.05 and result.p_value[0, 2] > 0.05
    np.testing.assert_allclose(result.uncertainty.score, result.cka, atol=1e-5)  # every sample used: the p-value's statistic is the CKA
    again = cka_statistics(entries, range(40), n_permutations=199, n_bootstrap=200, seed=0)
    np.testing.assert_array_equal(again.p_value, result.p_value)
    np.testing.assert_array_equal(again.ci_low, result.ci_low)
    other = cka_statistics(entries, range(40), n_permutations=199, n_bootstrap=200, seed=1)
    assert not np.array_equal(other.null_mean, result.null_mean)
    np.testing.assert_array_equal(other.cka, result.cka)  # the raw value does not depend on the null


def test_null_and_bootstrap_draws_equal_cka_recomputed_on_permuted_and_resampled_images(tmp_path):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(12, 3, 2, 2, generator=g), torch.randn(12, 2, 2, 2, generator=g)
    entries = _entries(tmp_path, [a, b], "boot")
    result = cka_statistics(entries, range(12), "spatial", grid=(2, 2), n_permutations=4, n_bootstrap=5, seed=7)
    x = a.double().permute(0, 2, 3, 1).reshape(-1, 3)
    for order, draw in zip(random_permutations(12, 4, 7), result.uncertainty.null):  # the column layer's image t is image π(t), cells kept
        y = b[order].double().permute(0, 2, 3, 1).reshape(-1, 2)
        assert draw[0, 1] == draw[1, 0] == pytest.approx(linear_cka(x, y), rel=1e-5)
    for counts, draw in zip(bootstrap_counts(12, 5, 7).astype(int), result.uncertainty.bootstrap):
        images = np.repeat(np.arange(12), counts)
        x = a[images].double().permute(0, 2, 3, 1).reshape(-1, 3)
        y = b[images].double().permute(0, 2, 3, 1).reshape(-1, 2)
        assert draw[0, 1] == pytest.approx(linear_cka(x, y), rel=1e-5)


def test_spatial_null_uses_a_seeded_cell_subset(tmp_path):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 4, 4, 4, generator=g)
    entries = _entries(tmp_path, [x, x + 0.5 * torch.randn(30, 4, 4, 4, generator=g)], "spatial")
    result = cka_statistics(entries, range(30), "spatial", grid=(4, 4), n_permutations=49, n_bootstrap=20, max_samples=100)
    assert (result.null_images, result.null_cells) == (30, 3)  # 30 images × 3 of 16 cells ≤ 100 samples
    assert result.p_value[0, 1] == pytest.approx(1 / 50)
    shift = result.cka[0, 1] - result.uncertainty.score[0, 1]
    assert 0 < abs(shift) < 0.1  # the subset's CKA is close to the full one, not equal
    low, high = result.uncertainty.interval()
    assert (result.ci_low[0, 1], result.ci_high[0, 1]) == pytest.approx((low[0, 1] + shift, high[0, 1] + shift))  # shifted onto the full value
    assert result.ci_low[0, 1] < result.cka[0, 1] < result.ci_high[0, 1]


def test_spatial_cka_refuses_pooled_entries(tmp_path):
    g = torch.Generator().manual_seed(7)
    entries = _entries(tmp_path, [torch.randn(10, 3, 2, 2, generator=g), torch.randn(10, 3, generator=g)], "mixed")
    with pytest.raises(CKAError, match="spatial CKA needs maps"):
        cka_matrix(entries, range(10), "spatial", grid=(2, 2))
    assert cka_matrix(entries, range(10), "pooled").shape == (2, 2)


def test_blocks_get_the_shared_schema_keys(tmp_path):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(30, 4, generator=g)
    features = [x, x + 0.1 * torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)]
    stats_ = {"pooled": cka_statistics(_entries(tmp_path, features, "blocks"), range(30), n_permutations=99, n_bootstrap=50)}
    probed = [SimpleNamespace(layers=["l1", "l2"]), SimpleNamespace(layers=["m1"])]
    blocks = [{}, {}, {}]  # (A, A), (A, B), (B, B)
    _add_cka_statistics(blocks, probed, stats_, alpha=0.05)
    keys = {f"cka_pooled_{k}" for k in ("null_mean", "corrected", "p_value", "significant", "ci_low", "ci_high")}
    assert all(set(block) == keys for block in blocks)
    assert blocks[0]["cka_pooled_significant"] == [[None, True], [True, None]]  # within one model: above the diagonal only
    assert blocks[1]["cka_pooled_significant"] == [[False], [False]]
    assert blocks[1]["cka_pooled_p_value"][0][0] == pytest.approx(float(stats_["pooled"].p_value[0, 2]), abs=1e-6)
    _add_cka_statistics(off := [{}, {}, {}], probed, {"pooled": cka_statistics(_entries(tmp_path, features, "off"), range(30))}, alpha=0.05)
    assert off == [{}, {}, {}]

"""Comparison statistics summed per shard of the test images and reduced give the one-pass numbers (issue 17).

The Ray backend splits the test images into one shard per worker; each worker sums its shard's
statistics (``concepts/compare/shards.py``) and the driver reduces them. Here, without Ray: a
hand-checked case of the per-range sums, then an in-process runner (:class:`InProcess`: each call
goes through :func:`run_task` with plain store references, as on a worker) against the single
pass: counts, maxima, the null and the bootstrap exactly, float sums to 1e-12.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from conceptlens.concepts.compare.cka import LinearCKA, cka_statistics, linear_cka
from conceptlens.concepts.compare.nulls import combine_overlaps, overlap_sums, paired_overlaps, random_permutations
from conceptlens.concepts.compare.shards import row_shards, run_task, sum_parts
from conceptlens.concepts.compare.similarity import (
    LayerMaps,
    ncav_maxima,
    ncav_overlap_sums,
    supervised_similarity,
    supervised_sums,
    unsupervised_similarity,
)
from tests.planted import activation_entry
from tests.test_similarity_nulls import map_entry

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeReader:
    """The one method the sums read maps through: ``rows(range)`` -> ``{"maps": (b, K, Gh, Gw)}``."""

    def __init__(self, maps: torch.Tensor) -> None:
        self.maps = maps

    def rows(self, rows: range) -> dict[str, torch.Tensor]:
        return {"maps": self.maps[list(rows)]}


class InProcess:
    """A ShardRunner that answers every call here through :func:`run_task` (what a Ray worker runs)."""

    def __init__(self, parts: int) -> None:
        self.parts, self.calls = parts, []

    def __call__(self, task: str, calls: list[dict[str, Any]], label: str) -> list[Any]:
        self.calls.append((task, [call["rows"] for call in calls]))
        return [run_task(task, call) for call in calls]


def test_row_shards_cover_every_image_once_in_order() -> None:
    assert row_shards(7, 2) == [(0, 4), (4, 7)]
    assert row_shards(7, 3) == [(0, 2), (2, 5), (5, 7)]
    assert row_shards(2, 5) == [(0, 1), (1, 2)]  # never an empty shard
    assert row_shards(5, 1) == [(0, 5)]


def test_supervised_sums_by_hand_and_two_shards_add_up_to_them() -> None:
    # 2 layers, 1 concept, 2 images of 1 × 2 cells; threshold 0.5
    a = torch.tensor([[[[0.9, 0.2]]], [[[0.6, 0.7]]]])
    b = torch.tensor([[[[0.8, 0.6]]], [[[0.1, 0.3]]]])
    readers, columns = [FakeReader(a), FakeReader(b)], [[0], [0]]
    whole = supervised_sums(readers, columns, range(2), 0.5, batch_size=16)
    # a binary: 1 0 | 1 1 (3 cells); b binary: 1 1 | 0 0 (2 cells); both: first cell only
    assert whole["binary"][0].tolist() == [3.0, 2.0] and whole["intersection"][0].tolist() == [[3.0, 1.0], [1.0, 2.0]]
    assert whole["count"] == 4
    assert whole["minimum"][0, 0, 1] == pytest.approx(0.8 + 0.2 + 0.1 + 0.3) and whole["minimum"][0, 1, 0] == whole["minimum"][0, 0, 1]
    assert whole["total"][0].tolist() == pytest.approx([2.4, 1.8])
    assert whole["cross"][0, 0, 1] == pytest.approx(0.9 * 0.8 + 0.2 * 0.6 + 0.6 * 0.1 + 0.7 * 0.3)
    halves = sum_parts([supervised_sums(readers, columns, range(0, 1), 0.5, 16), supervised_sums(readers, columns, range(1, 2), 0.5, 16)])
    assert halves["count"] == 4 and sorted(halves) == sorted(whole)
    for key in ("binary", "intersection"):
        assert np.array_equal(halves[key], whole[key])
    for key in ("minimum", "total", "squares", "cross"):
        np.testing.assert_allclose(halves[key], whole[key], rtol=1e-12)
    with pytest.raises(AssertionError):  # the check can fail: one shard alone is not the whole
        np.testing.assert_array_equal(supervised_sums(readers, columns, range(0, 1), 0.5, 16)["binary"], whole["binary"])


def test_ncav_maxima_and_overlaps_of_shards_are_exactly_the_one_pass() -> None:
    g = torch.Generator().manual_seed(4)
    readers = [FakeReader(torch.rand(11, 3, 4, 4, generator=g)), FakeReader(torch.rand(11, 2, 4, 4, generator=g) * 2)]
    whole = ncav_maxima(readers, range(11), batch_size=4)
    parts = [ncav_maxima(readers, range(a, b), 4) for a, b in row_shards(11, 3)]
    maxima = [np.maximum.reduce([part[l] for part in parts]) for l in range(2)]
    assert all(np.array_equal(m, w) for m, w in zip(maxima, whole))
    tops = [torch.from_numpy(m) for m in whole]
    one = ncav_overlap_sums(readers, tops, 0.5, range(11), batch_size=4)
    split = sum_parts([ncav_overlap_sums(readers, tops, 0.5, range(a, b), 4) for a, b in row_shards(11, 3)])
    assert all(np.array_equal(x, y) for x, y in zip(split["sizes"], one["sizes"]))
    assert len(one["intersections"]) == 3 and all(np.array_equal(x, y) for x, y in zip(split["intersections"], one["intersections"]))
    assert one["intersections"][1].shape == (3, 2) and one["intersections"][0].trace() == one["sizes"][0].sum()


def test_null_overlaps_of_row_shards_are_exactly_the_one_pass() -> None:
    g = torch.Generator().manual_seed(5)
    binary = (torch.rand(2, 3, 13, 10, generator=g) > 0.6).float()  # 2 groups, 3 channels, 13 images, 10 cells

    def read_binary(rows: range) -> torch.Tensor:
        return binary[:, :, list(rows)]

    permutations = random_permutations(13, 9, seed=1)
    whole = paired_overlaps(read_binary, 13, permutations, batch_size=4)
    split = combine_overlaps([overlap_sums(read_binary, 13, permutations, range(a, b), batch_size=4) for a, b in row_shards(13, 3)])
    for field in ("observed", "permuted", "per_item", "sizes"):
        assert np.array_equal(getattr(split, field), getattr(whole, field)), field
    # by hand: the first permutation's overlaps pair image t of the row channel with π(t) of the column channel
    expected = sum(binary[:, :, t] @ binary[:, :, permutations[0, t]].transpose(1, 2) for t in range(13))
    assert np.array_equal(whole.permuted[0], expected.double().numpy())


def _layers(tmp_path, maps: list[torch.Tensor], names: list[list[str]]) -> list[LayerMaps]:
    return [LayerMaps("A", f"l{i}", concepts, map_entry(tmp_path, m, tag=f"l{i}"), {c: 0.5 for c in concepts}) for i, (m, concepts) in
            enumerate(zip(maps, names))]


def test_supervised_similarity_on_a_runner_equals_the_local_pass_with_its_null(tmp_path) -> None:
    g = torch.Generator().manual_seed(6)
    base = torch.rand(21, 2, 6, 6, generator=g)
    maps = [base, (base + 0.3 * torch.rand(21, 2, 6, 6, generator=g)).clamp(0, 1), torch.rand(21, 2, 6, 6, generator=g)]
    layers = _layers(tmp_path, maps, [["car", "sky"]] * 3)
    settings = {"n_permutations": 19, "n_bootstrap": 15, "seed": 2, "batch_size": 4}
    local = supervised_similarity(layers, **settings)
    runner = InProcess(parts=3)
    sharded = supervised_similarity(layers, runner=runner, **settings)
    assert [task for task, _ in runner.calls] == ["similarity.supervised", "similarity.null"] and runner.calls[0][1] == [[0, 7], [7, 14], [14, 21]]
    assert np.array_equal(sharded.matrix, local.matrix)  # counts: exact
    for concept in ("car", "sky"):
        assert np.array_equal(sharded.set_iou[concept], local.set_iou[concept])
        np.testing.assert_allclose(sharded.soft_iou[concept], local.soft_iou[concept], rtol=1e-12)
        np.testing.assert_allclose(sharded.pearson[concept], local.pearson[concept], rtol=1e-12)
    assert np.array_equal(sharded.uncertainty.null, local.uncertainty.null) and np.array_equal(sharded.uncertainty.bootstrap, local.uncertainty.bootstrap)
    assert sharded.to_dict() == local.to_dict()
    assert 0.2 < local.matrix[0, 1] < 1.0 and local.matrix[0, 1] > local.matrix[0, 2]  # not a degenerate case


def test_unsupervised_similarity_on_a_runner_equals_the_local_pass_exactly(tmp_path) -> None:
    g = torch.Generator().manual_seed(7)
    maps = [torch.rand(10, 3, 5, 5, generator=g), torch.rand(10, 2, 5, 5, generator=g)]
    layers = _layers(tmp_path, maps, [["n0", "n1", "n2"], ["n0", "n1"]])
    local = unsupervised_similarity(layers, n_permutations=9, n_bootstrap=5, seed=1, batch_size=3)
    runner = InProcess(parts=4)
    sharded = unsupervised_similarity(layers, n_permutations=9, n_bootstrap=5, seed=1, batch_size=3, runner=runner)
    assert [task for task, _ in runner.calls] == ["similarity.maxima", "similarity.overlaps", "similarity.null"]
    assert np.array_equal(sharded.best_match, local.best_match) and np.array_equal(sharded.uncertainty.null, local.uncertainty.null)
    assert sharded.to_dict() == local.to_dict()


def test_cka_on_a_runner_equals_the_local_pass_and_the_closed_form(tmp_path) -> None:
    g = torch.Generator().manual_seed(8)
    acts = torch.randn(23, 4, 3, 3, generator=g)
    other = torch.einsum("bchw,cd->bdhw", acts, torch.randn(4, 5, generator=g)) + torch.randn(23, 5, 3, 3, generator=g)
    entries = [activation_entry(tmp_path, acts, [f"{i:06d}" for i in range(23)], tag="a"),
               activation_entry(tmp_path, other, [f"{i:06d}" for i in range(23)], tag="b")]
    for mode in ("pooled", "spatial"):
        local = cka_statistics(entries, range(23), mode, grid=(3, 3), batch_size=5, n_permutations=11, n_bootstrap=7, seed=3, max_samples=60)
        runner = InProcess(parts=2)
        sharded = cka_statistics(entries, range(23), mode, grid=(3, 3), batch_size=5, n_permutations=11, n_bootstrap=7, seed=3, max_samples=60,
                                 runner=runner)
        assert runner.calls == [("cka", [[0, 12], [12, 23]])]
        np.testing.assert_allclose(sharded.cka, local.cka, rtol=1e-12)
        assert np.array_equal(sharded.uncertainty.null, local.uncertainty.null)  # the same held samples, the same Grams
        assert np.array_equal(sharded.ci_low, local.ci_low) or np.allclose(sharded.ci_low, local.ci_low, rtol=1e-12)
    pooled = linear_cka(acts.double().mean(dim=(2, 3)), other.double().mean(dim=(2, 3)))
    assert cka_statistics(entries, range(23), "pooled", batch_size=5, runner=InProcess(3)).cka[0, 1] == pytest.approx(pooled, rel=1e-6)


def test_linear_cka_merge_needs_the_same_shift() -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    first, second, whole = LinearCKA([3], x[:4].mean(dim=0)), LinearCKA([3], x[:4].mean(dim=0)), LinearCKA([3])
    first.update([x[:4]]), second.update([x[4:]]), whole.update([x[:4]]), whole.update([x[4:]])
    first.merge(second)
    assert first.samples == 8 and torch.allclose(first.cross, whole.cross, rtol=1e-12)
    with pytest.raises(Exception, match="different shifts"):
        first.merge(LinearCKA([3], torch.zeros(3)))


def test_tcav_gradient_pass_in_shards_of_whole_batches_is_the_one_pass_bitwise() -> None:
    """What the Ray backend's gradient pass relies on: rows of shards of whole batches, concatenated, are the rows of one pass."""
    from conceptlens.attribution.tcav import target_sensitivities

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 2)).eval()
    x = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    modules = {"1": model[1], "3": model[3]}
    groups = {("", "1"): torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), ("", "3"): torch.randn(6, 5, generator=torch.Generator().manual_seed(3))}
    whole = target_sensitivities(model, x, modules, groups, 1, "t", 2, "auto")
    parts = [target_sensitivities(model, x[a:b], modules, groups, 1, "t", 2, "auto") for a, b in ((0, 4), (4, 7))]  # batches [0,2) [2,4) | [4,6) [6,7)
    for key in groups:
        assert torch.equal(torch.cat([p[0][key] for p in parts]), whole[0][key])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1]) and all(torch.equal(torch.cat([p[2][l] for p in parts]), whole[2][l]) for l in modules)
    assert whole[0][("", "1")].abs().sum() > 0  # real sensitivities


"""Streaming segmentation metrics (conceptlens.probes.metrics) on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from conceptlens.probes.metrics import DEFAULT_THRESHOLDS, SegmentationMetrics, average_precision_from_histograms, set_iou


def _tensors(probabilities, targets, valid):
    return (
        torch.tensor(probabilities, dtype=torch.float32),
        torch.tensor(targets, dtype=torch.bool),
        torch.tensor(valid, dtype=torch.bool),
    )


def test_set_iou_pools_pixels_unlike_the_per_image_mean():
    # image 0: perfect (4/4); image 1: one missed, one false pixel (0/2); image 2: both empty
    probabilities = [[[1, 1, 1, 1]], [[0, 1, 0, 0]], [[0, 0, 0, 0]]]
    targets = [[[1, 1, 1, 1]], [[1, 0, 0, 0]], [[0, 0, 0, 0]]]
    metrics = SegmentationMetrics(["c"])
    metrics.update(*_tensors(probabilities, targets, [[True], [True], [True]]))
    result = metrics.compute()["c"]
    assert result["set_iou"] == pytest.approx(4 / 6)
    assert result["mean_iou"] == pytest.approx(0.5)  # image 2 (empty union) is left out
    assert result["positive_pixels"] == 5
    assert result["n_images"] == 3
    assert set_iou(torch.tensor(probabilities) > 0.5, torch.tensor(targets).bool()) == pytest.approx(4 / 6)


def test_set_iou_function_accepts_numpy_and_reports_empty_union():
    assert set_iou(np.array([1, 0, 1]), np.array([1, 1, 0])) == pytest.approx(1 / 3)
    assert set_iou(np.zeros(3), np.zeros(3)) is None
    with pytest.raises(ValueError, match="shapes differ"):
        set_iou(np.zeros(3), np.zeros(4))


def test_iou_by_threshold_hand_computed():
    metrics = SegmentationMetrics(["c"])
    metrics.update(*_tensors([[[0.15, 0.35, 0.55, 0.75]]], [[[0, 1, 1, 1]]], [[True]]))
    by_threshold = metrics.compute()["c"]["iou_by_threshold"]
    expected = {0.1: 3 / 4, 0.2: 1, 0.3: 1, 0.4: 2 / 3, 0.5: 2 / 3, 0.6: 1 / 3, 0.7: 1 / 3, 0.8: 0, 0.9: 0}
    assert list(by_threshold) == list(DEFAULT_THRESHOLDS)
    assert by_threshold == pytest.approx(expected)


def test_average_precision_hand_ranked():
    # ranking TP, FP, TP, FP, TP: precision 1, 2/3, 3/5 at recall 1/3, 2/3, 1
    metrics = SegmentationMetrics(["c"])
    metrics.update(*_tensors([[[0.95, 0.85, 0.75, 0.65, 0.55]]], [[[1, 0, 1, 0, 1]]], [[True]]))
    assert metrics.compute()["c"]["auc_pr"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_average_precision_matches_sklearn_on_binned_scores():
    rng = np.random.default_rng(0)
    bins = 50
    scores = (rng.integers(0, bins, 400) + 0.5) / bins  # bin centres: binning loses nothing
    labels = rng.random(400) < scores  # informative but noisy
    metrics = SegmentationMetrics(["c"], bins=bins)
    metrics.update(torch.tensor(scores).view(1, 1, -1), torch.tensor(labels).view(1, 1, -1), torch.ones(1, 1, dtype=torch.bool))
    assert metrics.compute()["c"]["auc_pr"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_average_precision_of_ties_and_without_positives():
    assert average_precision_from_histograms([0, 2], [0, 2]) == pytest.approx(0.5)  # all tied
    assert average_precision_from_histograms([0, 0], [3, 1]) is None


def test_batching_gives_identical_results():
    rng = np.random.default_rng(1)
    probabilities = torch.tensor(rng.random((9, 3, 5, 6)), dtype=torch.float32)
    targets = torch.tensor(rng.random((9, 3, 5, 6)) < 0.3)
    valid = torch.tensor(rng.random((9, 3)) < 0.8)
    whole = SegmentationMetrics(["a", "b", "c"])
    whole.update(probabilities, targets, valid)
    batched = SegmentationMetrics(["a", "b", "c"])
    for part in (slice(0, 2), slice(2, 7), slice(7, 9)):
        batched.update(probabilities[part], targets[part], valid[part])
    assert whole.compute() == batched.compute()


def test_invalid_pairs_count_nowhere():
    rng = np.random.default_rng(2)
    probabilities = torch.tensor(rng.random((4, 2, 3, 3)), dtype=torch.float32)
    targets = torch.tensor(rng.random((4, 2, 3, 3)) < 0.5)
    valid = torch.ones(4, 2, dtype=torch.bool)
    valid[1, 0] = False
    with_invalid = SegmentationMetrics(["a", "b"])
    with_invalid.update(probabilities, targets, valid)
    without = SegmentationMetrics(["a"])
    keep = torch.tensor([0, 2, 3])
    without.update(probabilities[keep][:, :1], targets[keep][:, :1], valid[keep][:, :1])
    assert with_invalid.compute()["a"] == without.compute()["a"]
    assert with_invalid.compute()["a"]["n_images"] == 3
    assert with_invalid.compute()["b"]["n_images"] == 4


def test_concept_without_positives_is_flagged_never_nan():
    metrics = SegmentationMetrics(["empty", "full"])
    probabilities = torch.full((2, 2, 2, 2), 0.7)
    targets = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    targets[:, 1] = True
    metrics.update(probabilities, targets, torch.ones(2, 2, dtype=torch.bool))
    result = metrics.compute()
    assert result["empty"]["set_iou"] is None
    assert result["empty"]["flag"] == "no positive pixels"
    assert result["empty"]["auc_pr"] is None and result["empty"]["mean_iou"] is None
    assert all(v is None for v in result["empty"]["iou_by_threshold"].values())
    assert "flag" not in result["full"] and result["full"]["set_iou"] == 1.0
    numbers = [v for r in result.values() for v in r.values() if isinstance(v, float)]
    assert not any(math.isnan(v) for v in numbers)


def test_compute_before_update_flags_every_concept():
    result = SegmentationMetrics(["a"]).compute()
    assert result["a"]["flag"] == "no positive pixels" and result["a"]["n_images"] == 0


def test_shape_mismatch_is_reported():
    metrics = SegmentationMetrics(["a", "b"])
    with pytest.raises(ValueError, match=r"\(B, 2, \.\.\.\)"):
        metrics.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))

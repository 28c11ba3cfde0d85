"""mAP@0.5 of conceptlens.concepts.training.metrics on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from conceptlens.concepts.training.metrics import average_precision, box_iou, mean_average_precision


def _pred(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64)}


A = [0.0, 0.0, 10.0, 10.0]
B = [20.0, 20.0, 40.0, 30.0]
C = [50.0, 0.0, 60.0, 20.0]
FAR = [100.0, 100.0, 110.0, 110.0]


def test_box_iou_hand_computed():
    iou = box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    assert iou[0].tolist() == pytest.approx([50 / 150, 1.0, 0.0])


def test_perfect_detections_give_one():
    targets = [_target([A, B], [1, 2]), _target([C], [1])]
    predictions = [_pred([A, B], [0.9, 0.8], [1, 2]), _pred([C], [0.7], [1])]
    result = mean_average_precision(predictions, targets)
    assert result["map"] == pytest.approx(1.0)
    assert result["per_class"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    assert result["n_ground_truth"] == {1: 2, 2: 1}


def test_false_positive_ranked_first():
    # two objects; ranking FP, TP, TP: precision 0, 1/2, 2/3 at recall 0, 1/2, 1
    # envelope 2/3 at both recall steps -> AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3
    targets = [_target([A, B], [1, 1])]
    predictions = [_pred([FAR, A, B], [0.9, 0.8, 0.7], [1, 1, 1])]
    assert mean_average_precision(predictions, targets)["map"] == pytest.approx(2 / 3)


def test_false_positive_ranked_second():
    # TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    targets = [_target([A, B], [1, 1])]
    predictions = [_pred([A, FAR, B], [0.9, 0.8, 0.7], [1, 1, 1])]
    assert mean_average_precision(predictions, targets)["map"] == pytest.approx(5 / 6)


def test_missed_object_lowers_recall():
    targets = [_target([A, B], [1, 1]), _target([C], [1])]
    predictions = [_pred([A], [0.9], [1]), _pred([C], [0.8], [1])]
    # recall stops at 2/3 with precision 1
    assert mean_average_precision(predictions, targets)["map"] == pytest.approx(2 / 3)


def test_duplicate_detection_is_a_false_positive_and_iou_threshold_applies():
    targets = [_target([A], [1])]
    shifted = [4.0, 0.0, 14.0, 10.0]  # IoU 6/14 < 0.5 with A
    predictions = [_pred([A, A, shifted], [0.9, 0.8, 0.7], [1, 1, 1])]
    result = mean_average_precision(predictions, targets)
    assert result["map"] == pytest.approx(1.0)  # extra detections after full recall cost nothing
    assert mean_average_precision([_pred([shifted], [0.9], [1])], targets)["map"] == 0.0
    assert mean_average_precision([_pred([shifted], [0.9], [1])], targets, iou_threshold=0.4)["map"] == pytest.approx(1.0)


def test_wrong_class_and_mean_over_present_classes():
    targets = [_target([A, B], [1, 2])]
    # class 2 is detected with label 3 (absent from the ground truth): AP(2) = 0, class 3 is ignored
    predictions = [_pred([A, B], [0.9, 0.8], [1, 3])]
    result = mean_average_precision(predictions, targets, class_names=("car", "house", "tree"))
    assert result["per_class"] == {"car": pytest.approx(1.0), "house": 0.0}
    assert result["map"] == pytest.approx(0.5)


def test_average_precision_edge_cases():
    assert average_precision([], 3) == 0.0
    assert average_precision([True], 0) == 0.0
    assert average_precision([True, True], 4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_average_precision([], [_target([A], [1])])

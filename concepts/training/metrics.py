"""Detection metrics: per-class average precision and mAP at one IoU threshold.

Detections of a class are ranked by score over all images. Each one is matched greedily (in rank
order) to the unmatched ground-truth box of its image and class with the highest IoU, if that IoU
is at least the threshold: a true positive; otherwise it is a false positive. The average
precision is the area under the all-point interpolated precision–recall curve (VOC 2010+ and
COCO style, without COCO's 101-point sampling): precision at each recall level is replaced by
the highest precision at that or any higher recall, and AP sums it over the recall increments.
The mean is taken over the classes that have at least one ground-truth box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["box_iou", "average_precision", "mean_average_precision"]


def _as_numpy(value: Any, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (n, m) of xyxy boxes ``a`` (n, 4) and ``b`` (m, 4)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def average_precision(true_positive: Sequence[bool], n_ground_truth: int) -> float:
    """All-point interpolated AP of a ranked list of hits (best score first).

    ``true_positive[k]`` tells whether the k-th ranked detection matched a ground-truth box.
    Returns 0.0 when there is no ground truth.
    """
    if n_ground_truth <= 0:
        return 0.0
    hits = np.asarray(true_positive, dtype=bool)
    if hits.size == 0:
        return 0.0
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    recall = tp / n_ground_truth
    precision = tp / (tp + fp)
    # precision envelope: best precision at this or any higher recall
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    previous_recall = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - previous_recall) * envelope))


def mean_average_precision(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    iou_threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-class AP and their mean at one IoU threshold.

    Parameters
    ----------
    predictions : sequence of dict
        One per image: ``boxes`` (n, 4) xyxy, ``scores`` (n,), ``labels`` (n,) (tensors or arrays).
    targets : sequence of dict
        One per image, in the same order: ``boxes`` (m, 4) xyxy and ``labels`` (m,).
    iou_threshold : float
        Minimum IoU for a detection to match a ground-truth box.
    class_names : sequence of str, optional
        Names of labels ``1 .. len(class_names)``; when given, ``per_class`` is keyed by name.

    Returns
    -------
    dict
        ``map``: mean AP over the classes with ground truth (0.0 when there is none);
        ``per_class``: AP of each class with ground truth; ``n_ground_truth`` and
        ``n_detections`` per class (same keys); ``iou_threshold``.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets; give one of each per image")
    # per class: list of (score, image, box) and per image the ground-truth boxes
    detections: dict[int, list[tuple[float, int, np.ndarray]]] = {}
    truths: dict[int, dict[int, np.ndarray]] = {}
    for image, (prediction, target) in enumerate(zip(predictions, targets)):
        boxes = _as_numpy(target["boxes"], np.float64).reshape(-1, 4)
        labels = _as_numpy(target["labels"], np.int64).reshape(-1)
        for label in np.unique(labels):
            truths.setdefault(int(label), {})[image] = boxes[labels == label]
        p_boxes = _as_numpy(prediction["boxes"], np.float64).reshape(-1, 4)
        p_scores = _as_numpy(prediction["scores"], np.float64).reshape(-1)
        p_labels = _as_numpy(prediction["labels"], np.int64).reshape(-1)
        for box, score, label in zip(p_boxes, p_scores, p_labels):
            detections.setdefault(int(label), []).append((float(score), image, box))

    def key(label: int) -> Any:
        if class_names is not None and 1 <= label <= len(class_names):
            return class_names[label - 1]
        return label

    per_class: dict[Any, float] = {}
    n_truth: dict[Any, int] = {}
    n_det: dict[Any, int] = {}
    for label in sorted(truths):
        gt = truths[label]
        total = sum(len(b) for b in gt.values())
        ranked = sorted(detections.get(label, []), key=lambda d: -d[0])  # stable for equal scores
        matched = {image: np.zeros(len(b), dtype=bool) for image, b in gt.items()}
        hits = []
        for _score, image, box in ranked:
            if image not in gt:
                hits.append(False)
                continue
            ious = box_iou(box[None], gt[image])[0]
            ious[matched[image]] = -1.0
            best = int(np.argmax(ious))
            if ious[best] >= iou_threshold:
                matched[image][best] = True
                hits.append(True)
            else:
                hits.append(False)
        per_class[key(label)] = average_precision(hits, total)
        n_truth[key(label)] = int(total)
        n_det[key(label)] = len(ranked)
    mean = float(np.mean(list(per_class.values()))) if per_class else 0.0
    return {
        "map": mean,
        "per_class": per_class,
        "n_ground_truth": n_truth,
        "n_detections": n_det,
        "iou_threshold": float(iou_threshold),
    }

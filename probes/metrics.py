"""Segmentation metrics of concept maps against ground-truth masks, streamed over batches.

:class:`SegmentationMetrics` accumulates pixel counts per concept, so its memory depends on the
number of concepts, thresholds and histogram bins only — never on the number of images.

Conventions (docs/METHODS.md §2):

* **Set IoU** pools pixel counts over the whole image set, ``Σ|P∧Q| / Σ|P∨Q|``; a prediction is
  ``probability > threshold`` (0.5 for the headline figure).
* **Mean IoU** is the mean of per-image IoUs at 0.5 over the images whose union ``P∨Q`` is
  non-empty (an image where both the prediction and the mask are empty has no IoU and is left out).
* **AUC-PR** is the average precision ``Σ_n (R_n − R_{n−1}) P_n`` (no interpolation, as
  scikit-learn's ``average_precision_score``) computed from per-concept histograms of the
  probabilities of positive and negative pixels: exact for scores binned to ``bins`` levels.
* (image, concept) pairs with ``valid=False`` count nowhere for that concept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_THRESHOLDS", "SegmentationMetrics", "set_iou", "average_precision_from_histograms"]

DEFAULT_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))
HEADLINE_THRESHOLD = 0.5
NO_POSITIVES = "no positive pixels"


def set_iou(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float | None:
    """Set IoU ``Σ|P∧Q| / Σ|P∨Q|`` of two binary arrays of the same shape, pooled over all elements.

    Parameters
    ----------
    pred, target : Tensor or ndarray
        Binary maps (any shape; non-zero is true), e.g. ``(N, Gh, Gw)`` for an image set.

    Returns
    -------
    float or None
        The IoU, or None when both are empty (the IoU is undefined).
    """
    pred_t = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).bool()
    target_t = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target).bool()
    if pred_t.shape != target_t.shape:
        raise ValueError(f"set_iou: shapes differ, {tuple(pred_t.shape)} vs {tuple(target_t.shape)}")
    union = int((pred_t | target_t).sum())
    return None if union == 0 else int((pred_t & target_t).sum()) / union


def average_precision_from_histograms(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """Average precision from counts of positive and negative samples per score bin.

    Bins are ordered by increasing score; samples within one bin are tied. Returns None when
    there is no positive sample.
    """
    positives = np.asarray(positives, dtype=np.float64)[::-1]
    negatives = np.asarray(negatives, dtype=np.float64)[::-1]
    n_positive = positives.sum()
    if n_positive == 0:
        return None
    true_positives = np.cumsum(positives)
    predicted = true_positives + np.cumsum(negatives)
    step = positives > 0  # recall only moves at bins holding positives, where `predicted` > 0
    precision = true_positives[step] / predicted[step]
    return float(np.sum(positives[step] / n_positive * precision))


class SegmentationMetrics:
    """Streaming set IoU, mean IoU and AUC-PR of K concept maps.

    Parameters
    ----------
    concepts : sequence of str
        Concept names, in the order of the K maps.
    thresholds : sequence of float
        Probability thresholds for ``iou_by_threshold`` (a pixel is predicted when ``p > t``).
    bins : int
        Probability bins of the per-concept score histograms behind ``auc_pr``.

    Examples
    --------
    >>> metrics = SegmentationMetrics(["sky"])
    >>> metrics.update(torch.tensor([[[0.9, 0.2]]]), torch.tensor([[[True, False]]]), torch.tensor([[True]]))
    >>> metrics.compute()["sky"]["set_iou"]
    1.0
    """

    def __init__(self, concepts: Sequence[str], thresholds: Sequence[float] = DEFAULT_THRESHOLDS, bins: int = 1000) -> None:
        if bins < 1:
            raise ValueError(f"bins={bins}: give at least 1 bin")
        if any(not 0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds {list(thresholds)}: give probabilities in [0, 1]")
        self.concepts = list(concepts)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.bins = int(bins)
        self._levels = sorted({*self.thresholds, HEADLINE_THRESHOLD})
        self._state: dict[str, torch.Tensor] | None = None

    def _allocate(self, device: torch.device) -> dict[str, torch.Tensor]:
        k, levels = len(self.concepts), len(self._levels)
        counts = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=device)  # noqa: E731
        return {
            "intersection": counts(levels, k),
            "union": counts(levels, k),
            "iou_sum": torch.zeros(k, dtype=torch.float64, device=device),
            "iou_images": counts(k),
            "positive_hist": counts(k * self.bins),
            "negative_hist": counts(k * self.bins),
            "positive_pixels": counts(k),
            "n_images": counts(k),
        }

    def update(self, probabilities: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> None:
        """Add a batch.

        Parameters
        ----------
        probabilities : Tensor
            ``(B, K, ...)`` concept probabilities in [0, 1].
        targets : Tensor
            ``(B, K, ...)`` bool ground truth.
        valid : Tensor
            ``(B, K)`` bool: whether each (image, concept) pair counts.
        """
        scores, truth, used = self._flatten(probabilities, targets, valid)
        if self._state is None:
            self._state = self._allocate(scores.device)
        state = self._state
        positives, negatives = truth & used, ~truth & used
        for level, threshold in enumerate(self._levels):
            predicted = (scores > threshold) & used
            state["intersection"][level] += (predicted & truth).sum(dim=(0, 2))
            state["union"][level] += (predicted | positives).sum(dim=(0, 2))
        self._add_image_ious(scores > HEADLINE_THRESHOLD, truth, used[:, :, 0])
        self._add_histograms(scores, positives, negatives)
        state["positive_pixels"] += positives.sum(dim=(0, 2))
        state["n_images"] += used[:, :, 0].sum(dim=0)

    def _flatten(self, probabilities, targets, valid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = torch.as_tensor(probabilities)
        truth = torch.as_tensor(targets, device=scores.device).bool()
        used = torch.as_tensor(valid, device=scores.device).bool()
        k = len(self.concepts)
        if scores.dim() < 2 or scores.shape[1] != k or truth.shape != scores.shape or used.shape != scores.shape[:2]:
            raise ValueError(
                f"SegmentationMetrics.update: expected probabilities and targets (B, {k}, ...) and valid (B, {k}); "
                f"got {tuple(scores.shape)}, {tuple(truth.shape)}, {tuple(used.shape)}"
            )
        batch = scores.shape[0]
        return scores.reshape(batch, k, -1).float(), truth.reshape(batch, k, -1), used[:, :, None]

    def _add_image_ious(self, predicted: torch.Tensor, truth: torch.Tensor, used: torch.Tensor) -> None:
        intersection = (predicted & truth).sum(dim=2)
        union = (predicted | truth).sum(dim=2)
        counted = (union > 0) & used
        ious = intersection.double() / union.clamp(min=1).double()
        self._state["iou_sum"] += torch.where(counted, ious, torch.zeros_like(ious)).sum(dim=0)
        self._state["iou_images"] += counted.sum(dim=0)

    def _add_histograms(self, scores: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> None:
        bin_index = (scores * self.bins).long().clamp(0, self.bins - 1)
        offsets = torch.arange(len(self.concepts), device=scores.device).view(1, -1, 1) * self.bins
        slots = bin_index + offsets
        size = len(self.concepts) * self.bins
        self._state["positive_hist"] += torch.bincount(slots[positives], minlength=size)
        self._state["negative_hist"] += torch.bincount(slots[negatives], minlength=size)

    def compute(self) -> dict[str, dict[str, Any]]:
        """Metrics per concept name.

        Returns
        -------
        dict
            ``{concept: {"set_iou", "mean_iou", "auc_pr", "iou_by_threshold", "positive_pixels",
            "n_images"}}``. A concept without a positive pixel has ``None`` for every IoU and AUC
            figure and ``"flag": "no positive pixels"``.
        """
        state = self._state if self._state is not None else self._allocate(torch.device("cpu"))
        state = {name: tensor.cpu().numpy() for name, tensor in state.items()}
        return {concept: self._concept_metrics(state, k) for k, concept in enumerate(self.concepts)}

    def _concept_metrics(self, state: dict[str, np.ndarray], k: int) -> dict[str, Any]:
        positive_pixels = int(state["positive_pixels"][k])
        result: dict[str, Any] = {"positive_pixels": positive_pixels, "n_images": int(state["n_images"][k])}
        if positive_pixels == 0:
            none_by_threshold = {t: None for t in self.thresholds}
            return {"set_iou": None, "mean_iou": None, "auc_pr": None, "iou_by_threshold": none_by_threshold, **result, "flag": NO_POSITIVES}
        ious = state["intersection"][:, k] / state["union"][:, k]
        by_level = dict(zip(self._levels, ious.tolist()))
        histogram = slice(k * self.bins, (k + 1) * self.bins)
        return {
            "set_iou": by_level[HEADLINE_THRESHOLD],
            "mean_iou": float(state["iou_sum"][k] / state["iou_images"][k]),
            "auc_pr": average_precision_from_histograms(state["positive_hist"][histogram], state["negative_hist"][histogram]),
            "iou_by_threshold": {t: by_level[t] for t in self.thresholds},
            **result,
        }

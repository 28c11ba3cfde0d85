"""Attribution targets: turn a model's output for a batch into one differentiable scalar per image.

A target (docs/METHODS.md §6, the ``h_k`` of TCAV's conceptual sensitivity) is a callable
``target(output) -> TargetValues``. ``values`` is a ``(B,)`` tensor that stays in the autograd
graph of the forward pass, so ``values[valid].sum().backward()`` (or ``torch.autograd.grad``) gives
the per-image gradients w.r.t. the input or a captured activation. ``valid`` is a ``(B,)`` bool mask:
an image on which a detector target finds no matching detection gets ``valid=False`` and value 0 —
the zero is still a graph node (``0 * scores.sum()``), so the batch keeps its shape and no image is
dropped silently; :func:`describe_missing` writes the line a caller reports.

Targets
-------
* :class:`ClassLogit` / :class:`ClassProbability` — classifier output ``(B, n_classes)``.
* :class:`TopDetection` — score of the highest-scoring detection of one label.
* :class:`MatchedDetection` — score of the detection that best matches (IoU) a given box.

Class names
-----------
Where an index is expected a spec may name the class instead (``logit:"Egyptian cat"``,
``top:car``) when the model's class names are known (:attr:`LoadedModel.categories`: torchvision's
ImageNet and COCO names, the zoo's); every target then carries its class name as ``category`` and
shows it in ``display`` (``logit:285 (Egyptian cat)``).

Detector targets read torchvision-style output: a list with one dict per image holding ``boxes``
(``(n, 4)`` xyxy, in the coordinates of the model's input images), ``scores`` ``(n,)`` and
``labels`` ``(n,)`` — the output of torchvision's detection models and of the zoo detectors in
eval mode. Labels are compared as the model emits them (torchvision COCO models and the zoo
detectors are 1-based; 0 is background).

Gradients
---------
The chosen detection is found on detached values (argmax / IoU), then its score is *indexed* from
``scores``, which keeps the graph. This works because the post-processed scores are differentiable:
torchvision's Faster R-CNN computes them as ``softmax(class_logits)`` of the box head (its RPN
detaches the proposal boxes and objectness, so the gradient reaches the input through the RoI
features, not through the box coordinates); SSD/SSDlite compute ``softmax`` of the head logits and
select with ``topk``/indexing/NMS (indices only); the zoo CenterNet detectors gather the sigmoid
heatmap at its peaks. All of this requires that ``torch.no_grad()`` / ``torch.inference_mode()``
is **not** active during the forward pass and that the inputs (list of image tensors for
torchvision detectors) have ``requires_grad_()`` set before ``forward``. A detector whose
post-processing detaches its scores is caught: :func:`check_differentiable` raises a
:class:`TargetError` naming the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torchvision.ops import box_iou

from conceptlens.attribution.target_specs import (
    SPEC_FORMS,
    TargetError,
    TargetSpec,
    check_target_spec,
    resolve_class,
)
from conceptlens.attribution.target_specs import display as _display

__all__ = [
    "SPEC_FORMS",
    "ClassLogit",
    "ClassProbability",
    "MatchedDetection",
    "Target",
    "TargetError",
    "TargetSpec",
    "TargetValues",
    "TopDetection",
    "check_differentiable",
    "check_target_spec",
    "describe_missing",
    "target_from_spec",
]



@dataclass
class TargetValues:
    """Per-image target scalars.

    Attributes
    ----------
    values : torch.Tensor
        ``(B,)``, differentiable w.r.t. the forward pass's inputs; 0 where ``valid`` is False.
    valid : torch.Tensor
        ``(B,)`` bool; False when an image has no matching detection.
    index : torch.Tensor or None
        ``(B,)`` int64, index of the chosen detection in each image's output (-1 when invalid);
        None for classifier targets.
    """

    values: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def n_missing(self) -> int:
        return int((~self.valid).sum())

    def missing(self, ids: Sequence[Any] | None = None) -> list[Any]:
        """Ids (default: batch positions) of the images with no valid target."""
        positions = [int(i) for i in torch.nonzero(~self.valid.cpu()).flatten()]
        return positions if ids is None else [ids[i] for i in positions]


@runtime_checkable
class Target(Protocol):
    name: str

    def __call__(self, output: Any) -> TargetValues: ...


def describe_missing(values: TargetValues, ids: Sequence[Any] | None = None, target: Any = None, max_ids: int = 10) -> str:
    """One line reporting the images without a valid target, or ``""`` when there are none.

    ``"3 of 32 images have no detection of class 2 (top:2): img_04, img_11, img_17"``
    """
    missing = values.missing(ids)
    if not missing:
        return ""
    total = int(values.valid.numel())
    what = getattr(target, "what", None) or "valid target"
    name = getattr(target, "name", None)
    line = f"{len(missing)} of {total} images have no {what}"
    if name:
        line += f" ({name})"
    shown = ", ".join(str(i) for i in missing[:max_ids])
    if len(missing) > max_ids:
        shown += f", … (+{len(missing) - max_ids})"
    return f"{line}: {shown}"


def check_differentiable(values: TargetValues, target: Any = None) -> None:
    """Raise :class:`TargetError` when ``values`` carries no autograd graph.

    Typical causes: the forward pass ran under ``torch.no_grad()``/``inference_mode``, nothing
    upstream requires grad, or the model's post-processing (a model spec's ``decode``) detaches its
    scores. :func:`conceptlens.attribution.gradients.iter_layer_gradients` checks every batch.
    """
    if not values.values.requires_grad:
        name = getattr(target, "name", None) or "target"
        raise TargetError(
            name,
            "target values are not differentiable (no autograd graph)",
            "the model's post-processing (your decode, if the model spec brings one) must keep scores in the graph: "
            "no .detach(), .item(), .numpy() or torch.no_grad() on them; when calling a model yourself, run the forward pass "
            "without torch.no_grad()/inference_mode and call requires_grad_() on the inputs (each image tensor for torchvision detectors)",
        )


# -- classifier targets ------------------------------------------------------------------------


def _logits(output: Any, name: str, k: int) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 2:
        output = output[0]  # e.g. (logits, aux) outputs
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TargetError(name, f"expects classifier logits of shape (B, n_classes), got {shape}", "use a detector target (top:K, box:...) for detectors")
    if not -output.shape[1] <= k < output.shape[1]:
        raise TargetError(name, f"class {k} is out of range for {output.shape[1]} classes", f"use a class in 0..{output.shape[1] - 1}")
    return output


class _ClassTarget:
    """One class's score of a classifier, computed from its logits ``(B, n_classes)`` by :meth:`_scores`.

    Subclasses set ``kind`` (the spec prefix) and ``quantity`` (what the score is, for messages).
    """

    kind: ClassVar[str]
    quantity: ClassVar[str]

    def __init__(self, k: int, category: str | None = None) -> None:
        self.k = int(k)
        self.category = category
        self.name = f"{self.kind}:{self.k}"
        self.display = _display(self.name, category)
        self.what = f"{self.quantity} of class {_display(str(self.k), category)}"

    @staticmethod
    def _scores(logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, output: Any) -> TargetValues:
        logits = _logits(output, self.name, self.k)
        values = self._scores(logits)[:, self.k]
        return TargetValues(values, torch.ones_like(values, dtype=torch.bool))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.k}" + (f", category={self.category!r})" if self.category else ")")


class ClassLogit(_ClassTarget):
    """The logit of class ``k``: ``output[:, k]``.

    Examples
    --------
    >>> logits = torch.tensor([[0.0, 1.0, 5.0], [2.0, 0.0, -1.0]])
    >>> ClassLogit(2)(logits).values
    tensor([ 5., -1.])
    """

    kind = "logit"
    quantity = "logit"

    @staticmethod
    def _scores(logits: torch.Tensor) -> torch.Tensor:
        return logits


class ClassProbability(_ClassTarget):
    """The softmax probability of class ``k``: ``softmax(output, dim=1)[:, k]``.

    Examples
    --------
    >>> logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    >>> ClassProbability(1)(logits).values
    tensor([0.5000, 0.7500])
    """

    kind = "prob"
    quantity = "probability"

    @staticmethod
    def _scores(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)


#: The classifier targets by spec prefix.
_CLASS_TARGETS: dict[str, type[_ClassTarget]] = {target.kind: target for target in (ClassLogit, ClassProbability)}


# -- detector targets --------------------------------------------------------------------------


def _detections(output: Any, name: str) -> list[dict[str, torch.Tensor]]:
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):
        output = output[1]  # torchscript detectors return (losses, detections)
    if output is None:
        raise TargetError(name, "the model produced no output (a layer hook stopped the forward pass)", "run the full forward pass to compute a target")
    if not isinstance(output, (list, tuple)) or not all(isinstance(d, dict) and "scores" in d and "labels" in d for d in output):
        raise TargetError(
            name,
            f"expects detector output (a list of dicts with boxes/scores/labels), got {type(output).__name__}",
            "use logit:K or prob:K for classifiers; put the detector in eval mode",
        )
    if not output:
        raise TargetError(name, "the detector output is an empty batch", "pass at least one image")
    return list(output)


def _zero_like(scores: torch.Tensor) -> torch.Tensor:
    """A 0 that stays in the graph of ``scores`` (even when ``scores`` is empty)."""
    return scores.sum() * 0.0


def _pack(chosen: list[torch.Tensor], index: list[int]) -> TargetValues:
    values = torch.stack(chosen)
    idx = torch.tensor(index, dtype=torch.int64, device=values.device)
    return TargetValues(values, idx >= 0, idx)


class TopDetection:
    """Score of the highest-scoring detection of ``label`` (with score ≥ ``min_score``) per image."""

    def __init__(self, label: int, min_score: float = 0.0, category: str | None = None) -> None:
        self.label = int(label)
        self.min_score = float(min_score)
        self.category = category
        self.name = f"top:{self.label}" + (f":{self.min_score:g}" if self.min_score > 0 else "")
        self.display = _display(self.name, category)
        self.what = f"detection of class {_display(str(self.label), category)}" + (f" with score ≥ {self.min_score:g}" if self.min_score > 0 else "")

    def __call__(self, output: Any) -> TargetValues:
        chosen, index = [], []
        for det in _detections(output, self.name):
            scores, labels = det["scores"], det["labels"]
            ok = (labels == self.label) & (scores.detach() >= self.min_score)
            if bool(ok.any()):
                masked = torch.where(ok, scores.detach(), torch.full_like(scores.detach(), -math.inf))
                i = int(masked.argmax())
                chosen.append(scores[i])
                index.append(i)
            else:
                chosen.append(_zero_like(scores))
                index.append(-1)
        return _pack(chosen, index)

    def __repr__(self) -> str:
        return f"TopDetection({self.label}, min_score={self.min_score:g}" + (f", category={self.category!r})" if self.category else ")")


class MatchedDetection:
    """Score of the detection that best matches a given box per image.

    Parameters
    ----------
    label : int or None
        Only detections of this label are considered; None: any label.
    boxes : Tensor (B, 4) or (4,), or a sequence of per-image boxes
        xyxy in the coordinates of the model's input images (for torchvision detectors: the
        images handed to the model, before its internal resize; for the zoo detectors: the
        128×128 canvas). A per-image entry may be None (that image is invalid). A single (4,)
        box is used for every image.
    min_iou : float
        A detection matches when its IoU with the box is ≥ ``min_iou``.

    category : str, optional
        The label's class name, shown in ``display`` and messages.

    Among the matching detections the one with the largest IoU is chosen (ties: the higher score).
    """

    def __init__(self, label: int | None, boxes: torch.Tensor | Sequence[Any], min_iou: float = 0.5, category: str | None = None) -> None:
        self.label = None if label is None else int(label)
        self.min_iou = float(min_iou)
        self.boxes = boxes
        self.category = category
        box_text = ""
        single = self._single_box()
        if single is not None:
            box_text = ":" + ",".join(f"{float(v):g}" for v in single)
        self.name = f"box:{'any' if self.label is None else self.label}{box_text}"
        self.display = _display(self.name, category)
        cls = "any class" if self.label is None else f"class {_display(str(self.label), category)}"
        self.what = f"detection of {cls} with IoU ≥ {self.min_iou:g} to the given box"

    def _single_box(self) -> torch.Tensor | None:
        b = self.boxes
        if isinstance(b, torch.Tensor) and b.dim() == 1:
            return b
        if isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b):
            return torch.tensor(b, dtype=torch.float32)
        return None

    def _box_for(self, b: int, n_images: int) -> torch.Tensor | None:
        single = self._single_box()
        if single is not None:
            return single.reshape(4)
        boxes = self.boxes
        if isinstance(boxes, torch.Tensor) and (boxes.dim() != 2 or boxes.shape[1] != 4):
            raise TargetError(self.name, f"boxes must have shape (B, 4) or (4,), got {tuple(boxes.shape)}", "pass xyxy boxes")
        if len(boxes) != n_images:
            raise TargetError(self.name, f"got {len(boxes)} boxes for {n_images} images", "pass one box per image")
        box = boxes[b]
        if box is None:
            return None
        box = torch.as_tensor(box, dtype=torch.float32).reshape(-1)
        if box.numel() != 4:
            raise TargetError(self.name, f"box of image {b} has {box.numel()} numbers", "pass xyxy boxes (4 numbers)")
        return box

    def __call__(self, output: Any) -> TargetValues:
        detections = _detections(output, self.name)
        chosen, index = [], []
        for b, det in enumerate(detections):
            scores, labels = det["scores"], det["labels"]
            if "boxes" not in det:
                raise TargetError(self.name, "detector output has no 'boxes'", "use top:K instead")
            box = self._box_for(b, len(detections))
            i = -1
            if box is not None and scores.numel() > 0:
                pred = det["boxes"].detach()
                iou = box_iou(box.to(pred.device, pred.dtype)[None], pred)[0]
                ok = iou >= self.min_iou
                if self.label is not None:
                    ok &= labels == self.label
                if bool(ok.any()):
                    best = iou[ok].max()
                    tied = ok & (iou == best)
                    masked = torch.where(tied, scores.detach(), torch.full_like(scores.detach(), -math.inf))
                    i = int(masked.argmax())
            chosen.append(scores[i] if i >= 0 else _zero_like(scores))
            index.append(i)
        return _pack(chosen, index)

    def __repr__(self) -> str:
        return f"MatchedDetection({self.label}, boxes=..., min_iou={self.min_iou:g})"


def target_from_spec(spec: str, min_iou: float = 0.5, *, categories: Sequence[str] | None = None) -> Target:
    """Parse a CLI target spec: ``logit:K``, ``prob:K``, ``top:K[:MIN_SCORE]``, ``box:K|any:x0,y0,x1,y1``.

    Parameters
    ----------
    spec : str
        The spec; one of :data:`SPEC_FORMS`. ``K`` is an integer id, or a class name (quoted
        or plain: ``logit:"Egyptian cat"``, ``top:car``) when ``categories`` is given.
    min_iou : float
        The IoU a detection needs to match a ``box:`` spec's box.
    categories : sequence of str, optional
        The model's class names by id (:attr:`LoadedModel.categories`): names are matched
        exactly, then case-insensitively; every target gets its class name as ``category``.

    Returns
    -------
    Target
        :class:`ClassLogit`, :class:`ClassProbability`, :class:`TopDetection` or
        :class:`MatchedDetection`.

    Raises
    ------
    TargetError
        If the spec is malformed (the message lists the accepted forms) or names a class the
        model does not have (the message gives the closest names).

    Examples
    --------
    >>> target_from_spec("prob:3")
    ClassProbability(3)
    >>> target_from_spec("top:2:0.5").name
    'top:2:0.5'
    >>> target_from_spec("box:any:0,0,10,20")
    MatchedDetection(None, boxes=..., min_iou=0.5)
    >>> target_from_spec("top:Car", categories=["__background__", "car", "house"]).display
    'top:1 (car)'
    >>> target_from_spec("logit:x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    conceptlens.attribution.target_specs.TargetError: target 'logit:x': 'x' is not an integer class id, ...
    """
    parsed = check_target_spec(spec)
    if parsed.kind == "box" and parsed.cls is None:
        return MatchedDetection(None, torch.tensor(parsed.box), min_iou=min_iou)
    k, category = resolve_class(parsed.cls, spec, categories)
    if parsed.kind in _CLASS_TARGETS:
        return _CLASS_TARGETS[parsed.kind](k, category)
    if parsed.kind == "top":
        return TopDetection(k, parsed.min_score, category)
    return MatchedDetection(k, torch.tensor(parsed.box), min_iou=min_iou, category=category)

"""A model's own decode: raw outputs to torchvision-style detections, checked once per forward pass.

Detector targets (:mod:`conceptlens.attribution.targets`) read one dict per image with ``boxes``
(``(n, 4)`` xyxy in input-canvas pixels), ``scores`` (``(n,)`` floats) and ``labels`` (``(n,)``
integer class ids). Torchvision's detectors and the zoo's return that themselves; any other
detector (a YOLO-style head, say) brings a ``decode`` callable beside its adapter
(:class:`~conceptlens.concepts.models.adapters.ClassifierAdapter`), and :func:`apply_decode` runs
it on the raw output and refuses anything else with one line naming the decode.

For TCAV, concept maps and NCAV importance the scores must stay in the autograd graph: the decode
may pick detections with ``topk``/``argmax``/indexing/NMS (indices only), but must not call
``.detach()``, ``.item()``, ``.numpy()`` or run under ``torch.no_grad()`` on the scores. Detached
scores are caught where gradients are taken
(:func:`conceptlens.attribution.targets.check_differentiable`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from conceptlens.concepts.errors import ConceptLensError, ModelSpecError
from conceptlens.concepts.models.state_dicts import one_line

__all__ = ["DETECTION_KEYS", "USER_FILE_PREFIX", "DecodeError", "apply_decode", "decode_name", "detections_problem"]

#: The keys of one image's detections.
DETECTION_KEYS = ("boxes", "scores", "labels")

_FIX = ("return one dict per image: boxes (n, 4) xyxy in input-canvas pixels, scores (n,) floats kept in the autograd graph, "
        "labels (n,) integer class ids")


class DecodeError(ModelSpecError):
    """A decode callable failed or returned something other than one detection dict per image."""


#: Module names that :mod:`conceptlens.concepts.models.loading` gives the ``file.py`` of a ``file.py:callable`` spec.
USER_FILE_PREFIX = "conceptlens_user_"


def decode_name(decode: Callable[..., Any]) -> str:
    """``module.qualname`` of a decode function (of its class for a callable object); ``file.py:qualname`` for a spec's file.

    Examples
    --------
    >>> decode_name(functools.partial(decode_name))
    'conceptlens.concepts.models.decode.decode_name'
    """
    target = decode.func if isinstance(decode, functools.partial) else decode
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None) or type(target).__module__
    file = getattr(sys.modules.get(module), "__file__", None) if module.startswith(USER_FILE_PREFIX) else None
    return f"{Path(file).name}:{qualname}" if file else f"{module}.{qualname}"


def apply_decode(decode: Callable[[Any], Any], raw: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Run ``decode`` on a model's raw output and check that it returned detections.

    Parameters
    ----------
    decode : callable
        ``decode(raw) -> list of dicts`` with :data:`DETECTION_KEYS`.
    raw : Any
        The model's output for a batch.
    batch_size : int
        The number of images in the batch.

    Returns
    -------
    list of dict of str to Tensor
        One dict per image.

    Raises
    ------
    DecodeError
        When ``decode`` raises, or returns anything but ``batch_size`` dicts of matching
        ``boxes`` ``(n, 4)``, float ``scores`` ``(n,)`` and integer ``labels`` ``(n,)``.
    """
    try:
        detections = decode(raw)
    except ConceptLensError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's decode fails in its own ways
        raise DecodeError(f"decode {decode_name(decode)}", f"failed on the model's output ({one_line(error)})",
                          "fix the decode for this model's raw output (--debug shows the traceback)") from error
    problem = detections_problem(detections, batch_size)
    if problem:
        raise DecodeError(f"decode {decode_name(decode)}", problem, _FIX)
    return list(detections)


def detections_problem(detections: Any, batch_size: int) -> str | None:
    """What is wrong with ``detections`` as the detections of ``batch_size`` images, or None.

    Examples
    --------
    >>> detections_problem([{"boxes": torch.zeros(2, 4), "scores": torch.zeros(2), "labels": torch.zeros(1, dtype=torch.int64)}], 1)
    'image 0: boxes (2, 4), scores (2,) and labels (1,) do not describe one set of n detections'
    """
    if not isinstance(detections, (list, tuple)):
        return f"returned a {type(detections).__name__}, not a list of {batch_size} dicts (one per image)"
    if len(detections) != batch_size:
        return f"returned {len(detections)} items for a batch of {batch_size} images"
    for position, item in enumerate(detections):
        problem = _image_problem(item)
        if problem:
            return f"image {position}: {problem}"
    return None


def _image_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return f"is a {type(item).__name__}, not a dict of boxes, scores and labels"
    missing = [key for key in DETECTION_KEYS if key not in item]
    if missing:
        return f"the dict has no {missing[0]!r} (it has {sorted(map(str, item))})"
    for key in DETECTION_KEYS:
        if not isinstance(item[key], torch.Tensor):
            return f"{key} is a {type(item[key]).__name__}, not a tensor"
    boxes, scores, labels = (item[key] for key in DETECTION_KEYS)
    n = scores.shape[0] if scores.dim() == 1 else -1
    if tuple(boxes.shape) != (n, 4) or tuple(labels.shape) != (n,):
        return (f"boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)} and labels {tuple(labels.shape)} "
                "do not describe one set of n detections")
    if not scores.is_floating_point():
        return f"scores are {scores.dtype}, not floats"
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return f"labels are {labels.dtype}, not integer class ids"
    return None

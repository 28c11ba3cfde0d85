"""Adapters own a model's preprocessing and know where each image lands on the input canvas.

* :class:`ClassifierAdapter` resizes every image to a fixed size and normalises it; it can also
  reorder the channels (``channel_order="BGR"``), scale the pixel values to another range
  (``value_range=(0, 255)``) and turn the model's raw output into detections (``decode``, see
  :mod:`conceptlens.concepts.models.decode`).
* :class:`DetectorAdapter` hands [0, 1] images to a torchvision detection model, whose
  ``GeneralizedRCNNTransform`` resizes (keeping the aspect ratio) and pads the batch; the adapter
  reads the resized sizes and the padded canvas from that transform's output.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from conceptlens.concepts.errors import DataError, ModelSpecError
from conceptlens.concepts.geometry import Geometry
from conceptlens.concepts.models.decode import apply_decode
from conceptlens.concepts.models.hooks import StopForward
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Adapter",
    "AdapterError",
    "ClassifierAdapter",
    "DetectorAdapter",
    "check_image_sizes",
    "default_adapter",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The channel orders an adapter can hand to a model (images are read as RGB).
CHANNEL_ORDERS = ("RGB", "BGR")
#: Pixel values of [0, 1]: uint8 images divided by 255.
UNIT_RANGE = (0.0, 1.0)


def images_to_tensors(images: Sequence[np.ndarray], device: torch.device, value_range: tuple[float, float] = UNIT_RANGE) -> list[torch.Tensor]:
    """Convert uint8 (H, W, 3) arrays to float (3, H, W) tensors on ``device``.

    Pixel value ``p`` in 0..255 becomes ``low + p * (high - low) / 255`` for ``value_range = (low, high)``;
    the default (0, 1) is ``p / 255``.
    """
    tensors = [torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float() for image in images]
    if tuple(value_range) == UNIT_RANGE:
        return [t / 255 for t in tensors]
    low, high = value_range
    return [t * ((high - low) / 255) + low for t in tensors]


class AdapterError(ModelSpecError):
    """A classifier adapter setting of the wrong type, length or range; ``key`` names the setting."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        super().__init__(f"ClassifierAdapter {key}", problem, fix)


class Adapter(ABC):
    """Preprocessing and geometry of one model family.

    ``antialias`` tells whether images are resized with antialiasing, so that masks can be
    resized the same way (:func:`conceptlens.concepts.geometry.resize_like_image`).
    """

    antialias: bool = False

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """Return why an image of original ``size`` (H, W) cannot go through the model, or None."""
        return None

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Return the preprocessing settings as JSON-able dict (they enter store keys)."""

    @abstractmethod
    def prepare(self, images: Sequence[np.ndarray], device: torch.device) -> Any:
        """Turn uint8 (H, W, 3) images into the model's input on ``device``."""

    @abstractmethod
    def forward(self, model: nn.Module, inputs: Any, sizes: Sequence[tuple[int, int]]) -> tuple[Any, list[Geometry]]:
        """Run ``model`` on prepared ``inputs``; return its output and each image's geometry.

        The output is ``None`` when a layer hook stopped the forward pass early
        (:class:`conceptlens.concepts.models.hooks.StopForward`). ``sizes`` are the original (H, W) of the images.
        """


class ClassifierAdapter(Adapter):
    """Resize each whole image to ``input_size`` (no crop) and normalise with ``mean``/``std``.

    Any model that takes a fixed-size tensor batch uses it, detectors included: with ``decode``
    the model's raw output (a YOLO-style grid, say) becomes torchvision-style detections, so
    detector targets (``TopDetection``, ``MatchedDetection``) read it like a torchvision detector's.

    Parameters
    ----------
    input_size : (int, int)
        Height and width the model sees.
    mean, std : sequence of float
        Per-channel normalisation applied after scaling to ``value_range``, in the model's
        channel order (``channel_order``).
    antialias : bool
        Resize with antialiasing (torchvision's default for tensors).
    channel_order : {'RGB', 'BGR'}
        The channel order the model was trained on (``'BGR'``: OpenCV- or Caffe-style models).
    value_range : (float, float)
        The range pixel values 0..255 are scaled to before normalisation: ``(0, 1)`` (default) or,
        e.g., ``(0, 255)`` for models trained on unscaled pixels.
    decode : callable, optional
        ``decode(raw_output) -> list of dicts`` (one per image: ``boxes`` ``(n, 4)`` xyxy in
        input-canvas pixels, ``scores`` ``(n,)`` kept in the autograd graph, ``labels`` ``(n,)``
        int64), applied to the model's output in :meth:`forward` and checked there
        (:func:`~conceptlens.concepts.models.decode.apply_decode`).

    ``channel_order`` and ``value_range`` enter :meth:`settings` (and so store keys) only when not
    the default; ``decode`` never does, as it does not change any layer's activations.

    Examples
    --------
    >>> adapter = ClassifierAdapter((2, 2), mean=(0, 0, 0), std=(1, 1, 1), channel_order="BGR", value_range=(0, 255))
    >>> image = np.zeros((2, 2, 3), dtype=np.uint8); image[..., 0] = 200  # red
    >>> adapter.prepare([image], torch.device("cpu"))[0, :, 0, 0]  # blue, green, red
    tensor([  0.,   0., 200.])
    >>> adapter.settings()["channel_order"], adapter.settings()["value_range"]
    ('BGR', [0.0, 255.0])
    """

    def __init__(
        self,
        input_size: tuple[int, int] = (224, 224),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        antialias: bool = True,
        *,
        channel_order: str = "RGB",
        value_range: Sequence[float] = UNIT_RANGE,
        decode: Callable[[Any], Any] | None = None,
    ) -> None:
        self.input_size = _size_pair(input_size)
        self.mean = _channel_triple("mean", mean, positive=False)
        self.std = _channel_triple("std", std, positive=True)
        if not isinstance(antialias, (bool, np.bool_)):
            raise AdapterError("antialias", f"must be true or false, got {antialias!r}", "pass antialias=True or False")
        self.antialias = bool(antialias)
        self.channel_order = _channel_order(channel_order)
        self.value_range = _value_range(value_range)
        if decode is not None and not callable(decode):
            raise AdapterError("decode", f"must be a callable (raw model output -> list of detection dicts), got a {type(decode).__name__}",
                               "pass a function decode(raw_output) returning one dict of boxes, scores and labels per image")
        self.decode = decode

    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "adapter": "classifier",
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "antialias": self.antialias,
        }
        if self.channel_order != "RGB":
            settings["channel_order"] = self.channel_order
        if self.value_range != UNIT_RANGE:
            settings["value_range"] = list(self.value_range)
        return settings

    def prepare(self, images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
        tensors = images_to_tensors(images, device, self.value_range)
        resized = [
            F.interpolate(t[None], size=self.input_size, mode="bilinear", align_corners=False, antialias=self.antialias)[0]
            if tuple(t.shape[-2:]) != self.input_size
            else t
            for t in tensors
        ]
        batch = torch.stack(resized)
        if self.channel_order == "BGR":
            batch = batch.flip(1)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return (batch - mean) / std

    def geometry(self, size: tuple[int, int]) -> Geometry:
        """Geometry of an image of original ``size``: the whole image fills the whole canvas."""
        return Geometry(tuple(size), self.input_size, (0, 0), self.input_size)

    def forward(self, model: nn.Module, inputs: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> tuple[Any, list[Geometry]]:
        """Run the model; with ``decode``, return its detections instead of the raw output."""
        geometries = [self.geometry(size) for size in sizes]
        try:
            output = model(inputs)
        except StopForward:
            return None, geometries
        if self.decode is not None:
            output = apply_decode(self.decode, output, len(sizes))
        return output, geometries


def _numbers(value: Any) -> list[float] | None:
    """The items of a list/tuple/array of real numbers (bools excluded), or None."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        return None
    items = list(value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value)
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) for v in items):
        return None
    return [float(v) for v in items]


def _size_pair(value: Any) -> tuple[int, int]:
    numbers = _numbers(value)
    if numbers is None or len(numbers) != 2 or not all(math.isfinite(v) and v == int(v) and v >= 1 for v in numbers):
        raise AdapterError("input_size", f"must be two positive integers (height, width), got {value!r}", "pass e.g. input_size=(224, 224)")
    return int(numbers[0]), int(numbers[1])


def _channel_order(value: Any) -> str:
    order = value.upper() if isinstance(value, str) else None
    if order not in CHANNEL_ORDERS:
        raise AdapterError("channel_order", f"must be 'RGB' or 'BGR', got {value!r}",
                           "pass channel_order='BGR' for a model trained on BGR images (OpenCV, Caffe), else 'RGB'")
    return order


def _value_range(value: Any) -> tuple[float, float]:
    numbers = _numbers(value)
    if numbers is None or len(numbers) != 2 or not all(math.isfinite(v) for v in numbers) or numbers[0] >= numbers[1]:
        raise AdapterError("value_range", f"must be two finite numbers (low, high) with low < high, got {value!r}",
                           "pass value_range=(0, 1) for pixels scaled to [0, 1] (the default) or (0, 255) for unscaled pixels")
    return numbers[0], numbers[1]


def _channel_triple(key: str, value: Any, positive: bool) -> tuple[float, float, float]:
    numbers = _numbers(value)
    if numbers is None or len(numbers) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
        kind = "positive " if positive else ""
        raise AdapterError(key, f"must be three finite {kind}numbers (one per channel), got {value!r}",
                           f"pass e.g. {key}={IMAGENET_STD if positive else IMAGENET_MEAN}")
    return numbers[0], numbers[1], numbers[2]


class DetectorAdapter(Adapter):
    """Adapter for torchvision detection models (``GeneralizedRCNNTransform`` inside).

    The model receives a list of [0, 1] images; its transform normalises, resizes and pads them.
    A forward hook on ``model.transform`` records the resized sizes and the padded canvas.
    """

    antialias = False  # GeneralizedRCNNTransform resizes with plain bilinear interpolation

    def __init__(self, transform: nn.Module) -> None:
        self.transform = transform

    def settings(self) -> dict[str, Any]:
        t = self.transform
        return {
            "adapter": "torchvision-detector",
            "min_size": list(t.min_size),
            "max_size": int(t.max_size),
            "mean": [float(m) for m in t.image_mean],
            "std": [float(s) for s in t.image_std],
            "size_divisible": int(t.size_divisible),
            "fixed_size": list(t.fixed_size) if t.fixed_size else None,
        }

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """Refuse an image that the transform's aspect-preserving resize would shrink to 0 pixels."""
        t = self.transform
        if t.fixed_size:
            return None
        height, width = int(size[0]), int(size[1])
        scale = min(float(t.min_size[-1]) / min(height, width), float(t.max_size) / max(height, width))
        resized = (math.floor(height * scale), math.floor(width * scale))
        if min(resized) >= 1:
            return None
        return (
            f"image of {height}x{width} (HxW) would be resized by the detector (min_size {t.min_size[-1]}, "
            f"max_size {t.max_size}) to {resized[0]}x{resized[1]}"
        )

    def prepare(self, images: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
        return images_to_tensors(images, device)

    def forward(self, model: nn.Module, inputs: list[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> tuple[Any, list[Geometry]]:
        check_image_sizes(self, sizes)
        recorded: list[Geometry] = []

        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            image_list = output[0]
            canvas = tuple(image_list.tensors.shape[-2:])
            for size, resized in zip(sizes, image_list.image_sizes):
                recorded.append(Geometry(tuple(size), (int(resized[0]), int(resized[1])), (0, 0), canvas))

        handle = self.transform.register_forward_hook(record)
        try:
            output = model(inputs)
        except StopForward:
            output = None
        finally:
            handle.remove()
        return output, recorded


def check_image_sizes(adapter: Adapter, sizes: Sequence[tuple[int, int]], names: Sequence[str] | None = None) -> None:
    """Raise a DataError naming the first image the adapter cannot process at its size.

    Parameters
    ----------
    adapter : Adapter
        The model's adapter.
    sizes : sequence of (int, int)
        The original (H, W) of the images.
    names : sequence of str, optional
        The images' names for the message (default: their position and size).

    Raises
    ------
    DataError
        If :meth:`Adapter.size_problem` refuses an image.
    """
    for position, size in enumerate(sizes):
        problem = adapter.size_problem(tuple(size))
        if problem:
            name = names[position] if names is not None else f"image {position} of the batch ({size[0]}x{size[1]})"
            raise DataError(name, problem, "crop or pad the image to a less extreme aspect ratio, or leave it out")


def default_adapter(model: nn.Module, input_size: tuple[int, int] | None = None) -> Adapter:
    """Pick the adapter for ``model``: a detector adapter when it has a ``GeneralizedRCNNTransform``."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = getattr(model, "transform", None)
    if isinstance(transform, GeneralizedRCNNTransform):
        return DetectorAdapter(transform)
    return ClassifierAdapter(input_size or (224, 224))

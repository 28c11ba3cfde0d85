"""Adapters own a model's preprocessing and know where each image lands on the input canvas.

* :class:`ClassifierAdapter` resizes every image to a fixed size and normalises it.
* :class:`DetectorAdapter` hands [0, 1] images to a torchvision detection model, whose
  ``GeneralizedRCNNTransform`` resizes (keeping the aspect ratio) and pads the batch; the adapter
  reads the resized sizes and the padded canvas from that transform's output.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from conceptlens.concepts.errors import DataError
from conceptlens.concepts.geometry import Geometry
from conceptlens.concepts.models.hooks import StopForward
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Adapter",
    "ClassifierAdapter",
    "DetectorAdapter",
    "check_image_sizes",
    "default_adapter",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensors(images: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Convert uint8 (H, W, 3) arrays to float (3, H, W) tensors in [0, 1] on ``device``."""
    return [torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float() / 255 for image in images]


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

    Parameters
    ----------
    input_size : (int, int)
        Height and width the model sees.
    mean, std : sequence of float
        Per-channel normalisation applied to [0, 1] images.
    antialias : bool
        Resize with antialiasing (torchvision's default for tensors).
    """

    def __init__(
        self,
        input_size: tuple[int, int] = (224, 224),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        antialias: bool = True,
    ) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.antialias = antialias

    def settings(self) -> dict[str, Any]:
        return {
            "adapter": "classifier",
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "antialias": self.antialias,
        }

    def prepare(self, images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
        tensors = images_to_tensors(images, device)
        resized = [
            F.interpolate(t[None], size=self.input_size, mode="bilinear", align_corners=False, antialias=self.antialias)[0]
            if tuple(t.shape[-2:]) != self.input_size
            else t
            for t in tensors
        ]
        batch = torch.stack(resized)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return (batch - mean) / std

    def geometry(self, size: tuple[int, int]) -> Geometry:
        """Geometry of an image of original ``size``: the whole image fills the whole canvas."""
        return Geometry(tuple(size), self.input_size, (0, 0), self.input_size)

    def forward(self, model: nn.Module, inputs: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> tuple[Any, list[Geometry]]:
        geometries = [self.geometry(size) for size in sizes]
        try:
            return model(inputs), geometries
        except StopForward:
            return None, geometries


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

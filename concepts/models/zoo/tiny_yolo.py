"""A tiny Darknet/YOLO-style detector with its own decode: the "bring your own detector" example.

Load it as a callable spec, ``conceptlens.concepts.models.zoo.tiny_yolo:build``: :func:`build`
returns ``(module, adapter settings)`` whose ``decode`` turns the raw head grid into
torchvision-style detections, so TCAV, concept maps and NCAV importance target its detections
(``top:1``, ``TopDetection(1)``) as they target a torchvision detector's. Its weights are random
(seeded: the same on every load), so it shows the mechanics, not findings. It is not part of the
zoo (``zoo:`` names trained models); copy it as the template for your own detector.

* :class:`TinyYolo` — Darknet-style stages (3×3 conv, batch norm, leaky ReLU, 2×2 max pool) down
  to stride 8, and a 1×1 head predicting, per cell and for one anchor, the box offsets
  ``tx, ty, tw, th``, an objectness logit and one logit per class: raw output ``(B, 5 + C, h, w)``.
* :class:`GridDecoder` — the decode: score of class ``c`` at a cell
  ``σ(objectness) · softmax(class logits)_c``; per class the ``per_class`` best cells become
  detections (label ``c + 1``: 0 is background, as in torchvision), with the box
  ``((x + σ(tx)) · stride, (y + σ(ty)) · stride)`` centre and ``anchor · exp(tw, th)`` size,
  clipped to the canvas. No NMS (a real one may run ``torchvision.ops.batched_nms`` on detached
  boxes: it only selects). The scores are selected with ``topk`` and gathered, never detached,
  so gradients reach every layer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["GridDecoder", "TinyYolo", "build"]


class DarknetBlock(nn.Sequential):
    """3×3 convolution (no bias), batch norm, leaky ReLU (slope 0.1): Darknet's basic block."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(OrderedDict(conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), bn=nn.BatchNorm2d(c_out),
                                     act=nn.LeakyReLU(0.1)))


class TinyYolo(nn.Module):
    """Darknet-style backbone (stride 8) and a one-anchor YOLO head.

    Parameters
    ----------
    num_classes : int
        Classes the head predicts (labels 1..num_classes after decoding).
    width : int
        Channels of the first stage (doubled at each of the next two).

    Layers: ``backbone.stage1`` … ``backbone.stage4`` (the block outputs), ``backbone.pool1`` …
    ``backbone.pool3`` and ``head``. ``model(x)`` returns the raw head grid ``(B, 5 + C, h, w)``:
    channels ``tx, ty, tw, th, objectness``, then the class logits.
    """

    stride = 8

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.backbone = nn.Sequential(OrderedDict(
            stage1=DarknetBlock(3, width), pool1=nn.MaxPool2d(2),
            stage2=DarknetBlock(width, 2 * width), pool2=nn.MaxPool2d(2),
            stage3=DarknetBlock(2 * width, 4 * width), pool3=nn.MaxPool2d(2),
            stage4=DarknetBlock(4 * width, 4 * width),
        ))
        self.head = nn.Conv2d(4 * width, 5 + self.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class GridDecoder:
    """Turn a YOLO head grid ``(B, 5 + C, h, w)`` into one dict of boxes, scores and labels per image.

    Parameters
    ----------
    stride : int
        Input pixels per grid cell.
    anchor : (float, float)
        Width and height (pixels) of the one anchor box.
    per_class : int
        Detections kept per class and image (its best cells).

    Examples
    --------
    >>> raw = torch.zeros(1, 7, 1, 2)   # 2 classes, a 1×2 grid
    >>> raw[0, 4] = torch.tensor([[0.0, 2.0]])   # objectness logits
    >>> raw[0, 6] = torch.tensor([[0.0, 1.0]])   # logits of class 2 (class 1: 0)
    >>> detections = GridDecoder(stride=8, anchor=(8.0, 8.0), per_class=1)(raw)[0]
    >>> detections["labels"].tolist()  # the best cell of each class
    [1, 2]
    >>> [round(s, 4) for s in detections["scores"].tolist()]  # σ(0)·½ at cell 0; σ(2)·e/(1+e) at cell 1
    [0.25, 0.6439]
    >>> detections["boxes"].tolist()  # centres (0 + ½, 0 + ½)·8 and (1 + ½, 0 + ½)·8, 8×8 pixels
    [[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0]]
    """

    stride: int = TinyYolo.stride
    anchor: tuple[float, float] = (32.0, 32.0)
    per_class: int = 10

    def __call__(self, raw: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        batch, channels, height, width = raw.shape
        classes = channels - 5
        scores = torch.sigmoid(raw[:, 4:5]) * torch.softmax(raw[:, 5:], dim=1)  # (B, C, h, w)
        k = min(self.per_class, height * width)
        top, cells = scores.reshape(batch, classes, -1).topk(k, dim=2)  # values keep the graph; cells are indices
        labels = torch.arange(1, classes + 1, device=raw.device).repeat_interleave(k)
        boxes = self._boxes(raw, cells.reshape(batch, -1), (height, width))
        return [{"boxes": boxes[b], "scores": top[b].reshape(-1), "labels": labels} for b in range(batch)]

    def _boxes(self, raw: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """xyxy boxes ``(B, n, 4)`` of the given flat cell indices ``(B, n)``, clipped to the canvas."""
        height, width = grid
        offsets = raw[:, :4].reshape(raw.shape[0], 4, -1).gather(2, cells[:, None].expand(-1, 4, -1))  # (B, 4, n)
        column, row = (cells % width).to(raw.dtype), torch.div(cells, width, rounding_mode="floor").to(raw.dtype)
        centre_x = (column + torch.sigmoid(offsets[:, 0])) * self.stride
        centre_y = (row + torch.sigmoid(offsets[:, 1])) * self.stride
        half_w = self.anchor[0] * torch.exp(offsets[:, 2].clamp(max=4.0)) / 2
        half_h = self.anchor[1] * torch.exp(offsets[:, 3].clamp(max=4.0)) / 2
        boxes = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], dim=2)
        limits = torch.tensor([width, height, width, height], dtype=raw.dtype, device=raw.device) * self.stride
        return torch.minimum(boxes.clamp(min=0), limits)


def build(num_classes: int = 4, width: int = 16, input_size: int = 128, per_class: int = 10) -> tuple[nn.Module, dict[str, Any]]:
    """The tiny YOLO-style detector with seeded random weights, and its adapter settings.

    Parameters
    ----------
    num_classes : int
        Classes (labels 1..num_classes; 4 matches the synthetic world's car, house, tree, boat).
    width : int
        Channels of the first backbone stage.
    input_size : int
        Side of the square input (a multiple of 8).
    per_class : int
        Detections per class and image.

    Returns
    -------
    (TinyYolo, dict)
        The module and :class:`~conceptlens.concepts.models.adapters.ClassifierAdapter` settings:
        RGB pixels in [0, 1] as Darknet takes them (mean 0, std 1), and the :class:`GridDecoder`.
    """
    with torch.random.fork_rng(devices=[]):  # the same weights on every load, the caller's RNG untouched
        torch.manual_seed(0)
        module = TinyYolo(num_classes, width)
    decode = GridDecoder(stride=TinyYolo.stride, anchor=(input_size / 4, input_size / 4), per_class=per_class)
    return module, {"input_size": (input_size, input_size), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
                    "channel_order": "RGB", "value_range": (0.0, 1.0), "decode": decode}

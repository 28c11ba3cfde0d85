"""Two small object detectors trained on the synthetic concept world, shipped with their weights.

Both see a normalised batch ``(B, 3, 128, 128)`` (their :class:`~conceptlens.concepts.models.adapters.ClassifierAdapter`
resizes each scene to 128×128) and predict CenterNet-style maps at stride 4: a class heatmap (one
sigmoid channel per class of :data:`conceptlens.concepts.data.synthetic.OBJECT_CLASSES`), the box width and height
and the sub-cell offset of the box centre. They come from different families so that their layers
can be compared:

* :class:`VGGCenterNet` (``zoo:synthetic_vgg_centernet``) — a plain VGG-style backbone (stacks of
  conv3×3-BN-ReLU, max-pool downsampling, no skip connections) down to stride 16, a plain
  upsampling neck (no skips) back to stride 4 and the head.
* :class:`ResNetFPN` (``zoo:synthetic_resnet_fpn``) — a residual backbone of strided BasicBlocks
  down to stride 32, an FPN neck (lateral 1×1 convs, top-down nearest upsampling and sum, 3×3
  output convs) and the head on the finest merged level ``neck.p2`` (stride 4).

In eval mode ``model(x)`` returns torchvision-style detections, one dict per image with ``boxes``
(float ``(n, 4)``, xyxy in input-canvas pixels), ``scores`` and ``labels`` (int64, 1-based in the
order of ``OBJECT_CLASSES``). Peaks are the local maxima of the sigmoid heatmap (3×3 max-pool);
their scores are gathered from the heatmap, so they are differentiable w.r.t. the input. In train
mode ``model(x)`` returns the raw head maps and :meth:`CenterNetDetector.loss` computes the
training loss (penalty-reduced focal loss on Gaussian heatmap targets, L1 on size and offset at
object centres).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conceptlens.concepts.models.adapters import ClassifierAdapter
from conceptlens.concepts.errors import ModelSpecError
from conceptlens.concepts.data.synthetic import OBJECT_CLASSES

__all__ = [
    "INPUT_SIZE",
    "MEAN",
    "STD",
    "WEIGHTS_DIR",
    "CenterNetDetector",
    "VGGCenterNet",
    "ResNetFPN",
    "ARCHITECTURES",
    "build_detector",
    "detector_adapter",
    "weights_path",
    "synthetic_vgg_centernet",
    "synthetic_resnet_fpn",
]

#: Side of the square input canvas.
INPUT_SIZE = 128
#: Normalisation of [0, 1] images (roughly the statistics of the synthetic world).
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
#: Folder of the shipped weights and model cards.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------------------------
# shared head, decoding and loss
# --------------------------------------------------------------------------------------------


class CenterNetHead(nn.Module):
    """Three small branches on a stride-4 feature map: class heatmap logits, size, offset.

    ``size`` is the box width and height in units of the output stride; ``offset`` is the box
    centre's position inside its cell, in [0, 1). The forward pass returns a dict of the three maps.
    """

    def __init__(self, c_in: int, width: int, num_classes: int) -> None:
        super().__init__()

        def branch(c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, c_out, 1))

        self.heatmap = branch(num_classes)
        self.size = branch(2)
        self.offset = branch(2)
        # prior probability 0.1 for every class at every position (CenterNet's -2.19)
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"heatmap": self.heatmap(features), "size": self.size(features), "offset": self.offset(features)}


class CenterNetDetector(nn.Module):
    """Base class: ``features`` (stride-4 map) + :class:`CenterNetHead` + decoding and loss.

    Subclasses define ``self.backbone``, ``self.neck`` (modules, executed in that order) and
    :meth:`features`, and call :meth:`_build_head`.
    """

    stride = 4
    num_classes = len(OBJECT_CLASSES)
    #: Probe-worthy stages in execution order (set by subclasses).
    stages: tuple[str, ...] = ()

    def __init__(self, max_detections: int = 20, score_threshold: float = 0.05) -> None:
        super().__init__()
        self.max_detections = int(max_detections)
        self.score_threshold = float(score_threshold)

    def _build_head(self, c_in: int, width: int) -> None:
        self.head = CenterNetHead(c_in, width, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- forward ---------------------------------------------------------------------------
    def head_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs: ``heatmap`` logits (B, C, h, w), ``size`` and ``offset`` (B, 2, h, w)."""
        return self.head(self.features(x))

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid class heatmap (B, n_classes, h, w) at stride 4, for attribution."""
        return torch.sigmoid(self.head_maps(x)["heatmap"])

    def forward(self, x: torch.Tensor) -> Any:
        maps = self.head_maps(x)
        if self.training:
            return maps
        return self.decode(maps)

    def decode(self, maps: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Turn head maps into torchvision-style detections (peaks of the sigmoid heatmap)."""
        heat = torch.sigmoid(maps["heatmap"])
        batch, classes, height, width = heat.shape
        peak = F.max_pool2d(heat, 3, stride=1, padding=1)
        # keep only local maxima; multiplying by the 0/1 mask keeps the scores differentiable
        heat_peaks = heat * (peak == heat).to(heat.dtype)
        k = min(self.max_detections, classes * height * width)
        scores, index = heat_peaks.reshape(batch, -1).topk(k, dim=1)
        labels = torch.div(index, height * width, rounding_mode="floor")
        position = index % (height * width)
        ys = torch.div(position, width, rounding_mode="floor")
        xs = position % width
        size = maps["size"].reshape(batch, 2, -1)
        offset = maps["offset"].reshape(batch, 2, -1)
        gather = position[:, None, :].expand(batch, 2, k)
        wh = size.gather(2, gather).clamp(min=0) * self.stride
        off = offset.gather(2, gather)
        cx = (xs.to(heat.dtype) + off[:, 0]) * self.stride
        cy = (ys.to(heat.dtype) + off[:, 1]) * self.stride
        boxes = torch.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2, cy + wh[:, 1] / 2], dim=2)
        canvas_w, canvas_h = width * self.stride, height * self.stride
        boxes = torch.stack(
            [
                boxes[..., 0].clamp(0, canvas_w),
                boxes[..., 1].clamp(0, canvas_h),
                boxes[..., 2].clamp(0, canvas_w),
                boxes[..., 3].clamp(0, canvas_h),
            ],
            dim=2,
        )
        detections = []
        for b in range(batch):
            keep = scores[b] > self.score_threshold
            detections.append(
                {
                    "boxes": boxes[b][keep],
                    "scores": scores[b][keep],
                    "labels": (labels[b][keep] + 1).to(torch.int64),
                }
            )
        return detections

    # -- training ----------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Training loss on a batch; ``targets`` hold ``boxes`` (xyxy, canvas pixels) and ``labels``.

        Returns a dict with ``loss`` (the total to minimise), ``heatmap``, ``size`` and ``offset``.
        """
        maps = self.head_maps(x)
        height, width = maps["heatmap"].shape[-2:]
        encoded = encode_targets(targets, self.num_classes, (height, width), self.stride)
        return centernet_loss(maps, encoded)


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's Gaussian radius: centre shift that keeps IoU >= ``min_overlap`` (output units)."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def encode_targets(
    targets: Sequence[dict[str, torch.Tensor]], num_classes: int, shape: tuple[int, int], stride: int
) -> dict[str, torch.Tensor]:
    """Gaussian heatmaps and size/offset targets at the object centres of a batch.

    Returns ``heatmap`` (B, C, h, w) and, per object, ``batch``, ``ys``, ``xs`` (long), ``size``
    and ``offset`` (n, 2), all on CPU.
    """
    height, width = shape
    heatmap = np.zeros((len(targets), num_classes, height, width), dtype=np.float32)
    batch_ix, ys_list, xs_list, sizes, offsets = [], [], [], [], []
    grid_y = np.arange(height, dtype=np.float32)[:, None]
    grid_x = np.arange(width, dtype=np.float32)[None, :]
    for b, target in enumerate(targets):
        boxes = target["boxes"].detach().cpu().numpy().astype(np.float64).reshape(-1, 4) / stride
        labels = target["labels"].detach().cpu().numpy().astype(np.int64).reshape(-1)
        taken: set[tuple[int, int]] = set()
        for (x0, y0, x1, y1), label in zip(boxes, labels):
            w, h = x1 - x0, y1 - y0
            if w <= 0 or h <= 0:
                continue
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            ix = min(max(int(cx), 0), width - 1)
            iy = min(max(int(cy), 0), height - 1)
            radius = max(0, int(gaussian_radius(h, w)))
            sigma = (2 * radius + 1) / 6
            gauss = np.exp(-((grid_x - ix) ** 2 + (grid_y - iy) ** 2) / (2 * sigma * sigma))
            gauss[np.abs(grid_y[:, 0] - iy) > radius, :] = 0
            gauss[:, np.abs(grid_x[0] - ix) > radius] = 0
            np.maximum(heatmap[b, label - 1], gauss, out=heatmap[b, label - 1])
            if (iy, ix) in taken:  # two centres in one cell: keep the first box's regression
                continue
            taken.add((iy, ix))
            batch_ix.append(b)
            ys_list.append(iy)
            xs_list.append(ix)
            sizes.append((w, h))
            offsets.append((cx - ix, cy - iy))
    return {
        "heatmap": torch.from_numpy(heatmap),
        "batch": torch.tensor(batch_ix, dtype=torch.long),
        "ys": torch.tensor(ys_list, dtype=torch.long),
        "xs": torch.tensor(xs_list, dtype=torch.long),
        "size": torch.tensor(sizes, dtype=torch.float32).reshape(-1, 2),
        "offset": torch.tensor(offsets, dtype=torch.float32).reshape(-1, 2),
    }


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, normalised by the number of centres."""
    pos = target.eq(1).to(logits.dtype)
    neg = 1.0 - pos
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = -(log_p * (1 - p) ** alpha * pos).sum()
    neg_loss = -(log_1mp * p**alpha * (1 - target) ** beta * neg).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def centernet_loss(
    maps: dict[str, torch.Tensor], encoded: dict[str, torch.Tensor], size_weight: float = 0.1, offset_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """Focal loss on the heatmap plus L1 on size and offset at the object centres."""
    device = maps["heatmap"].device
    heat = focal_loss(maps["heatmap"], encoded["heatmap"].to(device))
    b, ys, xs = encoded["batch"].to(device), encoded["ys"].to(device), encoded["xs"].to(device)
    n = max(int(b.numel()), 1)
    size_pred = maps["size"].permute(0, 2, 3, 1)[b, ys, xs]
    offset_pred = maps["offset"].permute(0, 2, 3, 1)[b, ys, xs]
    size = F.l1_loss(size_pred, encoded["size"].to(device), reduction="sum") / n
    offset = F.l1_loss(offset_pred, encoded["offset"].to(device), reduction="sum") / n
    total = heat + size_weight * size + offset_weight * offset
    return {"loss": total, "heatmap": heat.detach(), "size": size.detach(), "offset": offset.detach()}


# --------------------------------------------------------------------------------------------
# A: VGG-style backbone + plain upsampling neck
# --------------------------------------------------------------------------------------------


class VGGBlock(nn.Sequential):
    """Optional 2×2 max-pool, then ``n`` conv3×3-BN-ReLU layers."""

    def __init__(self, c_in: int, c_out: int, n: int, pool: bool) -> None:
        layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
        for k in range(n):
            layers.extend(_conv_bn_relu(c_in if k == 0 else c_out, c_out))
        super().__init__(*layers)


class UpBlock(nn.Sequential):
    """×2 bilinear upsampling, then conv3×3-BN-ReLU (no skip connection)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), *_conv_bn_relu(c_in, c_out))


class VGGBackbone(nn.Module):
    def __init__(self, widths: Sequence[int], depths: Sequence[int]) -> None:
        super().__init__()
        c_in = 3
        for k, (c, n) in enumerate(zip(widths, depths)):
            self.add_module(f"block{k + 1}", VGGBlock(c_in, c, n, pool=k > 0))
            c_in = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


class VGGUpNeck(nn.Module):
    def __init__(self, widths: Sequence[int], c_in: int) -> None:
        super().__init__()
        for k, c in enumerate(widths):
            self.add_module(f"up{k + 1}", UpBlock(c_in, c))
            c_in = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


class VGGCenterNet(CenterNetDetector):
    """Plain VGG-style CenterNet: no skip connections anywhere.

    ``backbone.block1`` (stride 1) … ``backbone.block5`` (stride 16), each block a max-pool
    (except the first) and conv3×3-BN-ReLU layers; ``neck.up1`` (stride 8) and ``neck.up2``
    (stride 4), each a ×2 bilinear upsampling and a conv3×3-BN-ReLU; ``head.heatmap``,
    ``head.size``, ``head.offset`` at stride 4.
    """

    stages = (
        "backbone.block1",
        "backbone.block2",
        "backbone.block3",
        "backbone.block4",
        "backbone.block5",
        "neck.up1",
        "neck.up2",
        "head.heatmap",
    )

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 96, 128),
        depths: Sequence[int] = (1, 2, 2, 2, 2),
        neck_widths: Sequence[int] = (96, 64),
        head_width: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone = VGGBackbone(widths, depths)
        self.neck = VGGUpNeck(neck_widths, widths[-1])
        self._build_head(neck_widths[-1], head_width)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))


# --------------------------------------------------------------------------------------------
# B: residual backbone + FPN neck
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two conv3×3-BN, identity (or 1×1-conv projection) shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResStage(nn.Sequential):
    """``n`` BasicBlocks, the first one strided."""

    def __init__(self, c_in: int, c_out: int, n: int, stride: int) -> None:
        super().__init__(*[BasicBlock(c_in if k == 0 else c_out, c_out, stride if k == 0 else 1) for k in range(n)])


class ResNetBackbone(nn.Module):
    """``stem`` (conv3×3 stride 2, stride 2 overall), then ``block1`` … ``block4`` at strides 4 … 32."""

    def __init__(self, stem_width: int, widths: Sequence[int], depths: Sequence[int]) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, stem_width, stride=2)
        c_in = stem_width
        for k, (c, n) in enumerate(zip(widths, depths)):
            self.add_module(f"block{k + 1}", ResStage(c_in, c, n, stride=2))
            c_in = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        levels = []
        for name in ("block1", "block2", "block3", "block4"):
            x = getattr(self, name)(x)
            levels.append(x)
        return levels


class FPNLevel(nn.Module):
    """One FPN output: lateral 1×1 conv of a backbone level plus the upsampled coarser level,
    followed by a 3×3 conv-BN-ReLU."""

    def __init__(self, c_in: int, width: int) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(c_in, width, 1)
        self.smooth = _conv_bn_relu(width, width)

    def forward(self, x: torch.Tensor, coarser: torch.Tensor | None = None) -> torch.Tensor:
        merged = self.lateral(x)
        if coarser is not None:
            merged = merged + F.interpolate(coarser, size=merged.shape[-2:], mode="nearest")
        return self.smooth(merged)


class FPNNeck(nn.Module):
    """Top-down FPN: ``p5`` (stride 32) → ``p4`` → ``p3`` → ``p2`` (stride 4); returns ``p2``.

    Each level adds its 1×1 lateral to the (nearest-upsampled) output of the coarser level and
    smooths the sum with a conv3×3-BN-ReLU, so every level's output is a merged map worth probing.
    """

    def __init__(self, in_widths: Sequence[int], width: int) -> None:
        super().__init__()
        self.p5 = FPNLevel(in_widths[3], width)
        self.p4 = FPNLevel(in_widths[2], width)
        self.p3 = FPNLevel(in_widths[1], width)
        self.p2 = FPNLevel(in_widths[0], width)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        c2, c3, c4, c5 = levels
        p5 = self.p5(c5)
        p4 = self.p4(c4, p5)
        p3 = self.p3(c3, p4)
        return self.p2(c2, p3)


class ResNetFPN(CenterNetDetector):
    """Residual backbone + FPN neck + CenterNet head on the finest merged level (stride 4).

    ``backbone.stem`` (stride 2), ``backbone.block1`` … ``backbone.block4`` (strides 4 … 32, each a
    stage of BasicBlocks whose first block is strided), ``neck.p5`` … ``neck.p2`` (top-down FPN
    levels, 1×1 lateral + upsampled coarser level, then conv3×3-BN-ReLU), ``head.heatmap``,
    ``head.size``, ``head.offset`` on ``neck.p2``.
    """

    stages = (
        "backbone.stem",
        "backbone.block1",
        "backbone.block2",
        "backbone.block3",
        "backbone.block4",
        "neck.p3",
        "neck.p2",
        "head.heatmap",
    )

    def __init__(
        self,
        stem_width: int = 24,
        widths: Sequence[int] = (32, 64, 96, 128),
        depths: Sequence[int] = (1, 2, 2, 1),
        fpn_width: int = 64,
        head_width: int = 48,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone = ResNetBackbone(stem_width, widths, depths)
        self.neck = FPNNeck(widths, fpn_width)
        self._build_head(fpn_width, head_width)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))


# --------------------------------------------------------------------------------------------
# zoo entries
# --------------------------------------------------------------------------------------------

ARCHITECTURES: dict[str, type[CenterNetDetector]] = {
    "synthetic_vgg_centernet": VGGCenterNet,
    "synthetic_resnet_fpn": ResNetFPN,
}


def build_detector(name: str) -> CenterNetDetector:
    """A freshly initialised detector of the zoo architecture ``name``."""
    if name not in ARCHITECTURES:
        raise ModelSpecError(f"detector {name!r}", "no such synthetic detector", f"use one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]()


def detector_adapter() -> ClassifierAdapter:
    """The adapter of both detectors: resize to 128×128, normalise with :data:`MEAN`/:data:`STD`."""
    return ClassifierAdapter((INPUT_SIZE, INPUT_SIZE), MEAN, STD)


def weights_path(name: str) -> Path:
    """Path of the shipped safetensors file of detector ``name``."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def _load(name: str) -> tuple[nn.Module, ClassifierAdapter]:
    path = weights_path(name)
    if not path.is_file():
        raise ModelSpecError(
            str(path),
            f"the weights of zoo:{name} are missing",
            f"reinstall conceptlens (the weights ship with it), or retrain with `conceptlens train-zoo` and pass --weights zoo-weights/{name}.safetensors",
        )
    from safetensors.torch import load_file

    model = build_detector(name)
    state = {key: value.float() if value.is_floating_point() else value for key, value in load_file(str(path)).items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelSpecError(
            str(path),
            f"does not match the {name} architecture: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}",
            f"reinstall conceptlens, or retrain with `conceptlens train-zoo` and pass --weights zoo-weights/{name}.safetensors",
        )
    return model.eval(), detector_adapter()


def synthetic_vgg_centernet() -> tuple[nn.Module, ClassifierAdapter]:
    """``zoo:synthetic_vgg_centernet``: the VGG-style CenterNet with its shipped weights."""
    return _load("synthetic_vgg_centernet")


def synthetic_resnet_fpn() -> tuple[nn.Module, ClassifierAdapter]:
    """``zoo:synthetic_resnet_fpn``: the ResNet-FPN CenterNet with its shipped weights."""
    return _load("synthetic_resnet_fpn")

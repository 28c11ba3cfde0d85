"""Exact geometry between an original image, the model's input canvas and a layer's feature map.

A model adapter resizes each image (possibly keeping its aspect ratio) and places it on a canvas
(possibly padded, as torchvision detectors pad a batch to a multiple of 32). :class:`Geometry`
records where the image landed. With it:

* :func:`mask_to_feature_cells` puts a concept mask through the same resize and padding as the
  image and area-pools it onto a feature map's cells — the cells the mask covers in the model;
* :func:`features_to_grid` samples a feature map on a fixed concept grid laid over the *original*
  image, so that maps of different models and layers can be compared cell by cell;
* :func:`masks_to_grid` area-downsamples masks to the same grid (soft targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "GRID_SAMPLING",
    "Geometry",
    "resize_like_image",
    "mask_to_feature_cells",
    "image_cells",
    "features_to_grid",
    "masks_to_grid",
]


#: Version of the grid sampling rule; it enters the store keys of everything sampled on a grid.
GRID_SAMPLING = "clamped-to-image-cells"


@dataclass(frozen=True)
class Geometry:
    """Where one original image lies on the model's input canvas (all sizes in pixels).

    Attributes
    ----------
    image_size : (int, int)
        Height and width of the original image.
    resized_size : (int, int)
        Height and width of the image after the model's resize.
    offset : (int, int)
        Top and left position of the resized image on the canvas.
    canvas_size : (int, int)
        Height and width of the input tensor the network sees (after batching and padding).
    """

    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    offset: tuple[int, int]
    canvas_size: tuple[int, int]

    def to_list(self) -> list[int]:
        """Return the eight integers (for storing next to activations)."""
        return [*self.image_size, *self.resized_size, *self.offset, *self.canvas_size]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Geometry:
        """Inverse of :meth:`to_list`."""
        v = [int(x) for x in values]
        return cls((v[0], v[1]), (v[2], v[3]), (v[4], v[5]), (v[6], v[7]))


def resize_like_image(masks: torch.Tensor, geometry: Geometry, antialias: bool) -> torch.Tensor:
    """Resize float masks (K, H, W) to the image's resized size exactly as the adapter resized the image."""
    if tuple(masks.shape[-2:]) == geometry.resized_size:
        return masks
    return F.interpolate(
        masks[None], size=geometry.resized_size, mode="bilinear", align_corners=False, antialias=antialias
    )[0]


def mask_to_feature_cells(
    masks: torch.Tensor, geometry: Geometry, feature_size: tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """Map concept masks to the cells of a feature map, through the model's own resize and padding.

    Parameters
    ----------
    masks : Tensor
        ``(K, H, W)`` masks of one original image (bool or float).
    geometry : Geometry
        Where that image lies on the canvas.
    feature_size : (int, int)
        Height and width of the feature map.
    antialias : bool
        Whether the adapter resizes images with antialiasing.

    Returns
    -------
    Tensor
        ``(K, h, w)`` float: the fraction of each feature cell's canvas area covered by the mask.
    """
    resized = resize_like_image(masks.float(), geometry, antialias)
    canvas = resized.new_zeros((resized.shape[0], *geometry.canvas_size))
    top, left = geometry.offset
    paste_canvas(canvas, resized, top, left)
    return F.adaptive_avg_pool2d(canvas[None], feature_size)[0]


def paste_canvas(canvas: torch.Tensor, image: torch.Tensor, top: int, left: int) -> None:
    """Paste ``image`` (K, h, w) onto ``canvas`` (K, Hc, Wc) at (top, left), clipping at the borders."""
    height, width = image.shape[-2:]
    canvas_height, canvas_width = canvas.shape[-2:]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, canvas_height), min(left + width, canvas_width)
    if y1 > y0 and x1 > x0:
        canvas[:, y0:y1, x0:x1] = image[:, y0 - top : y1 - top, x0 - left : x1 - left]


def image_cells(geometry: Geometry, feature_size: tuple[int, int]) -> torch.Tensor:
    """Return a bool (h, w) map of the feature cells whose centre lies on the image (not padding)."""
    height, width = feature_size
    canvas_height, canvas_width = geometry.canvas_size
    rows = (torch.arange(height) + 0.5) * canvas_height / height
    cols = (torch.arange(width) + 0.5) * canvas_width / width
    top, left = geometry.offset
    inside_rows = (rows >= top) & (rows < top + geometry.resized_size[0])
    inside_cols = (cols >= left) & (cols < left + geometry.resized_size[1])
    return inside_rows[:, None] & inside_cols[None, :]


def _image_cell_range(offset: int, resized: int, canvas: int, cells: int) -> tuple[float, float]:
    """First and last feature cell index (along one axis) whose centre lies on the image."""
    centres = (np.arange(cells) + 0.5) * canvas / cells
    inside = np.nonzero((centres >= offset) & (centres < offset + resized))[0]
    if len(inside) == 0:  # an image thinner than one cell: use the cell it lies in
        nearest = int(np.clip((offset + resized / 2) * cells / canvas, 0, cells - 1))
        return float(nearest), float(nearest)
    return float(inside[0]), float(inside[-1])


def _axis_coordinates(size: int, offset: int, resized: int, canvas: int, cells: int) -> torch.Tensor:
    """Normalised sampling positions of ``size`` grid cells along one axis, clamped to the image's cells."""
    fraction = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    position = (offset + fraction * resized) * cells / canvas - 0.5  # in feature-cell index units
    first, last = _image_cell_range(offset, resized, canvas, cells)
    position = position.clamp(first, last)
    return (position + 0.5) * 2 / cells - 1


@lru_cache(maxsize=1024)
def _grid_coordinates(geometry: Geometry, grid: tuple[int, int], feature_size: tuple[int, int]) -> torch.Tensor:
    """Sampling grid (Gh, Gw, 2) in ``grid_sample``'s normalised coordinates (x, y).

    Positions are clamped to the centres of the outermost feature cells that lie on the image, so
    bilinear sampling near the image's bottom/right edge never mixes in a padding cell (edge values
    are replicated instead, as at the canvas border).
    """
    y = _axis_coordinates(grid[0], geometry.offset[0], geometry.resized_size[0], geometry.canvas_size[0], feature_size[0])
    x = _axis_coordinates(grid[1], geometry.offset[1], geometry.resized_size[1], geometry.canvas_size[1], feature_size[1])
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx, yy], dim=-1).float()


def features_to_grid(
    features: torch.Tensor, geometries: Sequence[Geometry], grid: tuple[int, int]
) -> torch.Tensor:
    """Bilinearly sample feature maps on a concept grid laid over each original image.

    Grid cell centres are mapped from the original image to the canvas and then to feature
    coordinates (``align_corners=False`` convention) and clamped to the outermost cells that lie
    on the image (edge values replicated), so padding never leaks into the grid. For an adapter that resizes the whole image onto the whole canvas this
    equals ``F.interpolate(features, grid, mode="bilinear", align_corners=False)``.

    Parameters
    ----------
    features : Tensor
        ``(B, C, h, w)`` feature maps of a batch.
    geometries : sequence of Geometry
        One per image of the batch.
    grid : (int, int)
        Concept grid height and width.

    Returns
    -------
    Tensor
        ``(B, C, Gh, Gw)``, same dtype as ``features``.
    """
    feature_size = (int(features.shape[-2]), int(features.shape[-1]))
    coordinates = torch.stack([_grid_coordinates(g, tuple(grid), feature_size) for g in geometries]).to(features.device)
    sampled = F.grid_sample(
        features.float(), coordinates, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.to(features.dtype)


def masks_to_grid(masks: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-downsample masks (K, H, W) to the concept grid: the covered fraction of each cell."""
    tensor = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
    return F.adaptive_avg_pool2d(tensor.float()[None], grid)[0]

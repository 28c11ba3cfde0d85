"""Geometry: masks land on exactly the feature cells the model sees, through resize and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptlens.concepts.models.adapters import ClassifierAdapter, DetectorAdapter
from conceptlens.concepts.geometry import Geometry, features_to_grid, image_cells, mask_to_feature_cells, masks_to_grid
from conceptlens.concepts.models.hooks import LayerCapture, resolve_layers


def _disc_and_bar_mask(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height * 0.4) ** 2 + (xx - width * 0.6) ** 2 < (min(height, width) * 0.25) ** 2
    bar = (yy > height * 0.75) & (xx > width * 0.1) & (xx < width * 0.5)
    return disc | bar


def _capture(model, images):
    adapter = DetectorAdapter(model.transform)
    refs = resolve_layers(model, ["backbone"])
    with LayerCapture(model, refs) as capture, torch.no_grad():
        _, geometries = adapter.forward(model, adapter.prepare(images, torch.device("cpu")), [i.shape[:2] for i in images])
    return capture.outputs["backbone"], geometries


def test_mask_lands_on_exact_feature_cells_in_padded_batch(pooling_detector):
    # A wide image and a tall image in one batch: the wide one is padded at the bottom, the tall
    # one on the right. The image *is* its mask, so the model's feature map shows where it went.
    masks = [_disc_and_bar_mask(50, 90), _disc_and_bar_mask(80, 44)]
    images = [np.repeat(m[..., None] * 255, 3, axis=2).astype(np.uint8) for m in masks]
    features, geometries = _capture(pooling_detector, images)

    assert geometries[0].canvas_size == geometries[1].canvas_size == tuple(features.shape[-2:] * np.array(8))
    assert geometries[0].resized_size == (64, 115)  # min side 64, aspect kept
    assert geometries[1].resized_size[1] < geometries[1].canvas_size[1]  # really padded
    for mask, geometry, feature in zip(masks, geometries, features):
        expected = mask_to_feature_cells(torch.from_numpy(mask)[None], geometry, tuple(feature.shape[-2:]))[0]
        torch.testing.assert_close(feature[0], expected, atol=1e-5, rtol=0)
        assert expected.sum() > 5  # the comparison is not between two empty maps


def test_naive_resize_does_not_match(pooling_detector):
    # The control: ignoring the model's resize and padding puts the mask on the wrong cells.
    mask = _disc_and_bar_mask(80, 44)
    other = _disc_and_bar_mask(50, 90)
    images = [np.repeat(m[..., None] * 255, 3, axis=2).astype(np.uint8) for m in (mask, other)]
    features, _ = _capture(pooling_detector, images)
    naive = F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], features.shape[-2:])[0, 0]
    assert (features[0, 0] - naive).abs().max() > 0.3


def test_image_cells_excludes_padding():
    geometry = Geometry(image_size=(50, 100), resized_size=(40, 80), offset=(0, 0), canvas_size=(64, 96))
    cells = image_cells(geometry, (8, 12))  # stride 8: rows 0-4 (centres 4..36) and columns 0-9 are image
    assert cells[:5, :10].all()
    assert not cells[5:].any() and not cells[:, 10:].any()


def test_grid_sampling_equals_interpolation_for_whole_image_adapter():
    adapter = ClassifierAdapter((32, 48))
    geometry = adapter.geometry((70, 90))
    features = torch.randn(1, 3, 8, 12)
    sampled = features_to_grid(features, [geometry], (20, 30))
    expected = F.interpolate(features, size=(20, 30), mode="bilinear", align_corners=False)
    torch.testing.assert_close(sampled, expected, atol=1e-5, rtol=0)


def test_grid_sampling_ignores_padding(pooling_detector):
    # An all-white image padded on the right: on the concept grid over the image no cell may
    # see the zero padding, even though a third of the canvas is padding.
    images = [np.full((80, 44, 3), 255, np.uint8), np.full((40, 90, 3), 255, np.uint8)]
    features, geometries = _capture(pooling_detector, images)
    assert features[0, 0].min() == 0  # padding is visible in the raw map
    grid = features_to_grid(features, geometries, (25, 25))
    # Interior cells see only image; edge cells see feature cells that straddle the image border
    # (the model's own pooling), never a cell made of padding alone.
    torch.testing.assert_close(grid[0, 0, :-2, :-2], torch.ones(23, 23))
    assert grid[0, 0].min() > 0.25
    canvas_naive = F.interpolate(features, size=(25, 25), mode="bilinear", align_corners=False)
    assert canvas_naive[0, 0].min() == 0


def test_masks_to_grid_is_area_fraction():
    mask = np.zeros((1, 40, 40), dtype=bool)
    mask[0, :20, :10] = True
    grid = masks_to_grid(mask, (4, 4))
    expected = torch.zeros(4, 4)
    expected[:2, 0] = 1.0
    torch.testing.assert_close(grid[0], expected)


@pytest.mark.parametrize("values", [[3, 4, 20, 30, 0, 0, 20, 32], [5, 6, 5, 6, -1, 2, 8, 8]])
def test_geometry_round_trip(values):
    assert Geometry.from_list(values).to_list() == values


def test_grid_sampling_never_reads_padding_cells():
    # an image of 40×70 on a 64×96 canvas (padded bottom and right); features at stride 8
    geometry = Geometry((40, 70), (40, 70), (0, 0), (64, 96))
    features = torch.zeros(1, 1, 8, 12)
    cells = image_cells(geometry, (8, 12))
    features[0, 0][cells] = 1.0
    features[0, 0][~cells] = 1000.0  # padding: must never be mixed in
    sampled = features_to_grid(features, [geometry], (40, 70))
    torch.testing.assert_close(sampled, torch.ones_like(sampled))  # a leak would add up to 1000
    # a ramp along the image's columns is kept inside the image, and replicated at its edge
    ramp = torch.arange(12, dtype=torch.float32).expand(8, 12).clone()[None, None]
    row = features_to_grid(ramp, [geometry], (1, 70))[0, 0, 0]
    last_image_column = int(cells[0].nonzero().max())
    assert row.max().item() == pytest.approx(last_image_column) and row.min().item() == pytest.approx(0)

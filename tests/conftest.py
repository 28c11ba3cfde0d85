"""Shared fixtures: tiny models and in-memory datasets, all seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from conceptlens.concepts.data.dataset import ArrayDataset


class PoolingDetector(nn.Module):
    """A detector-shaped model whose 'backbone' average-pools the input canvas by 8.

    It uses torchvision's own GeneralizedRCNNTransform (resize keeping aspect ratio, then pad to
    a multiple of 32), with mean 0 and std 1, so the feature map of an image equals its pooled
    pixels — a feature map of known content for geometry tests.
    """

    def __init__(self, min_size: int = 64, max_size: int = 120) -> None:
        super().__init__()
        self.transform = GeneralizedRCNNTransform(min_size, max_size, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], size_divisible=32)
        self.backbone = nn.AvgPool2d(8)

    def forward(self, images):
        image_list, _ = self.transform(images)
        return self.backbone(image_list.tensors)


@pytest.fixture
def pooling_detector() -> PoolingDetector:
    return PoolingDetector().eval()


@pytest.fixture
def random_images_dataset() -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(rng.integers(60, 100)), int(rng.integers(60, 100)), 3), dtype=np.uint8) for _ in range(10)]
    return ArrayDataset(images, name="random-images")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test single-threaded: its tensors are small, and on a busy 2-core machine OpenMP
    barriers make two threads many times slower than one. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Linear CKA (Kornblith et al. 2019), the representation-similarity baseline (docs/METHODS.md §7).

* :func:`linear_cka`: the closed form ``‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F)`` on centred features.
* :class:`MinibatchCKA`: CKA accumulated over minibatches with the unbiased HSIC estimator
  (Nguyen et al. 2021): ``CKA = mean HSIC₁(K, L) / sqrt(mean HSIC₁(K, K) · mean HSIC₁(L, L))``.
  For linear kernels HSIC₁ follows from the feature matrices alone, so no n×n Gram matrix is formed.
* :func:`cka_matrix`: every layer pair, streamed from the store, with pooled features (one
  sample per image) or spatial features (every cell of a common grid, one sample per position).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from conceptlens.concepts.geometry import Geometry, features_to_grid
from conceptlens.concepts.store.activations import EntryReader, StoreEntry

__all__ = ["linear_cka", "unbiased_hsic", "MinibatchCKA", "cka_matrix", "layer_features"]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Closed-form linear CKA of two feature matrices (n, p) and (n, q) (centred here)."""
    x = (x - x.mean(dim=0)).double()
    y = (y - y.mean(dim=0)).double()
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def unbiased_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased HSIC₁ (Song et al. 2012) of linear kernels ``K = XXᵀ``, ``L = YYᵀ`` (n ≥ 4).

    With ``K̃``, ``L̃`` the Gram matrices with zeroed diagonals:
    ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2·1ᵀK̃L̃1 / (n−2)] / (n(n−3))``,
    each term computed from X and Y in O(n·p·q).
    """
    x, y = x.double(), y.double()
    n = x.shape[0]
    norms_x, norms_y = (x * x).sum(dim=1), (y * y).sum(dim=1)
    trace = (x.T @ y).pow(2).sum() - (norms_x * norms_y).sum()
    row_sums_k = x @ x.sum(dim=0) - norms_x  # K̃ 1
    row_sums_l = y @ y.sum(dim=0) - norms_y  # L̃ 1
    total_k, total_l = row_sums_k.sum(), row_sums_l.sum()
    value = trace + total_k * total_l / ((n - 1) * (n - 2)) - 2 * (row_sums_k * row_sums_l).sum() / (n - 2)
    return float(value / (n * (n - 3)))


class MinibatchCKA:
    """Accumulate linear CKA between every pair of ``n_layers`` feature sets over minibatches."""

    def __init__(self, n_layers: int) -> None:
        self.hsic = np.zeros((n_layers, n_layers))
        self.batches = 0

    def update(self, features: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: per layer a (samples, channels) matrix, same samples in the same order."""
        if features[0].shape[0] < 4:
            return  # HSIC₁ needs n ≥ 4; a tiny last batch is skipped
        for i in range(len(features)):
            for j in range(i, len(features)):
                self.hsic[i, j] += unbiased_hsic(features[i], features[j])
                self.hsic[j, i] = self.hsic[i, j]
        self.batches += 1

    def compute(self) -> np.ndarray:
        """The (n_layers, n_layers) CKA matrix."""
        diagonal = np.sqrt(np.clip(np.diag(self.hsic), 1e-300, None))
        return self.hsic / np.outer(diagonal, diagonal)


def layer_features(activations: torch.Tensor, geometries: Sequence[Geometry], mode: str, grid: tuple[int, int]) -> torch.Tensor:
    """Turn a batch of activations (B, C, h, w) into CKA samples.

    ``pooled``: one sample per image (spatial mean), (B, C). ``spatial``: the map sampled on a
    common grid over each original image, one sample per (image, cell), (B·Gh·Gw, C).
    """
    if activations.dim() == 2:
        return activations.float()
    if mode == "pooled":
        return activations.float().mean(dim=(2, 3))
    sampled = features_to_grid(activations.float(), geometries, grid)
    return sampled.movedim(1, -1).reshape(-1, activations.shape[1])


def cka_matrix(
    entries: Sequence[StoreEntry], indices: Sequence[int], mode: str = "pooled", grid: tuple[int, int] = (8, 8), batch_size: int = 32
) -> np.ndarray:
    """Minibatch linear CKA between the activations of every pair of store entries.

    All entries must hold the same dataset items; ``indices`` (e.g. the test split) are visited
    in order, ``batch_size`` images at a time.
    """
    readers = [EntryReader(entry) for entry in entries]
    accumulator = MinibatchCKA(len(entries))
    indices = [int(i) for i in indices]
    for start in range(0, len(indices), batch_size):
        rows = indices[start : start + batch_size]
        features = []
        for reader in readers:
            tensors = reader.rows(rows)
            geometries = [Geometry.from_list(g.tolist()) for g in tensors["geometry"]]
            features.append(layer_features(tensors["activations"], geometries, mode, grid))
        accumulator.update(features)
    return accumulator.compute()

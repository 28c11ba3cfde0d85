"""Concept masks on the concept grid, stored next to activations.

Masks on the grid depend on the dataset and the grid only (the grid lies over the original
image), so one mask entry serves every model and layer. Entries are content-addressed like
activation entries: ``masks`` (B, K, Gh, Gw) float16 covered fractions and ``valid`` (B, K) uint8.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from conceptlens.concepts.progress import progress_bar

from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.errors import DataError
from conceptlens.concepts.geometry import masks_to_grid
from conceptlens.concepts.store.activations import FORMAT_VERSION, StoreEntry
from conceptlens.concepts.store.temporary import StoreLike, open_store

__all__ = ["embed_masks", "mask_request"]


def mask_request(dataset: ConceptDataset, grid: tuple[int, int]) -> dict:
    """The request whose hash keys a dataset's grid masks."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "masks",
        "grid": list(grid),
        "dataset_fingerprint": dataset.mask_fingerprint(),
        "concepts": list(dataset.concepts),
        "n_items": len(dataset),
    }


def embed_masks(
    dataset: ConceptDataset,
    store: StoreLike = None,
    grid: tuple[int, int] = (100, 100),
    batch_size: int = 64,
    progress: bool | None = None,
) -> StoreEntry:
    """Area-downsample every concept mask of ``dataset`` to ``grid`` and store them (once).

    Returns the complete entry; an existing one is reused, a partial one resumed. ``store``: a
    store or its folder; None: the session's temporary store.
    """
    if not dataset.concepts:
        raise DataError(f"dataset {dataset.name!r}", "has no concept masks", "use a dataset with masks/ (or COCO categories)")
    entry = open_store(store).entry(mask_request(dataset, grid))
    shards = entry.valid_shards()
    if entry.is_complete:
        return entry
    shard_size = shards[0].end - shards[0].start if shards else batch_size
    done = {(s.start, s.end) for s in shards}
    ranges = [(start, min(start + shard_size, len(dataset))) for start in range(0, len(dataset), shard_size)]
    show = sys.stderr.isatty() if progress is None else progress
    for start, end in progress_bar([r for r in ranges if r not in done], desc=f"masks of {dataset.name} on {grid[0]}x{grid[1]}", unit="shard", show=show):
        masks = torch.stack([masks_to_grid(dataset.masks(i), grid) for i in range(start, end)])
        valid = torch.from_numpy(np.stack([dataset.mask_valid(i) for i in range(start, end)]).astype(np.uint8))
        entry.write_shard(start, end, {"masks": masks.half(), "valid": valid})
    entry.finalize({
            "request": mask_request(dataset, grid),
            "dataset": {"name": dataset.name, "ids": list(dataset.ids), "concepts": list(dataset.concepts), "splits": dataset.splits},
        }, len(dataset))
    return entry

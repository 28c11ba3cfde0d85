"""Concept maps of a bank on the concept grid, computed once per (bank, activations, grid) and stored.

Comparisons read every layer's maps several times (NCAV maps twice: their maximum over the test
set normalises them before they are binarised), so the maps go to the store instead of being
recomputed. The maps are whatever the bank's projection gives (``sigmoid_affine``: probabilities,
``nnls_codes``: non-negative coefficients), stored as float16.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence

import numpy as np
import torch
from conceptlens.concepts.geometry import GRID_SAMPLING, Geometry
from conceptlens.concepts.store.activations import (
    FORMAT_VERSION,
    ActivationStore,
    EntryReader,
    StoreEntry,
)
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.concepts.progress import progress_bar

__all__ = ["bank_fingerprint", "concept_map_entry"]


def bank_fingerprint(bank: ConceptBank) -> str:
    """sha256 over a bank's tensors and the fields that shape its maps (its projection among them)."""
    digest = hashlib.sha256(json.dumps([bank.method, bank.projection, bank.layer, bank.concepts]).encode())
    for tensor in (bank.vectors, bank.biases, bank.channel_mean, bank.channel_std):
        if tensor is not None:
            digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def concept_map_entry(
    bank: ConceptBank,
    activations: StoreEntry,
    indices: Sequence[int],
    grid: tuple[int, int],
    store: ActivationStore,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> StoreEntry:
    """Store ``bank``'s maps on ``grid`` for the items ``indices`` of an activation entry.

    Returns a complete entry whose row ``r`` holds the maps of item ``indices[r]`` (tensor
    ``maps``, (n, K, Gh, Gw)); an existing entry for the same request is reused.

    Native maps (``reduce='native'``) are projected cell by cell and sampled on ``grid`` over each
    original image through its stored geometry; rows from shards of different padded sizes come
    zero-padded with rescaled geometries (:meth:`EntryReader.rows`), so every item's maps equal
    those of the item read alone. Maps already on a concept grid (``reduce='grid'``) lie over the
    original image, not the canvas: they are used as they are, or resampled from their grid to
    ``grid`` (bilinear, as ``F.interpolate`` with ``align_corners=False``).
    """
    indices = [int(i) for i in indices]
    on_grid = activations.manifest().get("request", {}).get("reduce") == "grid"
    request = {
        "format_version": FORMAT_VERSION,
        "kind": "concept_maps",
        "bank": bank_fingerprint(bank),
        "activations": activations.key,
        "indices_sha256": hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest(),
        "grid": list(grid),
        "grid_sampling": GRID_SAMPLING,
        **({"activations_on_grid": True} if on_grid else {}),  # native requests keep their keys
    }
    entry = store.entry(request)
    done = {(s.start, s.end) for s in entry.valid_shards()}
    if entry.is_complete:
        return entry
    reader = EntryReader(activations)
    ranges = [(s, min(s + batch_size, len(indices))) for s in range(0, len(indices), batch_size)]
    show = sys.stderr.isatty() if progress is None else progress
    for start, end in progress_bar([r for r in ranges if r not in done], desc=f"concept maps {bank.layer}", unit="batch", show=show):
        rows = reader.rows(indices[start:end])
        with torch.no_grad():
            maps = _project(bank, rows, grid, on_grid, device)
        entry.write_shard(start, end, {"maps": maps.half().cpu()})
    ids = activations.manifest()["dataset"]["ids"]
    entry.finalize({"request": request, "layer": bank.layer, "concepts": bank.concepts, "projection": bank.projection, "dataset": {"ids": [ids[i] for i in indices]}}, len(indices))
    return entry


def _project(bank: ConceptBank, rows: dict[str, torch.Tensor], grid: tuple[int, int], on_grid: bool, device: str | torch.device) -> torch.Tensor:
    """The bank's maps of a batch of stored rows on ``grid``."""
    features = rows["activations"].to(device=device, dtype=torch.float32)
    if not on_grid:
        return bank.concept_maps(features, [Geometry.from_list(g.tolist()) for g in rows["geometry"]], grid)
    size = (int(features.shape[-2]), int(features.shape[-1]))
    if size == tuple(grid):
        return bank.concept_maps(features)
    whole = Geometry(size, size, (0, 0), size)  # the stored grid covers the whole original image
    return bank.concept_maps(features, [whole] * features.shape[0], grid)

"""Stream aligned activations and grid masks from the store, one shard in memory at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from conceptlens.concepts.errors import DataError
from conceptlens.concepts.geometry import Geometry
from conceptlens.concepts.store.activations import EntryReader, StoreEntry

__all__ = ["ProbeBatch", "split_indices", "iter_batches", "check_aligned"]


@dataclass
class ProbeBatch:
    """A batch of items: dataset indices, activations, geometries and (optionally) grid masks."""

    indices: torch.Tensor
    activations: torch.Tensor
    geometries: list[Geometry]
    masks: torch.Tensor | None = None
    valid: torch.Tensor | None = None


def split_indices(mask_entry: StoreEntry, split: str) -> np.ndarray:
    """Indices of a split, from the dataset split recorded in a mask entry."""
    dataset = mask_entry.manifest()["dataset"]
    if split not in dataset.get("splits", {}):
        raise DataError(f"split {split!r}", f"not recorded for dataset {dataset['name']!r}", "use train, val or test")
    position = {item_id: i for i, item_id in enumerate(dataset["ids"])}
    return np.array(sorted(position[i] for i in dataset["splits"][split]), dtype=np.int64)


def check_aligned(activations: StoreEntry, masks: StoreEntry) -> None:
    """Raise DataError unless both entries hold the same dataset items in the same order."""
    left, right = activations.manifest()["dataset"], masks.manifest()["dataset"]
    if left["ids"] != right["ids"]:
        raise DataError(
            f"activations of {left['name']!r} vs masks of {right['name']!r}",
            "the entries hold different items",
            "embed activations and masks from the same dataset",
        )


def iter_batches(
    activations: StoreEntry,
    masks: StoreEntry | None = None,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[ProbeBatch]:
    """Yield batches of ``indices`` (default: every item) with activations and grid masks.

    A batch never spans two activation shards (a detector's native maps differ in size between
    shards), so it holds at most ``min(batch_size, shard size)`` items. With ``shuffle``, shard
    order and rows within a shard are permuted by ``seed``.
    """
    # Batches walk the activation shards one at a time, so one cached shard suffices (memory stays
    # flat as the dataset grows); a batch's mask rows span at most two mask shards.
    reader = EntryReader(activations, cached_shards=1)
    mask_reader = None
    if masks is not None:
        check_aligned(activations, masks)
        mask_reader = EntryReader(masks, cached_shards=2)
    wanted = np.arange(reader.bounds[-1][1]) if indices is None else np.asarray(indices, dtype=np.int64)
    by_shard: dict[int, list[int]] = {}
    for index in wanted:
        by_shard.setdefault(reader.shard_of(int(index)), []).append(int(index))
    order = sorted(by_shard)
    rng = np.random.default_rng(seed)
    if shuffle:
        order = list(rng.permutation(order))
    for number in order:
        rows = np.array(by_shard[number])
        if shuffle:
            rows = rng.permutation(rows)
        for chunk in np.array_split(rows, int(np.ceil(len(rows) / batch_size))):
            yield _batch(reader, mask_reader, chunk, device)


def _batch(reader: EntryReader, mask_reader: EntryReader | None, rows: np.ndarray, device) -> ProbeBatch:
    tensors = reader.rows(rows)
    batch = ProbeBatch(
        indices=torch.from_numpy(rows),
        activations=tensors["activations"].to(device=device, dtype=torch.float32),
        geometries=[Geometry.from_list(g.tolist()) for g in tensors["geometry"]],
    )
    if mask_reader is not None:
        mask_tensors = mask_reader.rows(rows)
        batch.masks = mask_tensors["masks"].to(device=device, dtype=torch.float32)
        batch.valid = mask_tensors["valid"].to(device=device).bool()
    return batch

"""Write in-memory activations and masks into real store entries, for learner tests.

Tests plant known concepts in activations and check that learners recover them; going through
the store keeps the tested path the one users run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from conceptlens.concepts.data.dataset import assign_splits
from conceptlens.concepts.store.activations import ActivationStore, StoreEntry

__all__ = ["planted_entries", "activation_entry"]


def activation_entry(
    root: Path, activations: torch.Tensor, ids: Sequence[str], name: str = "planted", shard_size: int = 16, tag: str = ""
) -> StoreEntry:
    """Store activations (N, C, ...) as a complete entry; geometry = whole image on the whole canvas."""
    n = activations.shape[0]
    height, width = (activations.shape[-2], activations.shape[-1]) if activations.dim() == 4 else (1, 1)
    entry = ActivationStore(root).entry({"planted": name, "kind": "activations", "tag": tag, "n": n})
    geometry = torch.tensor([[height, width, height, width, 0, 0, height, width]] * n, dtype=torch.int64)
    for start in range(0, n, shard_size):
        end = min(start + shard_size, n)
        entry.write_shard(start, end, {"activations": activations[start:end].float(), "geometry": geometry[start:end]})
    entry.finalize({"request": {"layer": name}, "item_shape": list(activations.shape[1:]), "dataset": {"name": name, "ids": list(ids)}}, n)
    return entry


def planted_entries(
    root: Path,
    activations: torch.Tensor,
    masks: torch.Tensor,
    concepts: Sequence[str],
    seed: int = 0,
    valid: torch.Tensor | None = None,
    shard_size: int = 16,
) -> tuple[StoreEntry, StoreEntry]:
    """Store planted activations (N, C, h, w) and grid masks (N, K, Gh, Gw); return both entries.

    The mask entry records a seeded 60/20/20 split like a real one (``conceptlens.probes.data.split_indices``).
    """
    n = activations.shape[0]
    ids = [f"{i:06d}" for i in range(n)]
    act_entry = activation_entry(root, activations, ids, shard_size=shard_size)
    mask_entry = ActivationStore(root).entry({"planted": "masks", "n": n, "k": len(concepts)})
    valid = torch.ones(n, len(concepts), dtype=torch.uint8) if valid is None else valid.to(torch.uint8)
    for start in range(0, n, shard_size):
        end = min(start + shard_size, n)
        mask_entry.write_shard(start, end, {"masks": masks[start:end].half(), "valid": valid[start:end]})
    splits = assign_splits(ids, seed)
    mask_entry.finalize(
        {"request": {"kind": "masks", "grid": list(masks.shape[-2:])}, "dataset": {"name": "planted", "ids": ids, "concepts": list(concepts), "splits": splits}},
        n,
    )
    return act_entry, mask_entry

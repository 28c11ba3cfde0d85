"""Aligned activations and grid masks for the probes, in batches: from the store or from memory.

A probe trains from a *batch source*: :class:`StoreSource` streams a pair of store entries one
shard in memory at a time, :class:`ArraySource` serves plain tensors; both yield the same
:class:`ProbeBatch` objects in the same order, so one training loop serves both. :func:`as_activations`
and :func:`as_masks` check plain arrays (scikit-learn's ``fit(X, y)``) before they become a source.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from conceptlens.concepts.data.splits import split_indices  # re-exported: it moved down for the comparison
from conceptlens.concepts.errors import DataError
from conceptlens.concepts.geometry import Geometry
from conceptlens.concepts.store.activations import EntryReader, StoreEntry

__all__ = [
    "ArrayInputError",
    "ArraySource",
    "BatchSource",
    "ProbeBatch",
    "StoreSource",
    "as_activations",
    "as_masks",
    "check_aligned",
    "holdout_split",
    "identity_geometries",
    "iter_batches",
    "split_indices",
]


@dataclass
class ProbeBatch:
    """A batch of items: dataset indices, activations, geometries and (optionally) grid masks."""

    indices: torch.Tensor
    activations: torch.Tensor
    geometries: list[Geometry]
    masks: torch.Tensor | None = None
    valid: torch.Tensor | None = None


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
    shards = [reader.shard_of(int(index)) for index in wanted]
    for chunk in _batch_rows(wanted, shards, batch_size, shuffle, seed):
        yield _batch(reader, mask_reader, chunk, device)


def _batch_rows(wanted: np.ndarray, shards: Sequence[int], batch_size: int, shuffle: bool, seed: int) -> Iterator[np.ndarray]:
    """The rows of each batch: shard by shard, ``min(batch_size, shard size)`` at most (one plan for every source).

    With ``shuffle``, shard order and then the rows within each shard are permuted by ``seed``.
    """
    by_shard: dict[int, list[int]] = {}
    for index, shard in zip(wanted, shards):
        by_shard.setdefault(shard, []).append(int(index))
    order = sorted(by_shard)
    rng = np.random.default_rng(seed)
    if shuffle:
        order = list(rng.permutation(order))
    for number in order:
        rows = np.array(by_shard[number])
        if shuffle:
            rows = rng.permutation(rows)
        yield from np.array_split(rows, int(np.ceil(len(rows) / batch_size)))


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


# ------------------------------------------------------------------------------- batch sources
class BatchSource(Protocol):
    """Aligned activations and grid masks that a probe reads in batches (store or memory).

    Attributes
    ----------
    concepts : list of str
        Concept names, the order of the K mask channels.
    grid : (int, int)
        The concept grid of the masks.
    description : str
        How errors name the data (``"dataset 'coco-val'"``).
    """

    concepts: list[str]
    grid: tuple[int, int]
    description: str

    def split(self, name: str) -> np.ndarray:
        """Item indices of a split (``train``, ``val`` or ``test``); never empty."""

    def batches(
        self, indices: Sequence[int] | None = None, batch_size: int = 64, shuffle: bool = False, seed: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[ProbeBatch]:
        """Batches of ``indices`` with activations, geometries, masks and validity, planned as :func:`iter_batches` plans them."""

    def record(self) -> dict[str, Any]:
        """Provenance of the data: store keys, model hash, layer and dataset (``None`` where unknown)."""


class StoreSource:
    """A pair of aligned store entries: native activations and the grid masks of the same dataset.

    Parameters
    ----------
    activations : StoreEntry
        Activations per item of one layer.
    masks : StoreEntry
        Grid masks (:func:`conceptlens.concepts.embedding.masks.embed_masks`); their manifest
        records the concepts, the grid and the dataset's split.
    """

    def __init__(self, activations: StoreEntry, masks: StoreEntry) -> None:
        check_aligned(activations, masks)
        self.activations, self.masks = activations, masks
        manifest = masks.manifest()
        self.dataset = str(manifest["dataset"].get("name"))
        self.concepts = list(manifest["dataset"].get("concepts", []))
        grid = manifest.get("request", {}).get("grid")
        self.grid = (int(grid[0]), int(grid[1]))
        self.description = repr(self.dataset)

    def split(self, name: str) -> np.ndarray:
        indices = split_indices(self.masks, name)
        if len(indices) == 0:
            raise DataError(f"split {name!r} of dataset {self.dataset!r}", "holds no image", "add images or change the split fractions")
        return indices

    def batches(
        self, indices: Sequence[int] | None = None, batch_size: int = 64, shuffle: bool = False, seed: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[ProbeBatch]:
        return iter_batches(self.activations, self.masks, indices, batch_size, shuffle=shuffle, seed=seed, device=device)

    def record(self) -> dict[str, Any]:
        request = self.activations.manifest().get("request", {})
        return {
            "activations_key": self.activations.key,
            "masks_key": self.masks.key,
            "model_hash": request.get("model_hash"),
            "layer": str(request.get("layer", self.activations.key)),
            "dataset": self.dataset,
        }


@dataclass
class ArraySource:
    """Activations and grid masks held in memory, served like a store entry of one shard.

    Every item's geometry is the identity (the whole image on the whole canvas), so the concept
    grid lies over the activation map itself.

    Parameters
    ----------
    activations : Tensor
        ``(N, C, h, w)`` activations (checked by :func:`as_activations`).
    masks : Tensor, optional
        ``(N, K, Gh, Gw)`` masks in [0, 1] (checked by :func:`as_masks`).
    concepts : list of str
        Names of the K concepts.
    splits : dict
        ``{split name: item indices}``.
    valid : Tensor, optional
        ``(N, K)`` bool: which (item, concept) pairs count; default all.
    description : str
        How errors name the data.
    """

    activations: torch.Tensor
    masks: torch.Tensor | None = None
    concepts: list[str] = field(default_factory=list)
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    valid: torch.Tensor | None = None
    description: str = "the arrays (X, y)"

    @property
    def grid(self) -> tuple[int, int]:
        shape = (self.masks if self.masks is not None else self.activations).shape[-2:]
        return int(shape[0]), int(shape[1])

    def split(self, name: str) -> np.ndarray:
        indices = self.splits.get(name)
        if indices is None or len(indices) == 0:
            raise DataError(f"split {name!r} of {self.description}", "holds no item", "pass more items, or a validation set")
        return np.asarray(indices, dtype=np.int64)

    def batches(
        self, indices: Sequence[int] | None = None, batch_size: int = 64, shuffle: bool = False, seed: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[ProbeBatch]:
        wanted = np.arange(len(self.activations)) if indices is None else np.asarray(indices, dtype=np.int64)
        geometry = identity_geometries(1, tuple(self.activations.shape[-2:]))[0]
        for rows in _batch_rows(wanted, [0] * len(wanted), batch_size, shuffle, seed):
            picked = torch.from_numpy(rows)
            batch = ProbeBatch(
                indices=picked,
                activations=self.activations[picked.to(self.activations.device)].to(device=device, dtype=torch.float32),
                geometries=[geometry] * len(rows),
            )
            if self.masks is not None:
                batch.masks = self.masks[picked.to(self.masks.device)].to(device=device, dtype=torch.float32)
                valid = self.valid[picked.to(self.valid.device)] if self.valid is not None else torch.ones(len(rows), self.masks.shape[1])
                batch.valid = valid.to(device).bool()
            yield batch

    def record(self) -> dict[str, Any]:
        return {"activations_key": None, "masks_key": None, "model_hash": None, "layer": None, "dataset": None}


def identity_geometries(n: int, size: tuple[int, int]) -> list[Geometry]:
    """``n`` geometries of an image that is its own canvas and feature map of ``size`` (h, w)."""
    size = (int(size[0]), int(size[1]))
    return [Geometry(size, size, (0, 0), size)] * n


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) item indices, sorted: ``round(fraction · n)`` held out, at least one of each.

    Raises
    ------
    ArrayInputError
        With fewer than 2 items.
    """
    if n < 2:
        raise ArrayInputError(
            f"{n} item (n_samples={n})",
            "too few items: early stopping holds out at least one item for validation, one sample is not enough",
            "pass 2 items or more, or a validation set",
        )
    held_out = min(max(1, int(round(fraction * n))), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


# -------------------------------------------------------------------------------- plain arrays
class ArrayInputError(DataError, ValueError):
    """Plain activations or masks a probe cannot use (also a ``ValueError``, as scikit-learn expects)."""


def as_activations(X: Any, name: str = "X") -> tuple[torch.Tensor, bool]:
    """Check plain activations and return them as ``(N, C, h, w)`` float maps.

    Parameters
    ----------
    X : Tensor, ndarray or array-like
        ``(N, C, h, w)`` activation maps, or ``(N, C)`` pixel vectors (read as 1×1 maps). A tensor
        stays on its device.
    name : str
        How errors name the argument.

    Returns
    -------
    maps : Tensor
        ``(N, C, h, w)``, float32 unless ``X`` is a floating tensor already.
    pixels : bool
        Whether ``X`` was 2-D.

    Raises
    ------
    ArrayInputError
        Another number of dimensions, no item or channel, complex, NaN or infinite values.
    """
    tensor = _as_tensor(X, name)
    if tensor.dim() not in (2, 4):
        raise ArrayInputError(
            f"{name} of shape {tuple(tensor.shape)}",
            "activations must be (N, C, h, w) maps or (N, C) pixel vectors",
            "Reshape your data: X[None] for a single item, X.reshape(-1, 1) for a single channel",
        )
    shape = tuple(tensor.shape)
    for axis, what in ((0, "sample"), (1, "feature")):
        if shape[axis] == 0:
            raise ArrayInputError(f"{name} of shape {shape}", f"0 {what}(s) (shape={shape}) while a minimum of 1 is required",
                                  "pass at least one item with at least one channel")
    if tensor.numel() == 0:
        raise ArrayInputError(f"{name} of shape {shape}", "the activation maps hold no cell", "pass maps of at least 1×1 cells")
    pixels = tensor.dim() == 2
    return (tensor[:, :, None, None] if pixels else tensor), pixels


def as_masks(y: Any, activations: torch.Tensor, pixels: bool, name: str = "y") -> torch.Tensor:
    """Check plain concept masks against their activations and return them as ``(N, K, h, w)`` floats.

    Parameters
    ----------
    y : Tensor, ndarray or array-like
        Masks on the activations' grid with values in [0, 1] (bool, 0/1 or covered fractions):
        ``(N, K, h, w)`` or ``(N, h, w)`` for maps, ``(N, K)`` or ``(N,)`` for pixel vectors; the
        forms without K hold one concept.
    activations : Tensor
        ``(N, C, h, w)`` maps from :func:`as_activations`.
    pixels : bool
        Whether the activations were ``(N, C)`` pixel vectors.
    name : str
        How errors name the argument.

    Raises
    ------
    ArrayInputError
        ``y`` missing, of another shape or item count, or with values outside [0, 1].
    """
    shapes = "(N, K) or (N,) with (N, C) pixel vectors" if pixels else "(N, K, h, w) or (N, h, w) with (N, C, h, w) maps"
    if y is None:
        raise ArrayInputError(f"{name}=None", "requires y to be passed, but the target y is None: probes learn from concept masks", f"pass the masks as y, {shapes}")
    masks = _as_tensor(y, name).float()
    single = 1 if pixels else 3
    if masks.dim() not in (single, single + 1):
        raise ArrayInputError(f"{name} of shape {tuple(masks.shape)}", f"masks must be {shapes}", "Reshape your data to one of these shapes")
    masks = masks.unsqueeze(1) if masks.dim() == single else masks
    masks = masks[:, :, None, None] if pixels else masks
    if masks.shape[0] != activations.shape[0]:
        raise ArrayInputError(f"{name} of shape {tuple(masks.shape)}", f"holds {masks.shape[0]} items, X holds {activations.shape[0]}", "pass one mask per item of X")
    if masks.shape[-2:] != activations.shape[-2:] or masks.shape[1] == 0:
        raise ArrayInputError(
            f"{name} of shape {tuple(masks.shape)}",
            f"masks must lie on the activations' grid {tuple(activations.shape[-2:])} with at least one concept",
            "resample the masks to the activation map (e.g. adaptive average pooling of full-size masks)",
        )
    if bool(((masks < 0) | (masks > 1)).any()):
        raise ArrayInputError(f"{name} in [{float(masks.min()):g}, {float(masks.max()):g}]", "mask values must lie in [0, 1] (covered fraction of a cell)", "pass binary masks or covered fractions")
    return masks


def _as_tensor(values: Any, name: str) -> torch.Tensor:
    """A real tensor of ``values`` (a tensor stays on its device), refusing sparse, complex and non-finite input."""
    if isinstance(values, torch.Tensor):
        if values.layout != torch.strided:
            raise ArrayInputError(f"{name} of layout {values.layout}", "sparse input is not supported", "pass a dense tensor (X.to_dense())")
        tensor = values.detach()
    else:
        if hasattr(values, "toarray"):
            raise ArrayInputError(f"{name} of type {type(values).__name__}", "sparse input is not supported", "pass a dense array (e.g. X.toarray())")
        array = np.asarray(values)
        if array.dtype.kind == "O":
            array = array.astype(np.float64)  # numbers held as objects; anything else raises TypeError
        if array.dtype.kind not in "biufc":
            raise ArrayInputError(f"{name} of dtype {array.dtype}", "values must be numbers", "pass a numeric array")
        if array.dtype.kind == "c":
            raise ArrayInputError(f"{name} of dtype {array.dtype}", "Complex data not supported", "pass real numbers")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32 if array.dtype.kind != "b" else bool))
    if tensor.is_complex():
        raise ArrayInputError(f"{name} of dtype {tensor.dtype}", "Complex data not supported", "pass real numbers")
    if tensor.dtype == torch.bool or not tensor.is_floating_point():
        tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        raise ArrayInputError(f"{name}", "contains NaN or inf values", "remove or impute the non-finite values")
    return tensor

"""Where the NMF estimators' pixel vectors come from: the thin adapter between data and solvers.

A fit reads pixel vectors ``(n, C)`` through one :class:`PixelSource`, whatever the data:

* an in-memory matrix: a tensor, array or nested list ``(N, C)``, or activations
  ``(N, C, h, w)`` whose every cell is a pixel vector (image by image, row-major);
* a store entry of a layer's activations, streamed image batch by image batch: only the cells
  that lie on an image count (``image_cells``; a detector's padding is left out).

:class:`Clamp` clamps blocks at zero (or refuses negatives) and checks them finite;
:func:`minibatches` re-cuts a stream of blocks into minibatches of a fixed size.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse
import torch
from conceptlens.concepts.progress import progress_bar

from conceptlens.concepts.geometry import image_cells
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.probes.data import ProbeBatch, iter_batches
from conceptlens.probes.nmf_solvers import NMFError

__all__ = [
    "IMAGE_BATCH",
    "Clamp",
    "PixelSource",
    "as_tensor",
    "checked_indices",
    "minibatches",
    "pixel_rows",
    "pixel_source",
    "reduction",
]

IMAGE_BATCH = 64  # images per read from the store
ROW_CHUNK = 65536  # pixel rows per block streamed from a matrix
SHAPES = "(N, C) pixel vectors or (N, C, h, w) activations"


@dataclass
class PixelSource:
    """Where pixel vectors come from: an in-memory matrix or a store entry (streamed)."""

    name: str
    description: dict[str, Any]
    pixels: torch.Tensor | None = None
    entry: StoreEntry | None = None
    indices: Sequence[int] | None = None
    reduce: str = "native"

    def channels(self) -> int:
        """The number of channels C of the pixel vectors."""
        if self.pixels is not None:
            return int(self.pixels.shape[1])
        return int(self.entry.manifest()["item_shape"][0])

    def matrix(self, device: torch.device, show: bool = False) -> torch.Tensor:
        """The whole (N, C) pixel matrix on ``device`` (raw, not clamped)."""
        if self.pixels is not None:
            return self.pixels.to(device=device, dtype=torch.float32)
        blocks = list(progress_bar(self.blocks(device, 0, False), desc="reading pixels", unit="batch", show=show))
        if not blocks:
            raise NMFError(self.name, "holds no pixel vectors", "give non-empty indices")
        return torch.cat(blocks)

    def blocks(self, device: torch.device, seed: int, shuffle: bool) -> Iterator[torch.Tensor]:
        """Raw pixel blocks (n, C) in order (or shuffled by ``seed``: blocks and rows within)."""
        if self.pixels is not None:
            yield from _matrix_blocks(self.pixels, device, seed, shuffle)
            return
        for batch in iter_batches(self.entry, indices=self.indices, batch_size=IMAGE_BATCH, shuffle=shuffle, seed=seed, device=device):
            block = _batch_pixels(batch, self.reduce)
            if shuffle:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + int(batch.indices[0]))
                block = block[torch.randperm(block.shape[0], generator=generator).to(block.device)]
            yield block


def pixel_source(data: Any, indices: Sequence[int] | None, caller: str) -> PixelSource:
    """The :class:`PixelSource` of ``data``: a store entry (``indices``: a split) or a matrix.

    Parameters
    ----------
    data : StoreEntry, Tensor, ndarray or array-like
        A store entry of a layer's activations, ``(N, C)`` pixel vectors or ``(N, C, h, w)``
        activations.
    indices : sequence of int, optional
        Items of a store entry; refused for in-memory data.
    caller : str
        How errors name the call (e.g. ``'NMFConcepts.fit'``).
    """
    if isinstance(data, StoreEntry):
        return _entry_source(data, indices)
    if indices is not None:
        raise NMFError(f"{caller}(indices=…)", "indices select items of a store entry", "index the pixel matrix yourself")
    tensor = as_tensor(data, "pixel matrix")
    pixels = pixel_rows(tensor, "pixel matrix")
    kind = "tensor" if isinstance(data, torch.Tensor) else "array"
    return PixelSource("pixel matrix", {"source": kind, "shape": list(tensor.shape)}, pixels=pixels)


def as_tensor(data: Any, name: str) -> torch.Tensor:
    """``data`` as a tensor, sharing memory where it can (never written to).

    Accepts tensors, numpy arrays (read-only ones too) and anything ``numpy.asarray`` reads
    (nested lists, array-likes); numbers stored as Python objects become float64. Sparse and
    complex input is refused.
    """
    if isinstance(data, torch.Tensor):
        return data.detach()
    if scipy.sparse.issparse(data):
        raise NMFError(name, "is a sparse matrix: sparse input is not supported", "pass a dense array or tensor (e.g. matrix.toarray())")
    array = np.asarray(data)
    if array.dtype.kind == "c":
        raise NMFError(name, "Complex data not supported: NMF needs real, non-negative input", "pass real activations")
    if array.dtype.kind not in "biuf":
        array = array.astype(np.float64)  # numbers held as objects; anything else raises TypeError here
    elif array.dtype.kind == "b" or array.dtype in (np.uint16, np.uint32, np.uint64):
        array = array.astype(np.float32)
    with warnings.catch_warnings():  # a read-only array (memmap) is only ever read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array)


def pixel_rows(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Pixel vectors (n, C) of ``(N, C)`` rows or ``(N, C, h, w)`` activations (every cell, row-major)."""
    if tensor.dim() not in (2, 4):
        raise NMFError(name, f"has shape {tuple(tensor.shape)}", f"Reshape your data: give {SHAPES}, or a store entry")
    for axis, noun in ((0, "sample"), (1, "feature")):
        if tensor.shape[axis] == 0:
            raise NMFError(name, f"has 0 {noun}(s) (shape={tuple(tensor.shape)}) while a minimum of 1 is required.", "give non-empty data")
    if tensor.dim() == 4:
        return tensor.movedim(1, -1).reshape(-1, tensor.shape[1])
    return tensor


def _entry_source(entry: StoreEntry, indices: Sequence[int] | None) -> PixelSource:
    manifest = entry.manifest()
    request = manifest.get("request", {})
    layer = request.get("layer")
    wanted = checked_indices(entry, indices, manifest["n_items"])
    description = {
        "source": "store",
        "store_key": entry.key,
        "model_hash": request.get("model_hash"),
        "layer": layer,
        "dataset": manifest.get("dataset", {}).get("name"),
        "n_images": int(len(wanted)),
        "indices_sha256": hashlib.sha256(np.ascontiguousarray(wanted).tobytes()).hexdigest(),
    }
    name = f"layer {layer!r} (store entry {entry.key})"
    return PixelSource(name, description, entry=entry, indices=None if indices is None else wanted, reduce=request.get("reduce") or "native")


def checked_indices(entry: StoreEntry, indices: Sequence[int] | None, n_items: int) -> np.ndarray:
    """``indices`` as an int64 array (default: every item), refused when outside the entry's ``n_items``."""
    if indices is None:
        return np.arange(n_items)
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
    if wanted.size and (wanted.min() < 0 or wanted.max() >= n_items):
        raise NMFError(f"store entry {entry.key}", f"holds {n_items} items; indices run from {wanted.min()} to {wanted.max()}", "give indices of this entry's items (conceptlens.probes.data.split_indices)")
    return wanted


def reduction(entry: StoreEntry) -> str:
    """How the entry's activations were reduced when embedded (``'native'`` unless recorded)."""
    return entry.manifest().get("request", {}).get("reduce") or "native"


def _batch_pixels(batch: ProbeBatch, reduce: str) -> torch.Tensor:
    """Pixel vectors (n, C) of a batch: its image cells, image by image, row-major."""
    activations = batch.activations
    if activations.dim() == 2:  # pooled activations: one vector per image
        return activations
    channels = activations.shape[1]
    cells = activations.movedim(1, -1).reshape(activations.shape[0], -1, channels)
    if reduce == "grid" or activations.dim() != 4:
        return cells.reshape(-1, channels)
    on_image = torch.stack([image_cells(g, tuple(activations.shape[-2:])) for g in batch.geometries])
    return cells[on_image.reshape(activations.shape[0], -1).to(cells.device)]


def _matrix_blocks(pixels: torch.Tensor, device: torch.device, seed: int, shuffle: bool) -> Iterator[torch.Tensor]:
    order = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, pixels.shape[0], ROW_CHUNK):
        rows = pixels[start : start + ROW_CHUNK] if order is None else pixels[order[start : start + ROW_CHUNK]]
        yield rows.to(device=device, dtype=torch.float32)


def minibatches(blocks: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of (n, C) blocks into minibatches of exactly ``size`` rows (the last: fewer)."""
    pending: list[torch.Tensor] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += block.shape[0]
        if held >= size:
            joined = torch.cat(pending)
            cut = (held // size) * size
            yield from joined[:cut].split(size)
            pending, held = ([joined[cut:]] if cut < held else []), held - cut
    if held:
        yield torch.cat(pending)


class Clamp:
    """Clamp pixel blocks at zero (counting negatives), or refuse negatives when clamping is off.

    Parameters
    ----------
    clamp : bool
        Clamp (and count) negative entries; ``False`` refuses them.
    name : str
        The culprit named by errors (layer, store entry, "pixel matrix").
    """

    def __init__(self, clamp: bool, name: str) -> None:
        self.clamp, self.name = clamp, name
        self.negative, self.total, self.counting = 0, 0, True

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        # one reduction, no block-sized temporaries: min/max propagate NaN and show ±inf
        low, high = (float(v) for v in torch.aminmax(block)) if block.numel() else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise NMFError(self.name, "contains NaN or inf", "check the model and the stored activations")
        negative = int((block < 0).sum()) if low < 0 else 0
        if self.counting:
            self.negative += negative
            self.total += block.numel()
        if negative and not self.clamp:
            raise NMFError(
                self.name, f"Negative values in data ({negative} of {block.numel()} entries in a batch): NMF needs non-negative input",
                "set clamp=True to clamp them at zero (recorded in the bank), or pick a layer after a ReLU",
            )
        return block.clamp(min=0) if negative else block

    @property
    def fraction(self) -> float:
        """Fraction of the counted entries that were negative."""
        return self.negative / self.total if self.total else 0.0

"""Stream a concept dataset through a model and store chosen layers' activations.

One forward pass captures every requested layer and stops after the last of them. Each batch is
written as one shard per layer; a rerun serves complete entries from the store without a forward
pass and resumes partial ones from their verified shards.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from conceptlens.concepts.progress import progress_bar

from conceptlens.concepts.environment import package_versions, resolve_device
from conceptlens.concepts.errors import LayerError, StoreError
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.embedding.decode import RangeDecoder, resolve_decode_workers
from conceptlens.concepts.geometry import GRID_SAMPLING, Geometry, features_to_grid, image_cells
from conceptlens.concepts.models.adapters import check_image_sizes
from conceptlens.concepts.models.hooks import LayerCapture, LayerRef, resolve_layers
from conceptlens.concepts.models.loading import LoadedModel
from conceptlens.concepts.store.activations import FORMAT_VERSION, ActivationStore, StoreEntry
from conceptlens.concepts.store.temporary import open_store

__all__ = ["REDUCTIONS", "EmbedPlan", "EmbedResult", "embed", "embed_ranges", "embed_request", "plan_embedding", "reduce_features"]

REDUCTIONS = ("native", "grid", "mean", "max")
DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class EmbedResult:
    """What :func:`embed` did: the entries per layer, which were computed, and how many batches ran."""

    entries: dict[str, StoreEntry]
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    forward_batches: int = 0


@dataclass
class EmbedPlan:
    """What an embedding still has to do: the entry per layer and the item ranges missing from each.

    ``groups`` maps a shard size to the layers written with it (a resumed entry keeps the shard
    size it was started with; the others take the batch size); layers whose entry is complete are
    in ``reused``.
    """

    entries: dict[str, StoreEntry]
    n_items: int
    groups: dict[int, list[str]] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)

    def ranges(self, shard_size: int) -> list[tuple[int, int]]:
        """The item ranges of ``shard_size`` that some layer of that group has no shard for yet."""
        return _missing_ranges(self.entries, self.groups[shard_size], shard_size, self.n_items)


def embed_request(
    model: LoadedModel, dataset: ConceptDataset, layer: str, reduce: str, grid: tuple[int, int], dtype: str, fingerprint: str | None = None
) -> dict[str, Any]:
    """The request that determines one layer's activations (its hash is the store key).

    ``fingerprint`` is ``dataset.image_fingerprint()`` when the caller already has it (it hashes
    every image file of a folder dataset).
    """
    return {
        "format_version": FORMAT_VERSION,
        "model_hash": model.hash,
        "layer": layer,
        "adapter": model.adapter.settings(),
        "reduce": reduce,
        "grid": list(grid) if reduce == "grid" else None,
        "grid_sampling": GRID_SAMPLING if reduce == "grid" else None,
        "dtype": dtype,
        "dataset_fingerprint": fingerprint or dataset.image_fingerprint(),
        "n_items": len(dataset),
    }


def reduce_features(features: torch.Tensor, geometries: Sequence[Geometry], reduce: str, grid: tuple[int, int]) -> torch.Tensor:
    """Apply a reduction to a batch of layer outputs (B, C, h, w).

    ``native`` keeps the map; ``grid`` samples it on the concept grid over each original image;
    ``mean``/``max`` pool over the cells that lie on the image (padding excluded).
    """
    if reduce == "native":
        return features
    if features.dim() != 4:
        raise LayerError("layer output", f"has shape {tuple(features.shape)}; reduce={reduce!r} needs (B, C, h, w)", "use reduce=native for this layer")
    if reduce == "grid":
        return features_to_grid(features, geometries, grid)
    cells = torch.stack([image_cells(g, tuple(features.shape[-2:])) for g in geometries]).to(features.device)[:, None]
    if reduce == "mean":
        return (features * cells).sum(dim=(2, 3)) / cells.sum(dim=(2, 3)).clamp(min=1)
    return features.masked_fill(~cells, float("-inf")).amax(dim=(2, 3))


def embed(
    model: LoadedModel,
    dataset: ConceptDataset,
    layers: Sequence[str],
    store: ActivationStore | str | os.PathLike | None = None,
    *,
    reduce: str = "native",
    grid: tuple[int, int] = (100, 100),
    dtype: str = "float16",
    batch_size: int = 32,
    device: str | torch.device = "auto",
    progress: bool | None = None,
    decode_workers: int | None = None,
) -> EmbedResult:
    """Embed ``dataset`` at ``layers`` of ``model`` into ``store``.

    Parameters
    ----------
    model : LoadedModel
        Model and adapter (see :func:`conceptlens.concepts.models.loading.load_model`).
    dataset : ConceptDataset
        Images to embed (masks are not needed here).
    layers : sequence of str
        Layer names (dotted module paths, ``:key`` for tuple/dict outputs).
    store : ActivationStore, str, PathLike or None
        Where to write: a store or its folder; None: the session's temporary store
        (:func:`conceptlens.concepts.store.temporary.temporary_store`).
    reduce : {'native', 'grid', 'mean', 'max'}
        Keep the feature map, sample it on the concept grid, or pool it per image.
    grid : (int, int)
        Concept grid size for ``reduce='grid'``.
    dtype : {'float16', 'float32'}
        Storage dtype.
    batch_size : int
        Images per forward pass and per shard (a resumed entry keeps its shard size).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    progress : bool, optional
        Show a progress bar; default: only when stderr is a terminal.
    decode_workers : int, optional
        Threads decoding the next batches' images while the model runs on the current one (0:
        decode in this thread, between forward passes); default
        :func:`~conceptlens.concepts.embedding.decode.default_decode_workers`. The shards are
        bitwise the same whatever the number.

    Returns
    -------
    EmbedResult
    """
    _check_arguments(reduce, dtype, batch_size, dataset)
    decode_workers = resolve_decode_workers(decode_workers)
    refs = resolve_layers(model.module, layers)
    torch_device = resolve_device(device)
    model.to(torch_device)
    plan = plan_embedding(model, dataset, [ref.name for ref in refs], store, reduce=reduce, grid=grid, dtype=dtype, batch_size=batch_size)
    result = EmbedResult(entries=plan.entries, reused=list(plan.reused))
    show = sys.stderr.isatty() if progress is None else progress
    for shard_size, names in plan.groups.items():
        group = [ref for ref in refs if ref.name in names]
        result.forward_batches += _embed_group(model, dataset, group, plan.entries, plan.ranges(shard_size), reduce, grid, dtype, torch_device, show,
                                               decode_workers)
        for name in names:
            entry = plan.entries[name]
            entry.finalize(_metadata(model, dataset, entry.request, entry), len(dataset))
            result.computed.append(name)
    return result


def plan_embedding(
    model: LoadedModel,
    dataset: ConceptDataset,
    layers: Sequence[str],
    store: ActivationStore | str | os.PathLike | None = None,
    *,
    reduce: str = "native",
    grid: tuple[int, int] = (100, 100),
    dtype: str = "float16",
    batch_size: int = 32,
) -> EmbedPlan:
    """The store entries :func:`embed` would write with these arguments, and what each still lacks.

    Corrupt shards are deleted on the way (:meth:`StoreEntry.valid_shards`), as :func:`embed` does.
    Several processes can then each write a share of :meth:`EmbedPlan.ranges` with
    :func:`embed_ranges`; a final :func:`embed` finds every shard present and writes the manifests.

    Parameters
    ----------
    model, dataset, layers, store, reduce, grid, dtype, batch_size
        As for :func:`embed`.

    Returns
    -------
    EmbedPlan
    """
    _check_arguments(reduce, dtype, batch_size, dataset)
    store = open_store(store)
    names = [ref.name for ref in resolve_layers(model.module, layers)]
    fingerprint = dataset.image_fingerprint()
    entries = {name: store.entry(embed_request(model, dataset, name, reduce, grid, dtype, fingerprint)) for name in names}
    plan = EmbedPlan(entries=entries, n_items=len(dataset))
    for name in names:
        shards = entries[name].valid_shards()
        if entries[name].is_complete:
            plan.reused.append(name)
            continue
        shard_size = shards[0].end - shards[0].start if shards else batch_size
        plan.groups.setdefault(shard_size, []).append(name)
    return plan


def embed_ranges(
    model: LoadedModel,
    dataset: ConceptDataset,
    layers: Sequence[str],
    store: ActivationStore | str | os.PathLike | None,
    ranges: Sequence[tuple[int, int]],
    *,
    reduce: str = "native",
    grid: tuple[int, int] = (100, 100),
    dtype: str = "float16",
    device: str | torch.device = "auto",
    progress: bool = False,
    fingerprint: str | None = None,
    decode_workers: int | None = None,
) -> int:
    """Write the shards of items ``ranges`` for ``layers`` (one shard per range), without a manifest.

    A range whose shard a layer already has is not written again (several writers, or a retried
    one, may share an entry); a range that every layer has is not run at all. Each range is one
    forward pass, so its shard is bitwise the shard :func:`embed` writes for it with the same
    ranges (:meth:`EmbedPlan.ranges`).

    Parameters
    ----------
    model, dataset, layers, store, reduce, grid, dtype, device
        As for :func:`embed`.
    ranges : sequence of (int, int)
        ``(start, end)`` item ranges, ``0 <= start < end <= len(dataset)``.
    progress : bool
        Show a progress bar.
    fingerprint : str, optional
        ``dataset.image_fingerprint()`` when the caller already has it (a worker writing many
        range lists hashes a folder dataset's images once).
    decode_workers : int, optional
        As for :func:`embed`.

    Returns
    -------
    int
        The number of forward passes run.
    """
    _check_arguments(reduce, dtype, 1, dataset)
    decode_workers = resolve_decode_workers(decode_workers)
    for start, end in ranges:
        if not 0 <= start < end <= len(dataset):
            raise StoreError(f"item range ({start}, {end})", f"is not within the dataset's {len(dataset)} items", "pass ranges from EmbedPlan.ranges")
    refs = resolve_layers(model.module, layers)
    torch_device = resolve_device(device)
    model.to(torch_device)
    fingerprint = fingerprint or dataset.image_fingerprint()
    store = open_store(store)
    entries = {ref.name: store.entry(embed_request(model, dataset, ref.name, reduce, grid, dtype, fingerprint)) for ref in refs}
    todo = [(int(start), int(end)) for start, end in ranges]
    return _embed_group(model, dataset, refs, entries, todo, reduce, grid, dtype, torch_device, progress, decode_workers)


def _check_arguments(reduce: str, dtype: str, batch_size: int, dataset: ConceptDataset) -> None:
    if reduce not in REDUCTIONS:
        raise StoreError(f"reduce={reduce!r}", "unknown reduction", f"use one of {', '.join(REDUCTIONS)}")
    if dtype not in DTYPES:
        raise StoreError(f"dtype={dtype!r}", "unsupported storage dtype", f"use one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise StoreError(f"batch_size={batch_size}", "must be at least 1", "pass a positive --batch-size")
    if len(dataset) == 0:
        raise StoreError(f"dataset {dataset.name!r}", "has no images", "check the dataset path")


def _layer_names(refs: Sequence[LayerRef], shown: int = 3) -> str:
    """``layer2, layer3`` for a progress bar; ``layer1, layer2, layer3 +2`` when there are more."""
    names = [ref.name for ref in refs]
    return ", ".join(names[:shown]) + (f" +{len(names) - shown}" if len(names) > shown else "")


def _embed_group(
    model: LoadedModel,
    dataset: ConceptDataset,
    refs: list[LayerRef],
    entries: dict[str, StoreEntry],
    ranges: list[tuple[int, int]],
    reduce: str,
    grid: tuple[int, int],
    dtype: str,
    device: torch.device,
    show_progress: bool,
    decode_workers: int = 0,
) -> int:
    """Run the forward passes of ``ranges`` for layers sharing a shard size; return the number of batches.

    A layer that already has a range's shard (another writer's) is not written again; a range
    every layer has is skipped. ``decode_workers`` threads decode the next ranges' images
    during each forward pass (:class:`~conceptlens.concepts.embedding.decode.RangeDecoder`).
    """
    done = {ref.name: {(s.start, s.end) for s in entries[ref.name].shards()} for ref in refs}
    todo = [r for r in ranges if any(r not in done[ref.name] for ref in refs)]
    batches = 0
    with LayerCapture(model.module, refs, stop_early=True) as capture, torch.no_grad(), RangeDecoder(dataset, todo, decode_workers) as decoded:
        bar = progress_bar(total=sum(end - start for start, end in todo), desc=f"embedding {dataset.name} at {_layer_names(refs)}", unit="img", show=show_progress)
        for start, end, images in decoded:
            sizes = [image.shape[:2] for image in images]
            check_image_sizes(model.adapter, sizes, [f"{dataset.name}: {dataset.ids[i]}" for i in range(start, end)])
            capture.reset()
            _, geometries = model.adapter.forward(model.module, model.adapter.prepare(images, device), sizes)
            capture.check_complete()
            geometry = torch.tensor([g.to_list() for g in geometries], dtype=torch.int64)
            for ref in refs:
                if (start, end) in done[ref.name]:
                    continue
                features = reduce_features(capture.outputs[ref.name], geometries, reduce, grid)
                _check_values(features, dtype, ref.name, dataset, start, end)
                entries[ref.name].write_shard(start, end, {"activations": features.to(DTYPES[dtype]), "geometry": geometry})
            batches += 1
            bar.update(end - start)
        bar.close()
    return batches


def _missing_ranges(entries: dict[str, StoreEntry], names: list[str], shard_size: int, n_items: int) -> list[tuple[int, int]]:
    """Ranges of ``shard_size`` tiling ``0..n_items`` that some layer of ``names`` has no shard for."""
    done = {name: {(s.start, s.end) for s in entries[name].shards()} for name in names}
    ranges = [(start, min(start + shard_size, n_items)) for start in range(0, n_items, shard_size)]
    return [r for r in ranges if any(r not in done[name] for name in names)]


def _check_values(features: torch.Tensor, dtype: str, layer: str, dataset: ConceptDataset, start: int, end: int) -> None:
    """Refuse NaN/inf, and values the storage dtype would turn into infinity (float16 tops out at 65504).

    One ``aminmax`` pass serves both checks (it propagates NaN and shows ±inf); only a batch that
    fails gets the exact per-image search.
    """
    if features.numel() == 0:
        return
    low, high = torch.aminmax(features)
    largest = max(-float(low), float(high))
    if not math.isfinite(largest):
        bad = torch.nonzero(~torch.isfinite(features.flatten(1)).all(dim=1)).flatten().tolist()
        ids = [dataset.ids[start + i] for i in bad[:3]]
        raise LayerError(f"layer {layer!r}", f"produced NaN or inf for images {ids}", "check the model's weights and preprocessing")
    limit = torch.finfo(DTYPES[dtype]).max
    if largest > limit:
        raise LayerError(
            f"layer {layer!r}", f"has activations up to {largest:.3g} (images from {dataset.ids[start]!r}), beyond {dtype}'s range ({limit:.5g})",
            "embed with --dtype float32 (or dtype='float32')",
        )


def _metadata(model: LoadedModel, dataset: ConceptDataset, request: dict[str, Any], entry: StoreEntry) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(entry.shards()[0].path), framework="pt") as file:
        item_shape = list(file.get_slice("activations").get_shape()[1:])
    return {
        "request": request,
        "item_shape": item_shape,
        "model": {"spec": model.spec, "weights": model.weights, "hash": model.hash},
        "dataset": {"name": dataset.name, "ids": list(dataset.ids), "concepts": list(dataset.concepts)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
    }

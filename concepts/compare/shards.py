"""Image-range shards of a comparison: partial sums computed here or on workers, then reduced.

Every statistic of a comparison is a sum (or a maximum) over test images: set-IoU counts and the
soft-IoU / Pearson sums of :func:`~conceptlens.concepts.compare.similarity.supervised_similarity`,
NCAV maxima and overlaps of :func:`~conceptlens.concepts.compare.similarity.unsupervised_similarity`,
the permuted overlap counts of :func:`~conceptlens.concepts.compare.nulls.paired_overlaps` and the
``Σz``, ``Σzzᵀ`` of :class:`~conceptlens.concepts.compare.cka.LinearCKA`. Each module has a pure
"statistics of an image range" function and a reduction; the local path computes one range (every
test image), a :class:`ShardRunner` computes one range per worker and the caller reduces.

A runner (the Ray backend's, :mod:`conceptlens.execution.ray_backend`) gets a task name and plain
calls (store references, lists, numbers, arrays: never objects of ours) and returns each call's
result in call order; a worker answers a call with :func:`run_task`. Counts and maxima are exact
whatever the split; float sums (soft IoU, Pearson, CKA) agree with the local run up to their
summation order (relative differences around 1e-15).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from conceptlens.concepts.store.activations import StoreEntry

__all__ = ["TASKS", "ShardRunner", "entry_reference", "map_rows", "open_reference", "row_shards", "run_task", "sum_parts"]

#: Task name -> "module:function" a worker runs on one call's keyword arguments.
TASKS = {
    "similarity.supervised": "conceptlens.concepts.compare.similarity:supervised_shard",
    "similarity.maxima": "conceptlens.concepts.compare.similarity:maxima_shard",
    "similarity.overlaps": "conceptlens.concepts.compare.similarity:overlaps_shard",
    "similarity.null": "conceptlens.concepts.compare.similarity:null_shard",
    "cka": "conceptlens.concepts.compare.cka:cka_shard",
}


class ShardRunner(Protocol):
    """Runs one task on several calls, spread over ``parts`` workers, and returns the results in call order."""

    parts: int

    def __call__(self, task: str, calls: list[dict[str, Any]], label: str) -> list[Any]:
        """Results of ``run_task(task, call)`` for every call (each call's ``units`` key: its images, for the progress bar)."""
        ...


def row_shards(n_items: int, parts: int) -> list[tuple[int, int]]:
    """``range(n_items)`` split into at most ``parts`` contiguous, non-empty ``(start, end)`` ranges of near-equal size.

    >>> row_shards(7, 2)
    [(0, 4), (4, 7)]
    >>> row_shards(2, 4)
    [(0, 1), (1, 2)]
    """
    parts = max(1, min(int(parts), int(n_items)))
    bounds = [round(i * n_items / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def entry_reference(entry: StoreEntry) -> dict[str, Any]:
    """A store entry as plain data a worker reopens (:func:`open_reference`)."""
    return {"root": str(Path(entry.path).parent.resolve()), "key": entry.key, "request": entry.request}


def open_reference(reference: dict[str, Any]) -> StoreEntry:
    """The store entry :func:`entry_reference` described."""
    return StoreEntry(Path(reference["root"]), reference["key"], reference.get("request"))


def run_task(task: str, call: dict[str, Any]) -> Any:
    """Run the shard function of ``task`` (a :data:`TASKS` name) on one call's keyword arguments."""
    module, _, name = TASKS[task].partition(":")
    return getattr(importlib.import_module(module), name)(**{k: v for k, v in call.items() if k != "units"})


def map_rows(runner: ShardRunner | None, task: str, n_items: int, common: dict[str, Any], label: str, local: Callable[[range], Any]) -> list[Any]:
    """Partial statistics of the images ``range(n_items)``: ``[local(range(n_items))]`` without a
    runner, else one ``task`` call per shard of :func:`row_shards` (``common`` plus its ``rows``)."""
    if runner is None:
        return [local(range(n_items))]
    calls = [{**common, "rows": [a, b], "units": b - a} for a, b in row_shards(n_items, runner.parts)]
    return runner(task, calls, label)


def sum_parts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise sum of partial statistics in the order given (lists element-wise; one part: returned as it is)."""
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            total[key] = [a + b for a, b in zip(total[key], value)] if isinstance(value, list) else total[key] + value
    return total

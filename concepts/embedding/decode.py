"""Decode the images of item ranges ahead of the forward pass, on a few threads.

Decoding (Pillow's decompression, the EXIF orientation, the conversion to RGB) releases the GIL,
so threads decode the next ranges while the model runs on the current one: the accelerator does
not wait on PIL. Threads, not worker processes: the dataset is shared as it is (nothing is sent
or copied), and an error raised while decoding reaches the caller as the very same exception a
serial decode raises, for the same image. Ranges come back in the order given, each with its
images in item order, so what is embedded is bitwise what a serial decode gives.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import numpy as np
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.errors import StoreError

__all__ = ["MAX_DECODE_WORKERS", "RangeDecoder", "default_decode_workers", "resolve_decode_workers"]

MAX_DECODE_WORKERS = 64  #: decode threads at most (``decode_workers``, ``--decode-workers``)
_AUTO_CAP = 4  #: the automatic choice uses at most this many threads
LOOKAHEAD = 2  #: ranges decoded ahead of the one the model is running on


def default_decode_workers() -> int:
    """The decode threads used when none are asked for: one core left to the model, at most 4.

    Returns
    -------
    int
        ``min(4, usable cores - 1)``; 0 (decode in the calling thread) on a single core.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(_AUTO_CAP, cores - 1))


def resolve_decode_workers(workers: int | None) -> int:
    """``workers`` checked, or :func:`default_decode_workers` for None.

    Raises
    ------
    StoreError
        If ``workers`` is not an integer from 0 to :data:`MAX_DECODE_WORKERS`.
    """
    if workers is None:
        return default_decode_workers()
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or not 0 <= workers <= MAX_DECODE_WORKERS:
        raise StoreError(f"decode_workers={workers!r}", f"must be a whole number from 0 to {MAX_DECODE_WORKERS}",
                         "pass e.g. --decode-workers 2 (0 decodes in the embedding thread)")
    return int(workers)


class RangeDecoder:
    """The decoded images of item ranges, in order, decoded up to :data:`LOOKAHEAD` ranges ahead.

    Use it as a context manager; leaving the block (normally, on an error or on Ctrl-C) drops
    the decodes not started yet and waits only for the images being decoded at that moment.

    Parameters
    ----------
    dataset : ConceptDataset
        Where the images come from (``dataset.image(i)``; called from the decode threads).
    ranges : sequence of (int, int)
        ``(start, end)`` item ranges, yielded in this order.
    workers : int
        Decode threads; 0 decodes each range in the calling thread when it is asked for (no
        thread, no lookahead).

    Examples
    --------
    >>> from conceptlens.concepts.data.dataset import ArrayDataset
    >>> data = ArrayDataset([np.full((2, 2, 3), v, dtype=np.uint8) for v in range(5)])
    >>> with RangeDecoder(data, [(0, 2), (2, 5)], workers=2) as batches:
    ...     [(start, end, [int(image[0, 0, 0]) for image in images]) for start, end, images in batches]
    [(0, 2, [0, 1]), (2, 5, [2, 3, 4])]
    """

    def __init__(self, dataset: ConceptDataset, ranges: Sequence[tuple[int, int]], workers: int) -> None:
        self.dataset = dataset
        self.ranges = [(int(start), int(end)) for start, end in ranges]
        self.workers = resolve_decode_workers(workers)
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> RangeDecoder:
        if self.workers > 0:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="conceptlens-decode")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Drop the decodes not started yet and wait for the running ones (one image each)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __iter__(self) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        if self._pool is None:
            for start, end in self.ranges:
                yield start, end, [self.dataset.image(i) for i in range(start, end)]
            return
        queued: Iterator[tuple[int, int]] = iter(self.ranges)
        pending: deque[tuple[tuple[int, int], list[Future[np.ndarray]]]] = deque()
        for _ in range(LOOKAHEAD + 1):
            self._submit(queued, pending)
        while pending:
            (start, end), futures = pending.popleft()
            images = [future.result() for future in futures]  # the first failing image's own error, as serially
            self._submit(queued, pending)
            yield start, end, images

    def _submit(self, queued: Iterator[tuple[int, int]], pending: deque) -> None:
        """Start decoding the next range's images, one task per image, if a range is left."""
        item_range = next(queued, None)
        if item_range is not None and self._pool is not None:
            pending.append((item_range, [self._pool.submit(self.dataset.image, i) for i in range(*item_range)]))

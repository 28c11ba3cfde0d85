"""Embedding overhead: ``conceptlens.concepts.embedding.embed.embed`` against a bare ``torch.no_grad()`` forward loop.

Usage: ``python benchmarks/bench_embed.py [--quick]``

Both sides see the same batches of the same images (pre-rendered synthetic scenes, so rendering
does not dilute the ratio) and run the same ``adapter.prepare`` + ``adapter.forward``; embedding
adds the layer hooks, the reductions, the finiteness check, the float16 conversion, the safetensors
serialisation with its sha256 and the atomic shard/manifest writes into a fresh store (a new
temporary folder per run). The model is ``torchvision:resnet18`` (random weights) at 224×224, where
the forward pass dominates as in real use.

Figures:

* ``embed 4 layers / bare forward``: layer1 … layer4 (spread over the network), ``reduce="native"``;
  target ≤ 1.15.
* ``embed shallow layers / bare forward``: layer1 and layer2 only, so the forward pass stops after
  layer2 (``StopForward``); target ≤ 1 — stopping early must more than pay for the writes.

Each side is timed several times, interleaved with the other, and the best time is kept.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Figure, check, standalone  # noqa: E402

MODEL = "torchvision:resnet18"
INPUT_SIZE = (224, 224)
ALL_LAYERS = ["layer1", "layer2", "layer3", "layer4"]
SHALLOW_LAYERS = ["layer1", "layer2"]
BATCH_SIZE = 32


def _images(n: int, seed: int = 0):
    """The synthetic world with its images rendered once and kept in memory."""
    import numpy as np

    from conceptlens.concepts.data.synthetic import SyntheticWorld

    class RenderedWorld(SyntheticWorld):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._images = [super(RenderedWorld, self).image(i) for i in range(self.n_images)]

        def image(self, index: int) -> np.ndarray:
            return self._images[self.check_index(index)].copy()

    return RenderedWorld(n, seed=seed)


def _bare(model, dataset, batch_size: int) -> None:
    """The same batches through the same adapter, no hooks, nothing stored."""
    import torch

    device = torch.device("cpu")
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            images = [dataset.image(i) for i in range(start, min(start + batch_size, len(dataset)))]
            sizes = [image.shape[:2] for image in images]
            model.adapter.forward(model.module, model.adapter.prepare(images, device), sizes)


def _embed(model, dataset, layers: list[str], batch_size: int, written: list[int] | None = None) -> float:
    """Embed into a fresh store; return the seconds of the embed call alone (store deletion excluded).

    The bytes written (shards and manifests) are appended to ``written`` when given.
    """
    from conceptlens.concepts.embedding.embed import embed
    from conceptlens.concepts.store.activations import ActivationStore

    folder = tempfile.mkdtemp(prefix="bench-embed-")
    try:
        start = time.perf_counter()
        result = embed(model, dataset, layers, ActivationStore(folder), reduce="native", dtype="float16", batch_size=batch_size, device="cpu", progress=False)
        seconds = time.perf_counter() - start
        assert sorted(result.computed) == sorted(layers) and not result.reused
        if written is not None:
            written.append(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()))
        return seconds
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(work) -> tuple[float, float]:
    """Wall and CPU seconds of ``work()``; ``work`` may return its own wall time (store deletion excluded)."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    inner = work()
    wall = time.perf_counter() - start
    return (inner if isinstance(inner, float) else wall), _cpu_seconds() - cpu


def measure(n: int, repeats: int) -> dict[str, Any]:
    """Interleave bare / embed(all) / embed(shallow) ``repeats`` times; keep each side's best time."""
    import torch

    from conceptlens.concepts.models.loading import load_model

    torch.manual_seed(0)
    model = load_model(MODEL, weights="none", input_size=INPUT_SIZE)
    dataset = _images(n)
    warm = _images(min(n // 4, BATCH_SIZE), seed=1)
    _bare(model, warm, BATCH_SIZE)  # warm-up: allocator, thread pool, and the model hash (computed once per
    _embed(model, warm, ALL_LAYERS, BATCH_SIZE)  # LoadedModel, so no timed run pays it)
    written: dict[str, list[int]] = {"embed_all": [], "embed_shallow": []}
    work = {
        "bare": lambda: _bare(model, dataset, BATCH_SIZE),
        "embed_all": lambda: _embed(model, dataset, ALL_LAYERS, BATCH_SIZE, written["embed_all"]),
        "embed_shallow": lambda: _embed(model, dataset, SHALLOW_LAYERS, BATCH_SIZE, written["embed_shallow"]),
    }
    times: dict[str, list[float]] = {side: [] for side in work}
    cpu: dict[str, list[float]] = {side: [] for side in work}
    for _ in range(repeats):  # interleaved: a burst of load elsewhere hits every side alike
        for side, function in work.items():
            wall, used = _timed(function)
            times[side].append(wall)
            cpu[side].append(used)
    return {
        "times": times,
        "cpu": cpu,
        "best": {side: min(values) for side, values in times.items()},
        "best_cpu": {side: min(values) for side, values in cpu.items()},
        "bytes_all": written["embed_all"][0],
        "bytes_shallow": written["embed_shallow"][0],
        "torch_threads": torch.get_num_threads(),
    }


def run(quick: bool = False) -> list[Figure]:
    n = 32 if quick else 256
    repeats = 3
    found = measure(n, repeats)
    best = found["best"]
    settings = {
        "model": MODEL, "weights": "none", "input_size": list(INPUT_SIZE), "n_images": n, "batch_size": BATCH_SIZE, "reduce": "native",
        "dtype": "float16", "device": "cpu", "repeats": repeats, "torch_threads": found["torch_threads"],
        "times_s": {side: [round(t, 4) for t in values] for side, values in found["times"].items()},
        "cpu_s": {side: [round(t, 4) for t in values] for side, values in found["cpu"].items()},
        "bare_forward_s": round(best["bare"], 4),
        "load_average": os.getloadavg(),
    }
    figures = []
    ratio = best["embed_all"] / best["bare"]
    target = "≤ 1.15"
    figures.append(Figure("embed", "embed 4 layers / bare forward", round(ratio, 4), "×", target, check(ratio, target), {
        **settings, "layers": ALL_LAYERS, "embed_s": round(best["embed_all"], 4),
        "cpu_ratio": round(found["best_cpu"]["embed_all"] / found["best_cpu"]["bare"], 4), "stored_mib": round(found["bytes_all"] / 2**20, 1),
    }))
    ratio = best["embed_shallow"] / best["bare"]
    target = "≤ 1"
    figures.append(Figure("embed", "embed shallow layers (early stop) / bare full forward", round(ratio, 4), "×", target, check(ratio, target), {
        **settings, "layers": SHALLOW_LAYERS, "embed_s": round(best["embed_shallow"], 4),
        "cpu_ratio": round(found["best_cpu"]["embed_shallow"] / found["best_cpu"]["bare"], 4), "stored_mib": round(found["bytes_shallow"] / 2**20, 1),
    }))
    return figures


if __name__ == "__main__":
    standalone(run, __doc__)

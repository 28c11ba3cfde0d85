"""Embedding throughput with images decoded on threads during the forward pass, against serial decoding.

Usage: ``python benchmarks/bench_decode.py [--quick]``

The dataset is a folder of 640×480 PNGs (the folder layout, read by ``FolderDataset``: Pillow
decode, EXIF orientation, RGB conversion, about 6 ms an image here), written to a temporary
folder once. Both sides call ``embed`` on the same model and images into a fresh store; the only
difference is ``decode_workers``: 0 (today's serial decode, between forward passes) or the
default, ``min(4, cores - 1)``. Each case runs in its own process, the two sides alternating,
best of ``repeats``.

Figures (img/s ratios, parallel over serial; ``> 1`` is a speed-up):

* ``detector, torch on every core``: ``torchvision:fasterrcnn_mobilenet_v3_large_320_fpn``
  (random weights), layer ``backbone.body:1``, torch using all cores: the decode thread competes
  with the forward pass for the CPU, so little can be won on a CPU-only machine.
* ``detector, one core left for decoding``: the same with torch on ``cores - 1`` threads, as when
  the forward pass runs on an accelerator and the CPU is free to decode.
* ``cheap forward (decode-bound), one core left``: ``torchvision:resnet18`` up to ``layer1`` at
  224×224, whose forward costs about as much as the decode — the regime of a fast GPU.

``details`` has both sides' seconds and img/s, the serial decode time alone and its share of the
serial embedding (the most a perfect overlap could save).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Figure, run_in_subprocess, standalone  # noqa: E402

HEIGHT, WIDTH = 480, 640
BATCH_SIZE = 8
CASES = (
    ("detector, torch on every core", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", None, ["backbone.body:1"], 0),
    ("detector, one core left for decoding", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", None, ["backbone.body:1"], 1),
    ("cheap forward (decode-bound), one core left", "torchvision:resnet18", [224, 224], ["layer1"], 1),
)


def write_images(root: Path, n: int) -> Path:
    """Write ``n`` 640×480 PNGs (gradients plus noise: they compress like photos, ~700 kB) as a folder dataset."""
    import numpy as np
    from conceptlens.concepts.data.dataset import ArrayDataset
    from conceptlens.concepts.data.folder import write_folder_dataset

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    images = []
    for i in range(n):
        base = np.stack([(cols * (i % 5 + 1)) % 256, (rows * 2) % 256, (cols + rows + 7 * i) % 256], axis=-1)
        images.append(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8))
    masks = [np.zeros((1, HEIGHT, WIDTH), bool) for _ in images]
    masks[0][0, :16, :16] = True  # the folder layout wants a concept with a positive pixel
    return write_folder_dataset(ArrayDataset(images, masks, ["patch"]), root)


def measure(root: str, spec: str, input_size: list[int] | None, layers: list[str], spare_cores: int, repeats: int) -> dict[str, Any]:
    """In a fresh process: best embedding time with serial and threaded decode, alternating; serial decode alone."""
    import torch
    from conceptlens.concepts.data.folder import FolderDataset
    from conceptlens.concepts.embedding.decode import default_decode_workers
    from conceptlens.concepts.embedding.embed import embed
    from conceptlens.concepts.models.loading import load_model

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores - spare_cores))
    data = FolderDataset(root)
    model = load_model(spec, input_size=tuple(input_size) if input_size else None)
    workers = default_decode_workers()
    embed(model, data.subset(range(BATCH_SIZE)), layers, tempfile.mkdtemp(), batch_size=BATCH_SIZE, decode_workers=0)  # warm-up
    best = {0: float("inf"), workers: float("inf")}
    for _ in range(repeats):
        for side in best:
            store = tempfile.mkdtemp()
            started = time.perf_counter()
            embed(model, data, layers, store, batch_size=BATCH_SIZE, decode_workers=side)
            best[side] = min(best[side], time.perf_counter() - started)
            shutil.rmtree(store)
    started = time.perf_counter()
    for index in range(len(data)):
        data.image(index)
    return {"serial_s": best[0], "threaded_s": best[workers], "decode_only_s": time.perf_counter() - started, "decode_workers": workers,
            "torch_threads": torch.get_num_threads(), "n_images": len(data)}


def run(quick: bool = False) -> list[Figure]:
    n, repeats = (16, 1) if quick else (96, 3)
    cases = CASES[1:] if quick else CASES
    folder = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    try:
        root = write_images(folder / "data", n)
        figures = []
        for name, spec, input_size, layers, spare in cases:
            found = measure_case(str(root), spec, input_size, layers, spare, repeats)
            figures.append(Figure("decode", f"embed img/s, decode threads / serial decode: {name}", found["speedup"], "×", details=found))
        return figures
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure_case(root: str, spec: str, input_size: list[int] | None, layers: list[str], spare: int, repeats: int) -> dict[str, Any]:
    """One case in a fresh process, with the figures derived from its times."""
    times = run_in_subprocess("bench_decode", "measure", {"root": root, "spec": spec, "input_size": input_size, "layers": layers,
                                                          "spare_cores": spare, "repeats": repeats})
    n = times["n_images"]
    return {
        "model": spec, "layers": layers, "input_size": input_size, "image": f"{WIDTH}x{HEIGHT} PNG", "batch_size": BATCH_SIZE, "repeats": repeats, **times,
        "speedup": round(times["serial_s"] / times["threaded_s"], 4),
        "serial_img_per_s": round(n / times["serial_s"], 2), "threaded_img_per_s": round(n / times["threaded_s"], 2),
        "decode_ms_per_image": round(1000 * times["decode_only_s"] / n, 2), "embed_ms_per_image_serial": round(1000 * times["serial_s"] / n, 2),
        "decode_share_of_serial": round(times["decode_only_s"] / times["serial_s"], 4),
        "best_possible_speedup": round(times["serial_s"] / max(times["serial_s"] - times["decode_only_s"], times["decode_only_s"]), 4),
    }


if __name__ == "__main__":
    standalone(run, __doc__)

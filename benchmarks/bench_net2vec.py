"""Net2Vec probes: K concepts trained jointly (one C→K 1×1 convolution) vs one probe per concept.

Usage: ``python benchmarks/bench_net2vec.py [--quick]``; in the suite (``run_all.py``)
:func:`run` gives the figures.

Inputs are synthetic and written to a temporary :class:`~conceptlens.concepts.store.activations.ActivationStore` the way
the workflow's are (an activation entry of native maps and a grid-mask entry with a seeded
60/20/20 split): ``N`` images of ``C × h × w`` ReLU activations in which each of ``K`` concepts
adds its own direction inside a random rectangle of its grid mask. The joint side is one
:class:`conceptlens.probes.net2vec.Net2VecProbe` on all K concepts; the loop side is K probes, each on a mask
entry holding only its concept (same activations, same settings). Both run the same number of
epochs (``patience = max_epochs``: no early stop). Only ``fit`` is timed; each side is timed
``repeats`` times, the sides interleaved, best time kept.

Throughput = pixels × channels / second, pixels = training images × grid cells × epochs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Figure, standalone  # noqa: E402

FULL = {"n": 200, "channels": 256, "k": 10, "native": 32, "grid": 50, "epochs": 3, "repeats": 2}
QUICK = {"n": 30, "channels": 64, "k": 3, "native": 16, "grid": 25, "epochs": 2, "repeats": 2}


def planted(n: int, channels: int, k: int, native: int, grid: int, seed: int = 0):
    """Activations (N, C, h, w) and soft grid masks (N, K, G, G) with K planted concepts."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, k, grid, grid)
    for i in range(n):
        for c in range(k):
            top, left = (int(v) for v in torch.randint(0, grid - grid // 4, (2,), generator=generator))
            height, width = (int(v) for v in torch.randint(grid // 8, grid // 3, (2,), generator=generator))
            masks[i, c, top : top + height, left : left + width] = 1
    directions = torch.rand(k, channels, generator=generator) ** 2
    native_masks = F.interpolate(masks, size=(native, native), mode="area")
    activations = torch.einsum("nkhw,kc->nchw", native_masks, directions)
    activations = torch.relu(activations + 0.3 * torch.randn(activations.shape, generator=generator))
    return activations, masks


def write_entries(root: Path, activations, masks, concepts: list[str]):
    """One activation entry and K + 1 mask entries (all concepts; each concept alone)."""
    import torch

    from conceptlens.concepts.data.dataset import assign_splits
    from conceptlens.concepts.store.activations import ActivationStore

    store = ActivationStore(root)
    n, shard = activations.shape[0], 32
    ids = [f"{i:06d}" for i in range(n)]
    side = activations.shape[-1]
    geometry = torch.tensor([[side, side, side, side, 0, 0, side, side]] * n, dtype=torch.int64)
    act_entry = store.entry({"bench": "net2vec", "kind": "activations", "n": n})
    for start in range(0, n, shard):
        end = min(start + shard, n)
        act_entry.write_shard(start, end, {"activations": activations[start:end].float(), "geometry": geometry[start:end]})
    act_entry.finalize({"request": {"layer": "bench"}, "item_shape": list(activations.shape[1:]), "dataset": {"name": "bench", "ids": ids}}, n)
    splits = assign_splits(ids, 0)

    def mask_entry(selected: list[int]):
        names = [concepts[i] for i in selected]
        entry = store.entry({"bench": "net2vec", "kind": "masks", "n": n, "concepts": names})
        for start in range(0, n, shard):
            end = min(start + shard, n)
            entry.write_shard(start, end, {"masks": masks[start:end, selected].half(), "valid": torch.ones(end - start, len(selected), dtype=torch.uint8)})
        entry.finalize({"request": {"kind": "masks", "grid": list(masks.shape[-2:])}, "dataset": {"name": "bench", "ids": ids, "concepts": names, "splits": splits}}, n)
        return entry

    return act_entry, mask_entry(list(range(len(concepts)))), [mask_entry([i]) for i in range(len(concepts))]


def run(quick: bool, size: dict | None = None) -> list[Figure]:
    import torch

    from conceptlens.probes.data import split_indices
    from conceptlens.probes.net2vec import Net2VecProbe

    size = size or (QUICK if quick else FULL)
    concepts = [f"concept_{i}" for i in range(size["k"])]
    activations, masks = planted(size["n"], size["channels"], size["k"], size["native"], size["grid"])
    settings = {"max_epochs": size["epochs"], "patience": size["epochs"], "device": "cpu", "progress": False}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-net2vec-") as folder:
        act_entry, all_masks, single_masks = write_entries(Path(folder), activations, masks, concepts)
        del activations, masks
        n_train = len(split_indices(all_masks, "train"))

        def joint():
            probe = Net2VecProbe(**settings).fit(act_entry, all_masks)
            assert len(probe.history_) == size["epochs"]
            return probe

        def loop():
            probes = [Net2VecProbe(**settings).fit(act_entry, entry) for entry in single_masks]
            assert all(len(p.history_) == size["epochs"] for p in probes)
            return probes

        joint()  # warm-up: page cache, allocator, thread pool
        best, fitted = {"joint": float("inf"), "loop": float("inf")}, {}
        for round_ in range(size["repeats"]):
            for name, work in (("joint", joint), ("loop", loop)) if round_ % 2 == 0 else (("loop", loop), ("joint", joint)):
                start = time.perf_counter()
                fitted[name] = work()
                best[name] = min(best[name], time.perf_counter() - start)
        # the two sides learn the same vectors (the K outputs are independent)
        together, alone = fitted["joint"], fitted["loop"]
        weight_gap = float((together.weight_ - torch.cat([p.weight_ for p in alone])).abs().max() / together.weight_.abs().max())
    pixels = n_train * size["grid"] ** 2 * size["epochs"]
    work = pixels * size["channels"]
    details = {**size, "n_train": n_train, "pixels": pixels, "joint_seconds": best["joint"], "loop_seconds": best["loop"],
               "max_relative_weight_gap": weight_gap, "threads": torch.get_num_threads(), "load_average": [load_start, os.getloadavg()[0]]}
    return [
        Figure("net2vec", f"joint K={size['k']} probe throughput", work / best["joint"] / 1e6, "Mpix·ch/s", None, None, details),
        Figure("net2vec", f"one probe per concept (K={size['k']} fits) throughput", work / best["loop"] / 1e6, "Mpix·ch/s", None, None, details),
        Figure("net2vec", "joint / per-concept loop (speed-up)", best["loop"] / best["joint"], "×", None, None, details),
    ]


if __name__ == "__main__":
    standalone(run, __doc__)

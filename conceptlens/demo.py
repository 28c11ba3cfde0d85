"""The demo on the embedded default: the synthetic concept world embedded at two layers.

Until the trained synthetic-world detectors ship, the demo embeds the synthetic world at two
layers of a small randomly initialised ResNet-18 (nothing to download) and prints what it stored.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from concepts.embed import embed
from concepts.models import load_model
from concepts.store import ActivationStore
from concepts.synthetic import SyntheticWorld

__all__ = ["run_demo"]

DEMO_MODEL = "torchvision:resnet18"
DEMO_LAYERS = ("layer2", "layer3")
DEMO_IMAGES = 200
DEMO_GRID = (28, 28)


def run_demo(out: Path, device: str = "auto", progress: bool = False) -> dict[str, object]:
    """Embed the synthetic world into ``out/store`` and print a summary; return it as a dict."""
    started = time.perf_counter()
    world = SyntheticWorld(n_images=DEMO_IMAGES, seed=0)
    model = load_model(DEMO_MODEL, weights="none", input_size=(112, 112))
    store = ActivationStore(Path(out) / "store")
    result = embed(model, world, list(DEMO_LAYERS), store, reduce="grid", grid=DEMO_GRID, batch_size=32, device=device, progress=progress)
    positives = _positive_images(world)
    print(f"conceptlens demo — {world.name}: {len(world)} scenes, {len(world.concepts)} concepts, "
          f"splits {', '.join(f'{s}={len(ids)}' for s, ids in world.splits.items())}")
    print(f"model {model.spec} (random init, hash {model.hash[:12]}), concept grid {DEMO_GRID[0]}×{DEMO_GRID[1]}")
    for layer, entry in result.entries.items():
        manifest = entry.manifest()
        megabytes = sum(p.stat().st_size for p in entry.path.iterdir()) / 1e6
        status = "reused from store" if layer in result.reused else "computed"
        print(f"  {layer:<8} {status:<17} {manifest['n_items']} × {'×'.join(map(str, manifest['item_shape']))} "
              f"{manifest['request']['dtype']}  {megabytes:.1f} MB  {entry.path}")
    print("images containing each concept: " + ", ".join(f"{c} {n}" for c, n in positives.items()))
    print(f"done in {time.perf_counter() - started:.1f} s ({result.forward_batches} forward batches)")
    return {"entries": {k: str(v.path) for k, v in result.entries.items()}, "positives": positives}


def _positive_images(world: SyntheticWorld) -> dict[str, int]:
    counts = np.zeros(len(world.concepts), dtype=int)
    for index in range(len(world)):
        counts += world.masks(index).any(axis=(1, 2))
    return dict(zip(world.concepts, counts.tolist()))

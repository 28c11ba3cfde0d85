"""The demo on the embedded default: the synthetic concept world probed in a shipped detector.

It embeds 240 synthetic scenes at three layers of the shipped VGG-CenterNet detector, trains
Net2Vec probes for the object and part concepts, and prints each concept's test set IoU per layer
and the layer that encodes it best. Everything is cached: a second run reuses store and banks.
"""

from __future__ import annotations

import time
from pathlib import Path

from concepts.models import load_model
from concepts.store import ActivationStore
from concepts.synthetic import SyntheticWorld
from conceptlens.workflow import probe_model, write_json

__all__ = ["run_demo", "DEMO_MODEL", "DEMO_LAYERS", "DEMO_CONCEPTS"]

DEMO_MODEL = "zoo:synthetic_vgg_centernet"
DEMO_LAYERS = ("backbone.block2", "backbone.block3", "backbone.block4")
DEMO_CONCEPTS = ("car", "house", "tree", "boat", "wheel", "window", "roof", "door", "crown", "sail", "hull", "sky", "water")
DEMO_IMAGES = 240
DEMO_GRID = (40, 40)


def run_demo(out: Path, device: str = "auto", progress: bool = False) -> dict[str, object]:
    """Probe the demo layers, write ``out/demo.json`` and print a per-concept table; return the results."""
    started = time.perf_counter()
    world = SyntheticWorld(n_images=DEMO_IMAGES, seed=0).select_concepts(list(DEMO_CONCEPTS))
    model = load_model(DEMO_MODEL)
    out = Path(out)
    probed = probe_model("vgg", model, world, list(DEMO_LAYERS), "net2vec", ActivationStore(out / "store"), out / "banks",
                         DEMO_GRID, {"max_epochs": 10}, device=device, progress=progress)
    table = {c: {layer: probed.metrics[layer][c]["set_iou"] for layer in DEMO_LAYERS} for c in DEMO_CONCEPTS}
    print(f"conceptlens demo — {world.name}: {len(world)} scenes, {len(world.splits['test'])} test images")
    print(f"model {DEMO_MODEL}; Net2Vec probes on a {DEMO_GRID[0]}×{DEMO_GRID[1]} concept grid; test set IoU per layer:")
    print(f"  {'concept':<8} " + " ".join(f"{layer:>16}" for layer in DEMO_LAYERS) + "   best layer (relative depth)")
    for concept, scores in table.items():
        best = max(scores, key=lambda layer: scores[layer] or -1)
        depth = probed.depths[DEMO_LAYERS.index(best)]
        cells = " ".join(f"{(scores[layer] or 0):>16.3f}" for layer in DEMO_LAYERS)
        print(f"  {concept:<8} {cells}   {best} ({depth:.2f})")
    path = write_json(out / "demo.json", {"model": DEMO_MODEL, "dataset": world.name, "layers": list(DEMO_LAYERS), "set_iou": table})
    print(f"results in {path}; done in {time.perf_counter() - started:.1f} s")
    return {"set_iou": table, "path": str(path)}

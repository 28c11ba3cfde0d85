"""Measure the per-image costs the README's scale projection rests on (not part of ``run_all``: slow).

Usage: ``python benchmarks/projection_costs.py [--images N]`` (writes ``benchmarks/projection_costs.json``)

For each detector of ``configs/coco_detectors.yaml`` (random weights: the cost does not depend on
them) it embeds N 480×640 images at the config's four layers (``reduce="native"``, float16, as
the probe step stores them, serial decode) and records seconds and stored bytes per image. It also
measures the decode of a 640×480 JPEG and PNG and the store's write throughput (one 256 MiB shard,
sha256 and atomic rename included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, write_json  # noqa: E402

DETECTORS = {
    "ssd300_vgg16": ["backbone.features.16", "backbone.features", "backbone.extra.0", "backbone.extra.1"],
    "fasterrcnn_resnet50_fpn": ["backbone.body.layer1", "backbone.body.layer2", "backbone.body.layer3", "backbone.body.layer4"],
    "retinanet_resnet50_fpn": ["backbone.body.layer1", "backbone.body.layer2", "backbone.body.layer3", "backbone.body.layer4"],
}


def photo(index: int):
    """A 480×640 image that compresses like a photo (gradients plus noise)."""
    import numpy as np

    rng = np.random.default_rng(index)
    rows, cols = np.mgrid[0:480, 0:640]
    base = np.stack([(cols * (index % 5 + 1)) % 256, (rows * 2) % 256, (cols + rows + 7 * index) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def decode_ms(folder: Path, n: int = 16) -> dict[str, float]:
    """Milliseconds to read one 640×480 image with ``read_image`` (decode, orientation, RGB), JPEG q90 and PNG."""
    from conceptlens.concepts.data.imageio import read_image
    from PIL import Image

    found = {}
    for suffix, options in ((".jpg", {"quality": 90}), (".png", {})):
        paths = []
        for i in range(n):
            paths.append(folder / f"{i}{suffix}")
            Image.fromarray(photo(i)).save(paths[-1], **options)
        started = time.perf_counter()
        for path in paths:
            read_image(path)
        found[suffix[1:]] = round(1000 * (time.perf_counter() - started) / n, 2)
    return found


def store_write_mib_s(folder: Path) -> float:
    """MiB/s of ``StoreEntry.write_shard`` for one 256 MiB float16 shard (serialisation, sha256, fsync-free rename)."""
    import torch
    from conceptlens.concepts.store.activations import ActivationStore

    entry = ActivationStore(folder / "store").entry({"bench": "write"})
    tensor = torch.randn(128, 1024, 1024).to(torch.float16)
    started = time.perf_counter()
    entry.write_shard(0, 128, {"activations": tensor})
    return round(tensor.numel() * 2 / 2**20 / (time.perf_counter() - started), 1)


def embed_costs(folder: Path, n: int) -> dict[str, dict[str, float]]:
    """Seconds and stored MiB per image of embedding each detector's four layers at 480×640 on CPU."""
    from conceptlens.concepts.data.dataset import ArrayDataset
    from conceptlens.concepts.embedding.embed import embed
    from conceptlens.concepts.models.loading import load_model

    data = ArrayDataset([photo(i) for i in range(n)])
    found = {}
    for name, layers in DETECTORS.items():
        model = load_model(f"torchvision:{name}")
        embed(model, data.subset([0]), layers, folder / f"warm-{name}", batch_size=1, decode_workers=0)
        store = folder / f"store-{name}"
        started = time.perf_counter()
        result = embed(model, data, layers, store, batch_size=2, decode_workers=0)
        seconds = time.perf_counter() - started
        stored = sum(shard.path.stat().st_size for entry in result.entries.values() for shard in entry.shards())
        found[name] = {"layers": layers, "s_per_image": round(seconds / n, 3), "stored_mib_per_image": round(stored / 2**20 / n, 2),
                       "item_shapes": {layer: list(entry.manifest()["item_shape"]) for layer, entry in result.entries.items()}}
        shutil.rmtree(store, ignore_errors=True)
        print(name, found[name], flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "projection_costs.json"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="projection-"))
    try:
        results = {"machine": machine(), "decode_ms": decode_ms(folder), "store_write_mib_s": store_write_mib_s(folder),
                   "embed": embed_costs(folder, args.images), "images": args.images}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_json(Path(args.out), results)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

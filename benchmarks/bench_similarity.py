"""Time and peak memory of the full layer × layer concept-similarity comparison.

Usage: ``python benchmarks/bench_similarity.py [--quick]``

Setting: 2 models × 8 layers × 10 concepts over 500 test images (quick: 4 layers, 48 images). The
two zoo detectors (``zoo:synthetic_vgg_centernet``, ``zoo:synthetic_resnet_fpn``) are embedded at
all eight layers of their model cards on the synthetic world (every image in the test split), the
grid masks are stored, and every layer gets a random Net2Vec bank of 10 concepts (vectors
``N(0, 1/C)``, biases 0, recorded test set IoU 0.3). All of that is set-up, done once and not timed:
the benchmark measures the comparison, not embedding or probing.

Timed, in a fresh process per run (``run_in_subprocess``, so peak RSS is honest): exactly
``conceptlens.concepts.compare.workflow.compare_models(..., method="net2vec")`` — the concept maps of every layer on
the 100×100 grid for the test images (computed and written to the store; maps left by an earlier
run are deleted first), the supervised layer × layer statistics (set IoU, soft IoU, Pearson per
concept for all 16 × 16 pairs), and pooled + spatial minibatch CKA. Best of the runs is kept; the
stage times (maps, similarity, CKA) come from timing wrappers around the functions
``compare_models`` calls.

Baseline (same run, also a fresh process): one streaming pass that reads every layer's stored
activations for the test images and converts them to float32 — the I/O and decoding floor any
comparison of these layers must pay, since it has to look at every activation at least once.
``compare_models`` reads them three times (maps, pooled CKA, spatial CKA) and writes and reads the
maps. Also reported: the time to read all the concept maps once (after they exist), the floor of
the similarity stage.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Figure, current_rss_mib, peak_rss_mib, run_in_subprocess, standalone  # noqa: E402

MODELS = {
    "A": ("zoo:synthetic_vgg_centernet", ["backbone.block1", "backbone.block2", "backbone.block3", "backbone.block4", "backbone.block5", "neck.up1", "neck.up2", "head.heatmap"]),
    "B": ("zoo:synthetic_resnet_fpn", ["backbone.stem", "backbone.block1", "backbone.block2", "backbone.block3", "backbone.block4", "neck.p3", "neck.p2", "head.heatmap"]),
}
QUICK_LAYERS = {"A": [0, 2, 4, 6], "B": [0, 2, 4, 6]}
N_CONCEPTS = 10
GRID = (100, 100)


def _dataset(n_images: int):
    """The synthetic world with every image in the test split."""
    from conceptlens.concepts.data.synthetic import SyntheticWorld

    world = SyntheticWorld(n_images, seed=0)
    world.splits = {"train": [], "val": [], "test": list(world.ids)}
    return world


def prepare(folder: str, n_images: int, quick: bool) -> dict[str, Any]:
    """Embed both models and the masks, write random banks; return the description (not timed)."""
    import torch

    from conceptlens.concepts.embedding.embed import embed
    from conceptlens.concepts.embedding.masks import embed_masks
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.concepts.vectors.bank import ConceptBank

    torch.manual_seed(0)
    store = ActivationStore(Path(folder) / "store")
    dataset = _dataset(n_images)
    masks = embed_masks(dataset, store, grid=GRID, progress=False)
    concepts = list(dataset.concepts[:N_CONCEPTS])
    described: dict[str, Any] = {"n_images": n_images, "concepts": concepts, "models": {}, "keep": [masks.key]}
    for label, (spec, all_layers) in MODELS.items():
        layers = [all_layers[i] for i in QUICK_LAYERS[label]] if quick else all_layers
        model = load_model(spec)
        result = embed(model, dataset, layers, store, batch_size=32, device="cpu", progress=False)
        banks = {}
        for layer in layers:
            entry = result.entries[layer]
            channels = int(entry.manifest()["item_shape"][0])
            bank = ConceptBank(
                "net2vec", layer, concepts, torch.randn(N_CONCEPTS, channels) / channels**0.5, torch.zeros(N_CONCEPTS),
                metrics={c: {"set_iou": 0.3} for c in concepts}, provenance={"benchmark": "random bank"},
            )
            path = Path(folder) / "banks" / f"{label}__{layer}.net2vec"
            bank.save(path)
            banks[layer] = {"bank": str(path), "activations": entry.key}
            described["keep"].append(entry.key)
        described["models"][label] = {"spec": spec, "layers": layers, "banks": banks}
    described["stored_mib"] = round(sum(p.stat().st_size for p in (Path(folder) / "store").rglob("*") if p.is_file()) / 2**20, 1)
    (Path(folder) / "described.json").write_text(json.dumps(described))
    return described


def _setting(folder: str):
    from conceptlens.concepts.compare.similarity import relative_depths
    from conceptlens.concepts.store.activations import ActivationStore, StoreEntry
    from conceptlens.concepts.vectors.bank import ConceptBank
    from conceptlens.concepts.vectors.probed import ProbedModel

    described = json.loads((Path(folder) / "described.json").read_text())
    store = ActivationStore(Path(folder) / "store")
    for path in store.root.iterdir():  # maps of an earlier run would be reused: delete them
        if path.is_dir() and path.name not in described["keep"] and len(path.name) == 32:
            shutil.rmtree(path)
    probed = []
    for label, model in described["models"].items():
        layers = model["layers"]
        activations = {layer: StoreEntry(store.root, model["banks"][layer]["activations"]) for layer in layers}
        banks = {layer: ConceptBank.load(model["banks"][layer]["bank"]) for layer in layers}
        depths = relative_depths(layers)
        probed.append(ProbedModel(label, None, layers, activations, banks, depths, depths, comparison="supervised"))  # model object: not used by compare_models
    return described, store, probed


def compare_worker(folder: str) -> dict[str, Any]:
    """In a fresh process: run ``compare_models`` once; its time, stage times and peak RSS."""
    import conceptlens.concepts.compare.workflow as workflow
    from conceptlens.concepts.compare.similarity import LayerMaps  # noqa: F401  (imported before the clock starts)

    described, store, probed = _setting(folder)
    dataset = _dataset(described["n_images"])
    stages: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    originals = {name: getattr(workflow, name) for name in ("embed_masks", "concept_map_entry", "supervised_similarity", "cka_statistics")}
    for name, function in originals.items():
        setattr(workflow, name, timed(name, function))
    rss_before, peak_before = current_rss_mib(), peak_rss_mib()
    start = time.perf_counter()
    result = workflow.compare_models(probed, dataset, store, "net2vec", grid=GRID, n_permutations=0, n_bootstrap=0)  # raw comparison; the null's cost is bench_controls'
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    for name, function in originals.items():
        setattr(workflow, name, function)
    n_layers = len(result["layers"])
    assert len(result["matrix"]) == n_layers and len(result["cka"]["spatial"]) == n_layers

    # the floor of the similarity stage: read every layer's maps once (they exist now)
    from conceptlens.concepts.store.activations import EntryReader

    map_entries = [entry for entry in store.entries() if entry.key not in described["keep"]]
    readers = [EntryReader(entry) for entry in map_entries]
    start = time.perf_counter()
    for rows in range(0, described["n_images"], 16):
        for reader in readers:
            reader.rows(range(rows, min(rows + 16, described["n_images"])))["maps"].float()
    read_maps = time.perf_counter() - start
    maps_mib = sum(p.stat().st_size for e in map_entries for p in e.path.iterdir()) / 2**20
    return {
        "seconds": seconds, "stages": stages, "peak_mib": peak, "rss_before_mib": rss_before, "peak_before_mib": peak_before,
        "read_maps_once_s": read_maps, "maps_mib": maps_mib, "n_layers": n_layers, "n_map_entries": len(map_entries),
    }


def read_worker(folder: str) -> dict[str, Any]:
    """In a fresh process: stream every layer's activations for the test images once (the baseline)."""
    from conceptlens.concepts.store.activations import EntryReader

    described, store, probed = _setting(folder)
    readers = [EntryReader(model.activations[layer]) for model in probed for layer in model.layers]
    n = described["n_images"]
    rss_before = current_rss_mib()
    start = time.perf_counter()
    for rows in range(0, n, 32):
        for reader in readers:
            reader.rows(range(rows, min(rows + 32, n)))["activations"].float()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": peak_rss_mib(), "rss_before_mib": rss_before}


def run(quick: bool = False) -> list[Figure]:
    n_images = 48 if quick else 500
    repeats = 1 if quick else 3
    folder = tempfile.mkdtemp(prefix="bench-similarity-")
    try:
        start = time.perf_counter()
        described = run_in_subprocess("bench_similarity", "prepare", {"folder": folder, "n_images": n_images, "quick": quick})
        setup_s = time.perf_counter() - start
        compares, reads = [], []
        for _ in range(repeats):  # interleaved
            compares.append(run_in_subprocess("bench_similarity", "compare_worker", {"folder": folder}))
            reads.append(run_in_subprocess("bench_similarity", "read_worker", {"folder": folder}))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    best = min(compares, key=lambda r: r["seconds"])
    baseline = min(r["seconds"] for r in reads)
    n_layers = best["n_layers"]
    details = {
        "models": {label: {"spec": m["spec"], "layers": m["layers"]} for label, m in described["models"].items()},
        "n_layers": n_layers, "n_concepts": N_CONCEPTS, "n_test_images": n_images, "grid": list(GRID), "cka_grid": [8, 8],
        "method": "net2vec (random banks)", "repeats": repeats, "setup_s_not_timed": round(setup_s, 1),
        "activations_stored_mib": described["stored_mib"], "maps_stored_mib": round(best["maps_mib"], 1),
        "compare_s_runs": [round(r["seconds"], 3) for r in compares],
        "stages_s_of_best": {k: round(v, 3) for k, v in best["stages"].items()},
        "baseline": "stream every layer's stored activations for the test images once (EntryReader, float32): the I/O floor",
        "baseline_read_activations_once_s": round(baseline, 3), "baseline_s_runs": [round(r["seconds"], 3) for r in reads],
        "compare_over_baseline": round(best["seconds"] / baseline, 2),
        "read_maps_once_s": round(best["read_maps_once_s"], 3),
        "similarity_over_read_maps_once": round(best["stages"].get("supervised_similarity", 0.0) / best["read_maps_once_s"], 2),
    }
    peak = max(r["peak_mib"] for r in compares)
    memory = {
        "peak_mib_runs": [round(r["peak_mib"], 1) for r in compares],
        "rss_before_compare_mib": round(best["rss_before_mib"], 1), "peak_before_compare_mib": round(best["peak_before_mib"], 1),
        "baseline_read_peak_mib": round(max(r["peak_mib"] for r in reads), 1),
        "n_layers": n_layers, "n_concepts": N_CONCEPTS, "n_test_images": n_images, "grid": list(GRID),
    }
    label = f"compare {len(described['models'])} models × {n_layers // len(described['models'])} layers × {N_CONCEPTS} concepts, {n_images} images"
    return [
        Figure("similarity", f"{label}: time", round(best["seconds"], 3), "s", None, None, details),
        Figure("similarity", f"{label}: peak RSS", round(peak, 1), "MiB", None, None, memory),
    ]


if __name__ == "__main__":
    standalone(run, __doc__)

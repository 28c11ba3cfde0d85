"""Memory scaling of embed + Net2Vec probe + compare with the number of images.

Usage: ``python benchmarks/bench_memory.py [--quick]``

Each size runs in a fresh process (``run_in_subprocess``) on the synthetic world with
``zoo:synthetic_resnet_fpn`` at three layers: ``conceptlens.probes.workflow.probe_model`` (embedding,
grid masks, one Net2Vec bank per layer with its test metrics, the module order) and then
``compare_models`` (concept maps, layer × layer similarity, CKA), every artefact in a fresh
store. The figure is peak RSS at 4N images over peak RSS at N (N = 100; quick: 20); streaming
code keeps it near 1 (target ≤ 1.2). Peak RSS after each stage and the RSS right after imports
are in ``details`` — the growth above that floor is what the code under test allocates.
Net2Vec training is capped at a few epochs (memory does not depend on the epoch count); quick mode
uses two layers and one epoch, and its sizes lie below the batch sizes, so its ratio is a smoke test.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Figure, check, current_rss_mib, peak_rss_mib, run_in_subprocess, standalone  # noqa: E402

MODEL = "zoo:synthetic_resnet_fpn"
LAYERS = ["backbone.block1", "backbone.block3", "neck.p2"]
MAX_EPOCHS = 3
GRID = (100, 100)


def worker(n_images: int, folder: str, quick: bool = False) -> dict[str, Any]:
    """In a fresh process: probe and compare on ``n_images`` scenes; peak RSS after each stage."""
    import torch

    import conceptlens.concepts.compare.workflow as compare_workflow
    import conceptlens.probes.workflow as probe_workflow
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.concepts.data.synthetic import SyntheticWorld
    from conceptlens.probes.net2vec import Net2VecProbe  # noqa: F401  (imported before the floor is read)

    torch.manual_seed(0)
    stages: list[dict[str, Any]] = []

    def traced(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                stages.append({"stage": name, "seconds": round(time.perf_counter() - start, 3), "peak_mib": round(peak_rss_mib(), 1), "rss_mib": round(current_rss_mib(), 1)})
        return wrapper

    stage_names = {probe_workflow: ("embed", "embed_masks", "fit_bank", "layer_order"),
                   compare_workflow: ("embed_masks", "concept_map_entry", "supervised_similarity", "cka_statistics")}
    for module, names in stage_names.items():
        for name in names:
            setattr(module, name, traced(name, getattr(module, name)))
    model = load_model(MODEL)
    dataset = SyntheticWorld(n_images, seed=0)
    floor = current_rss_mib()
    start = time.perf_counter()
    store = ActivationStore(Path(folder) / "store")
    layers, epochs = (LAYERS[:2], 1) if quick else (LAYERS, MAX_EPOCHS)
    probed = probe_workflow.probe_model(model, dataset, layers, "net2vec", store, banks_dir=Path(folder) / "banks", label="A", grid=GRID,
                                        params={"max_epochs": epochs}, device="cpu", input_size=(128, 128))
    peak_probe = peak_rss_mib()
    result = compare_workflow.compare_models([probed], dataset, store, "net2vec", grid=GRID, n_permutations=0, n_bootstrap=0)
    seconds = time.perf_counter() - start
    assert len(result["matrix"]) == len(layers)
    return {
        "n_images": n_images, "peak_mib": peak_rss_mib(), "peak_after_probe_mib": peak_probe, "rss_after_imports_mib": floor,
        "seconds": seconds, "stages": stages, "n_test_images": result["n_test_images"],
        "stored_mib": round(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20, 1),
    }


def measure(n_images: int, quick: bool = False) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="bench-memory-")
    try:
        return run_in_subprocess("bench_memory", "worker", {"n_images": n_images, "folder": folder, "quick": quick})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(quick: bool = False) -> list[Figure]:
    n = 20 if quick else 100
    small, large = measure(n, quick), measure(4 * n, quick)
    ratio = large["peak_mib"] / small["peak_mib"]
    growth_small = small["peak_mib"] - small["rss_after_imports_mib"]
    growth_large = large["peak_mib"] - large["rss_after_imports_mib"]
    target = "≤ 1.2"
    details = {
        "model": MODEL, "layers": LAYERS[:2] if quick else LAYERS, "grid": list(GRID), "net2vec_max_epochs": 1 if quick else MAX_EPOCHS, "device": "cpu",
        "note": "quick sizes lie below the batch sizes (embed 32, masks and Net2Vec 64), so the quick ratio also measures batch growth" if quick else None,
        "n": n, "peak_n_mib": round(small["peak_mib"], 1), "peak_4n_mib": round(large["peak_mib"], 1),
        "rss_after_imports_mib": [round(small["rss_after_imports_mib"], 1), round(large["rss_after_imports_mib"], 1)],
        "growth_above_imports_mib": [round(growth_small, 1), round(growth_large, 1)],
        "growth_ratio": round(growth_large / growth_small, 3) if growth_small > 0 else None,
        "peak_after_probe_mib": [round(small["peak_after_probe_mib"], 1), round(large["peak_after_probe_mib"], 1)],
        "seconds": [round(small["seconds"], 1), round(large["seconds"], 1)],
        "stored_mib": [small["stored_mib"], large["stored_mib"]],
        "n_test_images": [small["n_test_images"], large["n_test_images"]],
        "stages_n": small["stages"], "stages_4n": large["stages"],
    }
    return [Figure("memory", f"peak RSS at {4 * n} / {n} images (embed + net2vec + compare)", round(ratio, 4), "×", target, check(ratio, target), details)]


if __name__ == "__main__":
    standalone(run, __doc__)

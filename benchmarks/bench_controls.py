"""Cost of the controls (issue 14): probing and comparing with controls on / off.

Usage: ``python benchmarks/bench_controls.py [--quick]``; in the suite (``run_all.py``)
:func:`run` gives the figures.

Setting: the synthetic world (``SyntheticWorld``, seed 0; 6 concepts: the five parts and sky), the zoo detector
``zoo:synthetic_vgg_centernet`` probed with Net2Vec at 3 layers (quick: 2), grid 32×32 (quick 16×16).

Probing figure: ``probe_model`` with the config's default controls (both kinds, ``random_weights``
and ``permuted_masks``, ``control_epochs = 3``, ``n_bootstrap = 200``, margin 0.05) / the same call
with ``controls=False``. Each timed call gets a fresh, empty activation store and no banks folder,
so both sides pay embedding and fitting (the controls also embed the random-weights model).

Comparison figure: ``compare_models`` of two probed models (the detector above and
``zoo:synthetic_resnet_fpn`` at as many layers; probing is set-up, not timed) with the similarity and
CKA null and bootstrap at the config defaults (``n_permutations = 499``, ``n_bootstrap = 200``) /
with both 0 (no null). Before each timed call the concept maps left by an earlier call are deleted
from the store, so both sides compute their maps.

The sides are interleaved (on/off, then off/on …), best time of ``repeats`` kept.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Figure, standalone

MODELS = {
    "A": ("zoo:synthetic_vgg_centernet", ["backbone.block2", "backbone.block3", "backbone.block4"]),
    "B": ("zoo:synthetic_resnet_fpn", ["backbone.block2", "backbone.block3", "backbone.block4"]),
}
FULL = {"n_images": 120, "layers": 3, "grid": 32, "epochs": 10, "n_permutations": 499, "n_bootstrap": 200, "repeats": 2}
QUICK = {"n_images": 40, "layers": 2, "grid": 16, "epochs": 3, "n_permutations": 19, "n_bootstrap": 20, "repeats": 1}  # smoke test only
#: ``conceptlens.config.ControlsConfig`` defaults, as the pipeline passes them to ``probe_model``
CONTROL_EPOCHS = 3
KINDS = ["random_weights", "permuted_masks"]
CONCEPTS = ["wheel", "window", "roof", "trunk", "crown", "sky"]


def _interleaved(sides: dict, repeats: int) -> dict[str, float]:
    """Best time of each side over ``repeats`` rounds, the order alternating between rounds."""
    best = {name: float("inf") for name in sides}
    names = list(sides)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            best[name] = min(best[name], sides[name]())
    return best


def run(quick: bool, size: dict | None = None) -> list[Figure]:
    import torch
    from conceptlens.concepts.compare.workflow import compare_models
    from conceptlens.concepts.data.synthetic import SyntheticWorld
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.workflow import probe_model

    size = size or (QUICK if quick else FULL)
    torch.manual_seed(0)
    world = SyntheticWorld(size["n_images"], seed=0).select_concepts(CONCEPTS)
    models = {label: load_model(spec) for label, (spec, _) in MODELS.items()}
    layers = {label: names[: size["layers"]] for label, (_, names) in MODELS.items()}
    settings = {"params": {"max_epochs": size["epochs"]}, "grid": (size["grid"], size["grid"]), "device": "cpu", "batch_size": 32}
    controls = {"kinds": KINDS, "epochs": CONTROL_EPOCHS, "n_bootstrap": size["n_bootstrap"], "margin": 0.05, "seed": 0}
    load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench-controls-") as folder:
        checked = {}

        def probe(with_controls: bool) -> float:
            root = Path(folder) / "probe-store"
            shutil.rmtree(root, ignore_errors=True)
            store = ActivationStore(root)
            start = time.perf_counter()
            probed = probe_model(models["A"], world, layers["A"], store=store, controls=controls if with_controls else False, **settings)
            seconds = time.perf_counter() - start
            checked[with_controls] = probed.metrics
            return seconds

        probe_best = _interleaved({"on": lambda: probe(True), "off": lambda: probe(False)}, size["repeats"])
        # the controls really ran: every concept at every layer carries both control IoUs; without, none
        for layer in layers["A"]:
            assert all(set(KINDS) <= set(m["controls"]) for m in checked[True][layer].values()), layer
            assert not any("controls" in m for m in checked[False][layer].values()), layer

        # comparison: two models probed once (set-up), then compare_models with / without the null
        store = ActivationStore(Path(folder) / "compare-store")
        probed = [probe_model(models[label], world, layers[label], store=store, label=label, **settings) for label in MODELS]
        keep = {path.name for path in store.root.iterdir()}
        found = {}

        def compare(with_null: bool) -> float:
            for path in store.root.iterdir():  # concept maps of an earlier call would be reused: delete them
                if path.name not in keep:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            n_permutations, n_bootstrap = (size["n_permutations"], size["n_bootstrap"]) if with_null else (0, 0)
            start = time.perf_counter()
            found[with_null] = compare_models(probed, world, store, "net2vec", (size["grid"], size["grid"]),
                                              n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=0)
            return time.perf_counter() - start

        compare_best = _interleaved({"on": lambda: compare(True), "off": lambda: compare(False)}, size["repeats"])
        assert found[True].get("null") and not found[False].get("null"), "the null did not run (or ran without controls)"

    details = {**size, "control_epochs": CONTROL_EPOCHS, "kinds": KINDS, "models": {k: [MODELS[k][0], layers[k]] for k in MODELS},
               "probe_with_controls_seconds": probe_best["on"], "probe_without_seconds": probe_best["off"],
               "compare_with_null_seconds": compare_best["on"], "compare_without_seconds": compare_best["off"],
               "threads": torch.get_num_threads(), "load_average": [load_start, os.getloadavg()[0]]}
    return [
        Figure("controls", f"probe {size['layers']} layers with controls / without", probe_best["on"] / probe_best["off"], "×", None, None, details),
        Figure("controls", f"compare_models with null ({size['n_permutations']} perm., {size['n_bootstrap']} boot.) / without",
               compare_best["on"] / compare_best["off"], "×", None, None, details),
    ]


if __name__ == "__main__":
    standalone(run, __doc__)

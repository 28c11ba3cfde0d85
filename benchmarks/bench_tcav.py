"""Image-level CAVs + TCAV with significance: conceptlens vs captum's ``TCAV`` on MobileNetV2.

Usage: ``python benchmarks/bench_tcav.py [--quick] [--repeats N]``

Setup (full size): ImageNet MobileNetV2 (``zoo:mobilenet_v2``), 3 layers (``features.7``,
``features.11``, ``features.14``), 2 concepts (``brick``, ``grass``: seeded random crops of
scikit-image's real brick and grass textures, tinted, 224×224), 6 random sets (seeded
``RealTextureWorld`` composites), 40 images per set, 32 scored inputs (seeded composites of the
Chelsea cat photo on sample-photo backgrounds) for the logit of ImageNet class 285 (Egyptian cat),
2 torch threads.

* **captum** — ``captum.concept.TCAV(model, layers, classifier=DefaultClassifier(), save_path)``
  with its own activation cache; experimental sets ``[c, r_i]`` for every concept and random set,
  plus the random-vs-random sets ``[r_0, r_i]`` of captum's TCAV tutorial;
  ``interpret(inputs, sets, target=285)``; then the tutorial's ``scipy.stats.ttest_ind`` of the
  concept's sign-count scores against the random-vs-random ones, per concept and layer. Concept
  batches come from a ``DataLoader`` that prepares the images with the model's adapter (the same
  resize + normalisation conceptlens uses), so both sides start from the same uint8 images.
* **conceptlens** — the ``conceptlens tcav`` chain: ``probes.image_cavs.set_activations`` (every set
  embedded once into an ``ActivationStore``, reused when warm) → ``fit_image_cavs`` (batched Newton
  logistic CAVs, plus its own null CAVs ``r_i`` vs ``r_{i+1}``) → ``conceptlens.attribution.tcav.tcav_scores``
  (one forward+backward per input batch for all layers, t-test, Holm, 1000 bootstrap resamples).
  CAVs are trained on **flattened** ``C·h·w`` activations (``set_activations(flatten=True)``:
  ``reduce='native'`` maps), the features captum trains on; the pooled default is timed too
  (``details``).
* **floor** — bare ``no_grad`` forward passes (adapter preparation included) over every concept and
  random image in batches of the set size, plus one bare forward and ``autograd.grad`` of the
  summed target logit to the three layer outputs over the inputs.

Figures: cold (empty caches: fresh ``save_path`` / store folders) captum / ours, cold ours /
floor, warm (activation caches filled by the cold run, CAVs retrained on both sides: captum's
pickled CAVs are deleted first) captum / ours. Every side runs in its own fresh process (model load
and image drawing untimed, one untimed warm-up forward), sides interleaved, best of repeats.

Scores: captum's own CAVs are put into a ``CAVSet`` and scored by ``tcav_scores`` on the same
inputs; the sign-count scores of every run (concept and random-vs-random) must equal captum's
``interpret`` output (the figure is the largest difference). The two tools' *own* CAVs differ
(captum: SGD on a random 67/33 split; conceptlens: Newton logistic regression, seeded split), so
their per-concept mean scores are reported for reference only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Figure, check, run_in_subprocess  # noqa: E402

MODEL = "zoo:mobilenet_v2"
TARGET_CLASS = 285
CONCEPTS = ("brick", "grass")
THREADS = 2
SIZES: dict[str, dict[str, Any]] = {
    "full": {"n_per_set": 40, "n_random": 6, "n_inputs": 32, "layers": ["features.7", "features.11", "features.14"], "repeats": 3},
    "quick": {"n_per_set": 8, "n_random": 3, "n_inputs": 8, "layers": ["features.7"], "repeats": 1},
}
TARGETS = {"cold_speedup": "≥ 2.5", "cold_floor": "≤ 1.2", "warm_speedup": "≥ 10"}


# ------------------------------------------------------------------------------------------ data
def image_sets(n_per_set: int, n_random: int, n_inputs: int, seed: int = 0) -> tuple[dict[str, list], list]:
    """Seeded uint8 224×224 images: ``{set name: images}`` (concepts, then ``random_i``) and the inputs."""
    import numpy as np
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from conceptlens.concepts.data.real_textures import RealTextureWorld

    size = 224
    rng = np.random.default_rng(seed)

    def resized(array: np.ndarray, height: int, width: int) -> np.ndarray:
        return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))

    def texture_crop(texture: np.ndarray) -> np.ndarray:
        side = int(rng.integers(size // 2, min(texture.shape[:2]) + 1))
        r0, c0 = (int(rng.integers(0, texture.shape[i] - side + 1)) for i in (0, 1))
        gray = resized(texture[r0:r0 + side, c0:c0 + side], size, size).astype(np.float32)
        tint = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
        image = np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)
        return image[:, ::-1].copy() if rng.random() < 0.5 else image

    sets: dict[str, list] = {}
    for concept in CONCEPTS:
        texture = np.asarray(getattr(skimage.data, concept)(), dtype=np.uint8)
        sets[concept] = [texture_crop(texture) for _ in range(n_per_set)]
    world = RealTextureWorld(n_images=n_random * n_per_set, seed=seed + 1, size=size)
    for r in range(n_random):
        sets[f"random_{r}"] = [world.image(r * n_per_set + i) for i in range(n_per_set)]

    cat = np.asarray(skimage.data.chelsea(), dtype=np.uint8)[10:295, 50:410]
    backgrounds = [np.asarray(b, dtype=np.uint8) for b in load_sample_images().images]
    inputs = []
    for _ in range(n_inputs):
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        side = int(rng.integers(200, min(background.shape[:2]) + 1))
        r0, c0 = int(rng.integers(0, background.shape[0] - side + 1)), int(rng.integers(0, background.shape[1] - side + 1))
        canvas = resized(background[r0:r0 + side, c0:c0 + side], size, size).copy()
        width = int(size * rng.uniform(0.6, 0.95))
        height = int(width * cat.shape[0] / cat.shape[1])
        paste = resized(cat, height, width)
        if rng.random() < 0.5:
            paste = paste[:, ::-1]
        top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
        canvas[top:top + height, left:left + width] = paste
        inputs.append(canvas)
    return sets, inputs


def _setup(size: str) -> tuple[Any, dict[str, list], list, dict[str, Any]]:
    """Threads, model (warmed up), images: the untimed part of every worker."""
    import torch

    from conceptlens.concepts.models.loading import load_model

    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    config = SIZES[size]
    model = load_model(MODEL)
    sets, inputs = image_sets(config["n_per_set"], config["n_random"], config["n_inputs"])
    # both tools' modules imported untimed in every worker: imports are not the work measured
    import captum.concept  # noqa: F401
    import scipy.stats  # noqa: F401

    import conceptlens.attribution.tcav  # noqa: F401
    import conceptlens.probes.image_cavs  # noqa: F401

    with torch.no_grad():  # first-call overhead (allocator, oneDNN primitives) out of the timings
        model.module(model.adapter.prepare(inputs[:2], torch.device("cpu")))
    return model, sets, inputs, config


# ------------------------------------------------------------------------------------- captum
def _captum_once(model: Any, sets: dict[str, list], inputs: list, layers: list[str], save_path: str) -> tuple[dict, dict]:
    """One captum TCAV run with the tutorial's t-test: (scores, p-values)."""
    import numpy as np
    import torch
    from captum.concept import TCAV, Concept
    from captum.concept._utils.classifier import DefaultClassifier
    from scipy.stats import ttest_ind
    from torch.utils.data import DataLoader

    cpu = torch.device("cpu")
    batch = len(next(iter(sets.values())))
    concepts = {
        name: Concept(i, name, DataLoader(images, batch_size=batch, collate_fn=lambda b: model.adapter.prepare(b, cpu)))
        for i, (name, images) in enumerate(sets.items())
    }
    randoms = [name for name in sets if name.startswith("random_")]
    experimental_sets = [[concepts[c], concepts[r]] for c in CONCEPTS for r in randoms]
    experimental_sets += [[concepts[randoms[0]], concepts[r]] for r in randoms[1:]]
    tcav = TCAV(model.module, layers, model_id="mobilenet_v2", classifier=DefaultClassifier(), save_path=save_path)
    scores = tcav.interpret(model.adapter.prepare(inputs, cpu), experimental_sets, target=TARGET_CLASS)

    def key(a: str, b: str) -> str:
        return f"{concepts[a].id}-{concepts[b].id}"

    p_values = {}
    for layer in layers:
        null = [float(scores[key(randoms[0], r)][layer]["sign_count"][0]) for r in randoms[1:]]
        for c in CONCEPTS:
            concept_scores = [float(scores[key(c, r)][layer]["sign_count"][0]) for r in randoms]
            p_values[f"{c}/{layer}"] = float(ttest_ind(concept_scores, null).pvalue) if np.ptp(concept_scores + null) > 0 else float("nan")
    return {"scores": scores, "cavs": tcav.cavs, "ids": {n: c.id for n, c in concepts.items()}}, p_values


def _seed_captum() -> None:
    """captum's DefaultClassifier shuffles with ``random`` and fits an unseeded SGDClassifier (numpy's global RNG)."""
    import numpy as np

    random.seed(0)
    np.random.seed(0)


def captum_worker(size: str) -> dict[str, Any]:
    """Cold and warm captum runs in this fresh process, then the score check against tcav_scores."""
    model, sets, inputs, config = _setup(size)
    layers = config["layers"]
    root = tempfile.mkdtemp(prefix="bench-tcav-captum-")
    try:
        _seed_captum()
        start = time.perf_counter()
        run, p_values = _captum_once(model, sets, inputs, layers, root)
        cold = time.perf_counter() - start
        for pickled in Path(root, "mobilenet_v2").glob("*.pkl"):  # keep the activations, retrain the CAVs
            pickled.unlink()
        _seed_captum()
        start = time.perf_counter()
        _captum_once(model, sets, inputs, layers, root)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        _captum_once(model, sets, inputs, layers, root)  # CAV pickles kept as well: only the gradients
        all_cached = time.perf_counter() - start
        check_result = _score_check(model, sets, inputs, layers, run)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"cold": cold, "warm": warm, "all_cached": all_cached, "p_values": p_values, **check_result}


def _score_check(model: Any, sets: dict[str, list], inputs: list, layers: list[str], run: dict) -> dict[str, Any]:
    """Score captum's own CAVs with ``tcav_scores``; compare every run's sign count to captum's."""
    from conceptlens.attribution.targets import ClassLogit
    from conceptlens.attribution.tcav import tcav_scores
    from conceptlens.probes.linear import CAVSet

    ids, scores, cavs = run["ids"], run["scores"], run["cavs"]
    randoms = [name for name in sets if name.startswith("random_")]

    def concept_row(first: str, second: str, layer: str) -> Any:
        stats = cavs[f"{ids[first]}-{ids[second]}"][layer].stats
        classes = [int(c) for c in stats["classes"]]
        return stats["weights"][classes.index(ids[first])].float()

    import torch

    cav_sets = {}
    for layer in layers:
        vectors = torch.stack([torch.stack([concept_row(c, r, layer) for r in randoms]) for c in CONCEPTS])
        null = torch.stack([concept_row(randoms[0], r, layer) for r in randoms[1:]])
        vectors, null = vectors / vectors.norm(dim=-1, keepdim=True), null / null.norm(dim=-1, keepdim=True)
        k, r = vectors.shape[:2]
        cav_sets[layer] = CAVSet(
            concepts=list(CONCEPTS), random_sets=randoms, vectors=vectors, biases=torch.zeros(k, r), accuracies=torch.ones(k, r),
            random_pairs=[(randoms[0], name) for name in randoms[1:]], random_vectors=null,
            random_biases=torch.zeros(len(null)), random_accuracies=torch.ones(len(null)), layer=layer,
        )
    ours = tcav_scores(model, inputs, None, cav_sets, {"cat": ClassLogit(TARGET_CLASS)}, batch_size=len(inputs), n_bootstrap=0)
    differences, captum_means = [], {}
    for layer in layers:
        for c in CONCEPTS:
            record = ours.get(c, layer, "cat")
            theirs = [float(scores[f"{ids[c]}-{ids[r]}"][layer]["sign_count"][0]) for r in randoms]
            theirs_null = [float(scores[f"{ids[randoms[0]]}-{ids[r]}"][layer]["sign_count"][0]) for r in randoms[1:]]
            differences += [abs(a - b) for a, b in zip(record.scores["sign_count"], theirs)]
            differences += [abs(a - b) for a, b in zip(record.null_scores["sign_count"], theirs_null)]
            captum_means[f"{c}/{layer}"] = sum(theirs) / len(theirs)
    return {"max_sign_count_difference": max(differences), "n_compared": len(differences), "captum_mean_scores": captum_means}


# -------------------------------------------------------------------------------- conceptlens
def _ours_once(model: Any, sets: dict[str, list], inputs: list, layers: list[str], store_path: str, flatten: bool) -> Any:
    from conceptlens.attribution.targets import ClassLogit
    from conceptlens.attribution.tcav import tcav_scores
    from conceptlens.concepts.data.dataset import ArrayDataset
    from conceptlens.concepts.store.activations import ActivationStore
    from conceptlens.probes.image_cavs import fit_image_cavs, set_activations

    batch = len(next(iter(sets.values())))
    datasets = {name: ArrayDataset(images, name=name) for name, images in sets.items()}
    randoms = [name for name in sets if name.startswith("random_")]
    activations = set_activations(model, datasets, layers, ActivationStore(store_path), batch, "cpu", flatten=flatten)
    cav_sets = fit_image_cavs(activations, list(CONCEPTS), randoms, seed=0)
    return tcav_scores(model, inputs, None, cav_sets, {"cat": ClassLogit(TARGET_CLASS)}, batch_size=len(inputs))


def ours_worker(size: str, flatten: bool = True, profile: str | None = None) -> dict[str, Any]:
    """Cold and warm conceptlens runs in this fresh process (``profile``: write a cProfile of the cold run)."""
    model, sets, inputs, config = _setup(size)
    layers = config["layers"]
    root = tempfile.mkdtemp(prefix="bench-tcav-ours-")
    try:
        times = {}
        for phase in ("cold", "warm"):
            profiler = None
            if profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            start = time.perf_counter()
            result = _ours_once(model, sets, inputs, layers, root, flatten)
            times[phase] = time.perf_counter() - start
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{profile}.{phase}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    records = {f"{r.concept}/{r.layer}": {"mean": r.mean, "null_mean": r.null_mean, "p": r.p, "p_holm": r.p_holm} for r in result.records}
    return {**times, "records": records}


# ------------------------------------------------------------------------------------- floor
def floor_worker(size: str) -> dict[str, Any]:
    """Bare forward passes over every set image, bare forward + layer gradients over the inputs."""
    import torch

    model, sets, inputs, config = _setup(size)
    cpu = torch.device("cpu")
    modules = dict(model.module.named_modules())
    layer_modules = [modules[name] for name in config["layers"]]

    def forward_sets() -> None:
        with torch.no_grad():
            for images in sets.values():
                model.module(model.adapter.prepare(images, cpu))

    def gradients() -> None:
        outputs: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in layer_modules]
        try:
            with torch.enable_grad():
                x = model.adapter.prepare(inputs, cpu)
                logits = model.module(x)
                torch.autograd.grad(logits[:, TARGET_CLASS].sum(), outputs)
        finally:
            for handle in handles:
                handle.remove()

    start = time.perf_counter()
    forward_sets()
    middle = time.perf_counter()
    gradients()
    end = time.perf_counter()
    return {"forward": middle - start, "gradients": end - middle, "total": end - start}


# ----------------------------------------------------------------------------------------- run
def run(quick: bool = False, repeats: int | None = None) -> list[Figure]:
    size = "quick" if quick else "full"
    config = SIZES[size]
    repeats = repeats or config["repeats"]
    here = "bench_tcav"
    captum, ours, pooled, floor = [], [], [], []
    for _ in range(repeats):  # interleaved: the machine's load changes between sides
        captum.append(run_in_subprocess(here, "captum_worker", {"size": size}))
        ours.append(run_in_subprocess(here, "ours_worker", {"size": size, "flatten": True}))
        floor.append(run_in_subprocess(here, "floor_worker", {"size": size}))
        if not quick:
            pooled.append(run_in_subprocess(here, "ours_worker", {"size": size, "flatten": False}))

    def best(results: list[dict], key: str) -> float:
        return min(r[key] for r in results)

    captum_cold, captum_warm, ours_cold, ours_warm = best(captum, "cold"), best(captum, "warm"), best(ours, "cold"), best(ours, "warm")
    floor_total = best(floor, "total")
    max_difference = max(r["max_sign_count_difference"] for r in captum)
    setting = {
        "model": MODEL, "layers": config["layers"], "concepts": list(CONCEPTS), "n_random_sets": config["n_random"],
        "images_per_set": config["n_per_set"], "n_inputs": config["n_inputs"], "target": f"logit:{TARGET_CLASS}", "threads": THREADS,
        "repeats": repeats, "cav_features": "flattened C·h·w (both)", "load_average": os.getloadavg(),
    }
    common = {
        **setting,
        "captum_cold_s": captum_cold, "captum_warm_s": captum_warm, "captum_all_cached_s": best(captum, "all_cached"),
        "ours_cold_s": ours_cold, "ours_warm_s": ours_warm, "floor_s": floor_total,
        "floor_forward_s": best(floor, "forward"), "floor_gradients_s": best(floor, "gradients"),
        "max_sign_count_difference_vs_captum": max_difference, "n_scores_compared": captum[0]["n_compared"],
        "captum_p_values": captum[0]["p_values"], "captum_mean_scores": captum[0]["captum_mean_scores"],
        "ours_records": ours[0]["records"],
        "per_repeat_ratios": [
            {"cold_speedup": c["cold"] / o["cold"], "cold_floor": o["cold"] / f["total"], "warm_speedup": c["warm"] / o["warm"]} for c, o, f in zip(captum, ours, floor)
        ],
        "all_times": {"captum": captum, "ours": [{k: r[k] for k in ("cold", "warm")} for r in ours], "floor": floor},
    }
    if pooled:
        common["ours_pooled_cold_s"], common["ours_pooled_warm_s"] = best(pooled, "cold"), best(pooled, "warm")
    for side in captum:
        side.pop("p_values", None)
        side.pop("captum_mean_scores", None)
    figures = []
    for name, value, key in (
        ("cold: captum / ours", captum_cold / ours_cold, "cold_speedup"),
        ("cold: ours / floor", ours_cold / floor_total, "cold_floor"),
        ("warm: captum / ours", captum_warm / ours_warm, "warm_speedup"),
    ):
        figures.append(Figure("tcav", name, value, "×", TARGETS[key], check(value, TARGETS[key]), common if not figures else {"see": "first tcav figure"}))
    figures.append(Figure("tcav", "max |sign-count score − captum| (same CAVs)", max_difference, "", "≤ 1e-6", check(max_difference, "≤ 1e-6"), {}))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--repeats", type=int, help="repeats per side (default 3, quick 1)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures = run(quick=args.quick, repeats=args.repeats)
    for f in figures:
        met = "—" if f.passed is None else ("yes" if f.passed else "NO")
        value = f"{f.value:.2f} {f.unit}" if f.unit == "×" else f"{f.value:.3g}"
        print(f"{f.name:<46} {value:>10}  target {f.target}  met {met}")
    d = figures[0].details
    print(f"captum cold {d['captum_cold_s']:.2f} s, warm {d['captum_warm_s']:.2f} s (CAVs cached too: {d['captum_all_cached_s']:.2f} s); "
          f"ours cold {d['ours_cold_s']:.2f} s, warm {d['ours_warm_s']:.2f} s; floor {d['floor_s']:.2f} s "
          f"(forward {d['floor_forward_s']:.2f} + gradients {d['floor_gradients_s']:.2f})")
    if "ours_pooled_cold_s" in d:
        print(f"ours with pooled CAVs (the default): cold {d['ours_pooled_cold_s']:.2f} s, warm {d['ours_pooled_warm_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([f.to_dict() for f in figures], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

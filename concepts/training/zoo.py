"""Train, evaluate and ship the two synthetic-world detectors of the zoo.

Training scenes are rendered on the fly from :func:`conceptlens.concepts.data.synthetic.render_scene`: step ``s``
of a run with batch size ``B`` uses scenes ``s*B … s*B + B - 1`` of the world :data:`TRAIN_SEED`
(every scene is seen once), each resized to the 128×128 canvas exactly as the adapter does and
flipped horizontally with probability 1/2 (a flip drawn from ``default_rng([seed, s])``). The
parameters are initialised after ``torch.manual_seed(seed)``, so a run is reproducible from
``(name, steps, seed, batch_size)`` on a given machine and thread count.

Evaluation renders :data:`EVAL_SCENES` scenes of the world :data:`EVAL_SEED` (never used for
training) at their natural 96–128 px sizes; predictions are mapped from canvas pixels back to
scene pixels and scored with mAP@0.5 (:func:`conceptlens.concepts.training.metrics.mean_average_precision`).

``conceptlens train-zoo`` calls :func:`train_zoo`; ``python -m conceptlens.concepts.training.zoo`` does the same.
On a machine shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python:
OpenMP threads that spin at barriers while the cores are oversubscribed make training several
times slower (the results do not change).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptlens.concepts.errors import ModelSpecError
from conceptlens.concepts.data.synthetic import GENERATOR_VERSION, OBJECT_CLASSES, SyntheticWorld, render_scene
from conceptlens.concepts.models.zoo.detectors import (
    ARCHITECTURES,
    INPUT_SIZE,
    WEIGHTS_DIR,
    CenterNetDetector,
    build_detector,
    detector_adapter,
)
from conceptlens.concepts.training.metrics import mean_average_precision

__all__ = [
    "TRAIN_SEED",
    "EVAL_SEED",
    "EVAL_SCENES",
    "SIZE_RANGE",
    "TrainConfig",
    "DEFAULT_CONFIGS",
    "training_batch",
    "train_detector",
    "predict",
    "evaluate_detector",
    "save_detector",
    "train_zoo",
]

#: World seed of the training scenes.
TRAIN_SEED = 1000
#: World seed and number of the held-out evaluation scenes.
EVAL_SEED = 777
EVAL_SCENES = 300
#: Natural scene sizes (height and width drawn independently).
SIZE_RANGE = (96, 128)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one detector."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 30
    weight_decay: float = 1e-4
    final_lr_fraction: float = 0.02
    grad_clip: float = 10.0


#: Defaults of :func:`train_zoo` (about 3–4 minutes each on 2 idle CPU cores).
DEFAULT_CONFIGS: dict[str, TrainConfig] = {
    "synthetic_vgg_centernet": TrainConfig(steps=600, batch_size=16, lr=2e-3),
    "synthetic_resnet_fpn": TrainConfig(steps=600, batch_size=16, lr=2e-3),
}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _canvas_scale(height: int, width: int) -> tuple[float, float]:
    """(sx, sy): scene pixels → canvas pixels."""
    return INPUT_SIZE / width, INPUT_SIZE / height


def training_batch(
    indices: Sequence[int],
    world_seed: int = TRAIN_SEED,
    flips: Sequence[bool] | None = None,
    size_range: tuple[int, int] = SIZE_RANGE,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Render scenes ``indices`` of world ``world_seed`` as a normalised canvas batch.

    Returns the batch (B, 3, 128, 128) and one target per scene with ``boxes`` (xyxy, canvas
    pixels, float32) and ``labels`` (int64, 1-based). ``flips[k]`` mirrors scene ``k``.
    """
    adapter = detector_adapter()
    scenes = [render_scene(world_seed, int(i), size_range) for i in indices]
    batch = adapter.prepare([np.array(s.image) for s in scenes], torch.device("cpu"))
    targets = []
    for k, scene in enumerate(scenes):
        height, width = scene.image.shape[:2]
        sx, sy = _canvas_scale(height, width)
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32).reshape(-1, 4)
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        labels = torch.tensor([OBJECT_CLASSES.index(o.label) + 1 for o in scene.objects], dtype=torch.int64)
        if flips is not None and flips[k]:
            batch[k] = batch[k].flip(-1)
            boxes = torch.stack([INPUT_SIZE - boxes[:, 2], boxes[:, 1], INPUT_SIZE - boxes[:, 0], boxes[:, 3]], dim=1)
        targets.append({"boxes": boxes, "labels": labels})
    return batch, targets


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``final_lr_fraction``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    t = (step - config.warmup) / max(config.steps - config.warmup, 1)
    low = config.final_lr_fraction
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=True)


def train_detector(
    name: str,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float | None = None,
    data_seed: int = TRAIN_SEED,
    progress: bool = True,
    log_every: int = 0,
    log_file: Any = None,
) -> tuple[CenterNetDetector, dict[str, Any]]:
    """Train the zoo detector ``name`` from scratch.

    Parameters
    ----------
    name : str
        ``synthetic_vgg_centernet`` or ``synthetic_resnet_fpn``.
    steps, batch_size, lr : optional
        Override the defaults of :data:`DEFAULT_CONFIGS`.
    seed : int
        Torch seed (initialisation) and seed of the flip augmentation.
    data_seed : int
        World seed of the training scenes.
    progress : bool
        Show a tqdm bar when stderr is a terminal.
    log_every, log_file :
        Write a line with the mean losses every ``log_every`` steps to ``log_file`` (a text
        stream), when both are given.

    Returns
    -------
    model : CenterNetDetector
        The trained model, in eval mode.
    info : dict
        ``steps``, ``batch_size``, ``lr``, ``seed``, ``data_seed``, ``time_s`` (wall clock),
        ``cpu_time_s`` (process CPU time, all threads), ``losses`` (the total loss of every step)
        and ``config``.
    """
    if name not in DEFAULT_CONFIGS:
        raise ModelSpecError(f"detector {name!r}", "no such synthetic detector", f"use one of {', '.join(DEFAULT_CONFIGS)}")
    base = DEFAULT_CONFIGS[name]
    n_steps = int(steps if steps is not None else base.steps)
    if n_steps < 1:
        raise ValueError(f"steps={steps!r}: train for at least one step")
    config = TrainConfig(
        steps=n_steps,
        batch_size=int(batch_size if batch_size is not None else base.batch_size),
        lr=float(lr if lr is not None else base.lr),
        warmup=min(base.warmup, max(1, n_steps // 10)),
        weight_decay=base.weight_decay,
        final_lr_fraction=base.final_lr_fraction,
        grad_clip=base.grad_clip,
    )
    torch.manual_seed(seed)
    model = build_detector(name).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    losses: list[float] = []
    parts: dict[str, list[float]] = {"heatmap": [], "size": [], "offset": []}
    bar = _progress_bar(config.steps, name, progress)
    start = time.perf_counter()
    cpu_start = time.process_time()
    try:
        for step in range(config.steps):
            flips = np.random.default_rng([seed, step]).random(config.batch_size) < 0.5
            indices = range(step * config.batch_size, (step + 1) * config.batch_size)
            x, targets = training_batch(indices, data_seed, flips)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(step, config)
            result = model.loss(x, targets)
            optimizer.zero_grad(set_to_none=True)
            result["loss"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            losses.append(float(result["loss"].detach()))
            for key in parts:
                parts[key].append(float(result[key]))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if log_every and log_file is not None and ((step + 1) % log_every == 0 or step + 1 == config.steps):
                recent = slice(-log_every, None)
                log_file.write(
                    f"{name} step {step + 1}/{config.steps} loss {np.mean(losses[recent]):.4f} "
                    + " ".join(f"{k} {np.mean(v[recent]):.4f}" for k, v in parts.items())
                    + f" lr {optimizer.param_groups[0]['lr']:.2e} t {time.perf_counter() - start:.0f}s\n"
                )
                log_file.flush()
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    cpu_time = time.process_time() - cpu_start
    model.eval()
    info = {
        "name": name,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": int(seed),
        "data_seed": int(data_seed),
        "time_s": elapsed,
        "cpu_time_s": cpu_time,
        "losses": losses,
        "config": config,
    }
    return model, info


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: torch.nn.Module, images: Sequence[np.ndarray], batch_size: int = 50) -> list[dict[str, torch.Tensor]]:
    """Detections on uint8 scenes of any size, boxes in scene pixels (mapped from the canvas)."""
    adapter = detector_adapter()
    was_training = model.training
    model.eval()
    out: list[dict[str, torch.Tensor]] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = adapter.prepare(chunk, torch.device("cpu"))
            for image, det in zip(chunk, model(x)):
                height, width = image.shape[:2]
                sx, sy = _canvas_scale(height, width)
                scale = torch.tensor([sx, sy, sx, sy])
                out.append({"boxes": det["boxes"] / scale, "scores": det["scores"], "labels": det["labels"]})
    finally:
        model.train(was_training)
    return out


def evaluate_detector(
    model: torch.nn.Module, seed: int = EVAL_SEED, n_scenes: int = EVAL_SCENES, batch_size: int = 50
) -> dict[str, Any]:
    """mAP@0.5 on ``n_scenes`` fresh scenes of world ``seed`` at their natural sizes.

    Returns the dict of :func:`~conceptlens.concepts.training.metrics.mean_average_precision` (per class by name)
    plus ``seed`` and ``n_scenes``.
    """
    world = SyntheticWorld(n_images=n_scenes, seed=seed, size_range=SIZE_RANGE)
    images = [world.image(i) for i in range(n_scenes)]
    targets = [world.detection_target(i) for i in range(n_scenes)]
    predictions = predict(model, images, batch_size)
    result = mean_average_precision(predictions, targets, 0.5, class_names=OBJECT_CLASSES)
    result.update(seed=int(seed), n_scenes=int(n_scenes))
    return result


# --------------------------------------------------------------------------------------------
# shipping
# --------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "synthetic_vgg_centernet": (
        "VGG-style CenterNet: plain backbone of conv3x3-BN-ReLU stacks with 2x2 max-pool downsampling "
        "and no skip connections (block1 at stride 1 ... block5 at stride 16), plain upsampling neck "
        "(bilinear x2 + conv3x3-BN-ReLU, no skips) back to stride 4, CenterNet head at stride 4 "
        "(sigmoid class heatmap, box width/height, centre offset; conv3x3-ReLU-conv1x1 each)."
    ),
    "synthetic_resnet_fpn": (
        "ResNet-FPN CenterNet: conv3x3 stride-2 stem, residual backbone of BasicBlock stages whose first "
        "block is strided (block1 ... block4 at strides 4 ... 32), FPN neck (lateral 1x1 conv + nearest "
        "top-down upsampling and sum, then conv3x3-BN-ReLU; p5 ... p2), CenterNet head on the finest "
        "merged level p2 (stride 4)."
    ),
}


def _stage_shapes(model: CenterNetDetector) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    modules = dict(model.named_modules())

    def record(name: str) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
            shapes.setdefault(name, list(output.shape[1:]))

        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in model.stages]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def model_card(model: CenterNetDetector, info: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """The JSON model card of a trained detector."""
    adapter = detector_adapter()
    config: TrainConfig = info["config"]
    shapes = _stage_shapes(model)
    return {
        "name": info["name"],
        "spec": f"zoo:{info['name']}",
        "architecture": _DESCRIPTIONS[info["name"]],
        "layers": [{"name": name, "shape": shapes.get(name)} for name in model.stages],
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "input": {"size": [INPUT_SIZE, INPUT_SIZE], "mean": list(adapter.mean), "std": list(adapter.std)},
        "output_stride": model.stride,
        "classes": list(OBJECT_CLASSES),
        "data": {
            "generator": "conceptlens.concepts.data.synthetic.render_scene",
            "generator_version": GENERATOR_VERSION,
            "world_seed": info["data_seed"],
            "size_range": list(SIZE_RANGE),
            "scenes_seen": info["steps"] * info["batch_size"],
            "augmentation": "horizontal flip with probability 0.5",
        },
        "training": {
            "steps": info["steps"],
            "batch_size": info["batch_size"],
            "seed": info["seed"],
            "optimizer": f"AdamW(lr={config.lr}, weight_decay={config.weight_decay}), grad-norm clip {config.grad_clip}",
            "schedule": f"linear warmup {config.warmup} steps, cosine decay to {config.final_lr_fraction} x lr",
            "loss": "CenterNet penalty-reduced focal loss (alpha 2, beta 4, Gaussian targets) + 0.1 x L1 size + 1 x L1 offset",
            "time_s": round(info["time_s"], 1),
            "cpu_time_s": round(info["cpu_time_s"], 1),
            "threads": torch.get_num_threads(),
            "final_loss": round(float(np.mean(info["losses"][-20:])), 4),
        },
        "evaluation": {
            "metric": "mAP@0.5 (all-point interpolated AP, mean over classes present)",
            "map50": round(evaluation["map"], 4),
            "per_class_ap": {k: round(v, 4) for k, v in evaluation["per_class"].items()},
            "n_ground_truth": evaluation["n_ground_truth"],
            "seed": evaluation["seed"],
            "n_scenes": evaluation["n_scenes"],
            "size_range": list(SIZE_RANGE),
        },
        "torch_version": torch.__version__,
        "reproduce": f"OMP_WAIT_POLICY=PASSIVE python -m conceptlens.concepts.training.zoo --seed {info['seed']}"
        + ("" if info["steps"] == DEFAULT_CONFIGS[info["name"]].steps else f" --steps {info['steps']}"),
    }


def save_detector(model: CenterNetDetector, name: str, out_dir: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ``<name>.safetensors`` (float32) and, when given, ``<name>.json`` to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"name": name, "format": "pt"})
    path.chmod(0o644)  # safetensors writes 0600; the shipped file must be readable by everyone
    if card is not None:
        card = dict(card)
        card["weights"] = {
            "file": path.name,
            "dtype": "float32",
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return path


#: Where ``train_zoo`` writes by default: a folder under the working directory, never the package.
DEFAULT_OUT = "zoo-weights"


def train_zoo(
    out_dir: str | Path = DEFAULT_OUT,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = 2,
    log_file: Any = None,
    batch_size: int | None = None,
    eval_scenes: int = EVAL_SCENES,
) -> dict[str, Any]:
    """Train both synthetic detectors, evaluate them and write weights and model cards.

    Parameters
    ----------
    out_dir : path
        Where to write ``<name>.safetensors`` and ``<name>.json`` (default ``./zoo-weights``). Never
        inside the installed package: load retrained weights with
        ``load_model("zoo:<name>", weights="zoo-weights/<name>.safetensors")``.
    steps : int, optional
        Training steps of each model (default: :data:`DEFAULT_CONFIGS`).
    seed : int
        Torch and augmentation seed.
    progress : bool
        tqdm bars when stderr is a terminal.
    num_threads : int or None
        Torch CPU threads while training (the shipped weights used 2); None keeps the current.
    log_file : text stream, optional
        Where to write a loss line every 50 steps and each model's result.
    batch_size : int, optional
        Batch size of each model (default: :data:`DEFAULT_CONFIGS`).
    eval_scenes : int
        Number of held-out scenes of world :data:`EVAL_SEED` for the mAP of the cards.

    Returns
    -------
    dict
        Model name → its model card (held-out mAP@0.5 under ``evaluation.map50``).

    Raises
    ------
    ModelSpecError
        When ``out_dir`` lies inside the installed conceptlens package.
    """
    out = _output_folder(out_dir)
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    cards: dict[str, Any] = {}
    try:
        for name in ARCHITECTURES:
            model, info = train_detector(
                name,
                steps=steps,
                seed=seed,
                batch_size=batch_size,
                progress=progress,
                log_every=50 if log_file is not None else 0,
                log_file=log_file,
            )
            evaluation = evaluate_detector(model, n_scenes=eval_scenes)
            card = model_card(model, info, evaluation)
            save_detector(model, name, out, card)
            cards[name] = card
            if log_file is not None:
                log_file.write(f"{name}: mAP@0.5 {evaluation['map']:.4f} {evaluation['per_class']} in {info['time_s']:.0f}s\n")
                log_file.flush()
    finally:
        torch.set_num_threads(previous_threads)
    return cards


def _output_folder(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path, refused when it lies inside the installed package (shipped weights stay as shipped)."""
    out = Path(out_dir)
    package = WEIGHTS_DIR.parents[2]  # conceptlens.concepts' folder (…/models/zoo/weights → its root)
    if out.resolve() == package or package in out.resolve().parents:
        raise ModelSpecError(f"--out {out_dir}", "is inside the installed conceptlens package", f"write elsewhere, e.g. --out ./{DEFAULT_OUT}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m conceptlens.concepts.training.zoo [--steps N] [--seed S] [--out DIR]``: run :func:`train_zoo`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m conceptlens.concepts.training.zoo", description=main.__doc__)
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: tuned per model)")
    parser.add_argument("--seed", type=int, default=0, help="torch and augmentation seed")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    args = parser.parse_args(argv)
    cards = train_zoo(args.out, steps=args.steps, seed=args.seed, progress=True, log_file=sys.stdout)
    for name, card in cards.items():
        print(f"{name}: mAP@0.5 {card['evaluation']['map50']:.4f} ({card['training']['time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

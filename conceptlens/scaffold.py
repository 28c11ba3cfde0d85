"""``conceptlens init``: a commented pipeline config for your model and your data, ready for ``run``.

The model is loaded once to list its layers (:func:`propose_layers` picks a few at evenly spread
relative depths), the data spec is opened to find its concepts, and the settings of every step are
written out with a comment saying what each does. The text is parsed back with
:func:`conceptlens.config.parse_config` before it is written, so an ``init`` config always loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.models.loading import LayerInfo, LoadedModel, list_layers

__all__ = ["init_config", "propose_layers", "scaffold_config", "write_scaffold"]

#: Relative depths are spread over this many layers by default.
DEFAULT_LAYERS = 4


def init_config(
    model_spec: str,
    data_spec: str,
    *,
    weights: str = "none",
    coco_images: str | None = None,
    name: str | None = None,
    target: str | None = None,
    input_size: tuple[int, int] | None = None,
    n_layers: int = DEFAULT_LAYERS,
    config_path: str = "CONFIG.yaml",
) -> str:
    """Load the model, open the data and return the text of a config for both (``conceptlens init``).

    Parameters
    ----------
    model_spec, data_spec : str
        As for ``conceptlens run`` (model specs, data specs).
    weights : str
        ``none``, ``default`` or a state-dict path.
    coco_images, name, target, input_size
        See :func:`scaffold_config`.
    n_layers : int
        How many layers to propose (:func:`propose_layers`).
    config_path : str
        Where the config will be written (named in its first comment).

    Returns
    -------
    str
        The config's YAML text.
    """
    from conceptlens.concepts.models.loading import load_model
    from conceptlens.data_spec import open_dataset

    model = load_model(model_spec, weights=weights, input_size=input_size)
    dataset = open_dataset(data_spec, coco_images=coco_images)
    layers = propose_layers(model, input_size or (224, 224), n_layers)
    return scaffold_config(model, data_spec, dataset.concepts, layers, name=name, coco_images=coco_images, target=target,
                           input_size=input_size, n_images=len(dataset), config_path=config_path)


def propose_layers(model: LoadedModel, input_size: tuple[int, int] = (224, 224), n_layers: int = DEFAULT_LAYERS) -> list[str]:
    """Up to ``n_layers`` layers at evenly spread relative depths, shallow to deep.

    Candidates are modules that run once and output a spatial feature map (N, C, H, W), inside
    ``backbone`` when the model has one (detectors). Blocks (modules with children) at the
    shallowest nesting level that has at least three of them are preferred (``layer1``…``layer4``
    of a ResNet, ``features.0``…``features.18`` of a MobileNet); without blocks (a VGG), the last
    module at each spatial resolution (the end of each stage). Of ``n`` candidates the ones at
    relative depth ``i / n_layers`` for ``i = 1 … n_layers`` are picked, so the deepest candidate is
    always among them.

    Parameters
    ----------
    model : LoadedModel
    input_size : (int, int)
        The (H, W) of the dry-run image.
    n_layers : int
        How many layers to propose.

    Returns
    -------
    list of str
        Layer names in execution order.
    """
    candidates = _feature_map_layers(model, input_size)
    if not candidates:
        raise ConceptLensError(f"model {model.spec!r}", "no layer outputs a spatial feature map (N, C, H, W)",
                               "list the layers with `conceptlens layers` and write them into the config by hand")
    modules = dict(model.module.named_modules())
    leaves = [(name, shape) for name, shape in candidates if not any(True for _ in modules[name].children())]
    chosen = _shallowest_blocks(modules, [name for name, _ in candidates]) or _stage_ends(leaves or candidates)
    count = min(n_layers, len(chosen))
    picks = sorted({max(0, round(len(chosen) * i / count) - 1) for i in range(1, count + 1)})
    return [chosen[i] for i in picks]


def _feature_map_layers(model: LoadedModel, input_size: tuple[int, int]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every module that runs once and outputs a spatial map, in execution order."""
    def is_map(layer: LayerInfo) -> bool:
        return (layer.shape is not None and len(layer.shape) == 4 and min(layer.shape[2:]) > 1 and layer.calls == 1
                and ":" not in layer.name and not layer.module_type.startswith("Adaptive"))

    maps = [(layer.name, layer.shape) for layer in list_layers(model, input_size) if is_map(layer)]
    in_backbone = [(name, shape) for name, shape in maps if name.startswith("backbone.")]
    return in_backbone or maps


def _stage_ends(candidates: Sequence[tuple[str, tuple[int, ...]]]) -> list[str]:
    """The last candidate before the spatial resolution changes, and the last one."""
    return [name for (name, shape), following in zip(candidates, [*candidates[1:], None])
            if following is None or following[1][2:] != shape[2:]]


def _shallowest_blocks(modules: dict[str, nn.Module], candidates: Sequence[str]) -> list[str]:
    """Candidates that have children, at the shallowest nesting depth holding at least three."""
    blocks = [name for name in candidates if any(True for _ in modules[name].children())]
    for depth in sorted({name.count(".") for name in blocks}):
        level = [name for name in blocks if name.count(".") == depth]
        if len(level) >= 3:
            return level
    return []


def scaffold_config(
    model: LoadedModel,
    data_spec: str,
    concepts: Sequence[str],
    layers: Sequence[str],
    *,
    name: str | None = None,
    coco_images: str | None = None,
    target: str | None = None,
    input_size: tuple[int, int] | None = None,
    n_images: int | None = None,
    config_path: str = "CONFIG.yaml",
) -> str:
    """The text of a commented config for ``model`` on ``data_spec``.

    Parameters
    ----------
    model : LoadedModel
        The loaded model (its spec and weights are written as given).
    data_spec : str
        The concept dataset: a folder (``images/`` + ``masks/<concept>/``), a COCO ``.json`` or a
        generated world.
    concepts : sequence of str
        The dataset's concepts.
    layers : sequence of str
        The layers to probe, shallow to deep (:func:`propose_layers`).
    name : str, optional
        The run's name (default: the model's builder or file name).
    coco_images : str, optional
        The COCO image folder, for a ``.json`` data spec.
    target : str, optional
        A TCAV target (``logit:K``, ``top:K`` …): TCAV is switched on with it; without one the TCAV
        section is written switched off, with an example.
    input_size : (int, int), optional
        The classifier input size, when not 224×224.
    n_images : int, optional
        The dataset's size: TCAV image sets hold at most a quarter of it (5 to 40 images).
    config_path : str
        Where the config will be written, for the comment that says how to run it.

    Returns
    -------
    str
        YAML that :func:`conceptlens.config.parse_config` accepts.
    """
    run_name = name or _plain_name(model.spec)
    lines = [
        f"# conceptlens config for {model.spec} on {data_spec}, written by `conceptlens init`.",
        f"# Check it with:  conceptlens run {config_path} --dry-run      run it with:  conceptlens run {config_path}",
        "# Paths are relative to the folder you run conceptlens from.",
        f"name: {run_name}",
        "seed: 0                       # split seed and seed of every learner",
        "device: auto                  # auto (CUDA when present), cpu, cuda or cuda:N",
        "",
        "data:",
        f"  spec: {_yaml(data_spec)}",
    ]
    if coco_images:
        lines.append(f"  coco_images: {_yaml(coco_images)}")
    lines += [
        f"  # {len(concepts)} concepts found in the data; delete the ones you do not want to probe",
        f"  concepts: {_yaml(list(concepts))}",
        "",
        "models:",
        "  # Layers are dotted module names, shallow to deep, proposed at evenly spread relative depths;",
        f"  # list every layer with:  conceptlens layers {model.spec}",
        f"  - name: {_plain_name(model.spec)}",
        f"    spec: {_yaml(model.spec)}",
        f"    weights: {_yaml(model.weights)}",
    ]
    if input_size:
        lines.append(f"    input_size: {_yaml(list(input_size))}")
    lines += [
        f"    layers: {_yaml(list(layers))}",
        "",
        "embed:",
        "  grid: [56, 56]              # concept grid: masks, probes and comparisons work at this resolution",
        "  batch_size: 16",
        "",
        "probes:",
        "  net2vec: {max_epochs: 30}   # pixel-level linear probes, one per concept",
        "  nmf: {k: 10}                # unsupervised concept vectors (NCAVs) per layer",
        "",
        "compare:",
        "  methods: [net2vec, nmf, cka]  # layer × layer similarity, with the CKA baseline beside it",
        "",
        *_tcav_lines(target, concepts, n_images),
        "",
        "controls:",
        "  enabled: true               # random-weights and permuted-mask controls, nulls and CIs beside every number",
    ]
    return "\n".join(lines) + "\n"


def _tcav_lines(target: str | None, concepts: Sequence[str], n_images: int | None) -> list[str]:
    per_set = 40 if n_images is None else min(40, max(5, n_images // 4))
    if target is None:
        return [
            "tcav:",
            "  enabled: false              # switch on and name a target to test concepts against a class:",
            "  targets:",
            '    - spec: "logit:0"          # logit:K / prob:K for classifiers, top:K for detectors',
            f"      # inputs: {concepts[0] if concepts else 'CONCEPT'}   # score images showing this concept (default: all test images)",
        ]
    return [
        "tcav:",
        "  enabled: true",
        f"  images_per_set: {per_set:<14}# images per concept set and per random set",
        "  random_sets: 10             # random sets for the significance test (more sets: smaller p-values possible)",
        "  targets:",
        f"    - spec: {_yaml(target)}",
        "      # inputs: CONCEPT         # score only test images showing this concept (default: all test images)",
    ]


def _yaml(value: object) -> str:
    """A scalar or list as YAML flow text (JSON is valid YAML and quotes what needs quoting)."""
    return json.dumps(value, ensure_ascii=False)


def _plain_name(spec: str) -> str:
    """A config name from a model spec: ``torchvision:resnet18?num_classes=10`` → ``resnet18``."""
    base = spec.split("?", 1)[0].rstrip(":").rsplit(":", 1)[-1]
    base = Path(base).stem or "model"
    plain = re.sub(r"[^A-Za-z0-9_-]+", "_", base).strip("_")
    return plain or "model"


def write_scaffold(text: str, path: str | Path, overwrite: bool = False) -> Path:
    """Validate ``text`` as a config and write it to ``path`` atomically.

    Raises
    ------
    ConceptLensError
        When ``path`` exists and ``overwrite`` is false.
    """
    import yaml

    from conceptlens.concepts.store.atomic import atomic_write_text
    from conceptlens.config import parse_config

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConceptLensError(str(path), "already exists", "choose another --out, or pass --overwrite to replace it")
    parse_config(yaml.safe_load(text), str(path))
    atomic_write_text(path, text)
    return path

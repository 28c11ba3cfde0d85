"""Probe controls: is a concept encoded by the trained model, or would any model (or any mask) do?

Two controls per (model, layer, concept), fitted with the same probe as the real one
(docs/METHODS.md §2, probe controls):

* ``random_weights`` — the same layer of the same architecture with re-initialised weights
  (:func:`conceptlens.concepts.models.randomize.randomized`), the true masks;
* ``permuted_masks`` — the trained model's activations, masks moved to other images of the same
  split (:class:`conceptlens.concepts.data.permuted.PermutedMasks`).

Each concept gets the controls' test metrics, a **selectivity** ``IoU − max(IoU_rw, IoU_pm)``
(set IoU on the test split), a paired bootstrap CI of it over test images, and a verdict:
**encoded** when the selectivity is at least ``margin`` and the CI's lower end is above zero.
The bootstrap needs per-image intersections and unions, which :func:`image_counts` streams from a
bank's maps on the test split, one batch in memory at a time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.data.permuted import PermutedMasks
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.environment import resolve_device
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.models.randomize import randomized
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.store.temporary import StoreLike, open_store
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.concepts.vectors.probed import ProbedModel
from conceptlens.probes.data import iter_batches, split_indices
from conceptlens.probes.metrics import HEADLINE_THRESHOLD
from conceptlens.probes.net2vec import MASK_THRESHOLD

__all__ = [
    "CONTROL_KINDS",
    "ControlError",
    "ImageCounts",
    "ProbeControls",
    "bootstrap_selectivity",
    "control_records",
    "image_counts",
    "pooled_iou",
    "probe_controls",
]

CONTROL_KINDS = ("random_weights", "permuted_masks")
CONTROL_LABELS = {"random_weights": "random-weights", "permuted_masks": "permuted-masks"}
CONTROL_METRICS = ("set_iou", "mean_iou", "auc_pr")
DEFAULT_MARGIN = 0.05
DEFAULT_BOOTSTRAP = 200


class ControlError(ConceptLensError):
    """Probe controls cannot be computed as asked (a method without masks, an unknown kind…)."""


@dataclass(frozen=True)
class ImageCounts:
    """Per-image, per-concept pixel counts of thresholded concept maps against the masks.

    Attributes
    ----------
    concepts : list of str
        The K concepts.
    indices : ndarray
        ``(N,)`` dataset indices of the images, ascending.
    intersection, union : ndarray
        ``(N, K)`` int64 ``|P∧Q|`` and ``|P∨Q|`` on the concept grid (``P``: probability > 0.5;
        zero where the pair is not valid) — summed over images they give the set IoU.
    """

    concepts: list[str]
    indices: np.ndarray
    intersection: np.ndarray
    union: np.ndarray


@dataclass
class ProbeControls:
    """What :func:`probe_controls` returns.

    Attributes
    ----------
    records : dict
        ``records[layer][concept]``: ``controls``, ``selectivity``, ``selectivity_ci``,
        ``encoded``, ``verdict`` (merge them into the probe's metrics with :meth:`merge_into`).
    banks : dict
        ``banks[kind][layer]``: the control probes' banks.
    seconds : dict
        Wall time per control kind (embedding + fitting + counting).
    settings : dict
        Seed, kinds, margin, bootstrap size and level, the control probes' parameters.
    """

    records: dict[str, dict[str, dict[str, Any]]]
    banks: dict[str, dict[str, ConceptBank]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def merge_into(self, metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``metrics[layer][concept]`` with the control records added (new dicts; ``metrics`` is not changed)."""
        merged = {}
        for layer, by_concept in metrics.items():
            extra = self.records.get(layer, {})
            merged[layer] = {concept: {**values, **extra.get(concept, {})} for concept, values in by_concept.items()}
        return merged


# ------------------------------------------------------------------------------- per-image counts
@torch.no_grad()
def image_counts(
    bank: ConceptBank, activations: StoreEntry, masks: StoreEntry, split: str = "test", *, batch_size: int = 64, device: str = "cpu",
) -> ImageCounts:
    """Per-image intersections and unions of a bank's thresholded maps on one split, streamed.

    Parameters
    ----------
    bank : ConceptBank
        A bank whose maps are probabilities (``sigmoid_affine``), e.g. Net2Vec's.
    activations, masks : StoreEntry
        The layer's native activations and the grid masks of the same dataset.
    split : str
        The split whose images are counted.
    batch_size : int
        Images per batch (a batch never spans two activation shards).
    device : str
        Where the maps are computed.

    Returns
    -------
    ImageCounts
        Summed over images, ``intersection / union`` is the set IoU that
        :class:`~conceptlens.probes.metrics.SegmentationMetrics` reports at threshold 0.5.
    """
    if bank.map_kind != "probability":
        raise ControlError(f"bank of layer {bank.layer!r}", f"has {bank.map_kind} maps; controls compare probability maps", "use a Net2Vec bank")
    concepts = list(masks.manifest()["dataset"].get("concepts", []))
    columns = [concepts.index(c) for c in bank.concepts]
    grid = tuple(masks.manifest()["request"]["grid"])
    indices, parts = split_indices(masks, split), []
    for batch in iter_batches(activations, masks, indices, batch_size, device=resolve_device(device)):
        predicted = bank.concept_maps(batch.activations, batch.geometries, grid) > HEADLINE_THRESHOLD
        truth = batch.masks[:, columns] >= MASK_THRESHOLD
        used = batch.valid[:, columns, None, None]
        intersection = (predicted & truth & used).flatten(2).sum(2)
        union = ((predicted | truth) & used).flatten(2).sum(2)
        parts.append((batch.indices.numpy(), intersection.cpu().numpy(), union.cpu().numpy()))
    if not parts:
        empty = np.zeros((0, len(columns)), dtype=np.int64)
        return ImageCounts(list(bank.concepts), np.zeros(0, dtype=np.int64), empty, empty)
    rows, intersections, unions = (np.concatenate(column) for column in zip(*parts))
    order = np.argsort(rows)
    return ImageCounts(list(bank.concepts), rows[order].astype(np.int64), intersections[order].astype(np.int64), unions[order].astype(np.int64))


def pooled_iou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Set IoU ``Σ I / Σ U`` over the image axis (the second last); NaN where the union is empty.

    Parameters
    ----------
    intersection, union : ndarray
        ``(..., N, K)`` counts (a leading axis, e.g. bootstrap draws, is kept).

    Returns
    -------
    ndarray
        ``(..., K)`` float64.

    Examples
    --------
    >>> pooled_iou(np.array([[1, 0], [2, 0]]), np.array([[2, 0], [4, 0]])).tolist()
    [0.5, nan]
    """
    total_i = np.asarray(intersection, dtype=np.float64).sum(axis=-2)
    total_u = np.asarray(union, dtype=np.float64).sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_u > 0, total_i / np.where(total_u > 0, total_u, 1.0), np.nan)


# ------------------------------------------------------------------------------------ bootstrap
def bootstrap_selectivity(
    true: ImageCounts, controls: Mapping[str, ImageCounts], n_bootstrap: int = DEFAULT_BOOTSTRAP, level: float = 0.95, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI of ``IoU − max_c IoU_c`` per concept, by a paired bootstrap over test images.

    Each draw resamples the test images with replacement (the same images for the probe and every
    control: the three are evaluated on the same images) and recomputes every set IoU from the
    summed counts; draws where a set IoU is undefined are left out.

    Parameters
    ----------
    true : ImageCounts
        The probe's counts.
    controls : mapping of str to ImageCounts
        The controls' counts on the same images and concepts.
    n_bootstrap : int
        Draws ``B``; 0: no interval (NaN ends).
    level : float
        Coverage of the interval.
    seed : int
        Seed of the draws.

    Returns
    -------
    (ndarray, ndarray)
        ``(K,)`` lower and upper ends; NaN for a concept with no defined draw.
    """
    for name, counts in controls.items():
        if not np.array_equal(counts.indices, true.indices) or counts.concepts != true.concepts:
            raise ControlError(f"control {name!r}", "was counted on other images or concepts than the probe", "count every control on the probe's test split")
    n = len(true.indices)
    if n == 0 or n_bootstrap == 0:  # no images, or no interval asked for
        return np.full(len(true.concepts), np.nan), np.full(len(true.concepts), np.nan)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    weights = np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)  # (B, N) multiplicities

    def iou(counts: ImageCounts) -> np.ndarray:
        return pooled_iou((weights[:, :, None] * counts.intersection[None]), (weights[:, :, None] * counts.union[None]))

    floor = np.max(np.stack([iou(c) for c in controls.values()]), axis=0) if controls else np.zeros((n_bootstrap, len(true.concepts)))
    selectivity = iou(true) - floor  # NaN propagates from any undefined IoU
    tail = (1.0 - level) / 2.0
    low, high = np.full(len(true.concepts), np.nan), np.full(len(true.concepts), np.nan)
    for k in range(len(true.concepts)):
        defined = selectivity[:, k][~np.isnan(selectivity[:, k])]
        if len(defined):
            low[k], high[k] = np.quantile(defined, [tail, 1.0 - tail])
    return low, high


# -------------------------------------------------------------------------------------- records
def control_records(
    true: ImageCounts, controls: Mapping[str, ImageCounts], control_metrics: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *, margin: float = DEFAULT_MARGIN, n_bootstrap: int = DEFAULT_BOOTSTRAP, level: float = 0.95, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """One record per concept: controls' metrics, selectivity, its CI, ``encoded`` and a verdict.

    Parameters
    ----------
    true : ImageCounts
        The probe's per-image counts on the test split.
    controls : mapping of str to ImageCounts
        Each control's counts on the same images.
    control_metrics : mapping
        ``control_metrics[kind][concept]``: each control probe's test metrics (set IoU, mean IoU,
        AUC-PR…; see :meth:`conceptlens.probes.net2vec.Net2VecProbe.evaluate`).
    margin : float
        How far the probe's set IoU must lie above the larger control's.
    n_bootstrap, level, seed :
        The bootstrap (see :func:`bootstrap_selectivity`).

    Returns
    -------
    dict
        ``{concept: {"controls": {kind: {"set_iou", "mean_iou", "auc_pr"}}, "selectivity",
        "selectivity_ci": [low, high], "encoded", "verdict"}}``; ``None`` where undefined.
    """
    iou = pooled_iou(true.intersection, true.union)
    control_iou = {kind: pooled_iou(c.intersection, c.union) for kind, c in controls.items()}
    low, high = bootstrap_selectivity(true, controls, n_bootstrap, level, seed)
    records = {}
    for k, concept in enumerate(true.concepts):
        floors = {kind: values[k] for kind, values in control_iou.items()}
        records[concept] = _record(iou[k], floors, low[k], high[k], margin)
        records[concept]["controls"] = {
            kind: {m: control_metrics.get(kind, {}).get(concept, {}).get(m) for m in CONTROL_METRICS} for kind in controls
        }
    return records


def _record(iou: float, floors: dict[str, float], low: float, high: float, margin: float) -> dict[str, Any]:
    """Selectivity, CI, ``encoded`` and the verdict of one concept from its IoUs."""
    if np.isnan(iou) or any(np.isnan(v) for v in floors.values()):
        return {"selectivity": None, "selectivity_ci": [None, None], "encoded": False, "verdict": "undefined: no positive test pixels"}
    kind = max(floors, key=floors.get) if floors else None
    floor = floors[kind] if kind else 0.0
    selectivity = float(iou - floor)
    ci = [None if np.isnan(low) else float(low), None if np.isnan(high) else float(high)]
    if kind is not None and iou <= floor:
        verdict = f"not above the {CONTROL_LABELS.get(kind, kind)} control"
    elif selectivity < margin:
        verdict = f"above the {CONTROL_LABELS.get(kind, kind)} control by less than the margin {margin:g}"
    elif ci[0] is None:
        verdict = "selectivity CI undefined (no bootstrap draws, e.g. n_bootstrap 0): not called encoded"
    elif ci[0] <= 0:
        verdict = "selectivity CI includes zero"
    else:
        verdict = "clears both controls" if len(floors) > 1 else f"clears the {CONTROL_LABELS.get(kind, kind)} control"
    return {"selectivity": selectivity, "selectivity_ci": ci, "encoded": verdict.startswith("clears"), "verdict": verdict}


# ------------------------------------------------------------------------------------ workflow
def probe_controls(
    probed: ProbedModel,
    dataset: ConceptDataset,
    store: StoreLike = None,
    *,
    params: dict[str, Any] | None = None,
    kinds: Sequence[str] = CONTROL_KINDS,
    seed: int = 0,
    epochs: int | None = None,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    level: float = 0.95,
    margin: float = DEFAULT_MARGIN,
    banks_dir: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
) -> ProbeControls:
    """Fit the control probes of every probed layer and score each concept against them.

    Parameters
    ----------
    probed : ProbedModel
        Net2Vec banks of a model (from :func:`conceptlens.probes.workflow.probe_model`).
    dataset : ConceptDataset
        The dataset the banks were fitted on (the same images, masks and split).
    store : ActivationStore, str, PathLike or None
        Activation store (None: the session's temporary store). The permuted-masks control reuses
        the model's activations; the random-weights control embeds the dataset once more.
    params : dict, optional
        The probe's parameters (the control probes use the same, so the comparison is fair).
    kinds : sequence of str
        Controls to run, a subset of ``('random_weights', 'permuted_masks')``.
    seed : int
        Seed of the random weights, of the mask derangement and of the bootstrap.
    epochs : int, optional
        ``max_epochs`` of the control probes; default: the probe's own. Fewer epochs make the
        controls cheaper but weaker (a weaker control flatters the probe).
    n_bootstrap, level : int, float
        Bootstrap draws and CI coverage of the selectivity.
    margin : float
        Selectivity a concept needs to count as encoded.
    banks_dir : str, optional
        Save the control banks there (labels ``<label>~<kind>``) and reuse matching ones.
    batch_size : int
        Images per forward pass and per counting batch.
    device : str
        ``auto``, ``cpu``, ``cuda`` …
    progress : bool
        Progress bars.

    Returns
    -------
    ProbeControls
        Records per layer and concept (merge them with ``ProbeControls.merge_into(probed.metrics)``).
    """
    _check_request(probed, kinds)
    from conceptlens.probes.workflow import (
        layer_bank,  # the workflow imports this module
    )

    store, params = open_store(store), dict(params or {})
    control_params = {**params, **({"max_epochs": int(epochs)} if epochs is not None else {})}
    masks = embed_masks(dataset, store, grid=probed.grid, progress=progress)
    dtype = probed.activations[probed.layers[0]].manifest()["request"]["dtype"]
    sources: dict[str, tuple[dict[str, StoreEntry], StoreEntry]] = {}
    seconds: dict[str, float] = {}
    banks: dict[str, dict[str, ConceptBank]] = {}
    counts: dict[str, dict[str, ImageCounts]] = {}
    for kind in kinds:
        start = time.perf_counter()
        if kind == "random_weights":
            model = randomized(probed.model, seed)
            entries = embed(model, dataset, probed.layers, store, dtype=dtype, batch_size=batch_size, device=device, progress=progress).entries
            sources[kind] = (entries, masks)
        else:
            sources[kind] = (probed.activations, embed_masks(PermutedMasks(dataset, seed), store, grid=probed.grid, progress=progress))
        entries, kind_masks = sources[kind]
        banks[kind] = {
            layer: layer_bank(probed.method, layer, f"{probed.label}~{kind}", entries[layer], kind_masks, control_params, banks_dir, device, progress)
            for layer in probed.layers
        }
        counts[kind] = {layer: image_counts(banks[kind][layer], entries[layer], kind_masks, batch_size=batch_size, device=device) for layer in probed.layers}
        seconds[kind] = time.perf_counter() - start
    records = {}
    for layer in probed.layers:
        true = image_counts(probed.banks[layer], probed.activations[layer], masks, batch_size=batch_size, device=device)
        records[layer] = control_records(
            true, {kind: counts[kind][layer] for kind in kinds}, {kind: banks[kind][layer].metrics for kind in kinds},
            margin=margin, n_bootstrap=n_bootstrap, level=level, seed=seed,
        )
    settings = {"kinds": list(kinds), "seed": seed, "margin": margin, "n_bootstrap": n_bootstrap, "level": level, "params": control_params}
    return ProbeControls(records, banks, seconds, settings)


def _check_request(probed: ProbedModel, kinds: Sequence[str]) -> None:
    unknown = [kind for kind in kinds if kind not in CONTROL_KINDS]
    if unknown or not kinds:
        raise ControlError(f"control kinds {list(kinds)}", "unknown or none" if not unknown else f"{unknown} unknown", f"use some of {', '.join(CONTROL_KINDS)}")
    if probed.comparison != "supervised" or any(bank.map_kind != "probability" for bank in probed.banks.values()):
        raise ControlError(
            f"probes of {probed.label!r} ({probed.method})", "controls score supervised probability maps (set IoU against the masks)",
            "run controls on Net2Vec probes (method='net2vec'), or pass controls=False",
        )

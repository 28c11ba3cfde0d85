"""Steps shared by the CLI and the pipeline: embed, probe (reusing saved banks), compare.

Each step reuses what is already on disk: activations and masks from the store, banks from the
banks folder when their provenance matches the request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conceptlens.concepts.store.atomic import atomic_write_text
from conceptlens.concepts.compare.cka import cka_matrix
from conceptlens.concepts.compare.similarity import LayerMaps, relative_depths, ridge, supervised_similarity, unsupervised_similarity
from conceptlens.concepts.vectors.concept_maps import concept_map_entry
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.models.loading import LoadedModel, list_layers
from conceptlens.concepts.store.activations import ActivationStore, StoreEntry
from conceptlens.concepts.vectors.bank import BankError, ConceptBank
from conceptlens.probes.data import split_indices

__all__ = ["ProbedModel", "bank_path", "compare_models", "layer_order", "probe_model", "write_json"]

PIXEL_METHODS = ("net2vec", "nmf")


@dataclass
class ProbedModel:
    """A model with its probed layers: activation entries and banks per layer, and depths."""

    label: str
    model: LoadedModel
    layers: list[str]
    activations: dict[str, StoreEntry]
    banks: dict[str, ConceptBank]
    depths: list[float]
    module_depths: list[float]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


def bank_path(banks_dir: Path, label: str, layer: str, method: str) -> Path:
    """File base name of a bank: ``<banks_dir>/<label>__<layer>.<method>`` (unsafe characters replaced)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{label}__{layer}")
    return Path(banks_dir) / f"{safe}.{method}"


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (NaN-free: non-finite floats become null)."""
    atomic_write_text(Path(path), json.dumps(_finite(data), indent=1))
    return Path(path)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    return value


def probe_model(
    label: str,
    model: LoadedModel,
    dataset: ConceptDataset,
    layers: Sequence[str],
    method: str,
    store: ActivationStore,
    banks_dir: Path,
    grid: tuple[int, int] = (100, 100),
    params: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
    input_size: tuple[int, int] = (224, 224),
    dtype: str = "float16",
) -> ProbedModel:
    """Embed ``dataset`` at ``layers`` and fit one bank per layer (net2vec or nmf), reusing saved banks.

    Returns the probed model with the banks' test metrics (set IoU etc. for net2vec; matched
    concept, IoU and fidelity for nmf).
    """
    if method not in PIXEL_METHODS:
        raise ConceptLensError(f"method {method!r}", "is not a pixel-level method", f"use one of {', '.join(PIXEL_METHODS)}")
    result = embed(model, dataset, list(layers), store, dtype=dtype, batch_size=batch_size, device=device, progress=progress)
    masks = embed_masks(dataset, store, grid=grid, progress=progress)
    banks, metrics = {}, {}
    for layer in layers:
        path = bank_path(banks_dir, label, layer, method)
        bank = _reusable_bank(path, result.entries[layer], masks, params or {})
        if bank is None:
            bank = _fit_bank(method, layer, result.entries[layer], masks, params or {}, device, progress)
            bank.save(path)
        banks[layer], metrics[layer] = bank, bank.metrics
    order = layer_order(model, input_size, store)
    return ProbedModel(label, model, list(layers), result.entries, banks, relative_depths(layers), relative_depths(layers, order), metrics)


def layer_order(model: LoadedModel, input_size: tuple[int, int], store: ActivationStore) -> list[str]:
    """Every module of ``model`` in execution order (one traced forward pass, then cached in the store)."""
    path = Path(store.root) / "layer_orders" / f"{model.hash[:24]}_{input_size[0]}x{input_size[1]}.json"
    if path.is_file():
        try:
            order = json.loads(path.read_text())
            if isinstance(order, list) and all(isinstance(name, str) for name in order):
                return order
        except (OSError, ValueError):
            pass  # unreadable cache: trace again and rewrite it
    order = [info.name for info in list_layers(model, input_size)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(order))
    return order


def _reusable_bank(path: Path, activations: StoreEntry, masks: StoreEntry, params: dict[str, Any]) -> ConceptBank | None:
    if not Path(f"{path}.json").is_file():
        return None
    try:
        bank = ConceptBank.load(path)
    except BankError:
        return None
    provenance = bank.provenance
    same_data = provenance.get("activations_key") == activations.key and provenance.get("masks_key") == masks.key
    same_params = all(provenance.get("params", {}).get(k) == v for k, v in params.items())
    return bank if same_data and same_params else None


def _fit_bank(method: str, layer: str, activations: StoreEntry, masks: StoreEntry, params: dict[str, Any], device: str, progress: bool) -> ConceptBank:
    if method == "net2vec":
        from conceptlens.probes.net2vec import Net2VecProbe

        probe = Net2VecProbe(device=device, progress=progress, **params).fit(activations, masks)
        return probe.to_bank(layer, metrics=probe.evaluate(activations, masks, "test"))
    from conceptlens.probes.nmf import NMFConcepts

    channels = int(activations.manifest()["item_shape"][0])
    settings = {**params, "n_components": min(params.get("n_components", 10), channels)}  # a narrow layer gets k ≤ C
    nmf = NMFConcepts(device=device, progress=progress, **settings).fit(activations, indices=split_indices(masks, "train"))
    test = split_indices(masks, "test")
    labels = nmf.label(activations, masks, test)
    provenance = {"activations_key": activations.key, "masks_key": masks.key, "params": params, "n_components_used": settings["n_components"]}
    bank = nmf.to_bank(layer, labels, provenance=provenance)
    for name in bank.concepts:
        bank.metrics.setdefault(name, {})["fidelity"] = nmf.fidelity(activations, test)
    return bank


def compare_models(
    probed: Sequence[ProbedModel],
    dataset: ConceptDataset,
    store: ActivationStore,
    method: str,
    grid: tuple[int, int] = (100, 100),
    cka_grid: tuple[int, int] = (8, 8),
    progress: bool = False,
    cka: bool = True,
) -> dict[str, Any]:
    """Layer × layer similarity of every probed layer of every model on the test split.

    Returns a JSON-able dict: layer labels with both relative depths, the full matrix (and
    per-concept matrices), per model pair the sub-matrix and its ridge, and (``cka``) the linear
    CKA matrices beside it (``null`` without).
    """
    masks = embed_masks(dataset, store, grid=grid, progress=progress)
    test = split_indices(masks, "test")
    layer_maps, entries, depths, module_depths = [], [], [], []
    for model in probed:
        for layer, depth, module_depth in zip(model.layers, model.depths, model.module_depths):
            bank = model.banks[layer]
            maps = concept_map_entry(bank, model.activations[layer], test, grid, store, progress=progress)
            iou = {c: bank.metrics.get(c, {}).get("set_iou") for c in bank.concepts}
            layer_maps.append(LayerMaps(model.label, layer, bank.concepts, maps, iou))
            entries.append(model.activations[layer])
            depths.append(depth)
            module_depths.append(module_depth)
    labels = [m.label for m in layer_maps]
    if method == "nmf":
        similarity = unsupervised_similarity(layer_maps)
        matrix, details = similarity.best_match, similarity.to_dict()
    else:
        similarity = supervised_similarity(layer_maps)
        matrix, details = similarity.matrix, similarity.to_dict()
    cka_matrices = {mode: cka_matrix(entries, test, mode=mode, grid=cka_grid) for mode in ("pooled", "spatial")} if cka else None
    return {
        "method": method,
        "grid": list(grid),
        "n_test_images": int(len(test)),
        "layers": [
            {"label": label, "model": m.model, "layer": m.layer, "depth": d, "module_depth": md}
            for label, m, d, md in zip(labels, layer_maps, depths, module_depths)
        ],
        "matrix": details.get("matrix") or details.get("best_match"),
        "details": details,
        "cka": {mode: np.round(values, 6).tolist() for mode, values in cka_matrices.items()} if cka_matrices else None,
        "blocks": _blocks(probed, matrix, cka_matrices, depths),
    }


def _blocks(probed: Sequence[ProbedModel], matrix: np.ndarray, cka: dict[str, np.ndarray] | None, depths: list[float]) -> list[dict[str, Any]]:
    """Per (model A, model B) pair: the sub-matrices and the ridge of the concept similarity."""
    offsets = np.cumsum([0] + [len(m.layers) for m in probed])
    blocks = []
    for a, model_a in enumerate(probed):
        for b, model_b in enumerate(probed):
            if b < a:
                continue
            rows = slice(offsets[a], offsets[a + 1])
            cols = slice(offsets[b], offsets[b + 1])
            sub = np.asarray(matrix)[rows, cols]
            blocks.append({
                "a": model_a.label,
                "b": model_b.label,
                "rows": model_a.layers,
                "columns": model_b.layers,
                "similarity": sub.tolist(),
                "cka_pooled": cka["pooled"][rows, cols].tolist() if cka else None,
                "cka_spatial": cka["spatial"][rows, cols].tolist() if cka else None,
                "ridge": ridge(_without_diagonal(sub) if a == b else sub, depths[rows], depths[cols]),
            })
    return blocks


def _without_diagonal(matrix: np.ndarray) -> np.ndarray:
    """Within one model every layer matches itself; its ridge is the best *other* layer."""
    masked = np.array(matrix, dtype=float)
    np.fill_diagonal(masked, np.nan)
    return masked

"""NCAV importance and local explanations (docs/METHODS.md §4; ICE, Zhang et al. 2021, arXiv 2006.15417).

Definitions. ``A`` (C×h×w) are a layer's activations for input ``x``, ``P`` (k×C) the NCAVs of an
NMF :class:`~conceptlens.concepts.vectors.bank.ConceptBank` (``bank.vectors``), ``y`` a target scalar
(:mod:`conceptlens.attribution.targets`).

* Concept maps ``S(x)`` (k×h×w): the NNLS codes of the pixel vectors (``bank.nmf_maps``).
* Concept score ``s_j(x)``: the mean of ``S_j(x)`` over the image's cells (``image_cells`` of
  the input's geometry; every cell for plain tensor inputs).
* Importance ``I_j(x)``: the derivative of ``y`` when the concept's presence rises by ``δ`` at
  every image cell, ``A_hw → A_hw + δ·P_j``; by the chain rule
  ``I_j(x) = Σ_{hw ∈ image cells} ∂y/∂A_hw · P_j`` (autograd, exact).
* Contribution ``c_j(x) = I_j(x)·s_j(x)``: a first-order estimate of how much of ``y`` the concept
  accounts for — removing the concept's presence moves ``y`` by about ``−c_j(x)``.

ICE estimated ``I_j`` by central differences, ``(y(A + εP_j) − y(A − εP_j)) / 2ε`` with
``ε = 1e-4``, the shift applied at the image cells by a forward hook on the layer;
:func:`ncav_importance_finite_difference` does the same, for reference and tests.

Inputs whose target is invalid (a detector found no matching detection) keep their rows; their
importance, contribution and target value are NaN (None in JSON, empty in CSV) and ``valid`` is
False. Their concept scores are still computed: they do not depend on the target.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from conceptlens.attribution.gradients import GradientBatch, count_inputs, iter_layer_gradients, layer_modules_of, place_model, target_values
from conceptlens.concepts.store.atomic import atomic_write_text
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.geometry import Geometry, image_cells
from conceptlens.concepts.models.loading import LoadedModel
from conceptlens.concepts.vectors.bank import ConceptBank

__all__ = ["NCAVError", "NCAVImportance", "concept_scores", "ncav_importance", "ncav_importance_finite_difference"]

CSV_FIELDS = ("input_index", "input_id", "valid", "target_value", "concept", "label", "score", "importance", "contribution")


class NCAVError(ConceptLensError):
    """Bad NCAV-importance input: a bank that is not NMF or does not fit the layer, bad inputs."""


# ----------------------------------------------------------------------------------------------
# result


@dataclass
class NCAVImportance:
    """Importance of every NCAV of one layer for one target, per input.

    Attributes
    ----------
    layer : str
        Layer the NCAVs live in.
    concepts : list of str
        The bank's concept names (``ncav_0`` …).
    labels : list of str or None
        Per NCAV, the known concept it matches (``bank.metrics[name]["matched_concept"]``).
    label_ious : list of float or None
        Per NCAV, the set IoU of that match (``bank.metrics[name]["set_iou"]``).
    importance : ndarray
        ``(N, k)`` float64 ``I_j(x)``; NaN where the target is invalid.
    scores : ndarray
        ``(N, k)`` float64 concept scores ``s_j(x)``.
    target_values : ndarray
        ``(N,)`` float64 ``y(x)``; NaN where the target is invalid.
    valid : ndarray
        ``(N,)`` bool: False where a detector target found no matching detection.
    input_ids : list
        Per input, its id (default: its position).
    """

    layer: str
    concepts: list[str]
    labels: list[str | None]
    importance: np.ndarray
    scores: np.ndarray
    target_values: np.ndarray
    valid: np.ndarray
    input_ids: list[Any] = field(default_factory=list)
    label_ious: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.importance = np.asarray(self.importance, dtype=np.float64)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.target_values = np.asarray(self.target_values, dtype=np.float64)
        self.valid = np.asarray(self.valid, dtype=bool)
        n_inputs, k = len(self.valid), len(self.concepts)
        shapes = (self.importance.shape, self.scores.shape, self.target_values.shape)
        if shapes != ((n_inputs, k), (n_inputs, k), (n_inputs,)):
            raise NCAVError(
                "NCAVImportance", f"importance, scores and target values have shapes {shapes} for {n_inputs} inputs and {k} concepts",
                f"give ({n_inputs}, {k}) importance and scores and ({n_inputs},) target values",
            )
        self.input_ids = list(self.input_ids) or list(range(n_inputs))

    @property
    def contributions(self) -> np.ndarray:
        """``(N, k)`` ``I_j(x)·s_j(x)``; NaN where the target is invalid."""
        return self.importance * self.scores

    def summary(self) -> list[dict[str, Any]]:
        """Per NCAV, statistics over the inputs with a valid target.

        Returns
        -------
        list of dict
            ``concept``, ``label``, ``label_iou``, ``n_valid``, ``mean_importance``,
            ``std_importance`` (population std), ``fraction_positive`` (of ``I_j > 0``),
            ``mean_score`` and ``mean_contribution`` (mean of ``I_j·s_j``); the statistics are
            None when no input has a valid target.
        """
        importance, scores = self.importance[self.valid], self.scores[self.valid]
        rows = []
        for j, concept in enumerate(self.concepts):
            row: dict[str, Any] = {"concept": concept, "label": self.labels[j], "label_iou": self._label_iou(j), "n_valid": int(self.valid.sum())}
            row.update(_column_statistics(importance[:, j], scores[:, j]))
            rows.append(row)
        return rows

    def local_explanation(self, i: int, top: int | None = 5) -> list[dict[str, Any]]:
        """The NCAVs that account most for the target of input ``i``.

        Parameters
        ----------
        i : int
            Position of the input.
        top : int or None
            How many NCAVs to return (None: all).

        Returns
        -------
        list of dict
            ``{concept, label, score, importance, contribution}`` sorted by ``|contribution|``
            (largest first), ``contribution = importance × score``.
        """
        n_inputs = self.importance.shape[0]
        if not -n_inputs <= i < n_inputs:
            raise NCAVError(f"input {i}", f"is out of range for {n_inputs} inputs", f"use a position in 0..{n_inputs - 1}")
        if not self.valid[i]:
            raise NCAVError(f"input {self.input_ids[i]!r}", "has no valid target (no matching detection)", "explain an input with valid=True")
        if top is not None and top < 1:
            raise NCAVError("top", f"is {top}", "ask for at least one NCAV, or None for all")
        contributions = self.contributions[i]
        order = np.argsort(-np.abs(contributions), kind="stable")[:top]
        return [
            {
                "concept": self.concepts[j],
                "label": self.labels[j],
                "score": float(self.scores[i, j]),
                "importance": float(self.importance[i, j]),
                "contribution": float(contributions[j]),
            }
            for j in order
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of everything (NaN becomes None)."""
        return {
            "layer": self.layer,
            "concepts": list(self.concepts),
            "labels": list(self.labels),
            "label_ious": [self._label_iou(j) for j in range(len(self.concepts))],
            "input_ids": [_jsonable_id(i) for i in self.input_ids],
            "valid": [bool(v) for v in self.valid],
            "target_values": _nan_to_none(self.target_values),
            "importance": _nan_to_none(self.importance),
            "scores": _nan_to_none(self.scores),
            "summary": self.summary(),
        }

    def write_csv(self, path: str | Path) -> Path:
        """Write one row per (input, NCAV) — see :data:`CSV_FIELDS` — atomically; return the path."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        contributions = self.contributions
        for i, input_id in enumerate(self.input_ids):
            for j, concept in enumerate(self.concepts):
                writer.writerow({
                    "input_index": i, "input_id": input_id, "valid": bool(self.valid[i]),
                    "target_value": _csv_number(self.target_values[i]), "concept": concept, "label": self.labels[j] or "",
                    "score": _csv_number(self.scores[i, j]), "importance": _csv_number(self.importance[i, j]),
                    "contribution": _csv_number(contributions[i, j]),
                })
        path = Path(path)
        atomic_write_text(path, buffer.getvalue())
        return path

    def _label_iou(self, j: int) -> float | None:
        return self.label_ious[j] if j < len(self.label_ious) else None


def _column_statistics(importance: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    if importance.size == 0:
        return dict.fromkeys(("mean_importance", "std_importance", "fraction_positive", "mean_score", "mean_contribution"))
    return {
        "mean_importance": float(importance.mean()),
        "std_importance": float(importance.std()),
        "fraction_positive": float((importance > 0).mean()),
        "mean_score": float(scores.mean()),
        "mean_contribution": float((importance * scores).mean()),
    }


def _nan_to_none(values: np.ndarray) -> Any:
    if values.ndim == 0:
        value = float(values)
        return None if math.isnan(value) else value
    return [_nan_to_none(v) for v in values]


def _csv_number(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


def _jsonable_id(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


# ----------------------------------------------------------------------------------------------
# checks


def _check_bank(bank: Any, layer: str) -> None:
    if not isinstance(bank, ConceptBank):
        raise NCAVError("bank", f"is a {type(bank).__name__}", "pass a conceptlens.concepts.vectors.bank.ConceptBank (NMFConcepts.to_bank)")
    if bank.projection != "nnls_codes":
        raise NCAVError(
            _bank_name(bank),
            f"projects with {bank.projection!r}, not NCAVs; NCAV importance needs a bank with the 'nnls_codes' projection "
            f"(an NMF bank) for layer {layer!r}",
            "fit conceptlens.probes.nmf.NMFConcepts and use its to_bank(); use conceptlens.attribution.tcav for linear CAVs",
        )


def _check_channels(activations: torch.Tensor, bank: ConceptBank, layer: str) -> None:
    if activations.dim() < 2 or activations.shape[1] != bank.n_channels:
        raise NCAVError(
            _bank_name(bank), f"has {bank.n_channels} channels, layer {layer!r} outputs shape {tuple(activations.shape[1:])}",
            f"use an NMF bank fitted on the activations of layer {layer!r}",
        )


def _bank_name(bank: ConceptBank) -> str:
    return f"concept bank ({bank.method}, layer {bank.layer!r}, {bank.n_concepts} concepts)"


def _n_inputs(model: nn.Module | LoadedModel, inputs: Any) -> int:
    n_inputs = count_inputs(model, inputs)
    if n_inputs == 0:
        raise NCAVError("inputs", "is empty", "pass at least one input")
    return n_inputs


def _input_ids(input_ids: Sequence[Any] | None, n_inputs: int) -> list[Any]:
    if input_ids is None:
        return list(range(n_inputs))
    if len(input_ids) != n_inputs:
        raise NCAVError("input_ids", f"has {len(input_ids)} ids for {n_inputs} inputs", "give one id per input")
    return list(input_ids)


def _single_module(model: nn.Module | LoadedModel, layer: str) -> nn.Module:
    if not isinstance(layer, str):
        raise NCAVError("layer", f"is a {type(layer).__name__}", "name one layer by its dotted module path")
    return next(iter(layer_modules_of(model, [layer]).values()))


# ----------------------------------------------------------------------------------------------
# autograd importance


def ncav_importance(
    model: nn.Module | LoadedModel,
    inputs: torch.Tensor | Sequence[np.ndarray],
    layer: str,
    bank: ConceptBank,
    target: Callable[[Any], Any] | int,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    input_ids: Sequence[Any] | None = None,
) -> NCAVImportance:
    """Importance ``I_j(x) = Σ_{image cells} ∂y/∂A_hw · P_j`` and concept scores of every NCAV.

    Streams batches through :func:`conceptlens.attribution.gradients.iter_layer_gradients` (one forward and
    one backward pass per batch); only the ``(N, k)`` results are kept.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        A plain module (in eval mode) with a tensor batch, or a loaded model with raw images.
    inputs : Tensor or sequence of uint8 arrays
        ``(N, ...)`` tensor for a plain module; ``(H, W, 3)`` images for a loaded model.
    layer : str
        Dotted module path of the layer the bank was fitted on (a single tensor output).
    bank : ConceptBank
        A bank with the ``nnls_codes`` projection (an NMF bank) of that layer.
    target : callable or int
        ``target(output)`` → :class:`~conceptlens.attribution.targets.TargetValues` or ``(B,)`` tensor; an int
        ``k`` picks ``output[:, k]``.
    batch_size : int
    device : str or torch.device, optional
        Move the model there first (``auto`` = CUDA when present); default: where the model is.
    input_ids : sequence, optional
        One id per input (default: positions).

    Returns
    -------
    NCAVImportance

    Raises
    ------
    NCAVError
        The bank is not an NMF bank or its channel count does not match the layer; no inputs.
    """
    _check_bank(bank, layer)
    _single_module(model, layer)
    ids = _input_ids(input_ids, _n_inputs(model, inputs))
    parts = [_batch_importance(batch, layer, bank) for batch in iter_layer_gradients(model, inputs, [layer], target, batch_size, device, keep_activations=True)]
    importance, scores, values, valid = (np.concatenate(arrays) for arrays in zip(*parts))
    metrics = [bank.metrics.get(name, {}) for name in bank.concepts]
    return NCAVImportance(
        layer=layer, concepts=list(bank.concepts), labels=[m.get("matched_concept") for m in metrics],
        importance=importance, scores=scores, target_values=values, valid=valid, input_ids=ids,
        label_ious=[m.get("set_iou") for m in metrics],
    )


def _batch_importance(batch: GradientBatch, layer: str, bank: ConceptBank) -> tuple[np.ndarray, ...]:
    """``(importance, scores, target values, valid)`` of one batch, as float64/bool numpy arrays."""
    gradient = next(iter(batch.gradients.values()))
    activations = next(iter(batch.activations.values()))
    _check_channels(activations, bank, layer)
    vectors = bank.vectors.to(device=gradient.device, dtype=torch.float64)
    # gradients at padding cells are zero already, so the sum over all cells is the sum over image cells
    importance = torch.einsum("bcl,kc->bk", _flat_cells(gradient).double(), vectors).cpu().numpy()
    scores = concept_scores(activations, bank, batch.geometries).cpu().numpy()
    valid = batch.valid.numpy().astype(bool)
    values = batch.values.double().numpy().copy()
    importance[~valid] = np.nan
    values[~valid] = np.nan
    return importance, scores, values, valid


def concept_scores(activations: torch.Tensor, bank: ConceptBank, geometries: Sequence[Geometry] | None = None) -> torch.Tensor:
    """Concept scores ``(B, k)`` float64: NNLS concept maps averaged over each image's cells."""
    maps = _flat_cells(bank.nmf_maps(activations)).double()
    cells = _cell_mask(activations, geometries).flatten(1).to(device=maps.device, dtype=maps.dtype)
    return (maps * cells[:, None]).sum(-1) / cells.sum(-1).clamp(min=1)[:, None]


def _flat_cells(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, C, ...)`` → ``(B, C, L)`` (L = 1 for non-spatial outputs)."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1)


def _cell_mask(activations: torch.Tensor, geometries: Sequence[Geometry] | None) -> torch.Tensor:
    """Bool ``(B, *spatial)``: the cells on the image (all cells without geometries or a 2-D map)."""
    spatial = tuple(activations.shape[2:])
    if geometries is None or len(spatial) != 2:
        return torch.ones((activations.shape[0], *spatial), dtype=torch.bool)
    return torch.stack([image_cells(g, spatial) for g in geometries])


# ----------------------------------------------------------------------------------------------
# finite differences (ICE)


class _Shift:
    """Forward hook adding ``delta`` (B, C, ...) to a layer's output and keeping the output."""

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.delta: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise NCAVError(f"layer {self.layer!r}", f"outputs a {type(output).__name__}", "name a module with a single tensor output")
        self.output = output
        return output if self.delta is None else output + self.delta.to(output.dtype)


def _batch_runner(model: nn.Module | LoadedModel, inputs: Any, rows: slice, device: torch.device) -> Callable[[], tuple[Any, list[Geometry] | None]]:
    """A no-argument forward of one batch returning ``(output, geometries)``."""
    if not isinstance(model, LoadedModel):
        batch = inputs[rows].to(device)
        return lambda: (model(batch), None)
    images = [np.asarray(image) for image in inputs[rows]]
    sizes = [(int(image.shape[0]), int(image.shape[1])) for image in images]
    prepared = model.adapter.prepare(images, device)
    return lambda: model.adapter.forward(model.module, prepared, sizes)


def ncav_importance_finite_difference(
    model: nn.Module | LoadedModel,
    inputs: torch.Tensor | Sequence[np.ndarray],
    layer: str,
    bank: ConceptBank,
    target: Callable[[Any], Any] | int,
    epsilon: float = 1e-4,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """ICE's estimate of the importance: ``(y(A + εP_j) − y(A − εP_j)) / 2ε`` at the image cells.

    Per batch one unperturbed forward pass (which gives the layer's shape and, for a loaded model,
    the images' geometries, hence their cells) and ``2k`` perturbed ones, under ``torch.no_grad()``.
    The arithmetic runs in the model's dtype: in float32 the difference of two outputs carries
    rounding error of order ``1e-7·|y| / ε``; convert a plain module and its inputs with
    ``.double()`` for a precise reference.

    Parameters
    ----------
    model, inputs, layer, bank, target, batch_size, device
        As for :func:`ncav_importance`.
    epsilon : float
        The step ``ε`` along each NCAV (ICE: 1e-4).

    Returns
    -------
    ndarray
        ``(N, k)`` float64; NaN where the target is invalid unperturbed or in either shifted pass.
    """
    _check_bank(bank, layer)
    if not epsilon > 0:
        raise NCAVError("epsilon", f"is {epsilon}", "use a small positive step, e.g. 1e-4")
    if batch_size < 1:
        raise NCAVError("batch_size", f"is {batch_size}", "use a positive batch size")
    layer_module = _single_module(model, layer)
    where = place_model(model, device)
    n_inputs = _n_inputs(model, inputs)
    shift = _Shift(layer)
    handle = layer_module.register_forward_hook(shift)
    parts = []
    try:
        with torch.no_grad():
            for start in range(0, n_inputs, batch_size):
                run = _batch_runner(model, inputs, slice(start, min(start + batch_size, n_inputs)), where)
                parts.append(_batch_differences(run, shift, bank, target, epsilon))
    finally:
        handle.remove()
    return np.concatenate(parts)


def _batch_differences(run: Callable[[], tuple[Any, Any]], shift: _Shift, bank: ConceptBank, target: Any, epsilon: float) -> np.ndarray:
    shift.delta = None
    output, geometries = run()
    activations = shift.output
    _check_channels(activations, bank, shift.layer)
    n_batch = activations.shape[0]
    valid = target_values(target, output, n_batch).valid.cpu()
    cells = _cell_mask(activations, geometries).to(activations.device)
    differences = np.empty((n_batch, bank.n_concepts))
    for j, vector in enumerate(bank.vectors.to(activations.device)):
        direction = vector.view(1, -1, *([1] * (activations.dim() - 2))) * cells[:, None]
        values, valid_j = [], valid.clone()
        for sign in (1.0, -1.0):
            shift.delta = sign * epsilon * direction
            output, _ = run()
            shifted = target_values(target, output, n_batch)
            values.append(shifted.values.double().cpu())
            valid_j &= shifted.valid.cpu()
        column = ((values[0] - values[1]) / (2 * epsilon)).numpy()
        column[~valid_j.numpy()] = np.nan
        differences[:, j] = column
    shift.delta = None
    return differences

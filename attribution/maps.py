"""Concept maps of single images: where a concept is, and where it drives a prediction.

Two kinds of map, both laid over the *original* image (docs/METHODS.md §2, §4, §6):

* :func:`concept_maps` — a :class:`~conceptlens.concepts.vectors.bank.ConceptBank` applied to one image's layer
  activations. Linear banks (Net2Vec, linear) give probabilities ``σ(w·a + b)``, their logits
  resampled onto the image first (as the probes were trained and evaluated); NMF banks give the
  non-negative NNLS coefficients of each cell (NCAV maps). No gradients, and the forward pass
  stops after the bank's layer.
* :func:`gradient_cav_maps` — the gradient × CAV attribution map: per feature cell, the conceptual
  sensitivity ``S_k(hw) = ∂h/∂A_hw · v_k`` of a target scalar ``h``. Its sum over the image's
  cells is TCAV's sensitivity for a pooled CAV (see :mod:`conceptlens.attribution.tcav`), so the map shows
  where that sensitivity comes from. Stored in ``ImageConceptMaps.scores``.

Geometry. Feature maps are sampled on a grid over the original image with
:func:`conceptlens.concepts.geometry.features_to_grid`, using the geometry the model's adapter reports, so a
detector's resize and padding are undone exactly; its sample positions stop at the outermost cells
on the image, so nothing computed on padding reaches the map. The maps equal
``bank.concept_maps(activations, geometries, grid)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from conceptlens.attribution.gradients import TargetLike, iter_layer_gradients, place_model
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.geometry import features_to_grid
from conceptlens.concepts.models.hooks import LayerCapture, resolve_layers
from conceptlens.concepts.models.loading import LoadedModel
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.probes.linear import CAVSet

__all__ = [
    "KINDS",
    "ImageConceptMaps",
    "MapError",
    "concept_directions",
    "concept_maps",
    "concept_maps_batch",
    "gradient_cav_maps",
]

#: What a map holds: bank probabilities, NCAV coefficients, or per-cell conceptual sensitivities.
KINDS = ("probability", "ncav", "gradient×cav")


class MapError(ConceptLensError):
    """A concept map cannot be computed: bad image, size or vectors, or no valid target on the image."""


@dataclass
class ImageConceptMaps:
    """Concept maps of one image.

    Attributes
    ----------
    layer : str
        Layer the concept vectors live in.
    method : str
        ``net2vec``, ``linear`` or ``nmf`` (the bank's method), or ``cav`` for gradient × CAV maps.
    concepts : list of str
        Concept names, one per map.
    labels : list of str
        Display labels: the matched known concept (``bank.metrics[name]['matched_concept']``,
        recorded by unsupervised banks such as NMF) where there is one, else the concept name.
    maps : Tensor
        ``(K, H, W)`` float32 on the CPU, over the original image (or the requested ``size``).
    kind : {'probability', 'ncav', 'gradient×cav'} or str
        What a map value is: the bank's ``map_kind`` (from its projection), or ``'gradient×cav'``.
    scores : Tensor
        ``(K,)``: the mean of each map over the image for probability/NCAV maps; for gradient ×
        CAV maps the sum of the per-cell sensitivities over the image's feature cells, i.e. the
        TCAV sensitivity ``∇h · v`` (computed at the layer's resolution, before resampling).
    target : str or None
        The target's name (gradient × CAV maps).
    target_value : float or None
        The target scalar ``h`` on this image (gradient × CAV maps).
    """

    layer: str
    method: str
    concepts: list[str]
    labels: list[str]
    maps: torch.Tensor
    kind: str
    scores: torch.Tensor
    target: str | None = None
    target_value: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        """Height and width of the maps."""
        return int(self.maps.shape[-2]), int(self.maps.shape[-1])


# ---------------------------------------------------------------------------------------------
# bank maps


def concept_maps(
    model: LoadedModel,
    image: np.ndarray,
    bank: ConceptBank,
    *,
    size: tuple[int, int] | None = None,
    device: str | torch.device | None = None,
) -> ImageConceptMaps:
    """Maps of every concept of ``bank`` on one image.

    Parameters
    ----------
    model : LoadedModel
        The model the bank was trained on (classifier or detector).
    image : ndarray
        uint8 ``(H, W, 3)``.
    bank : ConceptBank
        Linear banks give probabilities, NMF banks NCAV coefficients.
    size : (int, int), optional
        Height and width of the maps; default the image's own ``(H, W)``.
    device : str or torch.device, optional
        Move the model there first (``auto`` = CUDA when present); default: where the model is.

    Returns
    -------
    ImageConceptMaps
    """
    return concept_maps_batch(model, [image], bank, size=size, device=device)[0]


def concept_maps_batch(
    model: LoadedModel,
    images: Sequence[np.ndarray],
    bank: ConceptBank,
    *,
    size: tuple[int, int] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> list[ImageConceptMaps]:
    """:func:`concept_maps` for several images (of any sizes), ``batch_size`` per forward pass."""
    if batch_size < 1:
        raise MapError("batch_size", f"is {batch_size}", "use a positive batch size")
    images = [_check_image(image) for image in images]
    grid_size = _check_size(size)
    where = _place(model, device)
    refs = resolve_layers(model.module, [bank.layer])
    kind = bank.map_kind
    labels = _labels(bank)
    results: list[ImageConceptMaps] = []
    with LayerCapture(model.module, refs, stop_early=True) as capture, torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            sizes = [(int(image.shape[0]), int(image.shape[1])) for image in batch]
            capture.reset()
            _, geometries = model.adapter.forward(model.module, model.adapter.prepare(batch, where), sizes)
            capture.check_complete()
            activations = _feature_maps(capture.outputs[bank.layer], bank.layer)
            bank.check_activations(activations)
            for i, geometry in enumerate(geometries):
                grid = grid_size or geometry.image_size
                maps = bank.concept_maps(activations[i : i + 1], [geometry], grid)[0].float().cpu()
                results.append(
                    ImageConceptMaps(bank.layer, bank.method, list(bank.concepts), list(labels), maps, kind, maps.mean(dim=(1, 2)))
                )
    return results


def _labels(bank: ConceptBank) -> list[str]:
    """Each concept's matched known concept where the bank records one (unsupervised banks), else its name."""
    return [str(bank.metrics.get(name, {}).get("matched_concept") or name) for name in bank.concepts]


# ---------------------------------------------------------------------------------------------
# gradient × CAV maps


def gradient_cav_maps(
    model: LoadedModel,
    image: np.ndarray,
    layer: str,
    vectors: torch.Tensor | ConceptBank | CAVSet,
    target: TargetLike,
    *,
    names: Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
    device: str | torch.device | None = None,
) -> ImageConceptMaps:
    """Per-cell conceptual sensitivity ``∂h/∂A_hw · v_k`` of a target on one image.

    Parameters
    ----------
    model : LoadedModel
        Classifier or detector.
    image : ndarray
        uint8 ``(H, W, 3)``.
    layer : str
        Layer name (a module with a single tensor output).
    vectors : Tensor, ConceptBank or CAVSet
        ``(K, C)`` concept directions, used as given (``(K, C, h, w)`` flattened CAVs are dotted
        cell by cell); a bank or CAV set goes through :func:`concept_directions` (unit vectors).
    target : callable or int
        Anything :func:`conceptlens.attribution.gradients.iter_layer_gradients` accepts, e.g.
        ``ClassLogit(k)`` or ``TopDetection(k)``.
    names : sequence of str, optional
        Concept names for a tensor of vectors (default ``cav_0`` …).
    size : (int, int), optional
        Height and width of the maps; default the image's own ``(H, W)``.
    device : str or torch.device, optional

    Returns
    -------
    ImageConceptMaps
        ``kind='gradient×cav'``; ``scores`` holds the TCAV sensitivities (sum over cells).

    Raises
    ------
    MapError
        When the target is not valid on the image (a detector found no matching detection), or
        the vectors do not fit the layer.
    """
    image = _check_image(image)
    grid_size = _check_size(size)
    labels = None
    if not isinstance(vectors, torch.Tensor):
        default_names, directions = concept_directions(vectors)
        labels = _labels(vectors) if isinstance(vectors, ConceptBank) and names is None else None
        names, vectors = (names if names is not None else default_names), directions
    directions = vectors.detach().float().cpu()
    if directions.dim() not in (2, 4):
        raise MapError("vectors", f"have shape {tuple(directions.shape)}", "give (K, C) concept vectors (or (K, C, h, w) flattened CAVs)")
    names = [f"cav_{k}" for k in range(directions.shape[0])] if names is None else [str(n) for n in names]
    if len(names) != directions.shape[0]:
        raise MapError("names", f"has {len(names)} names for {directions.shape[0]} vectors", "give one name per vector")
    where = _place(model, device)
    batch = next(iter_layer_gradients(model, [image], [layer], target, batch_size=1))
    target_name = str(getattr(target, "name", target))
    if not bool(batch.valid[0]):
        what = getattr(target, "what", None) or "valid target"
        raise MapError(
            f"target {target_name!r}",
            f"the image has no {what}, so there is no score to attribute",
            "pick a class the model detects on this image, or lower the detection threshold (top:K:MIN_SCORE)",
        )
    gradient = _feature_maps(batch.gradients[layer], layer).to(where)
    sensitivity = _cell_sensitivities(gradient, directions.to(where), layer)  # (1, K, h, w), zero at padding
    scores = sensitivity.sum(dim=(2, 3))[0].cpu()
    geometry = batch.geometries[0]
    maps = features_to_grid(sensitivity, [geometry], grid_size or geometry.image_size)[0].float().cpu()
    return ImageConceptMaps(
        layer, "cav", names, labels or list(names), maps, "gradient×cav", scores, target=target_name, target_value=float(batch.values[0])
    )


def concept_directions(source: ConceptBank | CAVSet) -> tuple[list[str], torch.Tensor]:
    """Concept names and unit concept directions in the layer's raw activation space.

    A :class:`~conceptlens.probes.linear.CAVSet` gives the mean of each concept's R CAVs (one per random set),
    normalised; flattened CAVs come back as ``(K, C, h, w)``. A :class:`~conceptlens.concepts.vectors.bank.ConceptBank`
    gives its vectors normalised; a bank with per-channel standardisation applies ``w`` to
    ``(a − μ)/σ``, so its direction in raw activations is ``w/σ`` (the gradient of its logit).
    """
    if isinstance(source, CAVSet):
        mean = source.vectors.float().mean(dim=1)
        if len(source.feature_shape) == 3:
            mean = mean.reshape(-1, *source.feature_shape)
        return list(source.concepts), _unit(mean, f"CAV set (layer {source.layer!r})")
    if isinstance(source, ConceptBank):
        vectors = source.vectors.float()
        if source.channel_std is not None:
            vectors = vectors / source.channel_std.float()[None]
        return list(source.concepts), _unit(vectors, f"concept bank (layer {source.layer!r})")
    raise MapError("vectors", f"is a {type(source).__name__}", "pass a (K, C) tensor, a ConceptBank or a CAVSet")


def _unit(vectors: torch.Tensor, culprit: str) -> torch.Tensor:
    norms = vectors.flatten(1).norm(dim=1)
    if bool((norms == 0).any()):
        raise MapError(culprit, "has a zero concept vector", "retrain the concept vectors")
    return vectors / norms.view(-1, *([1] * (vectors.dim() - 1)))


def _cell_sensitivities(gradient: torch.Tensor, directions: torch.Tensor, layer: str) -> torch.Tensor:
    """``(1, C, h, w)`` gradient and ``(K, C)`` or ``(K, C, h, w)`` directions -> ``(1, K, h, w)``."""
    channels = gradient.shape[1]
    if directions.dim() == 2 and directions.shape[1] == channels:
        return torch.einsum("kc,bchw->bkhw", directions, gradient.float())
    if directions.dim() == 4 and tuple(directions.shape[1:]) == tuple(gradient.shape[1:]):
        return torch.einsum("kchw,bchw->bkhw", directions, gradient.float())
    raise MapError(
        f"layer {layer!r}",
        f"has output shape {tuple(gradient.shape[1:])}, the concept vectors {tuple(directions.shape[1:])}",
        f"use vectors trained on this layer ({channels} channels)",
    )


# ---------------------------------------------------------------------------------------------
# helpers


def _check_image(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise MapError("image", f"is {array.dtype} of shape {array.shape}", "pass a uint8 (H, W, 3) RGB array")
    return array


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or any(int(s) != s or int(s) < 1 for s in size):
        raise MapError("size", f"is {size!r}", "give (height, width) as two positive integers")
    return int(size[0]), int(size[1])


def _place(model: LoadedModel, device: str | torch.device | None) -> torch.device:
    if not isinstance(model, LoadedModel):
        raise MapError("model", f"is a {type(model).__name__}", "load it with conceptlens.concepts.models.loading.load_model (maps need its adapter)")
    return place_model(model, device)


def _feature_maps(tensor: torch.Tensor, layer: str) -> torch.Tensor:
    if tensor.dim() != 4:
        raise MapError(f"layer {layer!r}", f"has output shape {tuple(tensor.shape)}", "pick a convolutional layer with (B, C, h, w) output")
    return tensor

"""Unsupervised concept vectors (NCAVs) by non-negative matrix factorisation, as in ICE.

ICE (Zhang et al. 2021, METHODS.md §4) flattens a layer's activations into pixel vectors
``V`` (pixels × C), clamps them at zero and factorises ``V ≈ S·P`` with ``S, P ≥ 0``. The k rows
of ``P`` are the NCAVs; the concept maps of an image are the non-negative least-squares codes
``S(x) = argmin_{S≥0} ‖A(x) − S·P‖`` of its pixel vectors.

:class:`NMFConcepts` learns ``P`` with one of

* ``"hals"`` — hierarchical alternating least squares in torch: scikit-learn's coordinate
  descent (``solver="cd"``, one sweep per factor and iteration) vectorised over pixels; CPU or
  CUDA;
* ``"mu"`` — Lee & Seung multiplicative updates in torch;
* ``"sklearn"`` — :class:`sklearn.decomposition.NMF` (``init="nndsvda"``), the reference.

All three are full batch: the pixel matrix is held in memory (on the device). With
``batch_size`` the torch solvers run an online variant instead (Mairal et al. 2010): pixels are
streamed in minibatches (from a tensor or straight from the activation store), each minibatch
is coded by NNLS against the current ``P``, its part of the sufficient statistics
``A = Σ SᵀS`` and ``B = Σ SᵀV`` replaces the part it contributed on the previous pass, and ``P``
is updated on ``A, B`` by HALS sweeps (multiplicative steps for ``"mu"``). Pixel memory is
bounded by the minibatch; the statistics take ``k·(k + C)`` numbers per minibatch.

Scale convention: ``S·P`` is invariant to ``S → S·D⁻¹, P → D·P``; every fitted ``P`` is scaled
so that each NCAV (row of ``components_``) has unit L2 norm, the scale going into ``S``. A
component that died (all zero) stays zero.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from conceptlens.concepts.environment import package_versions, resolve_device
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.geometry import features_to_grid, image_cells
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.vectors.bank import ConceptBank, nnls
from conceptlens.probes.data import ProbeBatch, iter_batches

__all__ = ["NMFConcepts", "NMFError", "SOLVERS"]

SOLVERS = ("hals", "mu", "sklearn")
CHECK_EVERY = 10  # iterations (full batch) between convergence checks, as scikit-learn's MU
IMAGE_BATCH = 64  # images per read from the store
ROW_CHUNK = 65536  # pixel rows per block streamed from a matrix
ERROR_CHUNK = 16384  # pixel rows per block of the exact final error
ONLINE_SWEEPS = 3  # HALS sweeps (or MU steps) on P per minibatch
ONLINE_NNLS_TOLERANCE = 1e-5  # NNLS codes inside the online fit (1e-7 is below float32 resolution)
INIT_SAMPLE = 20000  # pixels from the start of the stream that initialise the online variant
INNER_SHRINK = 0.3  # repeated HALS sweeps stop once one moves the factor < this × the first's move
EPSILON = float(np.finfo(np.float32).eps)  # floor of multiplicative-update denominators


class NMFError(ConceptLensError, ValueError):
    """NMF cannot run on the given data or settings (negative input without clamp, bad shapes…)."""


# ------------------------------------------------------------------------------------ estimator
class NMFConcepts:
    """Unsupervised concept vectors (NCAVs) of one layer by NMF (ICE, METHODS.md §4).

    Parameters
    ----------
    n_components : int, default=10
        Number of NCAVs ``k``.
    solver : {'hals', 'mu', 'sklearn'}, default='hals'
        ``'hals'``: torch coordinate descent (fast, default); ``'mu'``: torch multiplicative
        updates; ``'sklearn'``: :class:`sklearn.decomposition.NMF` with ``init='nndsvda'``,
        full batch on the CPU, for reference.
    max_iter : int, default=200
        Full batch: maximum iterations (one update of ``S`` and one of ``P`` each). Online:
        maximum passes over the data.
    tol : float, default=1e-4
        Stop when the relative error improved by less than ``tol × initial error`` over the
        last 10 iterations (full batch; scikit-learn's MU criterion) or over the last pass
        (online). ``'sklearn'`` uses scikit-learn's own criterion with this ``tol``.
    batch_size : int, optional
        Pixels per minibatch: switches the torch solvers to the online variant, which streams
        the data and never holds the pixel matrix.
    clamp : bool, default=True
        Clamp activations at zero (layers with signed outputs: SiLU, FPN, pre-activation
        convolutions). With ``False``, negative input is an error.
    seed : int, default=0
        Seeds the initialisation (the randomized SVD of NNDSVD-a, drawn as scikit-learn draws
        it) and the online pixel order. Fits are deterministic for a seed on a given device.
    device : str, default='auto'
        ``'auto'`` = CUDA when present, else CPU. Ignored by ``'sklearn'``.
    progress : bool, optional
        Show progress bars; ``None`` shows them when stderr is a terminal.

    Attributes
    ----------
    components_ : Tensor
        ``(k, C)`` float32 on the CPU: the NCAVs, each row of unit L2 norm.
    reconstruction_err_ : float
        ``‖V − S·P‖_F`` on the fit data (clamped); online: with NNLS codes of the final ``P``.
    relative_error_ : float
        ``reconstruction_err_ / ‖V‖_F``.
    error_curve_ : list of float
        Relative error after each iteration (online: estimate per pass, each minibatch coded
        against the ``P`` of that moment). Empty for ``'sklearn'``.
    n_iter_ : int
        Iterations (online: passes) run.
    n_features_in_ : int
        Channels ``C``.
    n_pixels_ : int
        Pixel vectors fitted on.
    clamped_fraction_ : float
        Fraction of input entries that were negative (and set to zero).
    data_ : dict
        Where the fit data came from: store key, model hash, layer, image count and a hash of
        the indices (for a tensor: its shape).
    fidelity_ : float
        Relative reconstruction error on held-out images; set by :meth:`fidelity`.
    output_fidelity_ : float
        Set by :meth:`output_fidelity`.
    labels_ : dict
        Set by :meth:`label`.

    Examples
    --------
    >>> pixels = torch.rand(500, 8)
    >>> ncavs = NMFConcepts(n_components=3, device="cpu").fit(pixels)
    >>> ncavs.components_.shape, ncavs.transform(pixels).shape
    (torch.Size([3, 8]), torch.Size([500, 3]))
    """

    def __init__(
        self,
        n_components: int = 10,
        solver: str = "hals",
        max_iter: int = 200,
        tol: float = 1e-4,
        batch_size: int | None = None,
        clamp: bool = True,
        seed: int = 0,
        device: str = "auto",
        progress: bool | None = None,
    ) -> None:
        self.n_components = n_components
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.batch_size = batch_size
        self.clamp = clamp
        self.seed = seed
        self.device = device
        self.progress = progress

    # ------------------------------------------------------------------------------------ fit
    def fit(self, data: torch.Tensor | np.ndarray | StoreEntry, indices: Sequence[int] | None = None) -> NMFConcepts:
        """Learn the NCAVs.

        Parameters
        ----------
        data : Tensor, ndarray or StoreEntry
            ``(N, C)`` pixel vectors, or a store entry of a layer's activations: then the pixels
            are every feature cell that lies on an image (``image_cells``; a detector's padding
            is left out), in image and row-major order.
        indices : sequence of int, optional
            Items of a store entry to use (a split); default every item.

        Returns
        -------
        NMFConcepts
            ``self``.
        """
        self._validate_params()
        source = _source(data, indices)
        channels = source.channels()
        if self.n_components > channels:
            raise NMFError(source.name, f"has {channels} channels, fewer than n_components={self.n_components}",
                           f"use n_components ≤ {channels} for this layer")
        device = torch.device("cpu") if self.solver == "sklearn" else resolve_device(self.device, f"NMFConcepts(device={self.device!r})")
        if self.batch_size is None:
            result = self._fit_full(source, device)
        else:
            result = self._fit_online(source, device)
        self._store_result(result, source)
        return self

    def _validate_params(self) -> None:
        def bad(name: str, rule: str) -> NMFError:
            return NMFError(f"NMFConcepts({name}={getattr(self, name)!r})", f"must be {rule}", f"give {name} {rule}")

        if not _is_int(self.n_components) or self.n_components < 1:
            raise bad("n_components", "an integer ≥ 1")
        if self.solver not in SOLVERS:
            raise bad("solver", f"one of {', '.join(SOLVERS)}")
        if not _is_int(self.max_iter) or self.max_iter < 1:
            raise bad("max_iter", "an integer ≥ 1")
        if not isinstance(self.tol, (int, float)) or not self.tol >= 0:
            raise bad("tol", "a number ≥ 0")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < self.n_components):
            raise bad("batch_size", f"None or an integer ≥ n_components ({self.n_components})")
        if self.batch_size is not None and self.solver == "sklearn":
            raise NMFError("NMFConcepts(solver='sklearn', batch_size=…)", "scikit-learn's NMF needs the pixel matrix in memory", "use solver='hals' with batch_size, or unset batch_size")
        if not isinstance(self.clamp, bool):
            raise bad("clamp", "True or False")
        if not _is_int(self.seed):
            raise bad("seed", "an integer")

    def _fit_full(self, source: _Source, device: torch.device) -> _FitResult:
        clamp = _Clamp(self.clamp, source.name)
        pixels = clamp(source.matrix(device, self._show()))
        _check_fittable(pixels, source.name)
        if self.solver == "sklearn":
            result = _fit_sklearn(pixels, self.n_components, self.tol, self.max_iter, self.seed)
        else:
            result = _fit_torch(pixels, self.n_components, self.solver, self.max_iter, self.tol, self.seed, self._show())
        result.clamped_fraction = clamp.fraction
        return result

    def _fit_online(self, source: _Source, device: torch.device) -> _FitResult:
        clamp = _Clamp(self.clamp, source.name)
        # the same seeded order every pass, so that minibatch b holds the same pixels each time
        stream = lambda clamp: _chunks(map(clamp, source.blocks(device, self.seed, True)), self.batch_size)  # noqa: E731
        components = _online_init(stream(_Clamp(self.clamp, source.name)), self.n_components, self.seed, source.name)
        statistics = _Statistics()
        errors: list[float] = []
        for epoch in tqdm(range(self.max_iter), desc="NMF passes", unit="pass", disable=not self._show()):
            errors.append(_online_pass(stream(clamp), components, statistics, self.solver))
            clamp.counting = False  # negatives are counted on the first pass
            if epoch > 0 and self.tol > 0 and errors[-2] - errors[-1] < self.tol * errors[0]:
                break
        _normalise_rows(components)
        residual, total, pixels = _streamed_error(source.blocks(device, self.seed, False), components, _Clamp(self.clamp, source.name))
        return _FitResult(components, math.sqrt(residual), math.sqrt(residual / total), errors, len(errors), pixels, clamp.fraction)

    def _store_result(self, result: _FitResult, source: _Source) -> None:
        self.components_ = result.components.float().cpu().contiguous()
        self.reconstruction_err_ = float(result.reconstruction_err)
        self.relative_error_ = float(result.relative_error)
        self.error_curve_ = [float(e) for e in result.error_curve]
        self.n_iter_ = int(result.n_iter)
        self.n_features_in_ = int(self.components_.shape[1])
        self.n_pixels_ = int(result.n_pixels)
        self.clamped_fraction_ = float(result.clamped_fraction)
        self.data_ = source.description
        for stale in ("fidelity_", "output_fidelity_", "labels_"):
            self.__dict__.pop(stale, None)

    def _show(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else bool(self.progress)

    # ------------------------------------------------------------------------------ projection
    def transform(self, pixels: torch.Tensor) -> torch.Tensor:
        """Concept codes of pixel vectors: ``argmin_{S≥0} ‖pixels − S·P‖`` row by row.

        Parameters
        ----------
        pixels : Tensor
            ``(N, C)``; clamped at zero as in fit (with ``clamp=False`` negative input is an
            error). Computed on the tensor's device with :func:`conceptlens.concepts.vectors.bank.nnls`.

        Returns
        -------
        Tensor
            ``(N, k)`` non-negative codes.
        """
        self._check_fitted()
        pixels = torch.as_tensor(pixels).detach()
        if pixels.dim() != 2 or pixels.shape[1] != self.n_features_in_:
            raise NMFError("NMFConcepts.transform", f"pixels have shape {tuple(pixels.shape)}", f"give (N, {self.n_features_in_}) pixel vectors")
        pixels = _Clamp(self.clamp, "pixels given to transform")(pixels.float())
        return nnls(pixels, self.components_.to(pixels.device))

    def inverse_transform(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixel vectors ``S·P`` (N, C) from codes (N, k)."""
        self._check_fitted()
        return codes.float() @ self.components_.to(codes.device)

    def concept_maps(self, activations: torch.Tensor) -> torch.Tensor:
        """NCAV maps of activations (B, C, h, w) → (B, k, h, w): the codes of every cell.

        Equal to ``self.to_bank(layer).concept_maps(activations)``.
        """
        self._check_fitted()
        if activations.dim() < 2 or activations.shape[1] != self.n_features_in_:
            raise NMFError("NMFConcepts.concept_maps", f"activations have shape {tuple(activations.shape)}", f"give (B, {self.n_features_in_}, h, w) activations of the fitted layer")
        batch, channels = activations.shape[:2]
        codes = self.transform(activations.movedim(1, -1).reshape(-1, channels))
        return codes.reshape(batch, *activations.shape[2:], -1).movedim(-1, 1)

    def reconstruct(self, activations: torch.Tensor) -> torch.Tensor:
        """Activations rebuilt from the NCAVs, ``S·P`` per cell: (B, C, h, w) → (B, C, h, w)."""
        maps = self.concept_maps(activations)
        return torch.einsum("bk...,kc->bc...", maps, self.components_.to(maps.device))

    # -------------------------------------------------------------------------------- quality
    def fidelity(self, entry: StoreEntry, indices: Sequence[int] | None = None) -> float:
        """Relative reconstruction error ``‖V − S·P‖_F / ‖V‖_F`` on (held-out) images.

        Streams the images of ``entry`` (``indices``: a split; default all), codes their pixel
        vectors (image cells only) by NNLS and pools squared errors and norms over the set.
        The value is also kept as ``fidelity_``.
        """
        self._check_fitted()
        source = _source(entry, indices)
        clamp = _Clamp(self.clamp, source.name)
        device = resolve_device(self.device, f"NMFConcepts(device={self.device!r})")
        residual, total, _ = _streamed_error(source.blocks(device, self.seed, False), self.components_.to(device), clamp)
        if total == 0:
            raise NMFError(source.name, "all pixel vectors are zero", "choose images or a layer with non-zero activations")
        self.fidelity_ = math.sqrt(residual / total)
        return self.fidelity_

    def output_fidelity(self, activations_batches: Iterable[torch.Tensor | ProbeBatch], head: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Output fidelity ``mean_x |y(A) − y(S·P)| / (|mean_x y(A)| + 1e-4)`` (METHODS.md §4).

        Parameters
        ----------
        activations_batches : iterable of Tensor or ProbeBatch
            Layer activations ``(B, C, h, w)`` of the images (e.g. ``iter_batches(entry, …)``).
        head : callable
            The rest of the model: layer activations ``(B, C, h, w)`` → one scalar per image
            ``(B,)``. ``y(A)`` uses the activations as given (unclamped), ``y(S·P)`` the
            reconstruction from the NCAV maps.

        Returns
        -------
        float
            0 when the NCAVs preserve the output exactly. Also kept as ``output_fidelity_``.
        """
        self._check_fitted()
        absolute_difference, outputs, count = 0.0, 0.0, 0
        with torch.no_grad():
            for batch in activations_batches:
                activations = batch.activations if isinstance(batch, ProbeBatch) else batch
                original = _scalar_outputs(head(activations), activations.shape[0])
                rebuilt = _scalar_outputs(head(self.reconstruct(activations).to(activations.dtype)), activations.shape[0])
                absolute_difference += float((original - rebuilt).abs().double().sum())
                outputs += float(original.double().sum())
                count += activations.shape[0]
        if count == 0:
            raise NMFError("NMFConcepts.output_fidelity", "got no activations", "pass at least one batch")
        self.output_fidelity_ = (absolute_difference / count) / (abs(outputs / count) + 1e-4)
        return self.output_fidelity_

    def label(
        self, entry: StoreEntry, masks_entry: StoreEntry, indices: Sequence[int] | None = None, threshold: float = 0.5
    ) -> dict[int, dict[str, Any]]:
        """Name each NCAV after the known concept whose masks its maps overlap most (set IoU).

        NCAV maps are sampled on the masks' concept grid, divided by each NCAV's maximum over
        the images (first pass), binarised at ``> threshold`` and compared with every concept's
        grid mask ``≥ 0.5`` (second pass), pooling pixel counts over the images
        (``valid`` pairs only).

        Returns
        -------
        dict
            ``{ncav_index: {"concept": name, "set_iou": value, "all": {concept: iou}}}``; an
            IoU is None when neither map nor mask has a pixel (then it cannot be the match).
            Also kept as ``labels_``.
        """
        self._check_fitted()
        concepts = list(masks_entry.manifest()["dataset"]["concepts"])
        reduce = _reduction(entry)
        indices = None if indices is None else _checked_indices(entry, indices, entry.manifest()["n_items"])
        batches = lambda: iter_batches(entry, masks_entry, indices, IMAGE_BATCH, device=resolve_device(self.device, f"NMFConcepts(device={self.device!r})"))  # noqa: E731
        maxima = None
        for batch in batches():
            maps = self._grid_maps(batch, reduce)
            batch_max = maps.amax(dim=(0, 2, 3))
            maxima = batch_max if maxima is None else torch.maximum(maxima, batch_max)
        if maxima is None:
            raise NMFError(entry.path.name, "no images to label with", "give non-empty indices")
        counts = _OverlapCounts()
        for batch in batches():
            predicted = self._grid_maps(batch, reduce) / maxima.clamp(min=torch.finfo(torch.float32).tiny).view(1, -1, 1, 1) > threshold
            counts.add(predicted, batch.masks >= 0.5, batch.valid)
        self.labels_ = counts.labels(concepts)
        return self.labels_

    def _grid_maps(self, batch: ProbeBatch, reduce: str) -> torch.Tensor:
        maps = self.concept_maps(batch.activations)
        if maps.dim() != 4:
            raise NMFError("NMFConcepts.label", f"activations of shape {tuple(batch.activations.shape)} have no spatial maps", "embed the layer with reduce='native' or 'grid'")
        grid = tuple(batch.masks.shape[-2:])
        if reduce != "grid":
            return features_to_grid(maps, batch.geometries, grid)
        return maps if tuple(maps.shape[-2:]) == grid else F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------------- bank
    def to_bank(self, layer: str, labels: dict[int, dict[str, Any]] | None = None, provenance: dict[str, Any] | None = None) -> ConceptBank:
        """Package the NCAVs as a :class:`~conceptlens.concepts.vectors.bank.ConceptBank` (method ``'nmf'``).

        Parameters
        ----------
        layer : str
            Layer the NCAVs live in.
        labels : dict, optional
            Output of :meth:`label` (default: ``labels_`` when computed).
        provenance : dict, optional
            Extra provenance; its keys override the ones recorded here.

        Returns
        -------
        ConceptBank
            Concepts ``ncav_0 …``, zero biases; metrics per NCAV: fit relative error, held-out
            fidelity and output fidelity when computed, matched concept and its set IoU.
        """
        self._check_fitted()
        labels = labels if labels is not None else getattr(self, "labels_", None)
        names = [f"ncav_{i}" for i in range(self.components_.shape[0])]
        return ConceptBank(
            method="nmf",
            layer=layer,
            concepts=names,
            vectors=self.components_.clone(),
            biases=torch.zeros(len(names)),
            metrics={name: self._concept_metrics(i, labels) for i, name in enumerate(names)},
            provenance={**self._provenance(layer), **(provenance or {})},
        )

    def _concept_metrics(self, index: int, labels: dict[int, dict[str, Any]] | None) -> dict[str, Any]:
        metrics: dict[str, Any] = {"relative_error": self.relative_error_}
        for name in ("fidelity", "output_fidelity"):
            if hasattr(self, f"{name}_"):
                metrics[name] = getattr(self, f"{name}_")
        label = (labels or {}).get(index, (labels or {}).get(str(index)))
        if label is not None:
            metrics.update(matched_concept=label["concept"], set_iou=label["set_iou"], set_iou_all=label["all"])
        return metrics

    def _provenance(self, layer: str) -> dict[str, Any]:
        return {
            "layer": layer,
            "model_hash": self.data_.get("model_hash"),
            "store_key": self.data_.get("store_key"),
            "data": self.data_,
            "nmf": {
                "solver": self.solver,
                "online": self.batch_size is not None,
                "n_components": self.n_components,
                "max_iter": self.max_iter,
                "tol": self.tol,
                "batch_size": self.batch_size,
                "n_iter": self.n_iter_,
                "relative_error": self.relative_error_,
                "n_pixels": self.n_pixels_,
            },
            "clamp": {"clamp": self.clamp, "clamped_fraction": self.clamped_fraction_},
            "seed": self.seed,
            "versions": package_versions(),
        }

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise NMFError("NMFConcepts", "is not fitted yet", "call fit() first")

    def __repr__(self) -> str:
        return (
            f"NMFConcepts(n_components={self.n_components}, solver={self.solver!r}, max_iter={self.max_iter}, tol={self.tol}, "
            f"batch_size={self.batch_size}, clamp={self.clamp}, seed={self.seed}, device={self.device!r})"
        )


# ---------------------------------------------------------------------------------- data input
@dataclass
class _Source:
    """Where pixel vectors come from: an in-memory matrix or a store entry (streamed)."""

    name: str
    description: dict[str, Any]
    pixels: torch.Tensor | None = None
    entry: StoreEntry | None = None
    indices: Sequence[int] | None = None
    reduce: str = "native"

    def channels(self) -> int:
        """The number of channels C of the pixel vectors."""
        if self.pixels is not None:
            return int(self.pixels.shape[1])
        return int(self.entry.manifest()["item_shape"][0])

    def matrix(self, device: torch.device, show: bool = False) -> torch.Tensor:
        """The whole (N, C) pixel matrix on ``device`` (raw, not clamped)."""
        if self.pixels is not None:
            return self.pixels.to(device=device, dtype=torch.float32)
        blocks = list(tqdm(self.blocks(device, 0, False), desc="reading pixels", unit="batch", disable=not show))
        if not blocks:
            raise NMFError(self.name, "holds no pixel vectors", "give non-empty indices")
        return torch.cat(blocks)

    def blocks(self, device: torch.device, seed: int, shuffle: bool) -> Iterator[torch.Tensor]:
        """Raw pixel blocks (n, C) in order (or shuffled by ``seed``: blocks and rows within)."""
        if self.pixels is not None:
            yield from _matrix_blocks(self.pixels, device, seed, shuffle)
            return
        for batch in iter_batches(self.entry, indices=self.indices, batch_size=IMAGE_BATCH, shuffle=shuffle, seed=seed, device=device):
            block = _batch_pixels(batch, self.reduce)
            if shuffle:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + int(batch.indices[0]))
                block = block[torch.randperm(block.shape[0], generator=generator).to(block.device)]
            yield block


def _source(data: Any, indices: Sequence[int] | None) -> _Source:
    if isinstance(data, StoreEntry):
        return _entry_source(data, indices)
    if indices is not None:
        raise NMFError("NMFConcepts.fit(indices=…)", "indices select items of a store entry", "index the pixel matrix yourself")
    pixels = torch.as_tensor(data).detach()
    if pixels.dim() != 2 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise NMFError("pixel matrix", f"has shape {tuple(pixels.shape)}", "give (N, C) pixel vectors, or a store entry")
    return _Source("pixel matrix", {"source": "tensor", "shape": list(pixels.shape)}, pixels=pixels)


def _entry_source(entry: StoreEntry, indices: Sequence[int] | None) -> _Source:
    manifest = entry.manifest()
    request = manifest.get("request", {})
    layer = request.get("layer")
    wanted = _checked_indices(entry, indices, manifest["n_items"])
    description = {
        "source": "store",
        "store_key": entry.key,
        "model_hash": request.get("model_hash"),
        "layer": layer,
        "dataset": manifest.get("dataset", {}).get("name"),
        "n_images": int(len(wanted)),
        "indices_sha256": hashlib.sha256(np.ascontiguousarray(wanted).tobytes()).hexdigest(),
    }
    name = f"layer {layer!r} (store entry {entry.key})"
    return _Source(name, description, entry=entry, indices=None if indices is None else wanted, reduce=request.get("reduce") or "native")


def _checked_indices(entry: StoreEntry, indices: Sequence[int] | None, n_items: int) -> np.ndarray:
    if indices is None:
        return np.arange(n_items)
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
    if wanted.size and (wanted.min() < 0 or wanted.max() >= n_items):
        raise NMFError(f"store entry {entry.key}", f"holds {n_items} items; indices run from {wanted.min()} to {wanted.max()}", "give indices of this entry's items (conceptlens.probes.data.split_indices)")
    return wanted


def _reduction(entry: StoreEntry) -> str:
    return entry.manifest().get("request", {}).get("reduce") or "native"


def _batch_pixels(batch: ProbeBatch, reduce: str) -> torch.Tensor:
    """Pixel vectors (n, C) of a batch: its image cells, image by image, row-major."""
    activations = batch.activations
    if activations.dim() == 2:  # pooled activations: one vector per image
        return activations
    channels = activations.shape[1]
    cells = activations.movedim(1, -1).reshape(activations.shape[0], -1, channels)
    if reduce == "grid" or activations.dim() != 4:
        return cells.reshape(-1, channels)
    on_image = torch.stack([image_cells(g, tuple(activations.shape[-2:])) for g in batch.geometries])
    return cells[on_image.reshape(activations.shape[0], -1).to(cells.device)]


def _matrix_blocks(pixels: torch.Tensor, device: torch.device, seed: int, shuffle: bool) -> Iterator[torch.Tensor]:
    order = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, pixels.shape[0], ROW_CHUNK):
        rows = pixels[start : start + ROW_CHUNK] if order is None else pixels[order[start : start + ROW_CHUNK]]
        yield rows.to(device=device, dtype=torch.float32)


def _chunks(blocks: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of (n, C) blocks into minibatches of exactly ``size`` rows (the last: fewer)."""
    pending: list[torch.Tensor] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += block.shape[0]
        if held >= size:
            joined = torch.cat(pending)
            cut = (held // size) * size
            yield from joined[:cut].split(size)
            pending, held = ([joined[cut:]] if cut < held else []), held - cut
    if held:
        yield torch.cat(pending)


class _Clamp:
    """Clamp pixel blocks at zero (counting negatives), or refuse negatives when clamping is off."""

    def __init__(self, clamp: bool, name: str) -> None:
        self.clamp, self.name = clamp, name
        self.negative, self.total, self.counting = 0, 0, True

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        # one reduction, no block-sized temporaries: min/max propagate NaN and show ±inf
        low, high = (float(v) for v in torch.aminmax(block)) if block.numel() else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise NMFError(self.name, "contains NaN or inf", "check the model and the stored activations")
        negative = int((block < 0).sum()) if low < 0 else 0
        if self.counting:
            self.negative += negative
            self.total += block.numel()
        if negative and not self.clamp:
            raise NMFError(
                self.name, f"has negative activations ({negative} of {block.numel()} entries in a batch) and NMF needs non-negative input",
                "set clamp=True to clamp them at zero (recorded in the bank), or pick a layer after a ReLU",
            )
        return block.clamp(min=0) if negative else block

    @property
    def fraction(self) -> float:
        return self.negative / self.total if self.total else 0.0


def _check_fittable(pixels: torch.Tensor, name: str) -> None:
    if not bool(pixels.amax() > 0):  # pixels ≥ 0 here (clamped, checked finite)
        raise NMFError(name, "all pixel vectors are zero (after clamping)", "choose a layer or images with positive activations")


# ------------------------------------------------------------------------------ torch solvers
@dataclass
class _FitResult:
    components: torch.Tensor
    reconstruction_err: float
    relative_error: float
    error_curve: list[float] = field(default_factory=list)
    n_iter: int = 0
    n_pixels: int = 0
    clamped_fraction: float = 0.0


def _fit_torch(pixels: torch.Tensor, k: int, solver: str, max_iter: int, tol: float, seed: int, show: bool) -> _FitResult:
    """Full-batch HALS or MU on ``pixels`` (N, C) ≥ 0: ``pixels ≈ codesᵀ·components``."""
    codes, components = _initialize(pixels, k, seed)  # codes kept transposed (k, N): rows contiguous
    norm_squared = _squared_norm(pixels)
    relative = lambda squared: squared.clamp(min=0).sqrt() / math.sqrt(norm_squared)  # noqa: E731
    initial = previous = 0.0
    if tol > 0:  # the stopping rule is relative to the initial error
        with _serial(pixels):
            initial = previous = float(relative(_squared_error(norm_squared, components, codes @ pixels, codes @ codes.T)))
    errors: list[torch.Tensor] = []
    n_iter = 0
    for n_iter in tqdm(range(1, max_iter + 1), desc=f"NMF ({solver})", unit="it", disable=not show):
        errors.append(relative(_iteration(pixels, codes, components, norm_squared, solver)))
        if tol > 0 and n_iter % CHECK_EVERY == 0:  # scikit-learn's MU criterion
            current = float(errors[-1])
            if previous - current < tol * initial:
                break
            previous = current
    scales = _normalise_rows(components)
    codes *= scales[:, None]
    residual = _exact_squared_error(pixels, codes, components)
    return _FitResult(components, math.sqrt(residual), math.sqrt(residual / norm_squared), [float(e) for e in errors], n_iter, pixels.shape[0])


def _iteration(pixels: torch.Tensor, codes: torch.Tensor, components: torch.Tensor, norm_squared: float, solver: str) -> torch.Tensor:
    """Update codes (k, N) then components (k, C) in place; return ‖V − SP‖² after it (a tensor)."""
    cross = (pixels @ components.T).T.contiguous()  # (k, N) = (V Pᵀ)ᵀ; this order is faster with MKL
    with _serial(pixels):
        gram = components @ components.T
        if solver == "hals":
            _hals_update(codes, cross, gram, 1, in_place=True)
        else:
            _mu_step(codes, cross, gram)
        del cross
        cross = codes @ pixels  # (k, C) = Sᵀ V
        gram = codes @ codes.T  # (k, k) = Sᵀ S
        if solver == "hals":
            _hals_update(components, cross, gram, 1)
        else:
            _mu_step(components, cross, gram)
        return _squared_error(norm_squared, components, cross, gram)


@contextmanager
def _serial(reference: torch.Tensor) -> Iterator[None]:
    """Run the enclosed CPU work on one intra-op thread (no-op on CUDA).

    A HALS iteration is some forty element-wise operations and small products besides the one
    large ``V·Pᵀ`` product. On a CPU each is an OpenMP region whose threads must all be scheduled
    before it ends; on a busy machine that synchronisation costs milliseconds per operation
    (measured: a codes sweep of 200k pixels 2 ms on one thread, 300+ ms on two), and MKL's
    ``Sᵀ·V`` (k × N by N × C, a long reduction) was also faster on one thread than on two.
    """
    if reference.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _hals_update(factor: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, max_sweeps: int, in_place: bool = False) -> None:
    """Decrease ``½ tr(F G Fᵀ) − tr(F Xᵀ)`` over ``F ≥ 0`` by HALS sweeps, in place.

    ``factor`` F is (k, M), ``cross`` X (k, M), ``gram`` G (k, k). Up to ``max_sweeps`` sweeps,
    stopping once one moves F by less than ``INNER_SHRINK`` times the first sweep's move (as in
    Gillis & Glineur's accelerated HALS; the full-batch solver uses one sweep, like
    scikit-learn, the online one repeats sweeps on the cheap k×C statistics). ``in_place``: divide
    ``cross`` itself (a temporary of the caller) rather than a copy.
    """
    target, coupling = _sweep_terms(cross, gram, in_place)
    first = None
    for _ in range(max_sweeps):
        before = factor.clone() if max_sweeps > 1 else None
        _hals_sweep(factor, target, coupling)
        if before is None:
            break
        change = float(torch.dist(factor, before))
        if first is None:
            first = change
        elif change <= INNER_SHRINK * first:
            break


def _sweep_terms(cross: torch.Tensor, gram: torch.Tensor, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``X_j / G_jj`` and ``G_ji / G_jj`` with a zero diagonal: the terms of a HALS row update.

    A dead component (zero row of the other factor) has zero rows in ``G`` and ``X``; flooring
    its diagonal keeps it at zero without a device sync.
    """
    diagonal = gram.diagonal().clamp(min=torch.finfo(gram.dtype).tiny)[:, None]
    coupling = gram / diagonal
    coupling.fill_diagonal_(0)
    return (cross.div_(diagonal) if in_place else cross / diagonal), coupling


def _hals_sweep(factor: torch.Tensor, target: torch.Tensor, coupling: torch.Tensor) -> None:
    """One exact coordinate-descent pass over the rows of ``factor`` (k, M), in place:
    ``F_j ← max(0, X_j/G_jj − Σ_{i≠j} (G_ji/G_jj) F_i)``.

    The columns of F are independent problems, so a sweep equals scikit-learn's element-wise
    ``_update_cdnmf_fast`` (three tensor operations per row, whatever M).
    """
    row = torch.empty_like(factor[0])
    for j in range(factor.shape[0]):
        torch.addmv(target[j], factor.T, coupling[j], alpha=-1, out=row)
        torch.clamp(row, min=0, out=factor[j])


def _mu_step(factor: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor) -> None:
    """One multiplicative update ``F ← F ∘ X / (G F)`` (Lee & Seung, Frobenius loss), in place."""
    denominator = gram @ factor
    denominator.clamp_(min=EPSILON)
    factor.mul_(cross).div_(denominator)


def _squared_error(norm_squared: float, components: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``‖V − SP‖² = ‖V‖² − 2⟨P, SᵀV⟩ + ⟨SᵀS, PPᵀ⟩`` from k×C and k×k quantities (float64 sums)."""
    linear = (components.double() * cross.double()).sum()
    quadratic = (gram.double() * (components.double() @ components.double().T)).sum()
    return norm_squared - 2 * linear + quadratic


def _squared_norm(pixels: torch.Tensor) -> float:
    """``‖V‖²``: float32 row norms (C terms each), their squares summed in float64 (no copy of V)."""
    if pixels.dim() != 2:
        return float(pixels.double().square().sum())
    return float(torch.linalg.vector_norm(pixels, dim=1).double().square().sum())


def _exact_squared_error(pixels: torch.Tensor, codes: torch.Tensor, components: torch.Tensor) -> float:
    """``‖V − SᵀP‖²`` computed blockwise (codes transposed, (k, N)), summed as :func:`_squared_norm`."""
    total = 0.0
    with _serial(pixels):
        for start in range(0, pixels.shape[0], ERROR_CHUNK):
            rows = slice(start, start + ERROR_CHUNK)
            total += _squared_norm(torch.addmm(pixels[rows], codes[:, rows].T, components.to(pixels.dtype), alpha=-1))
    return total


def _normalise_rows(components: torch.Tensor) -> torch.Tensor:
    """Scale each row of ``components`` to unit L2 norm in place (zero rows stay); return the norms."""
    norms = components.norm(dim=1)
    components /= torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    return norms


# ------------------------------------------------------------------------------ initialisation
def _initialize(pixels: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD-a (Boutsidis & Gallopoulos 2008), following scikit-learn's ``init='nndsvda'``.

    Returns codes transposed (k, N) and components (k, C). The randomized SVD draws its probe
    from ``numpy.random.RandomState(seed)`` exactly as scikit-learn does, so the start is the
    same on every device and close to scikit-learn's. When ``k > min(N, C)`` falls back to
    scikit-learn's random init ``|N(0,1)|·sqrt(mean(V)/k)``.
    """
    n, c = pixels.shape
    average = float(pixels.mean())
    if k > min(n, c):
        rng = np.random.RandomState(seed)
        scale = math.sqrt(average / k)
        components = np.abs(rng.standard_normal((k, c))) * scale
        codes = np.abs(rng.standard_normal((n, k))) * scale
        return (torch.from_numpy(codes.T.copy()).to(pixels), torch.from_numpy(components).to(pixels))
    left, singular, right = _randomized_svd(pixels, k, seed)
    codes, components = _nndsvd_factors(left.T, singular, right)
    # scikit-learn: entries < 1e-6 → 0, then zeros → mean(V)
    codes, components = (torch.where(factor < 1e-6, average, factor) for factor in (codes, components))
    return codes.contiguous(), components.contiguous()


def _randomized_svd(matrix: torch.Tensor, k: int, seed: int, oversamples: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD by a randomized range finder (Halko et al. 2011) as scikit-learn's ``randomized_svd``.

    Same probe, power-iteration count and transposition rule; power steps are normalised by QR
    (scikit-learn: LU), which spans the same subspace. When the short side of the matrix is small
    next to the work of the power steps (``min(N, C) ≤ (2q + 2)(k + oversamples)``, e.g. a few
    hundred channels), the power steps run on the Gram matrix ``TᵀT`` of the tall side ``T``
    (min(N, C)² entries, one pass over the data): ``T(TᵀT)^q Ω`` spans the same subspace as
    scikit-learn's alternating steps, at one large product instead of 2q + 1.
    """
    transpose = matrix.shape[0] < matrix.shape[1]
    target = matrix.T if transpose else matrix
    power_iterations = 7 if k < 0.1 * min(matrix.shape) else 4
    probe = np.random.RandomState(seed).normal(size=(target.shape[1], k + oversamples))
    basis = torch.from_numpy(probe).to(target)
    if target.shape[1] <= (2 * power_iterations + 2) * (k + oversamples):
        gram = (target.T @ target).double()
        small = basis.double()
        for _ in range(power_iterations):
            small = torch.linalg.qr(gram @ small).Q
        with _serial(target):
            basis = torch.linalg.qr(target @ small.to(target.dtype)).Q
            small_left, singular, right = torch.linalg.svd(basis.T @ target, full_matrices=False)
    else:
        with _serial(target):
            for _ in range(power_iterations):
                basis = torch.linalg.qr(target @ basis).Q
                basis = torch.linalg.qr((basis.T @ target).T).Q  # Tᵀ·Q; (Qᵀ·T)ᵀ is several times faster with MKL
            basis = torch.linalg.qr(target @ basis).Q
            small_left, singular, right = torch.linalg.svd(basis.T @ target, full_matrices=False)
    left = basis @ small_left
    if transpose:
        return right[:k].T, singular[:k], left[:, :k].T
    return left[:, :k], singular[:k], right[:k]


def _nndsvd_factors(left: torch.Tensor, singular: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD: each singular pair → its dominant non-negative part (left (k, N), right (k, C))."""
    left_pos, left_neg = left.clamp(min=0), (-left).clamp(min=0)
    right_pos, right_neg = right.clamp(min=0), (-right).clamp(min=0)
    norms = [t.norm(dim=1) for t in (left_pos, left_neg, right_pos, right_neg)]
    mass_pos, mass_neg = norms[0] * norms[2], norms[1] * norms[3]
    positive = (mass_pos > mass_neg)[:, None]
    tiny = torch.finfo(left.dtype).tiny
    u = torch.where(positive, left_pos / norms[0].clamp(min=tiny)[:, None], left_neg / norms[1].clamp(min=tiny)[:, None])
    v = torch.where(positive, right_pos / norms[2].clamp(min=tiny)[:, None], right_neg / norms[3].clamp(min=tiny)[:, None])
    weight = (singular * torch.where(positive[:, 0], mass_pos, mass_neg)).sqrt()[:, None]
    u[0], v[0] = left[0].abs(), right[0].abs()  # the leading pair is non-negative up to sign
    weight[0] = singular[0].sqrt()
    return weight * u, weight * v


# ----------------------------------------------------------------------------- online variant
def _online_init(chunks: Iterator[torch.Tensor], k: int, seed: int, name: str) -> torch.Tensor:
    """NNDSVD-a components from the first pixels of the stream (at least INIT_SAMPLE or all)."""
    sample, held = [], 0
    for chunk in chunks:
        sample.append(chunk)
        held += chunk.shape[0]
        if held >= INIT_SAMPLE:
            break
    if not sample:
        raise NMFError(name, "holds no pixel vectors", "give non-empty data")
    pixels = torch.cat(sample)
    _check_fittable(pixels, name)
    return _initialize(pixels, k, seed)[1]


class _Statistics:
    """Sufficient statistics ``A = Σ_b S_bᵀS_b``, ``B = Σ_b S_bᵀV_b`` with each minibatch's latest part.

    Keeping every minibatch's part (k·(k + C) numbers each) lets a later pass *replace* it
    rather than add to it — Mairal et al.'s variant for finite data sets — so the statistics
    always describe each pixel once, and the fixed point is that of full-batch alternating NNLS.
    """

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None

    def replace(self, index: int, gram: torch.Tensor, cross: torch.Tensor) -> None:
        gram, cross = gram.double(), cross.double()
        if self.gram is None:
            self.gram, self.cross = torch.zeros_like(gram), torch.zeros_like(cross)
        if index < len(self.parts):
            old_gram, old_cross = self.parts[index]
            self.gram -= old_gram
            self.cross -= old_cross
            self.parts[index] = (gram, cross)
        else:
            self.parts.append((gram, cross))
        self.gram += gram
        self.cross += cross

    def refresh(self) -> None:
        """Re-add the parts, dropping rounding drift of repeated replacements."""
        self.gram = torch.stack([g for g, _ in self.parts]).sum(dim=0)
        self.cross = torch.stack([c for _, c in self.parts]).sum(dim=0)


def _online_pass(chunks: Iterable[torch.Tensor], components: torch.Tensor, statistics: _Statistics, solver: str) -> float:
    """One pass over the minibatches: code each by NNLS, update its statistics, then P (in place).

    Returns the pass's relative error, each minibatch measured against the P it was coded with.
    """
    squared_error, norm_squared = 0.0, 0.0
    for index, pixels in enumerate(chunks):
        codes = nnls(pixels, components, tolerance=ONLINE_NNLS_TOLERANCE)
        gram, cross = codes.T @ codes, codes.T @ pixels
        block_norm = _squared_norm(pixels)
        squared_error += float(_squared_error(block_norm, components, cross, gram))
        norm_squared += block_norm
        statistics.replace(index, gram, cross)
        total_gram, total_cross = statistics.gram.float(), statistics.cross.float()
        if solver == "hals":
            _hals_update(components, total_cross, total_gram, ONLINE_SWEEPS)
        else:
            for _ in range(ONLINE_SWEEPS):
                _mu_step(components, total_cross, total_gram)
    if norm_squared == 0:
        raise NMFError("NMF online pass", "all pixel vectors are zero", "choose a layer or images with positive activations")
    statistics.refresh()
    return math.sqrt(max(squared_error, 0.0) / norm_squared)


def _streamed_error(blocks: Iterable[torch.Tensor], components: torch.Tensor, clamp: _Clamp) -> tuple[float, float, int]:
    """Pool ``‖V − S·P‖²`` (NNLS codes), ``‖V‖²`` and the pixel count over a stream of blocks."""
    residual, total, count = 0.0, 0.0, 0
    for block in blocks:
        pixels = clamp(block)
        codes = nnls(pixels, components)
        residual += float((pixels - codes @ components).double().square().sum())
        total += _squared_norm(pixels)
        count += pixels.shape[0]
    return residual, total, count


# ----------------------------------------------------------------------------------- sklearn
def _fit_sklearn(pixels: torch.Tensor, k: int, tol: float, max_iter: int, seed: int) -> _FitResult:
    """Fit :class:`sklearn.decomposition.NMF` (``init='nndsvda'``) on the CPU pixel matrix, in float32."""
    import warnings

    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    model = NMF(n_components=k, init="nndsvda", tol=tol, max_iter=max_iter, random_state=seed)

    matrix = pixels.cpu().numpy().astype(np.float32, copy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        codes = torch.from_numpy(model.fit_transform(matrix)).float()
    components = torch.from_numpy(model.components_).float()
    scales = _normalise_rows(components)
    codes *= scales[None, :]
    residual = _exact_squared_error(pixels.float(), codes.T.contiguous(), components)
    norm_squared = _squared_norm(pixels)
    return _FitResult(components, math.sqrt(residual), math.sqrt(residual / norm_squared), [], int(model.n_iter_), pixels.shape[0])


# ------------------------------------------------------------------------------------- labels
class _OverlapCounts:
    """Pooled intersections and unions of k binary NCAV maps with K concept masks."""

    def __init__(self) -> None:
        self.intersection: torch.Tensor | None = None
        self.union: torch.Tensor | None = None

    def add(self, predicted: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> None:
        """``predicted`` (B, k, G…) bool, ``truth`` (B, K, G…) bool, ``valid`` (B, K) bool."""
        predicted = predicted.flatten(2).double()
        truth = (truth & valid[:, :, None, None]).flatten(2).double()
        used = valid.double()
        intersection = torch.einsum("bkg,bcg->kc", predicted, truth)
        sizes = torch.einsum("bk,bc->kc", predicted.sum(dim=2), used) + truth.sum(dim=2).sum(dim=0)[None, :]
        union = sizes - intersection
        self.intersection = intersection if self.intersection is None else self.intersection + intersection
        self.union = union if self.union is None else self.union + union

    def labels(self, concepts: Sequence[str]) -> dict[int, dict[str, Any]]:
        intersection, union = self.intersection.cpu().tolist(), self.union.cpu().tolist()
        result = {}
        for i, (row_inter, row_union) in enumerate(zip(intersection, union)):
            ious = {c: (inter / uni if uni > 0 else None) for c, inter, uni in zip(concepts, row_inter, row_union)}
            defined = {c: v for c, v in ious.items() if v is not None}
            best = max(defined, key=defined.get) if defined else None
            result[i] = {"concept": best, "set_iou": defined.get(best), "all": ious}
        return result


# ------------------------------------------------------------------------------------ helpers
def _scalar_outputs(outputs: torch.Tensor, batch: int) -> torch.Tensor:
    outputs = torch.as_tensor(outputs)
    if outputs.numel() != batch:
        raise NMFError("output_fidelity head", f"returned shape {tuple(outputs.shape)} for {batch} images", "return one scalar per image, shape (B,)")
    return outputs.reshape(batch).double()


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

"""Unsupervised concept vectors (NCAVs) by non-negative matrix factorisation, as in ICE.

ICE (Zhang et al. 2021, docs/METHODS.md §4) flattens a layer's activations into pixel vectors
``V`` (pixels × C), clamps them at zero and factorises ``V ≈ S·P`` with ``S, P ≥ 0``. The k rows
of ``P`` are the NCAVs; the concept maps of an image are the non-negative least-squares codes
``S(x) = argmin_{S≥0} ‖A(x) − S·P‖`` of its pixel vectors.

Two estimators with scikit-learn's contract (like :class:`sklearn.decomposition.NMF` and
:class:`sklearn.decomposition.MiniBatchNMF`), sharing everything but the fit:

* :class:`NMFConcepts` — full batch: the pixel matrix is held in memory (on the device) and
  factorised by ``"hals"`` (hierarchical alternating least squares in torch: scikit-learn's
  coordinate descent vectorised over pixels; CPU or CUDA), ``"mu"`` (Lee & Seung multiplicative
  updates in torch) or ``"sklearn"`` (:class:`sklearn.decomposition.NMF`, the reference);
* :class:`MiniBatchNMFConcepts` — online (Mairal et al. 2010): pixels are streamed in minibatches
  of ``batch_size`` (from a tensor or straight from the activation store), each minibatch is
  coded by NNLS against the current ``P``, its part of the sufficient statistics
  ``A = Σ SᵀS`` and ``B = Σ SᵀV`` replaces the part it contributed on the previous pass, and ``P``
  is updated on ``A, B`` by HALS sweeps (multiplicative steps for ``"mu"``). Pixel memory is
  bounded by the minibatch; the statistics take ``k·(k + C)`` numbers per minibatch.
  :meth:`~MiniBatchNMFConcepts.partial_fit` feeds it data chunk by chunk.

Both fit ``(N, C)`` pixel vectors, ``(N, C, h, w)`` activations (every cell a pixel vector) or a
store entry (:mod:`conceptlens.probes.nmf_sources`); the solvers live in
:mod:`conceptlens.probes.nmf_solvers`.

Scale convention: ``S·P`` is invariant to ``S → S·D⁻¹, P → D·P``; every fitted ``P`` is scaled
so that each NCAV (row of ``components_``) has unit L2 norm, the scale going into ``S``. A
component that died (all zero) stays zero.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import NotFittedError
from conceptlens.concepts.progress import progress_bar

from conceptlens.concepts.environment import package_versions, resolve_device
from conceptlens.concepts.geometry import features_to_grid
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.vectors.bank import ConceptBank, nnls
from conceptlens.probes.data import ProbeBatch, iter_batches
from conceptlens.probes.nmf_solvers import (
    FitResult,
    NMFError,
    OnlineStatistics,
    check_fittable,
    fit_sklearn,
    fit_torch,
    normalise_rows,
    online_init,
    online_pass,
    streamed_error,
)
from conceptlens.probes.nmf_sources import (
    IMAGE_BATCH,
    Clamp,
    PixelSource,
    as_tensor,
    checked_indices,
    minibatches,
    pixel_source,
    reduction,
)
from conceptlens.probes.params import Interval, Options, ParameterError, Predicate, validate_params

__all__ = ["SOLVERS", "MiniBatchNMFConcepts", "NMFConcepts", "NMFError", "NMFNotFittedError", "match_labels"]

SOLVERS = ("hals", "mu", "sklearn")
ONLINE_SOLVERS = ("hals", "mu")


class NMFNotFittedError(NMFError, NotFittedError):
    """An NMF estimator used before ``fit`` (also scikit-learn's ``NotFittedError``)."""


def _is_device(value: Any) -> bool:
    return isinstance(value, (str, torch.device))


# ------------------------------------------------------------------------------------ estimators
class _BaseNMFConcepts(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """What both NMF estimators share: validation, projection, quality, labels and the bank.

    Subclasses define ``__init__`` (their parameters) and ``_fit_source`` (the solver run).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "n_components": [Interval(int, 1, None)],
        "solver": [Options(*SOLVERS)],
        "max_iter": [Interval(int, 1, None)],
        "tol": [Interval(float, 0, None)],
        "clamp": [Options(True, False)],
        "seed": [Interval(int, 0, 2**32 - 1)],
        "device": [Predicate(_is_device, "'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device")],
        "progress": [Options(None, True, False)],
    }
    _online = False

    # ------------------------------------------------------------------------------------ fit
    def fit(self, X: torch.Tensor | np.ndarray | StoreEntry, y: None = None, *, indices: Sequence[int] | None = None) -> _BaseNMFConcepts:
        """Learn the NCAVs.

        Parameters
        ----------
        X : Tensor, ndarray, array-like or StoreEntry
            ``(N, C)`` pixel vectors, ``(N, C, h, w)`` activations (every cell is a pixel
            vector), or a store entry of a layer's activations: then the pixels are every
            feature cell that lies on an image (``image_cells``; a detector's padding is left
            out), in image and row-major order, streamed from the store.
        y : None
            Ignored (scikit-learn's signature).
        indices : sequence of int, optional
            Items of a store entry to use (a split); default every item.

        Returns
        -------
        self
            The fitted estimator.
        """
        self._validate()
        source = pixel_source(X, indices, f"{type(self).__name__}.fit")
        channels = source.channels()
        if self.n_components > channels:
            raise NMFError(source.name, f"has {channels} channels, fewer than n_components={self.n_components}",
                           f"use n_components ≤ {channels} for this layer")
        result = self._fit_source(source, self._fit_device())
        self._store_result(result, source.description)
        return self

    def fit_transform(self, X: torch.Tensor | np.ndarray, y: None = None, **fit_params: Any) -> torch.Tensor | np.ndarray:
        """Fit on ``X`` and return its codes: ``fit(X).transform(X)``.

        Parameters
        ----------
        X : Tensor, ndarray or array-like
            ``(N, C)`` pixel vectors or ``(N, C, h, w)`` activations. A store entry is refused:
            fit it, then code it batch by batch (:meth:`concept_maps`).
        y : None
            Ignored.
        **fit_params
            Passed to :meth:`fit`.

        Returns
        -------
        Tensor or ndarray
            As :meth:`transform`.
        """
        if isinstance(X, StoreEntry):
            raise NMFError(f"{type(self).__name__}.fit_transform(store entry)", "would hold the codes of the whole entry in memory",
                           "call fit(entry), then concept_maps() on batches of conceptlens.probes.data.iter_batches(entry)")
        return self.fit(X, y, **fit_params).transform(X)

    def _validate(self) -> None:
        validate_params(self)

    def _fit_device(self) -> torch.device:
        if self.solver == "sklearn":
            return torch.device("cpu")
        return resolve_device(self.device, f"{type(self).__name__}(device={self.device!r})")

    def _fit_source(self, source: PixelSource, device: torch.device) -> FitResult:
        raise NotImplementedError

    def _store_result(self, result: FitResult, description: dict[str, Any]) -> None:
        self.components_ = result.components.float().cpu().contiguous()
        self.n_components_ = int(self.components_.shape[0])
        self.reconstruction_err_ = float(result.reconstruction_err)
        self.relative_error_ = float(result.relative_error)
        self.error_curve_ = [float(e) for e in result.error_curve]
        self.n_iter_ = int(result.n_iter)
        self.n_features_in_ = int(self.components_.shape[1])
        self.n_pixels_ = int(result.n_pixels)
        self.clamped_fraction_ = float(result.clamped_fraction)
        self.data_ = description
        for stale in ("fidelity_", "output_fidelity_", "labels_"):
            self.__dict__.pop(stale, None)

    def _show(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else bool(self.progress)

    # ------------------------------------------------------------------------------ projection
    def transform(self, X: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Concept codes: ``argmin_{S≥0} ‖X − S·P‖`` for every pixel vector.

        Parameters
        ----------
        X : Tensor, ndarray or array-like
            ``(N, C)`` pixel vectors or ``(N, C, h, w)`` activations; clamped at zero as in fit
            (with ``clamp=False`` negative input is an error). Computed on the tensor's device
            with :func:`conceptlens.concepts.vectors.bank.nnls`.

        Returns
        -------
        Tensor or ndarray
            ``(N, k)`` non-negative codes, or ``(N, k, h, w)`` concept maps; float32, a tensor
            for a tensor and a numpy array otherwise.
        """
        self._check_fitted()
        tensor = self._checked_input(X, "transform", self.n_features_in_, "features")
        codes = self.concept_maps(tensor) if tensor.dim() == 4 else self._codes(tensor)
        return _like(codes, X)

    def inverse_transform(self, X: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Pixel vectors ``S·P``: codes ``(N, k)`` → ``(N, C)``, maps ``(N, k, h, w)`` → ``(N, C, h, w)``.

        Parameters
        ----------
        X : Tensor, ndarray or array-like
            Codes or concept maps, as :meth:`transform` returns them.

        Returns
        -------
        Tensor or ndarray
            float32; a tensor for a tensor, a numpy array otherwise.
        """
        self._check_fitted()
        codes = self._checked_input(X, "inverse_transform", self.n_components_, "components").float()
        components = self.components_.to(codes.device)
        rebuilt = codes @ components if codes.dim() == 2 else torch.einsum("bk...,kc->bc...", codes, components)
        return _like(rebuilt, X)

    def concept_maps(self, activations: torch.Tensor) -> torch.Tensor:
        """NCAV maps of activations (B, C, h, w) → (B, k, h, w): the codes of every cell.

        Equal to ``self.to_bank(layer).concept_maps(activations)``.
        """
        self._check_fitted()
        if activations.dim() < 2 or activations.shape[1] != self.n_features_in_:
            raise NMFError(f"{type(self).__name__}.concept_maps", f"activations have shape {tuple(activations.shape)}", f"give (B, {self.n_features_in_}, h, w) activations of the fitted layer")
        batch, channels = activations.shape[:2]
        codes = self._codes(activations.movedim(1, -1).reshape(-1, channels))
        return codes.reshape(batch, *activations.shape[2:], -1).movedim(-1, 1)

    def reconstruct(self, activations: torch.Tensor) -> torch.Tensor:
        """Activations rebuilt from the NCAVs, ``S·P`` per cell: (B, C, h, w) → (B, C, h, w)."""
        maps = self.concept_maps(activations)
        return torch.einsum("bk...,kc->bc...", maps, self.components_.to(maps.device))

    def _codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """NNLS codes (N, k) of pixel vectors (N, C), clamped as in fit."""
        pixels = Clamp(self.clamp, "pixels given to transform")(pixels.detach().float())
        return nnls(pixels, self.components_.to(pixels.device))

    def _checked_input(self, X: Any, method: str, width: int, noun: str) -> torch.Tensor:
        """``X`` as a tensor of shape (N, width) or (N, width, h, w), else an error naming both."""
        name = f"X given to {type(self).__name__}.{method}"
        tensor = as_tensor(X, name)
        if tensor.dim() not in (2, 4):
            raise NMFError(name, f"has shape {tuple(tensor.shape)}", f"Reshape your data: give (N, {width}) or (N, {width}, h, w) data")
        if tensor.shape[1] != width:
            raise NMFError(name, f"X has {tensor.shape[1]} features, but {type(self).__name__} is expecting {width} {noun} as input",
                           f"give (N, {width}) or (N, {width}, h, w) data")
        return tensor

    @property
    def _n_features_out(self) -> int:
        """Number of output features (scikit-learn's ``get_feature_names_out``): the components."""
        return self.components_.shape[0]

    # -------------------------------------------------------------------------------- quality
    def fidelity(self, entry: StoreEntry, indices: Sequence[int] | None = None) -> float:
        """Relative reconstruction error ``‖V − S·P‖_F / ‖V‖_F`` on (held-out) images.

        Streams the images of ``entry`` (``indices``: a split; default all), codes their pixel
        vectors (image cells only) by NNLS and pools squared errors and norms over the set.
        The value is also kept as ``fidelity_``.
        """
        self._check_fitted()
        source = pixel_source(entry, indices, f"{type(self).__name__}.fidelity")
        clamp = Clamp(self.clamp, source.name)
        device = resolve_device(self.device, f"{type(self).__name__}(device={self.device!r})")
        residual, total, _ = streamed_error(map(clamp, source.blocks(device, self.seed, False)), self.components_.to(device))
        if total == 0:
            raise NMFError(source.name, "all pixel vectors are zero", "choose images or a layer with non-zero activations")
        self.fidelity_ = math.sqrt(residual / total)
        return self.fidelity_

    def output_fidelity(self, activations_batches: Iterable[torch.Tensor | ProbeBatch], head: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Output fidelity ``mean_x |y(A) − y(S·P)| / (|mean_x y(A)| + 1e-4)`` (docs/METHODS.md §4).

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
            raise NMFError(f"{type(self).__name__}.output_fidelity", "got no activations", "pass at least one batch")
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
        device = resolve_device(self.device, f"{type(self).__name__}(device={self.device!r})")
        self.labels_ = match_labels(self.concept_maps, entry, masks_entry, indices, threshold, device, type(self).__name__)
        return self.labels_

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
            projection="nnls_codes",
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
                "online": self._online,
                "n_components": self.n_components,
                "max_iter": self.max_iter,
                "tol": self.tol,
                "batch_size": getattr(self, "batch_size", None),
                "n_iter": self.n_iter_,
                "relative_error": self.relative_error_,
                "n_pixels": self.n_pixels_,
            },
            "clamp": {"clamp": self.clamp, "clamped_fraction": self.clamped_fraction_},
            "seed": self.seed,
            "versions": package_versions(),
        }

    # ------------------------------------------------------------------------- scikit-learn
    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            name = type(self).__name__
            raise NMFNotFittedError(name, "is not fitted yet", f"call {name}.fit() first")

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "components_")

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = self.clamp is False  # clamp=True clamps negative input itself
        tags.transformer_tags.preserves_dtype = ["float32"]  # codes are float32 whatever the input
        return tags


class NMFConcepts(_BaseNMFConcepts):
    """Unsupervised concept vectors (NCAVs) of one layer by full-batch NMF (ICE, docs/METHODS.md §4).

    The pixel matrix is held in memory (on the device). For data larger than memory, use
    :class:`MiniBatchNMFConcepts`.

    Parameters
    ----------
    n_components : int, default=10
        Number of NCAVs ``k``.
    solver : {'hals', 'mu', 'sklearn'}, default='hals'
        ``'hals'``: torch coordinate descent (fast, default); ``'mu'``: torch multiplicative
        updates; ``'sklearn'``: :class:`sklearn.decomposition.NMF` with ``init='nndsvda'``,
        on the CPU, for reference.
    max_iter : int, default=200
        Maximum iterations (one update of ``S`` and one of ``P`` each).
    tol : float, default=1e-4
        Stop when the relative error improved by less than ``tol × initial error`` over the
        last 10 iterations (scikit-learn's MU criterion). ``'sklearn'`` uses scikit-learn's own
        criterion with this ``tol``.
    clamp : bool, default=True
        Clamp activations at zero (layers with signed outputs: SiLU, FPN, pre-activation
        convolutions). With ``False``, negative input is an error.
    seed : int, default=0
        Seeds the initialisation (the randomized SVD of NNDSVD-a, drawn as scikit-learn draws
        it). Fits are deterministic for a seed on a given device.
    device : str, default='auto'
        ``'auto'`` = CUDA when present, else CPU. Ignored by ``'sklearn'``.
    progress : bool, optional
        Show progress bars; ``None`` shows them when stderr is a terminal.

    Attributes
    ----------
    components_ : Tensor
        ``(k, C)`` float32 on the CPU: the NCAVs, each row of unit L2 norm.
    n_components_ : int
        ``k``.
    reconstruction_err_ : float
        ``‖V − S·P‖_F`` on the fit data (clamped).
    relative_error_ : float
        ``reconstruction_err_ / ‖V‖_F``.
    error_curve_ : list of float
        Relative error after each iteration. Empty for ``'sklearn'``.
    n_iter_ : int
        Iterations run.
    n_features_in_ : int
        Channels ``C``.
    n_pixels_ : int
        Pixel vectors fitted on.
    clamped_fraction_ : float
        Fraction of input entries that were negative (and set to zero).
    data_ : dict
        Where the fit data came from: store key, model hash, layer, image count and a hash of
        the indices (for a tensor or array: its shape).
    fidelity_ : float
        Relative reconstruction error on held-out images; set by :meth:`fidelity`.
    output_fidelity_ : float
        Set by :meth:`output_fidelity`.
    labels_ : dict
        Set by :meth:`label`.

    See Also
    --------
    MiniBatchNMFConcepts : the online variant, for data larger than memory.

    Examples
    --------
    >>> pixels = torch.rand(500, 8)
    >>> ncavs = NMFConcepts(n_components=3, device="cpu").fit(pixels)
    >>> ncavs.components_.shape, ncavs.transform(pixels).shape
    (torch.Size([3, 8]), torch.Size([500, 3]))
    >>> NMFConcepts(n_components=3, device="cpu").fit_transform(pixels.numpy()).shape  # arrays in, arrays out
    (500, 3)
    """

    def __init__(
        self,
        n_components: int = 10,
        *,
        solver: str = "hals",
        max_iter: int = 200,
        tol: float = 1e-4,
        clamp: bool = True,
        seed: int = 0,
        device: str = "auto",
        progress: bool | None = None,
    ) -> None:
        self.n_components = n_components
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.clamp = clamp
        self.seed = seed
        self.device = device
        self.progress = progress

    def _fit_source(self, source: PixelSource, device: torch.device) -> FitResult:
        clamp = Clamp(self.clamp, source.name)
        pixels = clamp(source.matrix(device, self._show()))
        check_fittable(pixels, source.name)
        if self.solver == "sklearn":
            result = fit_sklearn(pixels, self.n_components, self.tol, self.max_iter, self.seed)
        else:
            result = fit_torch(pixels, self.n_components, self.solver, self.max_iter, self.tol, self.seed, self._show())
        result.clamped_fraction = clamp.fraction
        return result


class MiniBatchNMFConcepts(_BaseNMFConcepts):
    """NCAVs by online NMF (Mairal et al. 2010): the pixels are streamed in minibatches, never held.

    Each pass codes every minibatch of ``batch_size`` pixels by NNLS against the current
    components, replaces that minibatch's part of the sufficient statistics ``A = Σ SᵀS``,
    ``B = Σ SᵀV`` and updates the components on them by HALS sweeps (multiplicative steps for
    ``'mu'``). Pixel memory is bounded by the minibatch; the statistics take ``k·(k + C)`` numbers
    per minibatch. Use it when the pixel matrix does not fit in (device) memory; otherwise
    :class:`NMFConcepts` is faster and exact.

    Parameters
    ----------
    n_components : int, default=10
        Number of NCAVs ``k``.
    batch_size : int, default=8192
        Pixels per minibatch, at least ``n_components``.
    solver : {'hals', 'mu'}, default='hals'
        Update of the components on the statistics: HALS sweeps or multiplicative steps.
        (scikit-learn's solver needs the pixel matrix in memory: ``NMFConcepts(solver='sklearn')``.)
    max_iter : int, default=200
        Maximum passes over the data.
    tol : float, default=1e-4
        Stop when the relative error (estimated per pass, each minibatch coded against the
        components of that moment) improved by less than ``tol × first pass's error``.
    clamp : bool, default=True
        Clamp activations at zero. With ``False``, negative input is an error.
    seed : int, default=0
        Seeds the initialisation (NNDSVD-a on the first 20 000 streamed pixels) and the pixel
        order, the same every pass. Fits are deterministic for a seed on a given device.
    device : str, default='auto'
        ``'auto'`` = CUDA when present, else CPU.
    progress : bool, optional
        Show progress bars; ``None`` shows them when stderr is a terminal.

    Attributes
    ----------
    components_ : Tensor
        ``(k, C)`` float32 on the CPU: the NCAVs, each row of unit L2 norm.
    n_components_ : int
        ``k``.
    reconstruction_err_ : float
        ``‖V − S·P‖_F`` on the fit data (clamped), with NNLS codes of the final components.
        After :meth:`partial_fit`: on the data of the last call, each minibatch coded against
        the components of its step.
    relative_error_ : float
        ``reconstruction_err_ / ‖V‖_F``.
    error_curve_ : list of float
        Estimated relative error per pass (each minibatch coded against the components of that
        moment); :meth:`partial_fit` appends one value per call.
    n_iter_ : int
        Passes run by :meth:`fit` (0 when only :meth:`partial_fit` ran).
    n_steps_ : int
        Minibatches processed (updates of the components).
    n_features_in_ : int
        Channels ``C``.
    n_pixels_ : int
        Pixel vectors fitted on.
    clamped_fraction_ : float
        Fraction of input entries that were negative (and set to zero).
    data_ : dict
        Where the fit data came from (as :class:`NMFConcepts`); ``{"source": "partial_fit",
        "fit": …}`` after :meth:`partial_fit`, with the data of the fit it continued.
    fidelity_, output_fidelity_, labels_
        As :class:`NMFConcepts`.

    See Also
    --------
    NMFConcepts : full-batch NMF, when the pixel matrix fits in memory.

    Examples
    --------
    >>> pixels = torch.rand(3000, 8)
    >>> ncavs = MiniBatchNMFConcepts(n_components=3, batch_size=1000, device="cpu").fit(pixels)
    >>> ncavs.components_.shape, ncavs.n_steps_ == 3 * ncavs.n_iter_
    (torch.Size([3, 8]), True)
    >>> streamed = MiniBatchNMFConcepts(n_components=3, batch_size=1000, device="cpu")
    >>> for chunk in pixels.split(1000):
    ...     streamed = streamed.partial_fit(chunk)
    >>> streamed.n_steps_, streamed.n_pixels_
    (3, 3000)
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_BaseNMFConcepts._parameter_constraints,
        "batch_size": [Interval(int, 1, None)],
        "solver": [Options(*ONLINE_SOLVERS)],
    }
    _online = True

    def __init__(
        self,
        n_components: int = 10,
        *,
        batch_size: int = 8192,
        solver: str = "hals",
        max_iter: int = 200,
        tol: float = 1e-4,
        clamp: bool = True,
        seed: int = 0,
        device: str = "auto",
        progress: bool | None = None,
    ) -> None:
        self.n_components = n_components
        self.batch_size = batch_size
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.clamp = clamp
        self.seed = seed
        self.device = device
        self.progress = progress

    def _validate(self) -> None:
        validate_params(self)
        if self.batch_size < self.n_components:
            name = type(self).__name__
            raise ParameterError(f"{name}(batch_size={self.batch_size!r})", f"is smaller than n_components={self.n_components}",
                                 f"pass batch_size as an integer ≥ n_components ({self.n_components})")

    def _fit_source(self, source: PixelSource, device: torch.device) -> FitResult:
        clamp = Clamp(self.clamp, source.name)
        # the same seeded order every pass, so that minibatch b holds the same pixels each time
        stream = lambda clamp: minibatches(map(clamp, source.blocks(device, self.seed, True)), self.batch_size)  # noqa: E731
        components = online_init(stream(Clamp(self.clamp, source.name)), self.n_components, self.seed, source.name)
        statistics = OnlineStatistics()
        errors: list[float] = []
        for epoch in progress_bar(range(self.max_iter), desc="NMF passes", unit="pass", show=self._show()):
            errors.append(online_pass(stream(clamp), components, statistics, self.solver))
            clamp.counting = False  # negatives are counted on the first pass
            if epoch > 0 and self.tol > 0 and errors[-2] - errors[-1] < self.tol * errors[0]:
                break
        self.n_steps_ = len(errors) * len(statistics.parts)
        norms = normalise_rows(components)
        self._keep_statistics(statistics, norms)
        residual, total, pixels = streamed_error(map(Clamp(self.clamp, source.name), source.blocks(device, self.seed, False)), components)
        return FitResult(components, math.sqrt(residual), math.sqrt(residual / total), errors, len(errors), pixels, clamp.fraction)

    def _keep_statistics(self, statistics: OnlineStatistics, norms: torch.Tensor) -> None:
        """Keep the statistics (merged, scaled to the unit-norm components) for :meth:`partial_fit`."""
        statistics.merge()
        statistics.rescale(norms)
        self._statistics = statistics

    def partial_fit(self, X: torch.Tensor | np.ndarray, y: None = None) -> MiniBatchNMFConcepts:
        """Update the NCAVs with one more chunk of data (streaming from any source).

        ``X`` is cut into minibatches of ``batch_size`` (in order); each is coded by NNLS against
        the current components, its statistics are *added* to those of all data seen so far
        (including a previous :meth:`fit`'s), and the components are updated on them. The first
        call (without a fit) initialises the components from ``X``.

        Parameters
        ----------
        X : Tensor, ndarray or array-like
            ``(N, C)`` pixel vectors or ``(N, C, h, w)`` activations.
        y : None
            Ignored.

        Returns
        -------
        self
            The updated estimator.
        """
        name = type(self).__name__
        first = getattr(self, "_statistics", None) is None
        self._validate()
        source = pixel_source(X, None, f"{name}.partial_fit")
        if not first:
            self._checked_input(source.pixels, "partial_fit", self.n_features_in_, "features")
        elif self.n_components > source.channels():
            raise NMFError(source.name, f"has {source.channels()} channels, fewer than n_components={self.n_components}",
                           f"use n_components ≤ {source.channels()} for this layer")
        device = self._fit_device()
        clamp = Clamp(self.clamp, source.name)
        stream = lambda clamp: minibatches(map(clamp, source.blocks(device, self.seed, False)), self.batch_size)  # noqa: E731
        if first:
            components = online_init(stream(Clamp(self.clamp, source.name)), self.n_components, self.seed, source.name)
            statistics = OnlineStatistics()
        else:  # work on copies: a call that fails leaves the estimator as it was
            components, statistics = self.components_.to(device).clone(), self._statistics.copy()
        before = len(statistics.parts)
        error = online_pass(stream(clamp), components, statistics, self.solver, first=before)
        steps = len(statistics.parts) - before
        self._keep_statistics(statistics, normalise_rows(components))
        self._store_partial(components, error, source, clamp, steps, first)
        return self

    def _store_partial(self, components: torch.Tensor, error: float, source: PixelSource, clamp: Clamp, steps: int, first: bool) -> None:
        """Fitted attributes after a :meth:`partial_fit` call, pooling counts with the data seen before."""
        pixels, channels = source.pixels.shape
        seen = 0 if first else self.n_pixels_
        negatives = clamp.negative + (0.0 if first else self.clamped_fraction_ * seen * channels)
        previous = None if first else self.data_
        continued = previous.get("fit") if previous is not None and previous.get("source") == "partial_fit" else previous
        norm = float(torch.linalg.vector_norm(source.pixels.float().clamp(min=0), dtype=torch.float64))
        curve, n_iter, n_steps = ([], 0, 0) if first else (self.error_curve_, self.n_iter_, self.n_steps_)
        self._store_result(FitResult(components, error * norm, error, [*curve, error], n_iter, seen + pixels), {"source": "partial_fit", "fit": continued})
        self.clamped_fraction_ = negatives / ((seen + pixels) * channels)
        self.n_steps_ = n_steps + steps


# ------------------------------------------------------------------------------------- labels
def match_labels(
    concept_maps: Callable[[torch.Tensor], torch.Tensor], entry: StoreEntry, masks_entry: StoreEntry,
    indices: Sequence[int] | None = None, threshold: float = 0.5, device: torch.device | str = "cpu", owner: str = "NMFConcepts",
) -> dict[int, dict[str, Any]]:
    """:meth:`NMFConcepts.label` for any NCAV map function (e.g. a stored bank's ``concept_maps``).

    The same matching IoU against other masks — the permuted-masks control of an NCAV's match
    (``masks_entry`` of a :class:`~conceptlens.concepts.data.permuted.PermutedMasks` view) — comes
    from the same maps: the per-NCAV maxima depend on the activations only.
    """
    concepts = list(masks_entry.manifest()["dataset"]["concepts"])
    reduce = reduction(entry)
    indices = None if indices is None else checked_indices(entry, indices, entry.manifest()["n_items"])
    batches = lambda: iter_batches(entry, masks_entry, indices, IMAGE_BATCH, device=device)  # noqa: E731
    maxima = None
    for batch in batches():
        maps = _grid_maps(concept_maps, batch, reduce, owner)
        batch_max = maps.amax(dim=(0, 2, 3))
        maxima = batch_max if maxima is None else torch.maximum(maxima, batch_max)
    if maxima is None:
        raise NMFError(entry.path.name, "no images to label with", "give non-empty indices")
    counts = _OverlapCounts()
    for batch in batches():
        predicted = _grid_maps(concept_maps, batch, reduce, owner) / maxima.clamp(min=torch.finfo(torch.float32).tiny).view(1, -1, 1, 1) > threshold
        counts.add(predicted, batch.masks >= 0.5, batch.valid)
    return counts.labels(concepts)


def _grid_maps(concept_maps: Callable[[torch.Tensor], torch.Tensor], batch: ProbeBatch, reduce: str, owner: str) -> torch.Tensor:
    maps = concept_maps(batch.activations)
    if maps.dim() != 4:
        raise NMFError(f"{owner}.label", f"activations of shape {tuple(batch.activations.shape)} have no spatial maps", "embed the layer with reduce='native' or 'grid'")
    grid = tuple(batch.masks.shape[-2:])
    if reduce != "grid":
        return features_to_grid(maps, batch.geometries, grid)
    return maps if tuple(maps.shape[-2:]) == grid else F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)


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


def _like(result: torch.Tensor, data: Any) -> torch.Tensor | np.ndarray:
    """``result`` as a tensor when ``data`` was one, else as a numpy array (arrays in, arrays out)."""
    return result if isinstance(data, torch.Tensor) else result.cpu().numpy()

"""Net2Vec pixel-level concept probes (Fong & Vedaldi 2018; docs/METHODS.md §2).

A probe of one layer is a 1×1 convolution C→K with bias: ``z = W·a + b`` at every position of the
layer's native activation map, one output per concept, trained on grid masks. The logits are
computed at native resolution and then bilinearly resampled onto the concept grid over the
original image (:func:`conceptlens.concepts.geometry.features_to_grid`). Resampling commutes with the 1×1
convolution, so this equals probing upsampled activations, at a fraction of the cost.

:class:`Net2VecProbe` is a scikit-learn estimator: ``fit(X, y)`` on plain tensors or arrays
(activations ``(N, C, h, w)`` or pixel vectors ``(N, C)``, masks on the same grid), ``transform``
to concept probability maps, ``get_params`` / ``set_params`` / ``clone``. Fitting from the
activation store, ``fit(activation_entry, mask_entry)``, is the same estimator reading another
batch source (:mod:`conceptlens.probes.data`): the data streams shard by shard, the training loop
is one.

Targets and ground truth:

* the losses use the soft grid masks (covered fraction of each grid cell, docs/METHODS.md §2);
* metrics and early stopping use binary masks, **covered fraction ≥ 0.5**;
* an (image, concept) pair with ``valid=False`` counts neither in the loss nor in the metrics of
  that concept.

The K outputs are independent: the loss is a sum of per-concept losses, Adam adapts each weight
on its own, and early stopping keeps each concept's best epoch separately, so fitting K concepts
together gives the weights of K single-concept fits.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils import ClassifierTags, Tags
from conceptlens.concepts.progress import finish_early, progress_bar

from conceptlens.concepts.environment import package_versions, resolve_device
from conceptlens.concepts.errors import ConceptLensError, DataError, LayerError
from conceptlens.concepts.geometry import Geometry, features_to_grid, image_cells
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.vectors.bank import BankError, ConceptBank
from conceptlens.probes.data import (
    ArrayInputError,
    ArraySource,
    BatchSource,
    ProbeBatch,
    StoreSource,
    as_activations,
    as_masks,
    holdout_split,
    identity_geometries,
)
from conceptlens.probes.metrics import SegmentationMetrics
from conceptlens.probes.params import Interval, Options, ParameterError, Predicate, validate_params

__all__ = ["ChannelMismatchError", "LOSSES", "Net2VecProbe", "ProbeNotFittedError", "VARIANTS"]

LOSSES = ("net2vec", "bce", "dice", "tversky")
VARIANTS = ("default", "original")
MASK_THRESHOLD = 0.5  # a grid cell belongs to the concept when its covered fraction is ≥ this
TOP_QUANTILE = 0.005  # original Net2Vec: binarise each channel at its top 0.5 %
QUANTILE_BINS = 4096  # per-channel histogram bins of the streaming quantile estimate
SMOOTH = 1e-6  # Dice/Tversky smoothing


class ProbeNotFittedError(ConceptLensError, NotFittedError):
    """A probe used before ``fit`` (also scikit-learn's ``NotFittedError``)."""


class ChannelMismatchError(LayerError, ValueError):
    """Activations whose channel count differs from the layer the probe was trained on (also a ``ValueError``)."""


@dataclass(frozen=True)
class _Settings:
    """Optimiser settings resolved from the hyper-parameters and the variant."""

    optimizer: str
    lr: float
    batch_size: int
    momentum: float
    bias: bool


@dataclass(frozen=True)
class _Transform:
    """Per-channel transform of activations before the 1×1 convolution (all None: identity)."""

    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    threshold: torch.Tensor | None = None


@dataclass
class _Statistics:
    """Per-concept and per-channel statistics of the train split (one streaming pass)."""

    alpha: torch.Tensor
    n_channels: int
    pixel_mean: torch.Tensor
    channel_mean: torch.Tensor | None = None
    channel_std: torch.Tensor | None = None
    channel_threshold: torch.Tensor | None = None


def _is_device(value: Any) -> bool:
    return isinstance(value, (str, torch.device))


class Net2VecProbe(TransformerMixin, BaseEstimator):
    """Pixel-level concept vectors of one layer: a C→K 1×1 convolution trained on grid masks.

    Parameters
    ----------
    loss : {'net2vec', 'bce', 'dice', 'tversky'}
        ``net2vec``: ``−mean[α·m·p + (1−α)(1−m)(1−p)]`` with ``α = 1 −`` the concept's mean
        foreground fraction over its training images. ``bce``: BCE-with-logits with the same
        per-pixel weights, ``−mean[α·m·log p + (1−α)(1−m)·log(1−p)]``. ``dice``: soft Dice over
        the batch. ``tversky``: soft Tversky index over the batch (``tversky_alpha`` weighs false
        positives, ``tversky_beta`` false negatives). α is computed for every loss but only the
        first two use it.
    lr : float, optional
        Learning rate; default 1e-3 (Adam), 1e-4 (SGD) for ``variant='original'``.
    batch_size : int, optional
        Images per step; default 64, 16 for ``variant='original'``. A batch never spans two
        activation shards, so it can be smaller.
    max_epochs : int
        Upper bound on passes over the train split.
    patience : int
        A concept stops improving after this many epochs without a better validation set IoU;
        training ends when every concept has stopped. Each concept keeps its best epoch's weights.
    standardize : bool
        Standardise each channel with its mean and std over the train split (image cells only);
        the statistics are stored with the vectors.
    variant : {'default', 'original'}
        ``original`` is the paper's setting: each channel binarised at its top 0.5 % quantile on
        the train split (streamed per-channel histogram, linear interpolation inside the bin), no
        bias, SGD with momentum 0.9. It keeps the default's per-concept early stopping, which the
        paper does not have: after each epoch the validation split's set IoU decides, a concept
        stops after ``patience`` epochs without improvement, and its best validation epoch's
        weights are kept (model selection on the val split; the test split never enters). With
        ``patience >= max_epochs`` every epoch runs, as in the paper, but the best validation
        epoch is still the one kept, not the last.
    init : {'lda', 'zeros'}
        Starting weights. ``lda`` (default): one streaming pass gives each concept Fisher's
        discriminant ``Σ⁻¹(μ₊ − μ₋)`` (total pixel covariance Σ, class means on the concept grid),
        scaled to a 4-logit gap between the class means, threshold at their midpoint — the
        class-balanced optimum the α-weighted loss aims for, which Adam then refines; on a few
        hundred images this converges where a zero start needs thousands of steps. ``zeros``:
        start from zero (the original variant always does).
    tversky_alpha, tversky_beta : float
        Weights of false positives and false negatives in the Tversky loss (non-negative, not
        both zero).
    validation_fraction : float
        Share of the items of a plain-array fit held out, drawn from ``seed``, for early stopping
        (at least one item); unused when ``fit`` gets a validation set or store entries (whose
        dataset records its split).
    seed : int
        Seeds the shuffle order of every epoch (``seed + epoch``) and the validation hold-out.
    device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    progress : bool, optional
        Progress bar over epochs; default: only when stderr is a terminal.

    Attributes
    ----------
    concepts_ : list of str
        Concept names, the order of the K outputs.
    weight_ : Tensor
        ``(K, C)`` float32 concept vectors (in standardised units when ``standardize``).
    bias_ : Tensor
        ``(K,)`` float32 biases (zeros for the original variant).
    alpha_ : Tensor
        ``(K,)`` 1 − mean foreground fraction per concept on the train split.
    channel_mean_, channel_std_ : Tensor or None
        ``(C,)`` standardisation statistics.
    channel_threshold_ : Tensor or None
        ``(C,)`` binarisation thresholds of the original variant.
    history_ : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_set_iou`` (mean over concepts
        with positive validation pixels) and ``val_set_iou_by_concept``.
    best_epoch_ : list of int
        Per concept, the epoch whose weights were kept.
    grid_ : (int, int)
        The concept grid of the training masks (``(1, 1)`` for pixel vectors).
    n_channels_ : int
        Channels C of the layer.
    n_features_in_ : int
        The same C, under scikit-learn's name.
    training_data_ : dict
        Store keys, model hash, layer, dataset (``None`` for plain arrays) and split sizes of the
        training data.

    Notes
    -----
    Without standardisation, activations are centred by their train-split channel means while
    training, and the centring is folded into the bias when weights are kept: the model is the
    plain ``w·a + b``, only the optimisation is better conditioned.

    The original variant cannot be exported to a :class:`~conceptlens.concepts.vectors.bank.ConceptBank` (a bank
    has no binarisation step); :meth:`to_bank` refuses it.

    On CUDA, the backward pass of bilinear resampling accumulates with atomics, so two runs with
    the same seed can differ in the last bits; on the CPU they are identical.

    Examples
    --------
    Channel 3 carries the concept's mask; the probe finds it:

    >>> import torch
    >>> from conceptlens.probes.net2vec import Net2VecProbe
    >>> masks = (torch.rand(40, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    >>> X = torch.randn(40, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    >>> X[:, 3] += 4 * masks
    >>> probe = Net2VecProbe(max_epochs=5, progress=False, device="cpu").fit(X, masks, concepts=["stripe"])
    >>> int(probe.weight_[0].argmax()), tuple(probe.transform(X).shape)
    (3, (40, 1, 6, 6))
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "loss": [Options(*LOSSES)],
        "lr": [Interval(float, 0, None, closed="neither"), Options(None)],
        "batch_size": [Interval(int, 1, None), Options(None)],
        "max_epochs": [Interval(int, 1, None)],
        "patience": [Interval(int, 1, None)],
        "standardize": [Options(True, False)],
        "variant": [Options(*VARIANTS)],
        "init": [Options("lda", "zeros")],
        "tversky_alpha": [Interval(float, 0, None)],
        "tversky_beta": [Interval(float, 0, None)],
        "validation_fraction": [Interval(float, 0, 1, closed="neither")],
        "seed": [Interval(int, 0, None)],
        "device": [Predicate(_is_device, "a device name: 'auto', 'cpu', 'cuda' or 'cuda:N'")],
        "progress": [Options(None, True, False)],
    }

    def __init__(
        self,
        loss: str = "net2vec",
        lr: float | None = None,
        batch_size: int | None = None,
        max_epochs: int = 30,
        patience: int = 5,
        standardize: bool = False,
        variant: str = "default",
        init: str = "lda",
        tversky_alpha: float = 0.3,
        tversky_beta: float = 0.7,
        validation_fraction: float = 0.2,
        seed: int = 0,
        device: str = "auto",
        progress: bool | None = None,
    ) -> None:
        self.loss = loss
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.standardize = standardize
        self.variant = variant
        self.init = init
        self.tversky_alpha = tversky_alpha
        self.tversky_beta = tversky_beta
        self.validation_fraction = validation_fraction
        self.seed = seed
        self.device = device
        self.progress = progress

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True  # the masks
        tags.target_tags.multi_output = True  # K concepts at once
        tags.transformer_tags.preserves_dtype = ["float32"]  # maps are float32 whatever the input
        # each concept is a binary per-cell classification, several at once: masks are 0/1
        tags.classifier_tags = ClassifierTags(multi_class=False, multi_label=True)
        return tags

    # ------------------------------------------------------------------------------------- fit
    def fit(
        self,
        X: torch.Tensor | np.ndarray | StoreEntry,
        y: torch.Tensor | np.ndarray | StoreEntry | None = None,
        *,
        concepts: Sequence[str] | None = None,
        validation: tuple[Any, Any] | None = None,
    ) -> Net2VecProbe:
        """Train on the train split, early-stop on the validation split's set IoU.

        Parameters
        ----------
        X : Tensor, ndarray or StoreEntry
            Activations: ``(N, C, h, w)`` maps or ``(N, C)`` pixel vectors in memory, or a store
            entry of native activations ``(C, h, w)`` per image of one layer (``reduce='native'``).
        y : Tensor, ndarray or StoreEntry
            Concept masks, values in [0, 1]: on the grid of ``X`` in memory — ``(N, K, h, w)``
            or ``(N, h, w)`` for maps, ``(N, K)`` or ``(N,)`` for pixel vectors, the forms
            without K holding one concept — or the grid-mask entry of the same dataset
            (:func:`conceptlens.concepts.embedding.masks.embed_masks`).
        concepts : sequence of str, optional
            Names of the K concepts of plain masks; default ``concept_0``, ``concept_1``, ….
            A mask entry records its own.
        validation : (X_val, y_val), optional
            Plain items for early stopping; then every item of ``X`` trains. Default: a share
            ``validation_fraction`` of the items, drawn from ``seed``. Store entries use their
            dataset's ``train`` and ``val`` splits.

        Returns
        -------
        Net2VecProbe
            ``self``, fitted.
        """
        settings = self._settings()
        if isinstance(X, StoreEntry) or isinstance(y, StoreEntry):
            source = self._store_source(X, y, concepts, validation)
        else:
            source = self._array_source(X, y, concepts, validation)
        return self._fit_source(source, settings)

    def _store_source(self, activations: Any, masks: Any, concepts: Any, validation: Any) -> StoreSource:
        """The store form: two aligned entries, the layer's native maps and the dataset's grid masks."""
        if not (isinstance(activations, StoreEntry) and isinstance(masks, StoreEntry)):
            raise DataError(
                f"{type(self).__name__}.fit({type(activations).__name__}, {type(masks).__name__})",
                "one store entry and one array: activations and masks come both from the store or both from memory",
                "pass the activation entry with its mask entry, or two arrays",
            )
        if concepts is not None or validation is not None:
            raise DataError(
                f"{type(self).__name__}.fit(concepts=..., validation=...) with store entries",
                "a mask entry records its concepts and its dataset's split",
                "drop concepts= and validation=, or fit plain arrays",
            )
        source = StoreSource(activations, masks)
        _check_native(activations)
        return source

    def _array_source(self, X: Any, y: Any, concepts: Sequence[str] | None, validation: tuple[Any, Any] | None) -> ArraySource:
        """The in-memory form: checked arrays, with a seeded hold-out unless a validation set is given."""
        activations, pixels = as_activations(X, "X")
        masks = as_masks(y, activations, pixels, "y")
        names = _concept_names(concepts, masks.shape[1])
        if validation is None:
            train, val = holdout_split(len(activations), self.validation_fraction, self.seed)
            return ArraySource(activations, masks, names, {"train": train, "val": val})
        val_activations, val_masks = _validation_arrays(validation, activations, masks, pixels)
        n, m = len(activations), len(val_activations)
        return ArraySource(
            torch.cat([activations, val_activations.to(activations)]),
            torch.cat([masks, val_masks.to(masks)]),
            names,
            {"train": np.arange(n), "val": np.arange(n, n + m)},
        )

    def _fit_source(self, source: BatchSource, settings: _Settings) -> Net2VecProbe:
        """The one training procedure, whatever the source: statistics, Fisher start, epochs with early stopping."""
        train, val = source.split("train"), source.split("val")
        device = resolve_device(self.device)
        stats = _train_statistics(source, train, settings.batch_size, device, self.standardize, self.variant == "original")
        self._set_data_attributes(source, stats, len(train), len(val))
        start = None
        if self.init == "lda" and self.variant != "original":
            start = _lda_start(source, train, settings.batch_size, device)
        self.weight_, self.bias_ = self._train(source, train, val, settings, device, stats.pixel_mean, start)
        return self

    def _settings(self) -> _Settings:
        """Validate the hyper-parameters and resolve the variant's defaults."""
        validate_params(self)
        name = type(self).__name__
        original = self.variant == "original"
        if original and self.standardize:
            raise ParameterError(f"{name}(standardize=True, variant='original')", "binarised activations cannot be standardised",
                                 "drop one of the two options")
        if self.tversky_alpha + self.tversky_beta <= 0:
            raise ParameterError(f"{name}(tversky_alpha={self.tversky_alpha}, tversky_beta={self.tversky_beta})",
                                 "need non-negative weights, not both zero", "use e.g. 0.3 and 0.7")
        lr = self.lr if self.lr is not None else (1e-4 if original else 1e-3)
        batch_size = self.batch_size if self.batch_size is not None else (16 if original else 64)
        return _Settings("sgd" if original else "adam", float(lr), int(batch_size), 0.9 if original else 0.0, not original)

    def _set_data_attributes(self, source: BatchSource, stats: _Statistics, n_train: int, n_val: int) -> None:
        self.concepts_ = list(source.concepts)
        self.grid_ = source.grid
        self.alpha_ = stats.alpha
        self.channel_mean_, self.channel_std_ = stats.channel_mean, stats.channel_std
        self.channel_threshold_ = stats.channel_threshold
        self.n_channels_ = self.n_features_in_ = stats.n_channels
        self.training_data_ = {**source.record(), "n_train": n_train, "n_val": n_val}

    def _input_transform(self) -> _Transform:
        """The input transform of the fitted model (what predictions and the bank apply)."""
        return _Transform(self.channel_mean_, self.channel_std_, self.channel_threshold_)

    def _train(
        self,
        source: BatchSource,
        train: np.ndarray,
        val: np.ndarray,
        settings: _Settings,
        device: torch.device,
        centre: torch.Tensor,
        start: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Optimise from ``start`` (raw-space weight, bias) or zeros; return each concept's best-epoch (weight, bias)."""
        k, c = len(self.concepts_), self.n_channels_
        # Raw activations are centred during training and the centring is folded into the bias
        # (w·(a − μ) + b = w·a + (b − w·μ)): the same model, but Adam need not chase large
        # channel offsets with the bias while the weights tilt to compensate.
        centred = self.channel_mean_ is None and self.channel_threshold_ is None
        transform = _Transform(mean=centre.to(device)) if centred else self._input_transform()
        weight, bias = _in_transformed_space(start, transform, k, c)
        model = _LinearMaps(
            weight=weight.to(device).requires_grad_(True),
            bias=bias.to(device).requires_grad_(settings.bias),
            transform=transform,
            fold_mean=centred,
        )
        optimizer = _optimizer(model, settings)
        stopping = _EarlyStopping(*model.exported(), self.patience)
        self.history_ = []
        show = sys.stderr.isatty() if self.progress is None else bool(self.progress)
        epochs = progress_bar(range(self.max_epochs), desc="net2vec", unit="epoch", show=show)
        for epoch in epochs:
            train_loss = self._train_epoch(source, train, model, optimizer, settings.batch_size, epoch, device)
            val_iou, val_loss = self._validate(source, val, model, settings.batch_size, device)
            stopping.update(epoch, _stopping_scores(val_iou, val_loss), *model.exported())
            self.history_.append(_epoch_record(epoch, train_loss, val_loss, val_iou, self.concepts_))
            epochs.set_postfix(loss=f"{train_loss:.4f}", val_iou=self.history_[-1]["val_set_iou"])
            if stopping.done:
                finish_early(epochs, epoch + 1, f"stopped early at epoch {epoch + 1}: validation IoU no longer improving")
                break
        epochs.close()
        _warn_without_val_positives(val_iou, self.concepts_)
        self.best_epoch_ = stopping.best_epoch.tolist()
        return stopping.weight, stopping.bias

    def _train_epoch(
        self, source: BatchSource, indices: np.ndarray, model: _LinearMaps, optimizer: torch.optim.Optimizer,
        batch_size: int, epoch: int, device: torch.device,
    ) -> float:
        """One pass over the train split in a seeded order; return the mean loss per image."""
        total, images = 0.0, 0
        for batch in source.batches(indices, batch_size, shuffle=True, seed=self.seed + epoch, device=device):
            losses = self._losses(model.grid_logits(batch.activations, batch.geometries, source.grid), batch.masks, batch.valid)
            optimizer.zero_grad()
            losses.sum().backward()  # a sum keeps the K outputs independent
            optimizer.step()
            total += float(losses.detach().mean()) * len(batch.indices)
            images += len(batch.indices)
        return total / images

    @torch.no_grad()
    def _validate(
        self, source: BatchSource, indices: np.ndarray, model: _LinearMaps, batch_size: int, device: torch.device
    ) -> tuple[list[float | None], torch.Tensor]:
        """Set IoU (None without positive pixels) and mean loss per concept on the validation split."""
        metrics = SegmentationMetrics(self.concepts_, thresholds=(MASK_THRESHOLD,), bins=1)
        loss_sum = torch.zeros(len(self.concepts_), dtype=torch.float64)
        pairs = torch.zeros(len(self.concepts_), dtype=torch.float64)
        for batch in source.batches(indices, batch_size, device=device):
            logits = model.grid_logits(batch.activations, batch.geometries, source.grid)
            counted = batch.valid.sum(dim=0).double().cpu()
            loss_sum += self._losses(logits, batch.masks, batch.valid).double().cpu() * counted
            pairs += counted
            metrics.update(torch.sigmoid(logits), batch.masks >= MASK_THRESHOLD, batch.valid)
        ious = [result["set_iou"] for result in metrics.compute().values()]
        return ious, loss_sum / pairs.clamp(min=1)

    def _losses(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-concept loss ``(K,)`` of a batch on the grid."""
        if self.loss in ("net2vec", "bce"):
            return _weighted_loss(logits, targets, valid, self.alpha_.to(logits.device), log=self.loss == "bce")
        fp_weight, fn_weight = (0.5, 0.5) if self.loss == "dice" else (self.tversky_alpha, self.tversky_beta)
        return _tversky_loss(logits, targets, valid, fp_weight, fn_weight)

    # --------------------------------------------------------------------------------- predict
    def predict_proba(
        self, X: torch.Tensor | np.ndarray, geometries: Sequence[Geometry] | None = None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor | np.ndarray:
        """Concept probabilities, ``sigmoid(w·a + b)`` per cell and concept.

        Parameters
        ----------
        X : Tensor or ndarray
            ``(N, C, h, w)`` native activations of the layer, or ``(N, C)`` pixel vectors.
        geometries : sequence of Geometry, optional
            One per image (stored next to the activations): the maps are then sampled on a
            concept grid over each original image. Default: each map is its own image.
        grid : (int, int), optional
            Concept grid; default: the training grid ``grid_`` with ``geometries``, the
            activation map ``(h, w)`` without.

        Returns
        -------
        Tensor or ndarray
            ``(N, K, Gh, Gw)`` float32 — ``(N, K)`` for pixel vectors — a tensor on the device
            of a tensor ``X``, an ndarray for an ndarray.
        """
        return self._maps(X, geometries, grid, "predict_proba")

    def predict(
        self, X: torch.Tensor | np.ndarray, geometries: Sequence[Geometry] | None = None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor | np.ndarray:
        """Binary concept masks, ``probability > 0.5``: the shape of :meth:`predict_proba`, bool."""
        return self._maps(X, geometries, grid, "predict") > 0.5

    def transform(self, X: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Concept probability maps of plain activations: :meth:`predict_proba` without geometries.

        Parameters
        ----------
        X : Tensor or ndarray
            ``(N, C, h, w)`` activation maps or ``(N, C)`` pixel vectors.

        Returns
        -------
        Tensor or ndarray
            ``(N, K, h, w)`` or ``(N, K)`` float32, the type of ``X``.
        """
        return self._maps(X, None, None, "transform")

    @torch.no_grad()
    def _maps(self, X: Any, geometries: Sequence[Geometry] | None, grid: tuple[int, int] | None, method: str) -> torch.Tensor | np.ndarray:
        """Check plain activations and return their probabilities, in the type of ``X``."""
        self._check_fitted(method)
        if isinstance(X, StoreEntry):
            raise ArrayInputError(
                f"store entry {X.key}", "predictions are for activations in memory",
                "read its items (conceptlens.probes.data.iter_batches), or use evaluate() or to_bank().concept_maps",
            )
        activations, pixels = as_activations(X, "X")
        self._check_channels(tuple(activations.shape[:2] if pixels else activations.shape))
        if not isinstance(X, torch.Tensor):
            activations = activations.to(resolve_device(self.device))
        if geometries is None:
            geometries = identity_geometries(len(activations), tuple(activations.shape[-2:]))
            grid = (1, 1) if pixels else tuple(grid or activations.shape[-2:])
        elif pixels:
            raise ArrayInputError("geometries with (N, C) pixel vectors", "pixel vectors have no image geometry", "pass (N, C, h, w) maps, or no geometries")
        probabilities = self._probabilities(activations, geometries, grid)
        probabilities = probabilities[:, :, 0, 0] if pixels else probabilities
        return probabilities if isinstance(X, torch.Tensor) else probabilities.cpu().numpy()

    def _probabilities(self, activations: torch.Tensor, geometries: Sequence[Geometry], grid: tuple[int, int] | None) -> torch.Tensor:
        """Probabilities of checked ``(B, C, h, w)`` activations on ``grid`` (default ``grid_``)."""
        self._check_channels(tuple(activations.shape))
        model = _LinearMaps(self.weight_, self.bias_, self._input_transform())
        return torch.sigmoid(model.grid_logits(activations, geometries, tuple(grid or self.grid_)))

    def _check_fitted(self, method: str) -> None:
        if not hasattr(self, "weight_"):
            raise ProbeNotFittedError(f"{type(self).__name__}.{method}", "this probe is not fitted yet", "call fit(X, y) first")

    def _check_channels(self, shape: tuple[int, ...]) -> None:
        if len(shape) in (2, 4) and shape[1] != self.n_channels_:
            layer = self.training_data_["layer"]
            raise ChannelMismatchError(
                f"layer {layer!r}" if layer else f"activations of shape {shape}",
                f"the probe expects (N, {self.n_channels_}, h, w) or (N, {self.n_channels_}) activations, got {shape}: "
                f"X has {shape[1]} features, but {type(self).__name__} is expecting {self.n_channels_} features as input",
                "pass activations of the layer the probe was trained on",
            )

    def evaluate(
        self, X: torch.Tensor | np.ndarray | StoreEntry, y: torch.Tensor | np.ndarray | StoreEntry, split: str = "test",
        *, concepts: Sequence[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Set IoU, mean IoU, AUC-PR and IoU by threshold per concept.

        Parameters
        ----------
        X, y : Tensor, ndarray or StoreEntry
            Activations and masks in the forms :meth:`fit` takes.
        split : str
            With store entries, the dataset split to evaluate; plain arrays are evaluated whole.
        concepts : sequence of str, optional
            Names of the concepts of plain masks; default the probe's own.

        Returns
        -------
        dict
            ``{concept: metrics}`` (see :meth:`conceptlens.probes.metrics.SegmentationMetrics.compute`).
        """
        self._check_fitted("evaluate")
        if isinstance(X, StoreEntry) or isinstance(y, StoreEntry):
            source = self._store_source(X, y, None, None)
            indices, culprit = source.split(split), f"mask entry {y.key}"
        else:
            activations, pixels = as_activations(X, "X")
            masks = as_masks(y, activations, pixels, "y")
            names = list(concepts) if concepts is not None else (self.concepts_ if masks.shape[1] == len(self.concepts_) else None)
            source = ArraySource(activations, masks, _concept_names(names, masks.shape[1]))
            indices, culprit = np.arange(len(activations)), "masks y"
        if source.concepts != self.concepts_:
            raise DataError(culprit, f"holds concepts {source.concepts}, the probe was trained on {self.concepts_}",
                            "evaluate on masks of the same concepts")
        metrics = SegmentationMetrics(self.concepts_)
        device = resolve_device(self.device)
        with torch.no_grad():
            for batch in source.batches(indices, self._settings().batch_size, device=device):
                probabilities = self._probabilities(batch.activations, batch.geometries, source.grid)
                metrics.update(probabilities, batch.masks >= MASK_THRESHOLD, batch.valid)
        return metrics.compute()

    # ------------------------------------------------------------------------------ export
    def to_bank(self, layer: str, metrics: dict | None = None, provenance: dict | None = None) -> ConceptBank:
        """Export the concept vectors as a ``net2vec`` :class:`~conceptlens.concepts.vectors.bank.ConceptBank`.

        Parameters
        ----------
        layer : str
            Layer name the vectors live in.
        metrics : dict, optional
            Per-concept metrics to store (e.g. from :meth:`evaluate`).
        provenance : dict, optional
            Extra provenance; its keys override the recorded ones.

        Returns
        -------
        ConceptBank
            Its ``concept_maps(activations, geometries, grid)`` equals :meth:`predict_proba`.
        """
        self._check_fitted("to_bank")
        if self.channel_threshold_ is not None:
            raise BankError(
                f"Net2VecProbe(variant='original') of layer {layer!r}",
                "a concept bank cannot represent binarised activations",
                "use variant='default' to export vectors, or predict with the probe itself",
            )
        recorded = {
            **self.training_data_,
            "method": "net2vec",
            "grid": list(self.grid_),
            "params": self.get_params(),
            "training": asdict(self._settings()),
            "seed": self.seed,
            "best_epoch": dict(zip(self.concepts_, self.best_epoch_)),
            "versions": package_versions(),
        }
        return ConceptBank(
            method="net2vec",
            projection="sigmoid_affine",
            layer=layer,
            concepts=self.concepts_,
            vectors=self.weight_,
            biases=self.bias_,
            channel_mean=self.channel_mean_,
            channel_std=self.channel_std_,
            metrics=dict(metrics or {}),
            provenance={**recorded, **(provenance or {})},
        )


# ---------------------------------------------------------------------------------- the model
@dataclass
class _LinearMaps:
    """The C→K 1×1 convolution and the input transform it sees.

    ``fold_mean``: the transform only centres the activations, and :meth:`exported` folds the
    centring into the bias so that the exported vectors apply to raw activations.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    transform: _Transform
    fold_mean: bool = False

    def grid_logits(self, activations: torch.Tensor, geometries: Sequence[Geometry], grid: tuple[int, int]) -> torch.Tensor:
        """Logits at native resolution, resampled onto the concept grid: (B, K, Gh, Gw)."""
        return features_to_grid(_native_logits(activations, self.weight, self.bias, self.transform), geometries, grid)

    def exported(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, bias)`` for the fitted model's transform."""
        if self.fold_mean:
            return self.weight, self.bias - self.weight @ self.transform.mean
        return self.weight, self.bias


def _optimizer(model: _LinearMaps, settings: _Settings) -> torch.optim.Optimizer:
    parameters = [model.weight, model.bias] if settings.bias else [model.weight]
    if settings.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=settings.lr)
    return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum)


def _native_logits(activations: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, transform: _Transform) -> torch.Tensor:
    """``W·a + b`` per position, (B, C, h, w) -> (B, K, h, w).

    The arithmetic mirrors :meth:`ConceptBank.logits` operation for operation, so that a bank
    exported from the probe reproduces its maps exactly.
    """
    inputs = activations.float()
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    if transform.threshold is not None:
        inputs = (inputs > transform.threshold.to(inputs).view(shape)).float()
    elif transform.mean is not None:
        inputs = inputs - transform.mean.to(inputs).view(shape)
        if transform.std is not None:
            inputs = inputs / transform.std.to(inputs).view(shape)
    scores = torch.einsum("kc,bc...->bk...", weight.to(inputs.device), inputs)
    return scores + bias.to(inputs.device).view(shape)


def _weighted_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, alpha: torch.Tensor, log: bool) -> torch.Tensor:
    """Net2Vec loss (``log=False``) or α-weighted BCE (``log=True``) per concept, over valid pairs."""
    if log:
        foreground, background = F.logsigmoid(logits), F.logsigmoid(-logits)
    else:
        foreground = torch.sigmoid(logits)
        background = 1 - foreground
    a = alpha.view(1, -1, 1, 1)
    terms = a * targets * foreground + (1 - a) * (1 - targets) * background
    weights = valid[:, :, None, None].to(terms.dtype)
    pixels = weights.sum(dim=(0, 2, 3)) * logits.shape[-2] * logits.shape[-1]
    return -(terms * weights).sum(dim=(0, 2, 3)) / pixels.clamp(min=1)


def _tversky_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, fp_weight: float, fn_weight: float) -> torch.Tensor:
    """``1 − TP / (TP + a·FP + b·FN)`` per concept from soft counts pooled over the batch (Dice: a = b = ½)."""
    weights = valid[:, :, None, None].to(logits.dtype)
    probabilities = torch.sigmoid(logits)
    true_positive = (probabilities * targets * weights).sum(dim=(0, 2, 3))
    false_positive = (probabilities * (1 - targets) * weights).sum(dim=(0, 2, 3))
    false_negative = ((1 - probabilities) * targets * weights).sum(dim=(0, 2, 3))
    index = (true_positive + SMOOTH) / (true_positive + fp_weight * false_positive + fn_weight * false_negative + SMOOTH)
    return 1 - index


class _EarlyStopping:
    """Per-concept early stopping: each row keeps its best epoch's weights and stops on its own."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, patience: int) -> None:
        k = weight.shape[0]
        self.patience = patience
        self.best_score = torch.full((k,), -float("inf"), dtype=torch.float64)
        self.best_epoch = torch.full((k,), -1, dtype=torch.int64)
        self.waited = torch.zeros(k, dtype=torch.int64)
        self.stopped = torch.zeros(k, dtype=torch.bool)
        self.weight = weight.detach().cpu().clone()
        self.bias = bias.detach().cpu().clone()

    def update(self, epoch: int, scores: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Record an epoch's validation scores (higher is better) and current weights."""
        active = ~self.stopped
        improved = active & (scores > self.best_score)
        self.best_score[improved] = scores[improved]
        self.best_epoch[improved] = epoch
        self.weight[improved] = weight.detach().cpu()[improved]
        self.bias[improved] = bias.detach().cpu()[improved]
        self.waited[improved] = 0
        self.waited[active & ~improved] += 1
        self.stopped |= self.waited >= self.patience

    @property
    def done(self) -> bool:
        return bool(self.stopped.all())


def _stopping_scores(ious: list[float | None], losses: torch.Tensor) -> torch.Tensor:
    """Validation set IoU per concept; minus the validation loss where no positive pixel exists."""
    return torch.tensor([-float(loss) if iou is None else iou for iou, loss in zip(ious, losses)], dtype=torch.float64)


def _epoch_record(epoch: int, train_loss: float, val_loss: torch.Tensor, val_iou: list[float | None], concepts: list[str]) -> dict[str, Any]:
    measured = [iou for iou in val_iou if iou is not None]
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": float(val_loss.mean()),
        "val_set_iou": float(np.mean(measured)) if measured else None,
        "val_set_iou_by_concept": dict(zip(concepts, val_iou)),
    }


def _warn_without_val_positives(val_iou: list[float | None], concepts: list[str]) -> None:
    missing = [c for c, iou in zip(concepts, val_iou) if iou is None]
    if missing:
        warnings.warn(
            f"concepts {missing} have no positive pixel in the val split: early stopping used their validation loss",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------- the data
def _check_native(activations: StoreEntry) -> None:
    """Refuse a store entry whose activations are not native ``(C, h, w)`` maps."""
    manifest = activations.manifest()
    request = manifest.get("request", {})
    layer = str(request.get("layer", activations.key))
    shape, reduce = manifest.get("item_shape", []), request.get("reduce", "native")
    if reduce != "native" or len(shape) != 3:
        found = f"reduced with reduce={reduce!r}" if reduce != "native" else f"of shape {tuple(shape)} per image"
        raise LayerError(f"layer {layer!r}", f"its stored activations are {found}; pixel probes need native (C, h, w) maps",
                         "embed the layer with reduce='native'")


def _concept_names(concepts: Sequence[str] | None, k: int) -> list[str]:
    """The names of K plain concepts: as given (K distinct strings) or ``concept_0 … concept_{K-1}``."""
    if concepts is None:
        return [f"concept_{j}" for j in range(k)]
    names = [concepts] if isinstance(concepts, str) else list(concepts)
    if len(names) != k or len(set(names)) != k or not all(isinstance(name, str) for name in names):
        raise ArrayInputError(f"concepts={names!r}", f"the masks hold {k} concepts: need {k} distinct names", f"pass {k} distinct strings, one per mask channel")
    return names


def _validation_arrays(validation: Any, activations: torch.Tensor, masks: torch.Tensor, pixels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a validation pair against the training arrays: same form, channels, grid and concepts."""
    if not (isinstance(validation, (tuple, list)) and len(validation) == 2):
        raise ArrayInputError("validation", "must be a pair (X_val, y_val)", "pass validation=(X_val, y_val)")
    val_activations, val_pixels = as_activations(validation[0], "X_val")
    val_masks = as_masks(validation[1], val_activations, val_pixels, "y_val")
    if val_pixels != pixels or val_activations.shape[1:] != activations.shape[1:] or val_masks.shape[1:] != masks.shape[1:]:
        raise ArrayInputError(
            f"X_val, y_val of shapes {tuple(val_activations.shape)}, {tuple(val_masks.shape)}",
            f"do not match X, y of shapes {tuple(activations.shape)}, {tuple(masks.shape)} (as maps)",
            "pass validation items of the same layer, grid and concepts",
        )
    return val_activations, val_masks


def _check_positives(positive_pixels: torch.Tensor, source: BatchSource) -> None:
    missing = [c for c, count in zip(source.concepts, positive_pixels.tolist()) if count == 0]
    if missing:
        raise DataError(
            "concept " + ", ".join(repr(c) for c in missing),
            f"no positive grid cell (covered fraction ≥ {MASK_THRESHOLD}) in the train split of {source.description}",
            "add training images that contain it, or drop the concept",
        )


def _train_statistics(
    source: BatchSource, indices: np.ndarray, batch_size: int, device: torch.device, standardize: bool, binarise: bool
) -> _Statistics:
    """One streaming pass over the train split (a second one for the binarisation thresholds)."""
    k = len(source.concepts)
    foreground = torch.zeros(k, dtype=torch.float64)
    images = torch.zeros(k, dtype=torch.float64)
    positives = torch.zeros(k, dtype=torch.int64)
    moments = _ChannelMoments()
    for batch in source.batches(indices, batch_size, device=device):
        valid = batch.valid
        foreground += (batch.masks.mean(dim=(2, 3)) * valid).sum(dim=0).double().cpu()
        images += valid.sum(dim=0).double().cpu()
        positives += ((batch.masks >= MASK_THRESHOLD) & valid[:, :, None, None]).sum(dim=(0, 2, 3)).cpu()
        moments.update(_image_pixels(batch))
    _check_positives(positives, source)
    stats = _Statistics(alpha=(1 - foreground / images).float(), n_channels=moments.channels, pixel_mean=moments.mean.float())
    if standardize:
        stats.channel_mean, stats.channel_std = moments.mean_std()
    if binarise:
        stats.channel_threshold = _top_quantile(source, indices, batch_size, device, moments)
    return stats


LDA_LOGIT_GAP = 4.0


def _lda_start(source: BatchSource, indices: np.ndarray, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher discriminant per concept in raw activation space: ``(weight (K, C), bias (K,))``.

    Activations are sampled on a grid over the original image no finer than twice the feature
    map (masks pooled to it), so the pass costs about as much as one epoch.
    """
    total = count = squares = None
    positive_sum = negative_sum = positive_weight = negative_weight = None
    for batch in source.batches(indices, batch_size, device=device):
        h, w = batch.activations.shape[-2:]
        grid = (min(source.grid[0], 2 * h), min(source.grid[1], 2 * w))
        pixels = features_to_grid(batch.activations, batch.geometries, grid).movedim(1, -1).reshape(-1, batch.activations.shape[1]).double()
        masks = F.adaptive_avg_pool2d(batch.masks, grid).movedim(1, -1).reshape(-1, batch.masks.shape[1]).double()
        valid = batch.valid.double().repeat_interleave(grid[0] * grid[1], dim=0)
        positive, negative = (masks >= MASK_THRESHOLD).double() * valid, (masks < MASK_THRESHOLD).double() * valid
        sums = (pixels.sum(0), pixels.T @ pixels, positive.T @ pixels, negative.T @ pixels, positive.sum(0), negative.sum(0))
        if total is None:
            total, squares, positive_sum, negative_sum, positive_weight, negative_weight = sums
            count = pixels.shape[0]
        else:
            total, squares = total + sums[0], squares + sums[1]
            positive_sum, negative_sum = positive_sum + sums[2], negative_sum + sums[3]
            positive_weight, negative_weight = positive_weight + sums[4], negative_weight + sums[5]
            count += pixels.shape[0]
    mean = total / count
    covariance = squares / count - torch.outer(mean, mean)
    # a ridge relative to each channel's variance keeps the start equivariant to channel scaling
    covariance += torch.diag(1e-3 * covariance.diagonal().clamp(min=1e-12))
    mean_positive = positive_sum / positive_weight.clamp(min=1)[:, None]
    mean_negative = negative_sum / negative_weight.clamp(min=1)[:, None]
    difference = mean_positive - mean_negative
    direction = torch.linalg.solve(covariance, difference.T).T
    gap = (direction * difference).sum(dim=1).clamp(min=1e-12)
    weight = direction * (LDA_LOGIT_GAP / gap)[:, None]
    bias = -(weight * (mean_positive + mean_negative) / 2).sum(dim=1)
    return weight.float().cpu(), bias.float().cpu()


def _in_transformed_space(start: tuple[torch.Tensor, torch.Tensor] | None, transform: _Transform, k: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Express a raw-space linear map ``w·a + b`` in the training input space (centred or standardised)."""
    if start is None:
        return torch.zeros(k, c), torch.zeros(k)
    weight, bias = start
    mean = transform.mean.cpu().float() if transform.mean is not None else torch.zeros(c)
    std = transform.std.cpu().float() if getattr(transform, "std", None) is not None else torch.ones(c)
    return weight * std, bias + weight @ mean


def _image_pixels(batch: ProbeBatch) -> torch.Tensor:
    """Pixel vectors ``(P, C)`` of the feature cells that lie on the image (padding excluded)."""
    size = tuple(batch.activations.shape[-2:])
    cells = torch.stack([image_cells(g, size) for g in batch.geometries]).to(batch.activations.device)
    return batch.activations.movedim(1, -1)[cells]


class _ChannelMoments:
    """Streaming per-channel count, mean, sum of squared deviations, min and max.

    Batches are merged with Chan et al.'s pairwise update in float64, which stays accurate when a
    channel's mean is large against its spread.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = self.squares = self.low = self.high = None

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def update(self, pixels: torch.Tensor) -> None:
        n = pixels.shape[0]
        if n == 0:
            return
        mean = pixels.mean(dim=0)
        squares = (pixels - mean).square().sum(dim=0).double().cpu()
        mean, low, high = mean.double().cpu(), pixels.min(dim=0).values.cpu(), pixels.max(dim=0).values.cpu()
        if self.count == 0:
            self.mean, self.squares, self.low, self.high = mean, squares, low, high
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * n / total
            self.squares = self.squares + squares + delta.square() * self.count * n / total
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)
        self.count += n

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per channel; a constant channel gets std 1 (it standardises to 0)."""
        std = (self.squares / self.count).sqrt()
        constant = std <= 1e-7 * self.mean.abs().clamp(min=1)
        return self.mean.float(), torch.where(constant, torch.ones_like(std), std).float()


def _top_quantile(source: BatchSource, indices: np.ndarray, batch_size: int, device: torch.device, moments: _ChannelMoments) -> torch.Tensor:
    """Per-channel value exceeded by ``TOP_QUANTILE`` of the train pixels, from streamed histograms."""
    low = moments.low.to(device)
    width = ((moments.high.to(device) - low) / QUANTILE_BINS).clamp(min=1e-12)
    channels = moments.channels
    offsets = torch.arange(channels, device=device) * QUANTILE_BINS
    counts = torch.zeros(channels * QUANTILE_BINS, dtype=torch.int64)
    for batch in source.batches(indices, batch_size, device=device):
        bins = ((_image_pixels(batch) - low) / width).long().clamp(0, QUANTILE_BINS - 1)
        counts += torch.bincount((bins + offsets).flatten(), minlength=channels * QUANTILE_BINS).cpu()
    counts = counts.view(channels, QUANTILE_BINS).double()
    tail = counts.flip(1).cumsum(1).flip(1)  # tail[:, j]: pixels in bins j and above
    wanted = TOP_QUANTILE * moments.count
    last = (tail >= wanted).sum(dim=1) - 1  # highest bin whose tail reaches `wanted`
    above = torch.cat([tail[:, 1:], torch.zeros(channels, 1, dtype=tail.dtype)], dim=1).gather(1, last[:, None])[:, 0]
    inside = counts.gather(1, last[:, None])[:, 0]
    fraction = (wanted - above) / inside  # share of that bin lying above the threshold (uniform within the bin)
    return (moments.low.double() + (last + 1 - fraction) * width.cpu().double()).float()

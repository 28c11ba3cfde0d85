"""The concept-method registry: one entry per way of learning concept vectors.

Each :class:`ConceptMethod` says everything the rest of conceptlens needs to know about a
method, so that nothing switches on the method's name:

* ``estimator`` — the learner class (``Net2VecProbe``, ``NMFConcepts``, ``LinearCAV``, …);
* ``fit_bank`` — how the probe workflow fits one layer's bank from store entries;
* ``projection`` — how its banks turn activations into concept maps
  (:mod:`conceptlens.concepts.vectors.projections`; recorded in every bank it produces);
* ``comparison`` — which layer comparison its maps feed: ``'supervised'`` (concept-wise, by
  concept name) or ``'unsupervised'`` (best match between unnamed concepts, set IoU);
* ``level`` — ``'pixel'`` (fitted on concept masks, one map per concept) or ``'image'``
  (fitted on image sets);
* ``label`` and ``similarity_label`` — how the report and figures name it and its similarity.

Adding a method touches its own module and one :func:`register_method` call::

    register_method(ConceptMethod(
        name="toy", estimator=ToyProbe, fit_bank=fit_toy_bank, projection="sigmoid_affine",
        comparison="supervised", level="pixel", label="Toy", similarity_label="mean concept set IoU",
    ))

after which ``probe_model(..., method="toy")`` fits, saves and reuses its banks, and every bank it
produces maps activations with its projection.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Protocol

from conceptlens.concepts.compare.workflow import COMPARISONS
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.concepts.vectors.projections import ProjectionError, get_projection
from conceptlens.probes.data import split_indices
from conceptlens.probes.linear import LinearCAV
from conceptlens.probes.net2vec import Net2VecProbe
from conceptlens.probes.nmf import NMFConcepts

__all__ = [
    "COMPARISONS",
    "LEVELS",
    "ConceptMethod",
    "FitBank",
    "MethodError",
    "fit_bank",
    "get_method",
    "method_names",
    "methods",
    "register_method",
]

LEVELS = ("pixel", "image")


class MethodError(ConceptLensError):
    """A concept method is unknown, malformed, or cannot do what it was asked."""


class FitBank(Protocol):
    """``fit_bank(layer, activations, masks, params, device, progress) -> ConceptBank``.

    ``activations`` and ``masks`` are aligned store entries of one layer and one dataset (the mask
    entry carries the train/val/test split); ``params`` are the estimator's hyper-parameters. The
    bank's provenance must record ``activations_key``, ``masks_key`` and ``params`` so that the
    workflow can reuse it.
    """

    def __call__(
        self, layer: str, activations: StoreEntry, masks: StoreEntry, params: dict[str, Any], device: str, progress: bool
    ) -> ConceptBank: ...


@dataclass(frozen=True)
class ConceptMethod:
    """One concept method of the registry.

    Attributes
    ----------
    name : str
        What users pass as ``method`` and banks record as ``ConceptBank.method``.
    estimator : type
        The learner class.
    projection : str
        The projection of the banks it produces (a registered projection name).
    comparison : {'supervised', 'unsupervised'}
        Which layer comparison its maps feed.
    level : {'pixel', 'image'}
        Pixel-level methods are fitted on concept masks by the probe workflow; image-level ones
        on sets of images.
    label : str
        Short name in the report and figures, e.g. ``'Net2Vec'``.
    similarity_label : str
        What its layer-similarity heatmaps show, e.g. ``'mean concept set IoU'``.
    fit_bank : FitBank or None
        How the probe workflow fits one layer's bank from store entries; ``None`` for methods
        the workflow cannot fit from masks (image-level methods).
    """

    name: str
    estimator: type
    projection: str
    comparison: str
    level: str
    label: str
    similarity_label: str
    fit_bank: FitBank | None = None

    def __post_init__(self) -> None:
        culprit = f"concept method {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise MethodError(culprit, "has no valid name", "name it like a Python identifier, e.g. 'toy'")
        if not isinstance(self.estimator, type):
            raise MethodError(culprit, f"has estimator {self.estimator!r}, not a class", "pass the estimator class itself")
        if self.comparison not in COMPARISONS:
            raise MethodError(culprit, f"has comparison {self.comparison!r}", f"use one of {', '.join(COMPARISONS)}")
        if self.level not in LEVELS:
            raise MethodError(culprit, f"has level {self.level!r}", f"use one of {', '.join(LEVELS)}")
        if self.fit_bank is not None and not callable(self.fit_bank):
            raise MethodError(culprit, "has a fit_bank that is not callable", "pass a function, or None")
        try:
            get_projection(self.projection)
        except ProjectionError as error:
            raise MethodError(culprit, f"has projection {self.projection!r}, which is not registered", error.fix) from None

    @property
    def report_name(self) -> str:
        """``'<comparison>, <label>'``, e.g. ``'supervised, Net2Vec'``: how findings name it."""
        return f"{self.comparison}, {self.label}"


# ------------------------------------------------------------------------------- the built-ins
def _fit_net2vec_bank(
    layer: str, activations: StoreEntry, masks: StoreEntry, params: dict[str, Any], device: str, progress: bool
) -> ConceptBank:
    """Net2Vec probe on the train split (early stopping on val), with its test metrics."""
    probe = Net2VecProbe(device=device, progress=progress, **params).fit(activations, masks)
    return probe.to_bank(layer, metrics=probe.evaluate(activations, masks, "test"))


def _fit_nmf_bank(
    layer: str, activations: StoreEntry, masks: StoreEntry, params: dict[str, Any], device: str, progress: bool
) -> ConceptBank:
    """NMF on the train split's pixels; NCAVs labelled with their best concept and held-out fidelity on test."""
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


_METHODS: dict[str, ConceptMethod] = {}


def register_method(entry: ConceptMethod, *, replace: bool = False) -> ConceptMethod:
    """Add a concept method to the registry (``replace=True`` to redefine a name); return it.

    Raises
    ------
    MethodError
        When ``entry`` is not a :class:`ConceptMethod`, or its name is taken and ``replace`` is false.
    """
    if not isinstance(entry, ConceptMethod):
        raise MethodError("register_method", f"got a {type(entry).__name__}", "pass a conceptlens.probes.registry.ConceptMethod")
    if entry.name in _METHODS and not replace and _METHODS[entry.name] != entry:
        raise MethodError(f"concept method {entry.name!r}", "is already registered", "choose another name, or pass replace=True")
    _METHODS[entry.name] = entry
    return entry


def get_method(name: str) -> ConceptMethod:
    """The registered method called ``name``.

    Raises
    ------
    MethodError
        When no method has that name; the message names the closest registered one and lists all.
    """
    entry = _METHODS.get(name) if isinstance(name, str) else None
    if entry is None:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1, cutoff=0.5)
        closest = f" (closest: {close[0]})" if close else ""
        raise MethodError(
            f"concept method {name!r}", f"is not registered{closest}",
            f"use one of {', '.join(_METHODS)}, or register it with conceptlens.probes.registry.register_method",
        )
    return entry


def methods(level: str | None = None) -> tuple[ConceptMethod, ...]:
    """The registered methods in registration order, only those of ``level`` when given."""
    if level is not None and level not in LEVELS:
        raise MethodError(f"level {level!r}", "is not a method level", f"use one of {', '.join(LEVELS)}, or None for all")
    return tuple(entry for entry in _METHODS.values() if level is None or entry.level == level)


def method_names(level: str | None = None) -> tuple[str, ...]:
    """Names of :func:`methods` (e.g. the choices of a ``--method`` option)."""
    return tuple(entry.name for entry in methods(level))


def fit_bank(
    method: str,
    layer: str,
    activations: StoreEntry,
    masks: StoreEntry,
    params: dict[str, Any] | None = None,
    device: str = "auto",
    progress: bool = False,
) -> ConceptBank:
    """Fit one layer's bank with a registered pixel-level method, and check what it returns.

    Parameters
    ----------
    method : str
        A registered method with a ``fit_bank`` (``'net2vec'``, ``'nmf'``, …).
    layer : str
        The layer the activations come from.
    activations, masks : StoreEntry
        Aligned activation and grid-mask entries of one dataset.
    params : dict, optional
        The estimator's hyper-parameters.
    device : str
        ``'auto'``, ``'cpu'``, ``'cuda'``, …
    progress : bool
        Show progress bars.

    Returns
    -------
    ConceptBank
        Recording ``method`` and the method's projection.

    Raises
    ------
    MethodError
        When the method is unknown, cannot be fitted from masks, or its ``fit_bank`` returns
        something other than a bank of this method and projection.
    """
    entry = get_method(method)
    if entry.fit_bank is None:
        fitted_from = "image sets (fit_image_cavs)" if entry.level == "image" else "its estimator directly"
        raise MethodError(
            f"concept method {method!r}", f"is a {entry.level}-level method the probe workflow cannot fit from concept masks",
            f"use one of {', '.join(name for name, e in _METHODS.items() if e.fit_bank is not None)}, or fit {method!r} from {fitted_from}",
        )
    bank = entry.fit_bank(layer, activations, masks, dict(params or {}), device, progress)
    _check_bank(entry, bank)
    return bank


def _check_bank(entry: ConceptMethod, bank: Any) -> None:
    culprit = f"fit_bank of concept method {entry.name!r}"
    if not isinstance(bank, ConceptBank):
        raise MethodError(culprit, f"returned a {type(bank).__name__}", "return a conceptlens.concepts.vectors.bank.ConceptBank")
    if (bank.method, bank.projection) != (entry.name, entry.projection):
        raise MethodError(
            culprit, f"returned a bank of method {bank.method!r} with projection {bank.projection!r}",
            f"build the bank with method={entry.name!r}, projection={entry.projection!r}",
        )


def _register_builtins() -> None:
    register_method(ConceptMethod(
        name="net2vec", estimator=Net2VecProbe, fit_bank=_fit_net2vec_bank, projection="sigmoid_affine", comparison="supervised",
        level="pixel", label="Net2Vec", similarity_label="mean concept set IoU",
    ))
    register_method(ConceptMethod(
        name="linear", estimator=LinearCAV, fit_bank=None, projection="sigmoid_affine", comparison="supervised",
        level="image", label="linear CAV", similarity_label="mean concept set IoU",
    ))
    register_method(ConceptMethod(
        name="nmf", estimator=NMFConcepts, fit_bank=_fit_nmf_bank, projection="nnls_codes", comparison="unsupervised",
        level="pixel", label="NMF", similarity_label="NCAV best-match set IoU",
    ))


_register_builtins()

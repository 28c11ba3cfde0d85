"""How a concept bank projects activations to concept maps: a small table of named projections.

A :class:`~conceptlens.concepts.vectors.bank.ConceptBank` records the *name* of its projection,
not the learner that produced it, and :meth:`ConceptBank.concept_maps` looks the name up here.
A projection has two steps so that maps can be resampled onto the concept grid in between:

``scores(bank, activations)``
    (B, C, h, w) activations → (B, K, h, w) scores on the feature grid;
``finish(scores)``
    applied after the (bilinear) resampling, e.g. a sigmoid.

Built-in projections:

``sigmoid_affine``
    ``σ(w·a + b)`` per cell, after the bank's channel standardisation: concept probabilities
    (Net2Vec pixel probes, image-level linear CAVs). Bilinear resampling commutes with the affine
    map, so the logits are resampled before the sigmoid.
``nnls_codes``
    ``argmin_{s ≥ 0} ‖a − s·P‖`` per cell: the non-negative codes of each pixel vector against
    the bank's rows (NCAV maps of an NMF bank), resampled as they are.

A new concept method with a new projection registers it with :func:`register_projection` from
its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from conceptlens.concepts.errors import ConceptLensError

if TYPE_CHECKING:
    from conceptlens.concepts.vectors.bank import ConceptBank

__all__ = ["Projection", "ProjectionError", "get_projection", "projection_names", "register_projection"]


class ProjectionError(ConceptLensError):
    """A projection name is unknown, or a projection is malformed or registered twice."""


@dataclass(frozen=True)
class Projection:
    """One way of turning a bank's vectors and a layer's activations into concept maps.

    Attributes
    ----------
    name : str
        The name banks record (``ConceptBank.projection``) and save in their JSON.
    scores : callable
        ``scores(bank, activations) -> Tensor``: (B, C, h, w) → (B, K, h, w) on the feature grid.
    finish : callable
        ``finish(scores) -> Tensor``, applied after resampling onto the concept grid.
    map_kind : str
        What a map value is, for plots: ``'probability'`` (in [0, 1]) or ``'ncav'``
        (non-negative codes).
    description : str
        One line for documentation and error messages.
    """

    name: str
    scores: Callable[[ConceptBank, torch.Tensor], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor]
    map_kind: str
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ProjectionError(f"projection {self.name!r}", "has no valid name", "name it like a Python identifier, e.g. 'relu_affine'")
        for part in ("scores", "finish"):
            if not callable(getattr(self, part)):
                raise ProjectionError(f"projection {self.name!r}", f"has a {part} that is not callable", f"give {part} as a function")


def _affine_logits(bank: ConceptBank, activations: torch.Tensor) -> torch.Tensor:
    return bank.logits(activations)


def _nnls_codes(bank: ConceptBank, activations: torch.Tensor) -> torch.Tensor:
    return bank.nmf_maps(activations)


def _unchanged(scores: torch.Tensor) -> torch.Tensor:
    return scores


_PROJECTIONS: dict[str, Projection] = {
    projection.name: projection
    for projection in (
        Projection("sigmoid_affine", _affine_logits, torch.sigmoid, "probability", "concept probabilities σ(w·a + b) per cell"),
        Projection("nnls_codes", _nnls_codes, _unchanged, "ncav", "non-negative least-squares codes of each cell against the bank's rows"),
    )
}


def projection_names() -> tuple[str, ...]:
    """Names of the registered projections, built-in ones first."""
    return tuple(_PROJECTIONS)


def get_projection(name: str) -> Projection:
    """The registered projection called ``name``.

    Raises
    ------
    ProjectionError
        When no projection has that name (the message lists the registered ones).
    """
    try:
        return _PROJECTIONS[name]
    except (KeyError, TypeError):
        raise ProjectionError(
            f"projection {name!r}", "is not registered",
            f"use one of {', '.join(_PROJECTIONS)}, or register it with conceptlens.concepts.vectors.projections.register_projection",
        ) from None


def register_projection(projection: Projection, *, replace: bool = False) -> Projection:
    """Add ``projection`` to the table (``replace=True`` to redefine an existing name); return it."""
    if not isinstance(projection, Projection):
        raise ProjectionError("register_projection", f"got a {type(projection).__name__}", "pass a Projection")
    if projection.name in _PROJECTIONS and not replace and _PROJECTIONS[projection.name] != projection:
        raise ProjectionError(f"projection {projection.name!r}", "is already registered", "choose another name, or pass replace=True")
    _PROJECTIONS[projection.name] = projection
    return projection

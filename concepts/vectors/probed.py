"""A probed model: one concept bank per layer, with the activation entries the banks were fit on.

:func:`conceptlens.probes.workflow.probe_model` returns it; :func:`conceptlens.concepts.compare.workflow.compare_models`
compares several of them layer by layer. It lives here, below both, because it only holds
concept-level objects (banks, store entries, the loaded model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conceptlens.concepts.models.loading import LoadedModel
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.vectors.bank import ConceptBank

__all__ = ["ProbedModel"]


@dataclass
class ProbedModel:
    """A model with its probed layers: activation entries and banks per layer, and depths.

    Attributes
    ----------
    label : str
        The model's name in comparisons, bank file names and reports.
    model : LoadedModel
        The probed model.
    layers : list of str
        Probed layers, shallow to deep.
    activations : dict of str to StoreEntry
        Per layer, the store entry the bank was fit on (native maps).
    banks : dict of str to ConceptBank
        Per layer, the concept bank.
    depths : list of float
        Relative depth of each layer among the probed ones (0 … 1).
    module_depths : list of float
        Relative depth of each layer among every module of the model, in execution order.
    metrics : dict of str to dict
        Per layer, the bank's test metrics (``bank.metrics``).
    grid : (int, int), optional
        The concept grid the masks were embedded on.
    comparison : {'supervised', 'unsupervised'}, optional
        The layer comparison the banks' method feeds (from the method registry); what
        ``compare_models`` uses when not told.
    """

    label: str
    model: LoadedModel
    layers: list[str]
    activations: dict[str, StoreEntry]
    banks: dict[str, ConceptBank]
    depths: list[float]
    module_depths: list[float]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    comparison: str | None = None

    @property
    def method(self) -> str:
        """The method of the banks (``net2vec``, ``nmf``, …)."""
        return self.banks[self.layers[0]].method

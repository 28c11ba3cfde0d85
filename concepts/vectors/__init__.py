"""Concept vectors: banks of one layer's vectors, how they project activations, their stored maps.

``ConceptBank`` holds K vectors of one layer with biases, standardisation, metrics and provenance
(safetensors + JSON); its projection (``sigmoid_affine``, ``nnls_codes`` …) turns activations into
concept maps. ``ProbedModel`` is a model with one bank per probed layer. Names are imported on
first use.
"""

from conceptlens.concepts._lazy import lazy_exports

_EXPORTS = {
    "BankError": "conceptlens.concepts.vectors.bank",
    "ConceptBank": "conceptlens.concepts.vectors.bank",
    "ProbedModel": "conceptlens.concepts.vectors.probed",
    "concept_map_entry": "conceptlens.concepts.vectors.concept_maps",
    "Projection": "conceptlens.concepts.vectors.projections",
    "get_projection": "conceptlens.concepts.vectors.projections",
    "register_projection": "conceptlens.concepts.vectors.projections",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

"""Concept data and the space concepts live in — the lowest layer of conceptlens.

Subpackages
-----------
data
    Concept datasets: folder layout, COCO, image sets, the synthetic world, real textures.
models
    Model loading (spec strings, your own modules), adapters, layer hooks, the embedded zoo.
store
    The content-addressed activation store, tensor artifacts, atomic writes.
embedding
    Streaming a dataset through a model into the store; concept masks on the concept grid.
vectors
    Concept banks and their projections, concept maps, probed models.
compare
    Layer comparison: concept similarity, linear CKA, ridges, :func:`compare_models`.
training
    Training and evaluating the zoo's synthetic-world detectors.

This package re-exports the errors, the geometry record and the environment helpers; everything
else is imported from its subpackage (``from conceptlens.concepts.data import FolderDataset``) or
from the facade (``import conceptlens as cl``). Nothing here depends on probes, attribution or the
application.
"""

from conceptlens.concepts._lazy import lazy_exports

_EXPORTS = {
    "ConceptLensError": "conceptlens.concepts.errors",
    "DataError": "conceptlens.concepts.errors",
    "LayerError": "conceptlens.concepts.errors",
    "ModelSpecError": "conceptlens.concepts.errors",
    "StoreError": "conceptlens.concepts.errors",
    "WriteError": "conceptlens.concepts.errors",
    "DeviceError": "conceptlens.concepts.environment",
    "package_versions": "conceptlens.concepts.environment",
    "resolve_device": "conceptlens.concepts.environment",
    "Geometry": "conceptlens.concepts.geometry",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

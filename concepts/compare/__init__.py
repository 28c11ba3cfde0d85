"""Layer comparison: concept similarity between layers and models, linear CKA beside it, ridges.

``compare_models`` compares probed models in one call; ``supervised_similarity`` (named concepts:
set IoU, soft IoU, Pearson of their maps) and ``unsupervised_similarity`` (best match of unnamed
NCAVs) compare stored concept maps; ``cka_matrix`` is the representation-similarity baseline;
``ridge`` traces the best-matching layer across depth. Names are imported on first use.
"""

from conceptlens.concepts._lazy import lazy_exports

_EXPORTS = {
    "compare_models": "conceptlens.concepts.compare.workflow",
    "CompareError": "conceptlens.concepts.compare.similarity",
    "LayerMaps": "conceptlens.concepts.compare.similarity",
    "SupervisedSimilarity": "conceptlens.concepts.compare.similarity",
    "UnsupervisedSimilarity": "conceptlens.concepts.compare.similarity",
    "relative_depths": "conceptlens.concepts.compare.similarity",
    "ridge": "conceptlens.concepts.compare.similarity",
    "supervised_similarity": "conceptlens.concepts.compare.similarity",
    "unsupervised_similarity": "conceptlens.concepts.compare.similarity",
    "MinibatchCKA": "conceptlens.concepts.compare.cka",
    "cka_matrix": "conceptlens.concepts.compare.cka",
    "linear_cka": "conceptlens.concepts.compare.cka",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

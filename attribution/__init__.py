"""Attribution: how concepts drive a model's outputs (docs/ARCHITECTURE.md).

``tcav_scores`` (TCAV with random-CAV significance tests, Holm/Bonferroni correction, bootstrap
intervals), the targets it differentiates (``ClassLogit``, ``ClassProbability``, ``TopDetection``,
``MatchedDetection``, or ``target_from_spec("logit:285")``), concept maps of one image
(``concept_maps``: where a bank's concepts are; ``gradient_cav_maps``: where a concept drives the
target) and ``ncav_importance`` (exact NCAV importance by autograd). Names are imported on first
use; nothing here depends on the application.
"""

from conceptlens.concepts._lazy import lazy_exports

_EXPORTS = {
    "TCAVError": "conceptlens.attribution.tcav",
    "TCAVRecord": "conceptlens.attribution.tcav",
    "TCAVResult": "conceptlens.attribution.tcav",
    "bonferroni": "conceptlens.attribution.tcav",
    "holm": "conceptlens.attribution.tcav",
    "merge_results": "conceptlens.attribution.tcav",
    "tcav_scores": "conceptlens.attribution.tcav",
    "ClassLogit": "conceptlens.attribution.targets",
    "ClassProbability": "conceptlens.attribution.targets",
    "MatchedDetection": "conceptlens.attribution.targets",
    "TargetError": "conceptlens.attribution.targets",
    "TopDetection": "conceptlens.attribution.targets",
    "target_from_spec": "conceptlens.attribution.targets",
    "ImageConceptMaps": "conceptlens.attribution.maps",
    "MapError": "conceptlens.attribution.maps",
    "concept_maps": "conceptlens.attribution.maps",
    "concept_maps_batch": "conceptlens.attribution.maps",
    "gradient_cav_maps": "conceptlens.attribution.maps",
    "NCAVError": "conceptlens.attribution.ncav",
    "NCAVImportance": "conceptlens.attribution.ncav",
    "ncav_importance": "conceptlens.attribution.ncav",
    "iter_layer_gradients": "conceptlens.attribution.gradients",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

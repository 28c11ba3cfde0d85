"""Training the zoo's synthetic-world detectors (``conceptlens train-zoo``) and detection metrics.

Kept apart from the data layer: it trains models, the rest of ``concepts`` only reads them. Names
are imported on first use.
"""

from conceptlens.concepts._lazy import lazy_exports

_EXPORTS = {
    "evaluate_detector": "conceptlens.concepts.training.zoo",
    "train_detector": "conceptlens.concepts.training.zoo",
    "train_zoo": "conceptlens.concepts.training.zoo",
    "average_precision": "conceptlens.concepts.training.metrics",
    "box_iou": "conceptlens.concepts.training.metrics",
    "mean_average_precision": "conceptlens.concepts.training.metrics",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

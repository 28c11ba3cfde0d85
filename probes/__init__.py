"""Probes: learn concept vectors from activations (docs/ARCHITECTURE.md).

Estimators — ``Net2VecProbe`` (pixel-level CAVs, all concepts of a layer at once), ``LinearCAV``
(image-level CAVs; ``train_cavs`` / ``fit_image_cavs`` train many at once into a ``CAVSet``) and
``NMFConcepts`` / ``MiniBatchNMFConcepts`` (unsupervised NCAVs; the online estimator for data
larger than memory). Workflows — ``probe_model`` (model + dataset → one bank per
layer; ``controls=True`` adds ``probe_controls``: random-weights and permuted-masks controls,
selectivity and "encoded"), ``set_activations`` (image sets → image-level activations). The method registry
(``get_method``, ``register_method``) says how each method fits, projects and compares. Names are
imported on first use; nothing here depends on attribution or the application.
"""

from conceptlens.concepts._lazy import lazy_exports

_EXPORTS = {
    "Net2VecProbe": "conceptlens.probes.net2vec",
    "CAVError": "conceptlens.probes.linear",
    "CAVSet": "conceptlens.probes.linear",
    "LinearCAV": "conceptlens.probes.linear",
    "pooled_activations": "conceptlens.probes.linear",
    "train_cavs": "conceptlens.probes.linear",
    "train_layer_cavs": "conceptlens.probes.linear",
    "MiniBatchNMFConcepts": "conceptlens.probes.nmf",
    "NMFConcepts": "conceptlens.probes.nmf",
    "NMFError": "conceptlens.probes.nmf",
    "SegmentationMetrics": "conceptlens.probes.metrics",
    "ParameterError": "conceptlens.probes.params",
    "iter_batches": "conceptlens.probes.data",
    "split_indices": "conceptlens.probes.data",
    "ProbedModel": "conceptlens.concepts.vectors.probed",
    "bank_path": "conceptlens.probes.workflow",
    "layer_order": "conceptlens.probes.workflow",
    "probe_model": "conceptlens.probes.workflow",
    "ProbeControls": "conceptlens.probes.controls",
    "probe_controls": "conceptlens.probes.controls",
    "fit_image_cavs": "conceptlens.probes.image_cavs",
    "set_activations": "conceptlens.probes.image_cavs",
    "ConceptMethod": "conceptlens.probes.registry",
    "MethodError": "conceptlens.probes.registry",
    "get_method": "conceptlens.probes.registry",
    "method_names": "conceptlens.probes.registry",
    "register_method": "conceptlens.probes.registry",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

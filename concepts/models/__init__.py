"""Models: load one from a spec string or your own ``nn.Module``, list its layers, hook them.

``load_model`` returns a ``LoadedModel`` (module in eval mode + adapter + spec); adapters own the
preprocessing and report where each image lands on the input canvas; ``list_layers`` lists every
hookable layer in execution order. The embedded zoo (``zoo:<name>`` specs) is in :mod:`.zoo`.
Names are imported on first use.
"""

from conceptlens.concepts._lazy import lazy_exports

_EXPORTS = {
    "LayerInfo": "conceptlens.concepts.models.loading",
    "LoadedModel": "conceptlens.concepts.models.loading",
    "list_layers": "conceptlens.concepts.models.loading",
    "load_model": "conceptlens.concepts.models.loading",
    "load_state_dict_file": "conceptlens.concepts.models.loading",
    "model_hash": "conceptlens.concepts.models.loading",
    "Adapter": "conceptlens.concepts.models.adapters",
    "ClassifierAdapter": "conceptlens.concepts.models.adapters",
    "DetectorAdapter": "conceptlens.concepts.models.adapters",
    "default_adapter": "conceptlens.concepts.models.adapters",
    "LayerCapture": "conceptlens.concepts.models.hooks",
    "resolve_layers": "conceptlens.concepts.models.hooks",
    "ZOO": "conceptlens.concepts.models.zoo",
    "load_zoo_model": "conceptlens.concepts.models.zoo",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

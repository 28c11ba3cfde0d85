"""Storage: the content-addressed activation store, tensor artifacts and JSON, atomic writes.

``ActivationStore`` keeps one entry per (model, layer, preprocessing, reduction, dataset) request;
library calls given no store use ``temporary_store()`` (one temporary folder per process, deleted
at exit). Names are imported on first use.
"""

from conceptlens.concepts._lazy import lazy_exports

_EXPORTS = {
    "ActivationStore": "conceptlens.concepts.store.activations",
    "EntryReader": "conceptlens.concepts.store.activations",
    "StoreEntry": "conceptlens.concepts.store.activations",
    "open_store": "conceptlens.concepts.store.temporary",
    "temporary_store": "conceptlens.concepts.store.temporary",
    "read_artifact": "conceptlens.concepts.store.artifacts",
    "read_json": "conceptlens.concepts.store.artifacts",
    "write_artifact": "conceptlens.concepts.store.artifacts",
    "write_json": "conceptlens.concepts.store.artifacts",
    "atomic_write_bytes": "conceptlens.concepts.store.atomic",
    "atomic_write_text": "conceptlens.concepts.store.atomic",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

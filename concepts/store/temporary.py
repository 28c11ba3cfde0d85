"""The store a library call uses when it is given none: one temporary folder per process.

``probe_model(model, data, layers)``, ``compare_models(probed, data)``, ``set_activations(...)`` and
``embed(...)`` take ``store=None``. They then share one :class:`ActivationStore` in a temporary
folder (``conceptlens-store-*`` in the system's temp folder), created on first use and deleted
when the interpreter exits, so calls in one session still reuse each other's activations, masks
and concept maps. A persistent store is one argument away: pass a folder path or an
``ActivationStore``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from conceptlens.concepts.store.activations import ActivationStore

__all__ = ["StoreLike", "open_store", "temporary_store"]

#: What a ``store`` argument accepts: an open store, a folder, or None (the temporary store).
StoreLike = ActivationStore | str | os.PathLike | None

_TEMPORARY: ActivationStore | None = None


def temporary_store() -> ActivationStore:
    """The process-wide temporary store (created on first call, deleted at interpreter exit).

    Returns
    -------
    ActivationStore
        The same store on every call of this process.
    """
    global _TEMPORARY
    if _TEMPORARY is None or not _TEMPORARY.root.is_dir():
        root = Path(tempfile.mkdtemp(prefix="conceptlens-store-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _TEMPORARY = ActivationStore(root)
    return _TEMPORARY


def open_store(store: StoreLike) -> ActivationStore:
    """The store a ``store`` argument names.

    Parameters
    ----------
    store : ActivationStore, str, PathLike or None
        An open store (returned as is), a store folder (opened; created on first write), or None
        for :func:`temporary_store`.

    Returns
    -------
    ActivationStore
    """
    if store is None:
        return temporary_store()
    if isinstance(store, ActivationStore):
        return store
    return ActivationStore(store)

"""Progress bars that say what they count: which model, which layer, which set.

Long steps draw their bar with :func:`progress_bar`; callers that know the context wrap the work in
:func:`progress_scope` (``with progress_scope("vgg", "backbone.block3"):``), and every bar drawn
inside reads ``vgg · backbone.block3 · net2vec``. A loop that ends early (early stopping) calls
:func:`finish_early`, so the bar ends full, saying where it stopped, instead of hanging at 40 %.
Bars are drawn on stderr only when asked (``show``), i.e. on a terminal without ``--quiet``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

__all__ = ["finish_early", "progress_bar", "progress_scope", "scoped"]

_SCOPE: ContextVar[tuple[str, ...]] = ContextVar("conceptlens_progress_scope", default=())


@contextmanager
def progress_scope(*names: str) -> Iterator[None]:
    """Prefix the descriptions of the bars drawn inside with ``names`` (nested scopes add up)."""
    token = _SCOPE.set(_SCOPE.get() + tuple(str(name) for name in names if name))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def scoped(desc: str) -> str:
    """``desc`` after the names of the current scopes.

    Examples
    --------
    >>> with progress_scope("vgg", "backbone.block3"):
    ...     scoped("net2vec")
    'vgg · backbone.block3 · net2vec'
    """
    return " · ".join((*_SCOPE.get(), desc))


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, show: bool, total: int | None = None, unit: str = "it") -> tqdm:
    """A tqdm bar described by :func:`scoped` ``(desc)``; disabled unless ``show``."""
    return tqdm(iterable, total=total, desc=scoped(desc), unit=unit, disable=not show)


def finish_early(bar: tqdm, done: int, note: str) -> None:
    """End ``bar`` as complete after ``done`` steps of a loop that stopped early, with ``note`` beside it.

    The bar is closed here: a bar iterating a loop counts lazily and sets its own count again when
    the loop is left, so the caller says how many steps are done and nothing redraws it after.
    """
    if bar.disable:
        return
    bar.n = bar.total = done
    bar.set_postfix_str(note, refresh=False)
    bar.close()

"""Lazy re-exports for package ``__init__`` modules (PEP 562): a name's module is imported on first use.

A package lists ``{public name: "module path"}``; ``import conceptlens`` or ``import
conceptlens.probes`` then costs nothing (no torch), ``dir()`` lists the names, and internal code
keeps importing full module paths, so no import cycle can arise through a package ``__init__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, namespace: dict[str, Any], exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package that re-exports ``exports`` lazily.

    Parameters
    ----------
    package : str
        The package's ``__name__`` (for error messages).
    namespace : dict
        The package's ``globals()``: a resolved name is cached there, so each is imported once.
    exports : mapping of str to str
        Public name → absolute path of the module that defines it.

    Returns
    -------
    (callable, callable)
        ``__getattr__(name)`` and ``__dir__()`` for the package module.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__

"""Builder arguments of a model spec: ``torchvision:resnet18?num_classes=10&dropout=0.2``.

The part after ``?`` is ``key=value`` pairs joined by ``&``. A value is read as an integer
(``10``), a number (``0.2``, ``1e-3``), ``true``/``false`` (any case), or else a string; quotes
(``'...'`` / ``"..."``) keep a string that would read as something else (``"10"``). Nothing is
evaluated. A config's ``kwargs:`` mapping adds arguments of the same types.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conceptlens.concepts.errors import ModelSpecError

__all__ = ["SpecArguments", "accepted_arguments", "parse_arguments", "split_spec", "spec_with_arguments"]

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FORMS = "write ?key=value&key2=value2 (values: integers, numbers, true/false or strings)"


@dataclass
class SpecArguments:
    """Builder arguments with where each came from (the spec string or ``kwargs:``)."""

    values: dict[str, Any] = field(default_factory=dict)
    from_kwargs: frozenset[str] = frozenset()

    def source(self, key: str) -> str:
        """``"kwargs:"`` or ``"the spec string"``: where the argument ``key`` was given."""
        return "kwargs:" if key in self.from_kwargs else "the spec string"


def split_spec(spec: str, kwargs: Mapping[str, Any] | None = None) -> tuple[str, SpecArguments]:
    """Split ``spec`` into the spec without arguments and its arguments, merged with ``kwargs``.

    Parameters
    ----------
    spec : str
        A model spec, optionally with ``?key=value&…``; an existing file whose name holds ``?`` is
        taken whole.
    kwargs : mapping, optional
        More arguments (a config's ``kwargs:``); a key also in the spec string must have the
        same value.

    Returns
    -------
    (str, SpecArguments)

    Raises
    ------
    ModelSpecError
        A malformed pair, a key given twice with different values, or a value of another type.

    Examples
    --------
    >>> base, arguments = split_spec("torchvision:resnet18?num_classes=10&zero_init_residual=true")
    >>> base, arguments.values
    ('torchvision:resnet18', {'num_classes': 10, 'zero_init_residual': True})
    """
    base, query = spec, ""
    if "?" in spec and not Path(spec).exists():
        base, query = spec.split("?", 1)
    values = parse_arguments(query, spec)
    given = dict(kwargs or {})
    for key, value in given.items():
        _check_kwarg(key, value, spec)
        if key in values and values[key] != value:
            raise ModelSpecError(f"model {spec!r}", f"builder argument {key} is {values[key]!r} in the spec string but {value!r} in kwargs:", f"give {key} once")
    return base, SpecArguments({**values, **given}, frozenset(key for key in given if key not in values))


def parse_arguments(query: str, spec: str) -> dict[str, Any]:
    """``{"num_classes": 10}`` for ``"num_classes=10"``; ``{}`` for ``""``."""
    values: dict[str, Any] = {}
    if not query:
        return values
    for pair in query.split("&"):
        key, equals, text = pair.partition("=")
        key = key.strip()
        if not equals or not _KEY.fullmatch(key):
            raise ModelSpecError(f"model {spec!r}", f"builder argument {pair!r} is not key=value", _FORMS)
        if key in values:
            raise ModelSpecError(f"model {spec!r}", f"builder argument {key} is given twice", "give each argument once")
        values[key] = _literal(text.strip())
    return values


def _literal(text: str) -> int | float | bool | str:
    """The value ``text`` spells: int, float, bool, or a string (quotes removed)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _check_kwarg(key: Any, value: Any, spec: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ModelSpecError(f"model {spec!r}: kwargs key {key!r}", "is not a Python argument name", "use letters, digits and _")
    if not isinstance(value, (bool, int, float, str)) or (isinstance(value, float) and not math.isfinite(value)):
        raise ModelSpecError(f"model {spec!r}: kwargs {key}", f"is {value!r} ({type(value).__name__})", "give an integer, a finite number, true/false or a string")


def spec_with_arguments(spec: str, kwargs: Mapping[str, Any] | None) -> str:
    """The spec string recorded for a model: ``spec`` with the ``kwargs`` it lacks appended (``?k=v&…``).

    Examples
    --------
    >>> spec_with_arguments("torchvision:resnet18", {"num_classes": 10, "zero_init_residual": True})
    'torchvision:resnet18?num_classes=10&zero_init_residual=true'
    """
    base, arguments = split_spec(spec)
    extra = {key: value for key, value in (kwargs or {}).items() if key not in arguments.values}
    if not extra:
        return spec
    pairs = "&".join(f"{key}={_text(value)}" for key, value in extra.items())
    return f"{spec}{'&' if spec != base else '?'}{pairs}"


def _text(value: Any) -> str:
    """The spelling of a value that :func:`_literal` reads back to it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and _literal(value) != value:
        return f'"{value}"'
    return str(value)


def accepted_arguments(function: Any, keep_var_keyword: bool = False, optional_only: bool = False) -> list[str] | None:
    """The keyword arguments ``function`` accepts; None when it takes ``**kwargs`` (any name).

    Parameters
    ----------
    function : callable
    keep_var_keyword : bool
        List the named arguments even when it also takes ``**kwargs``.
    optional_only : bool
        Only arguments with a default (those a builder does not fill itself).
    """
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: accept anything
        return None
    if not keep_var_keyword and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in keyword and p.name != "self" and (not optional_only or p.default is not inspect.Parameter.empty)]

"""Declarative shapes of JSON data, checked right after a file is parsed.

A shape is built from small constructors and checked by :func:`check`, which raises the caller's
error with the culprit ``"<file>: <key path>"`` (``splits.json: train[3]``), the problem
(``expected a string, got 12 (an integer)``) and the caller's fix::

    SPLITS = Record({"train": Ids(), "val": Ids(), "test": Ids()}, optional={"seed": Int(min=-1)})
    check(data, SPLITS, "root/splits.json", DataError, "delete it to recompute the split")

Records allow keys they do not name (files written by newer versions still read). ``Ids`` are
unique and all integers or all strings, never a mix. Numbers are finite unless ``finite=False``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.store.strict_json import render_path

__all__ = ["Anything", "Bool", "Ids", "Int", "Label", "ListOf", "MapOf", "Number", "OneOf", "Record", "Schema", "Str", "Where", "check", "culprit", "describe", "find_problem"]

Where = tuple[str | int, ...]
Problem = tuple[Where, str]
Label = Callable[[Any, Where], str]


def describe(value: Any) -> str:
    """A short, one-line account of a JSON value and its type: ``'12' (a string)``, ``a list of 3 items``."""
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value) if value is not None else "null"
    return f"{text[:40]}{'…' if len(text) > 40 else ''} ({kind})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bounds(lower: float | None, upper: float | None) -> str:
    if lower is not None and upper is not None:
        return f" in [{lower}, {upper}]"
    return f" >= {lower}" if lower is not None else f" <= {upper}" if upper is not None else ""


class Schema:
    """A JSON shape; :meth:`problem` returns the first ``(key path, problem)`` of a value, or None."""

    expected = "a value"

    def problem(self, value: Any, where: Where = ()) -> Problem | None:
        return None if self.accepts(value) else (where, f"expected {self.expected}, got {describe(value)}")

    def accepts(self, value: Any) -> bool:
        return True


@dataclass(frozen=True)
class Anything(Schema):
    """Any JSON value (kept as written)."""


@dataclass(frozen=True)
class Bool(Schema):
    expected = "true or false"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Int(Schema):
    """A JSON integer (not a boolean, not ``2.0``) within ``[min, max]``."""

    min: int | None = None
    max: int | None = None

    @property
    def expected(self) -> str:
        return f"an integer{_bounds(self.min, self.max)}"

    def accepts(self, value: Any) -> bool:
        return _is_int(value) and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


@dataclass(frozen=True)
class Number(Schema):
    """A JSON number (integer or not, not a boolean), finite unless ``finite=False``, within ``[min, max]``."""

    min: float | None = None
    max: float | None = None
    finite: bool = True

    @property
    def expected(self) -> str:
        return f"{'a finite' if self.finite else 'a'} number{_bounds(self.min, self.max)}"

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if self.finite and not -float("inf") < value < float("inf"):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


@dataclass(frozen=True)
class Str(Schema):
    """A JSON string; ``non_empty`` refuses ``""``, ``pattern`` must match it whole."""

    non_empty: bool = False
    pattern: re.Pattern[str] | None = None
    what: str = ""

    @property
    def expected(self) -> str:
        return self.what or ("a non-empty string" if self.non_empty else "a string")

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value or not self.non_empty) and (self.pattern is None or bool(self.pattern.fullmatch(value)))


class OneOf(Schema):
    """A value of any of ``options`` (``OneOf(Int(), None)``: an integer or null)."""

    def __init__(self, *options: Schema | None) -> None:
        self.options = options

    @property
    def expected(self) -> str:
        return " or ".join("null" if option is None else option.expected for option in self.options)

    def problem(self, value: Any, where: Where = ()) -> Problem | None:
        if value is None and None in self.options:
            return None
        found = [option.problem(value, where) for option in self.options if option is not None]
        if any(problem is None for problem in found):
            return None
        deeper = [problem for problem in found if len(problem[0]) > len(where)]
        return deeper[0] if len(deeper) == 1 else (where, f"expected {self.expected}, got {describe(value)}")


@dataclass(frozen=True)
class ListOf(Schema):
    """A JSON list of ``item`` values, ``min_len`` to ``max_len`` long; ``unique``: no value twice."""

    item: Schema = field(default_factory=Anything)
    min_len: int = 0
    max_len: int | None = None
    unique: bool = False

    @property
    def expected(self) -> str:
        low, high = self.min_len, self.max_len
        if high is not None:
            return f"a list of {high} items" if low == high else f"a list of {low} to {high} items" if low else f"a list of at most {high} items"
        return f"a list of at least {low} items" if low else "a list"

    def problem(self, value: Any, where: Where = ()) -> Problem | None:
        if not isinstance(value, list) or len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            return where, f"expected {self.expected}, got {describe(value)}"
        for index, item in enumerate(value):
            problem = self.item.problem(item, (*where, index))
            if problem:
                return problem
        return _repeat(value, where) if self.unique else None


def _repeat(items: list[Any], where: Where) -> Problem | None:
    """The second place a hashable value appears in ``items``, or None."""
    first: dict[Any, int] = {}
    for index, item in enumerate(items):
        key = (type(item), item) if not isinstance(item, (list, dict)) else (list, repr(item))
        if key in first:
            return (*where, index), f"repeats {describe(item)} (first at [{first[key]}])"
        first[key] = index
    return None


@dataclass(frozen=True)
class Ids(ListOf):
    """A list of unique ids, all integers or all strings: a mix (``[1, "2"]``) is refused."""

    item: Schema = field(default_factory=lambda: OneOf(Int(), Str()))
    unique: bool = True

    def problem(self, value: Any, where: Where = ()) -> Problem | None:
        found = super().problem(value, where)
        if found or not value:
            return found
        kind = type(value[0])
        mixed = next((i for i, item in enumerate(value) if type(item) is not kind), None)
        if mixed is not None:
            return (*where, mixed), f"mixes id types: {describe(value[mixed])} after {describe(value[0])} at [0]"
        return None


@dataclass(frozen=True)
class MapOf(Schema):
    """A JSON object whose every value is ``value``; ``keys`` (a :class:`Str`) checks the keys."""

    value: Schema = field(default_factory=Anything)
    keys: Str | None = None
    expected = "an object"

    def problem(self, value: Any, where: Where = ()) -> Problem | None:
        if not isinstance(value, dict):
            return where, f"expected an object, got {describe(value)}"
        for key, item in value.items():
            if self.keys is not None and not self.keys.accepts(key):
                return (*where, key), f"key expected to be {self.keys.expected}"
            problem = self.value.problem(item, (*where, key))
            if problem:
                return problem
        return None


@dataclass(frozen=True)
class Record(Schema):
    """A JSON object with the ``required`` keys and, when present, the ``optional`` ones (others are allowed)."""

    required: Mapping[str, Schema] = field(default_factory=dict)
    optional: Mapping[str, Schema] = field(default_factory=dict)
    expected = "an object"

    def problem(self, value: Any, where: Where = ()) -> Problem | None:
        if not isinstance(value, dict):
            return where, f"expected an object, got {describe(value)}"
        for key, schema in self.required.items():
            if key not in value:
                return (*where, key), f"is missing (expected {schema.expected})"
        for key, schema in (*self.required.items(), *self.optional.items()):
            if key in value:
                problem = schema.problem(value[key], (*where, key))
                if problem:
                    return problem
        return None


def culprit(file: Any, where: Where = ()) -> str:
    """``"<file>: <key path>"`` (just the file for the whole value)."""
    path = render_path(where)
    return f"{file}: {path}" if path else str(file)


def find_problem(value: Any, schema: Schema) -> Problem | None:
    """The first ``(key path, problem)`` of ``value`` against ``schema``, or None when it fits."""
    return schema.problem(value, ())


def check(value: Any, schema: Schema, file: Any, error: type[ConceptLensError], fix: str, label: Label | None = None) -> Any:
    """Return ``value`` when it has ``schema``'s shape, else raise ``error`` naming ``file`` and the key path.

    Parameters
    ----------
    value : Any
        Parsed JSON.
    schema : Schema
        Its expected shape.
    file : str or Path
        The file it was read from (the culprit's start).
    error : type of ConceptLensError
        Raised on a mismatch.
    fix : str
        How the user fixes the file.
    label : callable, optional
        ``label(value, key path)`` renders a key path (to name list items by their id, say);
        default :func:`render_path`.

    Examples
    --------
    >>> check({"n": "12"}, Record({"n": Int(min=0)}), "a.json", ConceptLensError, "write it again")
    Traceback (most recent call last):
    ...
    conceptlens.concepts.errors.ConceptLensError: a.json: n: expected an integer >= 0, got '12' (a string) — fix: write it again
    """
    problem = find_problem(value, schema)
    if problem is not None:
        where, text = problem
        path = label(value, where) if label else render_path(where)
        raise error(f"{file}: {path}" if path else str(file), text, fix)
    return value

"""Parsing JSON text strictly: UTF-8 only, no key given twice, nesting bounded.

Every JSON file conceptlens reads (store manifests, bank and CAV-set metadata, result files,
dataset files such as ``splits.json`` and COCO annotations) is parsed here, by
:func:`parse_json`, before its shape is checked (:mod:`conceptlens.concepts.store.schema`):

- the bytes must be UTF-8 (a leading byte-order mark is allowed); anything else is refused
  naming the offset of the first bad byte;
- an object that gives a key twice is refused, naming the key path: ``json.loads`` would keep
  the last value silently, and another reader the first;
- lists and objects may nest at most :data:`MAX_DEPTH` levels deep; deeper text (100 000
  nested lists, say) is refused without a ``RecursionError``;
- ``NaN``, ``Infinity`` and ``-Infinity`` are read as floats, because artifact metadata written
  by conceptlens can hold them (a metric that is undefined); shapes that need finite numbers
  refuse them (:class:`conceptlens.concepts.store.schema.Number`).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_DEPTH", "JSONProblem", "parse_json", "render_path"]

MAX_DEPTH = 64


class JSONProblem(ValueError):
    """JSON text that cannot be used: ``where`` is the key path (``""`` for the whole text)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


class _Repeated(dict):
    """An object in which ``key`` was given more than once (found by :func:`_locate`)."""

    key: str = ""


def parse_json(raw: bytes | str) -> Any:
    """The value of JSON text, refusing non-UTF-8 bytes, repeated keys and deep nesting.

    Parameters
    ----------
    raw : bytes or str
        The text (bytes are decoded as UTF-8).

    Returns
    -------
    Any
        What :func:`json.loads` returns.

    Raises
    ------
    JSONProblem
        Naming the key path (when there is one) and what is wrong.

    Examples
    --------
    >>> parse_json(b'{"a": [1, 2.5, NaN]}')
    {'a': [1, 2.5, nan]}
    >>> parse_json('{"a": {"b": 1, "b": 2}}')
    Traceback (most recent call last):
    ...
    conceptlens.concepts.store.strict_json.JSONProblem: a: gives the key 'b' twice
    """
    text = _text(raw)
    repeated: list[bool] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(pairs)
        if len(value) == len(pairs):
            return value
        seen: set[str] = set()
        marked = _Repeated(value)
        marked.key = next(key for key, _ in pairs if key in seen or seen.add(key))
        repeated.append(True)
        return marked

    try:
        value = json.loads(text, object_pairs_hook=pairs_hook)
    except RecursionError:
        raise JSONProblem("", f"nests lists or objects deeper than the {MAX_DEPTH}-level limit") from None
    except ValueError as error:
        raise JSONProblem("", f"not valid JSON ({error})") from None
    if repeated or _depth(value) > MAX_DEPTH:
        _locate(value)
    return value


def _text(raw: bytes | str) -> str:
    """``raw`` as text: UTF-8 bytes decoded (a leading byte-order mark dropped)."""
    if isinstance(raw, str):
        return raw.removeprefix("\ufeff")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        bad = raw[error.start : error.start + 1].hex()
        raise JSONProblem("", f"is not UTF-8 text (byte 0x{bad} at offset {error.start})") from None


def _children(value: Any) -> list[tuple[str | int, Any]]:
    if isinstance(value, dict):
        return [(key, item) for key, item in value.items() if isinstance(item, (dict, list))]
    if isinstance(value, list):
        return [(index, item) for index, item in enumerate(value) if isinstance(item, (dict, list))]
    return []


def _depth(value: Any) -> int:
    """How many lists and objects deep ``value`` nests (0 for a scalar), without recursion."""
    deepest, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:
        deepest += 1
        if deepest > MAX_DEPTH:
            return deepest
        level = [item for container in level for _, item in _children(container)]
    return deepest


def _locate(value: Any) -> None:
    """Raise :class:`JSONProblem` at the first repeated key or the first container past :data:`MAX_DEPTH`."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        container, path = stack.pop()
        if isinstance(container, _Repeated):
            raise JSONProblem(render_path(path), f"gives the key {container.key!r} twice")
        if len(path) >= MAX_DEPTH:
            raise JSONProblem(render_path(path[:8]) + "…", f"nests lists or objects deeper than the {MAX_DEPTH}-level limit")
        stack.extend((item, (*path, key)) for key, item in reversed(_children(container)))


def render_path(path: tuple[str | int, ...] | list[str | int]) -> str:
    """A key path as text: ``images[3].id``, ``splits.train[0]``, ``metrics['a b']``.

    Examples
    --------
    >>> render_path(("images", 3, "id"))
    'images[3].id'
    >>> render_path(("metrics", "a b", 0))
    "metrics['a b'][0]"
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text

"""A strict, safe YAML reader for config files.

:class:`ConfigLoader` is :class:`yaml.SafeLoader` (plain data only, never Python objects) that
also refuses what a config never needs and a hostile file uses to hurt the reader: nesting deeper
than :data:`MAX_DEPTH`, more than :data:`MAX_ALIASES` aliases, a document that would expand (every
alias counted as a copy of what it names) to more than :data:`MAX_NODES` nodes ("billion laughs"),
an alias inside the node it names (a cycle), and duplicate keys in a mapping. Each refusal is a
:class:`RefusedYAML` naming the line, the key path and the fix; nothing large is ever built, since
the checks run on the composed node graph, whose size is that of the file.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["MAX_ALIASES", "MAX_DEPTH", "MAX_NODES", "ConfigLoader", "RefusedYAML", "load_yaml"]

#: Deepest nesting of mappings and lists (a config needs 5: ``tcav.targets[0].models[0]``).
MAX_DEPTH = 32
#: Most aliases (``*name``) in one file.
MAX_ALIASES = 100
#: Most nodes of the document with every alias expanded.
MAX_NODES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML, or nearly, that a config file may not contain.

    Attributes
    ----------
    key_path : str
        Where in the document (``embed.batch_size``, ``models[0]``; empty: the top level).
    fix : str
        How to fix the file.
    """

    def __init__(self, problem: str, mark: yaml.Mark | None, fix: str, key_path: str = "") -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.fix, self.key_path = fix, key_path


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with bounds on depth, aliases and expanded size, and no duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Compose one node, counting aliases and nesting before the composer recurses."""
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise RefusedYAML(f"more than {MAX_ALIASES} aliases", self.peek_event().start_mark,
                                  "write the values out; a config needs few aliases (&name / *name)")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RefusedYAML(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark,
                                  "flatten the file: a config nests a few levels only")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """Build one value; a value Python cannot hold (a 5000-digit integer, 30 February) is refused at its line."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as error:
            raise RefusedYAML(f"{node.value!r:.40} cannot be read ({error})", node.start_mark,
                              "write a number Python can hold, or a valid date, or quote the value as a string") from None

    def construct_document(self, node: yaml.Node) -> Any:
        """Check the whole node graph (expanded size, cycles, duplicate keys), then build the data."""
        _GraphCheck(self).measure(node, "")
        return super().construct_document(node)


class _GraphCheck:
    """One pass over the composed graph: expanded size and depth (memoised per node), cycles, duplicate keys."""

    def __init__(self, loader: ConfigLoader) -> None:
        self.loader = loader
        self.sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
        self.open: set[int] = set()

    def measure(self, node: yaml.Node, path: str) -> tuple[int, int]:
        key = id(node)
        if key in self.sizes:
            return self.sizes[key]
        if key in self.open:
            raise RefusedYAML("an alias refers to the mapping or list that contains it (a cycle)", node.start_mark,
                              "remove the alias; a config is a tree", path)
        self.open.add(key)
        size, depth = 1, 0
        for child_path, child in self._children(node, path):
            child_size, child_depth = self.measure(child, child_path)
            size, depth = size + child_size, max(depth, child_depth)
            if size > MAX_NODES or depth + 1 > MAX_DEPTH:
                what = f"more than {MAX_NODES} values" if size > MAX_NODES else f"more than {MAX_DEPTH} levels"
                raise RefusedYAML(f"with its aliases expanded, the document holds {what} (an alias bomb?)", child.start_mark,
                                  "write the values out instead of nesting aliases", child_path)
        self.open.discard(key)
        self.sizes[key] = (size, depth + 1)
        return self.sizes[key]

    def _children(self, node: yaml.Node, path: str) -> list[tuple[str, yaml.Node]]:
        if isinstance(node, yaml.SequenceNode):
            return [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            return []
        self._refuse_duplicate_keys(node, path)
        children = []
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "<key>"
            children += [(path, key_node), (f"{path}.{name}" if path else str(name), value_node)]
        return children

    def _refuse_duplicate_keys(self, node: yaml.MappingNode, path: str) -> None:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # merged keys (<<) may be overridden, as YAML intends
            key = self.loader.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the constructor refuses it
                continue
            if first is not key_node:
                where = f"{path}.{key}" if path else str(key)
                raise RefusedYAML(f"duplicate key {key!r} (first on line {first.start_mark.line + 1}, again on line {key_node.start_mark.line + 1})",
                                  key_node.start_mark, "keep one of the two; YAML keys must be unique", where)


def load_yaml(text: str) -> Any:
    """Parse one YAML document with :class:`ConfigLoader`.

    Parameters
    ----------
    text : str
        The document.

    Returns
    -------
    Any
        Plain data: dicts, lists, strings, numbers, booleans, None (dates stay as YAML builds them).

    Raises
    ------
    yaml.YAMLError
        Invalid YAML, a tag naming a Python object (:class:`yaml.constructor.ConstructorError`), or
        a :class:`RefusedYAML`.

    Examples
    --------
    >>> load_yaml("a: 1\\nb: [x, y]")
    {'a': 1, 'b': ['x', 'y']}
    >>> load_yaml("a: 1\\na: 2")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    conceptlens.config_yaml.RefusedYAML: duplicate key 'a' (first on line 1, again on line 2)
    ...
    """
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()

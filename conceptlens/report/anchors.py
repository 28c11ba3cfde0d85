"""The ``id`` of every place in the report that a finding or a table links to (``href="#…"``).

One function per kind of target, shared by the sections (which carry the ids) and the findings
(which link to them), so that a link and its target are spelled in one place. An id keeps the
names' letters, digits, ``_`` and ``-``; a name with any other character (a space, a dot, a
colon…) gets a short hash of the whole name appended, so that two names never share an id.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["concept_anchor", "ncav_anchor", "pair_anchor", "slug", "tcav_anchor"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def slug(*parts: str) -> str:
    """``parts`` joined by ``-`` as an HTML id: safe characters kept, a hash added when any were replaced."""
    text = "-".join(str(part) for part in parts)
    safe = _UNSAFE.sub("-", text).strip("-") or "x"
    if safe == text:
        return safe
    return f"{safe}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:6]}"


def concept_anchor(concept: str) -> str:
    """The per-concept view's block of ``concept``."""
    return "concept-" + slug(concept)


def pair_anchor(a: str, b: str) -> str:
    """The layer-similarity heatmaps of models ``a`` (rows) and ``b`` (columns)."""
    return "similarity-" + slug(a, "vs", b)


def ncav_anchor(model: str, layer: str) -> str:
    """The NCAV prototypes figure of ``model``'s ``layer``."""
    return "ncavs-" + slug(model, layer)


def tcav_anchor(target: str) -> str:
    """The TCAV chart of ``target``."""
    return "tcav-" + slug(target)

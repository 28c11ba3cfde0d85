"""Target specs without torch: the forms ``logit:K``, ``prob:K``, ``top:K[:MIN_SCORE]``,
``box:K|any:x0,y0,x1,y1``, their syntax check and the lookup of class names.

:func:`conceptlens.attribution.targets.target_from_spec` builds the differentiable target of a
spec; this module only parses it, so that configs and the command line can check specs (and
print the accepted forms in ``--help``) without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from conceptlens.concepts.errors import ConceptLensError, closest_names

__all__ = ["CLASS_KINDS", "SPEC_FORMS", "TargetError", "TargetSpec", "check_target_spec", "display", "resolve_class"]

#: Accepted forms of :func:`target_from_spec`, for error messages and CLI help.
SPEC_FORMS = ("logit:K, prob:K, top:K, top:K:MIN_SCORE, box:K:x0,y0,x1,y1 or box:any:x0,y0,x1,y1 "
              "(K an integer class/label id, or a class name such as logit:\"Egyptian cat\" or top:car when the model's class names are known)")


class TargetError(ConceptLensError):
    """A target spec is malformed, or a model output does not fit the target."""

#: Target kinds of classifiers (one class id each).
CLASS_KINDS = ("logit", "prob")


# -- spec parser ---------------------------------------------------------------------------------


def display(name: str, category: str | None) -> str:
    """``logit:285 (Egyptian cat)``; the bare name when the class name is unknown."""
    return f"{name} ({category})" if category else name


def _bad(spec: str, problem: str) -> TargetError:
    return TargetError(f"target {spec!r}", problem, f"use one of {SPEC_FORMS}")


@dataclass(frozen=True)
class TargetSpec:
    """A target spec split into its parts (:func:`check_target_spec`), before class names are looked up.

    ``kind`` is ``logit``, ``prob``, ``top`` or ``box``; ``cls`` an integer id, a class name (str)
    or None (``box:any``); ``min_score`` and ``box`` as given.
    """

    kind: str
    cls: int | str | None
    min_score: float = 0.0
    box: tuple[float, float, float, float] | None = None


def _split(spec: str) -> list[str]:
    """Split at ``:`` outside double or single quotes (a class name may hold a colon)."""
    parts, current, quote = [], "", None
    for char in spec:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ":":
            parts.append(current)
            current = ""
            continue
        current += char
    if quote:
        raise _bad(spec, f"unclosed quote {quote} in the class name")
    return [*parts, current]


def _class_part(text: str, spec: str) -> int | str:
    """An integer id, or a class name (quotes removed)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        name = text[1:-1].strip()
        if not name:
            raise _bad(spec, "the class name is empty")
        return name
    try:
        return int(text)
    except ValueError:
        pass
    if not text:
        raise _bad(spec, "the class id is empty")
    return text


def _parse(spec: str) -> TargetSpec:
    if not isinstance(spec, str):
        raise _bad(str(spec), "a target spec must be a string")
    parts = _split(spec.strip())
    kind = parts[0].lower()
    if kind in CLASS_KINDS:
        if len(parts) != 2:
            raise _bad(spec, f"{kind} takes exactly one class id")
        return TargetSpec(kind, _class_part(parts[1], spec))
    if kind == "top":
        if len(parts) not in (2, 3):
            raise _bad(spec, "top takes a label and optionally a minimum score")
        min_score = 0.0
        if len(parts) == 3:
            try:
                min_score = float(parts[2])
            except ValueError:
                raise _bad(spec, f"{parts[2]!r} is not a number (minimum score)") from None
        return TargetSpec(kind, _class_part(parts[1], spec), min_score)
    if kind == "box":
        if len(parts) != 3:
            raise _bad(spec, "box takes a label (or 'any') and four comma-separated coordinates")
        label = None if parts[1].strip().lower() == "any" else _class_part(parts[1], spec)
        try:
            coords = [float(v) for v in parts[2].split(",")]
        except ValueError:
            raise _bad(spec, f"{parts[2]!r} is not four comma-separated numbers") from None
        if len(coords) != 4 or not all(math.isfinite(v) for v in coords):
            raise _bad(spec, f"{parts[2]!r} is not four finite comma-separated numbers")
        if coords[2] <= coords[0] or coords[3] <= coords[1]:
            raise _bad(spec, "the box needs x1 > x0 and y1 > y0 (xyxy)")
        return TargetSpec(kind, label, box=(coords[0], coords[1], coords[2], coords[3]))
    raise _bad(spec, f"unknown target kind {parts[0]!r}")


#: Placeholder names in class lists (COCO's unused ids, the background) that are never a target's class.
_NOT_CLASSES = ("N/A", "__background__")


def resolve_class(cls: int | str, spec: str, categories: Sequence[str] | None) -> tuple[int, str | None]:
    """The class id and its name: an id is kept (named when the list has it), a name is looked up."""
    if isinstance(cls, int):
        named = categories is not None and -len(categories) <= cls < len(categories) and categories[cls] not in _NOT_CLASSES
        return cls, str(categories[cls]) if named else None
    if categories is None:
        raise TargetError(f"target {spec!r}", f"{cls!r} is not an integer class id, and this model's class names are unknown",
                          f"use an integer class id (one of {SPEC_FORMS.split(' (')[0]})")
    names = [str(name) for name in categories]
    for matches in ([i for i, name in enumerate(names) if name == cls], [i for i, name in enumerate(names) if name.casefold() == cls.casefold()]):
        matches = [i for i in matches if names[i] not in _NOT_CLASSES]
        if len(matches) == 1:
            return matches[0], names[matches[0]]
        if len(matches) > 1:
            ids = ", ".join(str(i) for i in matches)
            raise TargetError(f"target {spec!r}", f"{cls!r} names {len(matches)} classes ({ids})", f"use the class id, e.g. {spec.split(':')[0]}:{matches[0]}")
    known = [name for name in names if name not in _NOT_CLASSES]
    raise TargetError(f"target {spec!r}", f"{cls!r} is not a class name of this model", f"{closest_names(cls, known)}; or use an integer class id")


def check_target_spec(spec: str) -> TargetSpec:
    """Check a target spec's syntax without the model: class names are accepted, checked later
    by :func:`conceptlens.attribution.targets.target_from_spec` with the model's ``categories``.

    Parameters
    ----------
    spec : str
        A spec of the forms :data:`SPEC_FORMS`.

    Returns
    -------
    TargetSpec

    Raises
    ------
    TargetError
        If the spec is malformed; the message lists the accepted forms.

    Examples
    --------
    >>> check_target_spec('logit:"Egyptian cat"')
    TargetSpec(kind='logit', cls='Egyptian cat', min_score=0.0, box=None)
    >>> check_target_spec("top:3:0.5").cls
    3
    """
    return _parse(spec)

"""Errors raised for bad input.

Every error names its culprit (a file, layer, concept or key) and says how to fix it, on one
line, so that the CLI can print it without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "closest_names",
    "ConceptLensError",
    "DataError",
    "ModelSpecError",
    "LayerError",
    "StoreError",
    "WriteError",
]


class ConceptLensError(Exception):
    """Base class of every error caused by bad input or a bad environment.

    Parameters
    ----------
    culprit : str
        What is wrong: a file path, layer name, concept name or config key.
    problem : str
        What is wrong with it.
    fix : str, optional
        How the user can fix it.
    """

    def __init__(self, culprit: str, problem: str, fix: str | None = None) -> None:
        self.culprit = _one_line(culprit)
        self.problem = _one_line(problem)
        self.fix = _one_line(fix) if fix else fix
        culprit, problem, fix = self.culprit, self.problem, self.fix
        message = f"{culprit}: {problem}"
        if fix:
            message += f" — fix: {fix}"
        super().__init__(message)


def _one_line(text: str) -> str:
    """Join the lines of ``text`` (an embedded exception message, say) so that the error stays one line."""
    if not isinstance(text, str) or not ("\n" in text or "\r" in text):
        return text
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class DataError(ConceptLensError):
    """A concept dataset (images, masks, annotations) is missing or malformed."""


class ModelSpecError(ConceptLensError):
    """A model spec cannot be resolved, or its weights are missing."""


class LayerError(ConceptLensError):
    """A layer name does not exist in the model or its output cannot be captured."""


class StoreError(ConceptLensError):
    """The activation store cannot be read or written."""


class WriteError(ConceptLensError):
    """A file cannot be written: the disk is full or the folder is read-only."""


def closest_names(word: str, options: Iterable[str], n: int = 5, whole: int = 10) -> str:
    """Name the options closest to ``word``, for an error message about an unknown name.

    The options are ordered closest first. A short list (at most ``whole`` options) is shown
    whole; a long one (1000 ImageNet classes, a model's hundreds of layers) is cut to the ``n``
    closest names and its size.

    Parameters
    ----------
    word : str
        The unknown name the user gave.
    options : iterable of str
        Every accepted name, in their natural order.
    n : int
        How many names a long list is cut to.
    whole : int
        Lists up to this length are shown whole.

    Returns
    -------
    str
        ``"did you mean 'car'? closest: car, cart, scar (of 80)"``; a short list without the count
        (``"closest: b, a, c"``), the question only when one name is close; ``"none are known"``
        when there are no options.

    Examples
    --------
    >>> closest_names("dgo", ["cat", "dog", "bird"])
    "did you mean 'dog'? closest: dog, bird, cat"
    >>> closest_names("layer5", [f"layer{i}" for i in range(1, 60)], n=3)
    "did you mean 'layer5'? closest: layer5, layer15, layer25 (of 59)"
    """
    names = [str(option) for option in dict.fromkeys(options)]
    if not names:
        return "none are known"
    ranked = sorted(range(len(names)), key=lambda i: (-_likeness(str(word), names[i]), i))
    best = names[ranked[0]] if _likeness(str(word), names[ranked[0]]) >= 0.6 else None
    hint = f"did you mean {best!r}? " if best is not None else ""
    if len(names) <= whole:
        return f"{hint}closest: {', '.join(names[i] for i in ranked)}"
    return f"{hint}closest: {', '.join(names[i] for i in ranked[:n])} (of {len(names)})"


def _likeness(word: str, name: str) -> float:
    """How alike two names are, case-insensitively: 1 equal, else difflib's ratio, raised when one contains the other
    (the more so when it is a whole word of it)."""
    word, name = word.casefold(), name.casefold()
    if word == name:
        return 1.0
    ratio = difflib.SequenceMatcher(None, word, name).ratio()
    short, long = sorted((word, name), key=len)
    if not short or short not in long:
        return ratio
    whole_word = short in long.replace("_", " ").replace(".", " ").split()
    return max(ratio, 0.7 + 0.2 * len(short) / len(long) + (0.05 if whole_word else 0.0))

"""Errors raised for bad input.

Every error names its culprit (a file, layer, concept or key) and says how to fix it, on one
line, so that the CLI can print it without a traceback.
"""

from __future__ import annotations

__all__ = [
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

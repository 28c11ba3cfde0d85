"""Declarative hyper-parameter validation shared by every concept estimator.

Each estimator declares ``_parameter_constraints``: for every ``__init__`` parameter, the list of
constraints any one of which the value may satisfy (like scikit-learn's). :func:`validate_params`
checks them in ``fit`` and raises one :class:`ParameterError` that names the estimator, the
parameter and its value (the culprit), what is wrong, and what to pass instead.

>>> from conceptlens.probes.params import Interval, Options, validate_params
>>> class Probe:
...     _parameter_constraints = {"lr": [Interval(float, 0, None, closed="neither")], "loss": [Options("bce", "dice")]}
...     def __init__(self, lr=1e-3, loss="bce"):
...         self.lr, self.loss = lr, loss
>>> validate_params(Probe(lr=-1.0))
Traceback (most recent call last):
...
conceptlens.probes.params.ParameterError: Probe(lr=-1.0): must be a number > 0 — fix: pass lr as a number > 0
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from conceptlens.concepts.errors import ConceptLensError

__all__ = ["Interval", "Options", "ParameterError", "Predicate", "validate_params"]


class ParameterError(ConceptLensError, ValueError):
    """A hyper-parameter outside its allowed values (also a ``ValueError``, as scikit-learn expects)."""


@dataclass(frozen=True)
class Interval:
    """A real or integral number within bounds.

    Parameters
    ----------
    kind : {int, float}
        ``int`` accepts integers only (not bools); ``float`` accepts any finite real number.
    low, high : float or None
        Bounds; ``None`` is unbounded.
    closed : {'both', 'left', 'right', 'neither'}
        Which bounds belong to the interval.
    """

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if not math.isfinite(float(value)):
            return False
        low_ok = self.low is None or (value >= self.low if self.closed in ("both", "left") else value > self.low)
        high_ok = self.high is None or (value <= self.high if self.closed in ("both", "right") else value < self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        left = ">=" if self.closed in ("both", "left") else ">"
        right = "<=" if self.closed in ("both", "right") else "<"
        if self.low is not None and self.high is not None:
            return f"{noun} with {_number(self.low)} {'<=' if left == '>=' else '<'} value {right} {_number(self.high)}"
        if self.low is not None:
            return f"{noun} {left} {_number(self.low)}"
        if self.high is not None:
            return f"{noun} {right} {_number(self.high)}"
        return noun


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (strings, ``None``, booleans)."""

    values: tuple[Any, ...]

    def __init__(self, *values: Any) -> None:
        object.__setattr__(self, "values", tuple(values))

    def accepts(self, value: Any) -> bool:
        return any(value is option or (type(value) is type(option) and value == option) for option in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(option) for option in self.values)


@dataclass(frozen=True)
class Predicate:
    """Any other rule: a function of the value and the sentence that describes what it accepts."""

    test: Any
    description: str

    def accepts(self, value: Any) -> bool:
        return bool(self.test(value))

    def describe(self) -> str:
        return self.description


def validate_params(estimator: Any, constraints: dict[str, list[Any]] | None = None) -> None:
    """Check every declared parameter of ``estimator``; raise :class:`ParameterError` on the first bad one.

    Parameters
    ----------
    estimator : object
        Has the parameters as attributes and, unless ``constraints`` is given, a class attribute
        ``_parameter_constraints``.
    constraints : dict, optional
        ``{parameter: [constraint, ...]}``; a value passes when any one constraint accepts it.
    """
    name = type(estimator).__name__
    for parameter, allowed in (constraints if constraints is not None else estimator._parameter_constraints).items():
        value = getattr(estimator, parameter)
        if not any(rule.accepts(value) for rule in allowed):
            wanted = " or ".join(rule.describe() for rule in allowed)
            raise ParameterError(f"{name}({parameter}={value!r})", f"must be {wanted}", f"pass {parameter} as {wanted}")


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)

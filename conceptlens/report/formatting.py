"""Numbers and names as the report writes them: two decimals, p-values, durations, method labels."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["METHOD_NAMES", "STATISTIC_NAMES", "duration", "f2", "f3g", "join_words", "number", "p_phrase", "p_value"]

class _MethodNames(Mapping):
    """Each registered concept method's report name (``ConceptMethod.report_name``), looked up when read."""

    def __getitem__(self, method: str) -> str:
        from conceptlens.probes.registry import MethodError, get_method

        try:
            return get_method(method).report_name
        except MethodError:
            raise KeyError(method) from None

    def __iter__(self) -> Iterator[str]:
        from conceptlens.probes.registry import method_names

        return iter(method_names())

    def __len__(self) -> int:
        return len(tuple(iter(self)))


#: How the report names each concept method (figures, tables, findings): ``'supervised, Net2Vec'`` …
METHOD_NAMES: Mapping[str, str] = _MethodNames()
#: How the report names each TCAV statistic.
STATISTIC_NAMES = {"sign_count": "TCAV", "magnitude": "TCAV magnitude", "mean_sensitivity": "mean sensitivity"}


def number(value: Any) -> float:
    """``value`` as a float; NaN for None and for anything that is not a number."""
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def f2(value: Any) -> str:
    """Two decimals, or "—" for a missing value."""
    value = number(value)
    return "—" if math.isnan(value) else f"{value:.2f}"


def f3g(value: Any) -> str:
    """Three significant digits, or "—" for a missing value."""
    value = number(value)
    return "—" if math.isnan(value) else f"{value:.3g}"


def p_value(value: Any) -> str:
    """A p-value to three decimals, "< 0.001" below that, "—" when missing."""
    value = number(value)
    if math.isnan(value):
        return "—"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def p_phrase(name: str, value: Any) -> str:
    """``name = 0.012`` or ``name < 0.001``."""
    text = p_value(value)
    return f"{name} {text}" if text.startswith("<") else f"{name} = {text}"


def duration(seconds: Any) -> str:
    """Seconds as "4.2 s", "3 min 05 s" or "1 h 02 min"; "—" when missing."""
    seconds = number(seconds)
    if math.isnan(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


def join_words(parts: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

"""Typed records of the result files: what ``run.json``, ``probe_<model>_<method>.json``,
``compare_<method>/compare.json``, ``tcav.json`` and the report inputs' metadata hold.

The writers (the pipeline, :func:`conceptlens.compare_output.write_comparison`,
:func:`conceptlens.tcav_step.write_tcav`) build these records and write :meth:`to_json`; the
report reads them back with :meth:`from_json`. A record's field names are the file's keys, in the
file's order, so a key is spelled in one place only.

Reading checks the structure (objects, lists, nested records) and raises :class:`ResultsError`
naming the field; scalar values are kept as written (a number may be ``null``, see
:func:`conceptlens.report.formatting.number`). Keys a record does not know are ignored; keys it
knows but the file lacks take the field's default, so files written by older versions (or by hand)
still read.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.store.artifacts import read_json, write_json
from conceptlens.report.formatting import number

__all__ = [
    "EXAMPLES_KIND", "PROTOTYPES_KIND", "REPORT_INPUTS_VERSION", "BestLayer", "Block", "Comparison", "DataInfo", "ExamplesMeta", "LayerInfo", "ModelInfo", "NCAVLabel", "ProbeResults",
    "PrototypesMeta", "ResultsError", "Ridge", "RidgePair", "RunSummary", "StepTime", "TCAVResults", "TCAVRow", "WorkerTime",
]

#: Artifact kinds and format version of the report inputs (``examples/<model>.*``, ``prototypes/<model>.*``).
EXAMPLES_KIND = "report-examples"
PROTOTYPES_KIND = "report-prototypes"
REPORT_INPUTS_VERSION = 1

#: Field metadata of a key that some writers leave out: written only when its value is not None.
_OMIT_IF_NONE = {"omit_if_none": True}
_R = TypeVar("_R", bound="_Record")


class ResultsError(ConceptLensError):
    """A result file does not hold what its record expects."""


class _Record:
    """JSON conversion of a frozen dataclass, driven by its fields and their type hints."""

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-able data (records become dicts, tuples lists), keys in field order."""
        out = {}
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if value is None and item.metadata.get("omit_if_none"):
                continue
            out[item.name] = _encode(value)
        return out

    @classmethod
    def from_json(cls: type[_R], data: Any) -> _R:
        """The record of loaded JSON ``data``; raises :class:`ResultsError` on a wrong structure."""
        if not isinstance(data, Mapping):
            raise ResultsError(cls.__name__, f"is a {_kind(data)}, not a JSON object", "write the file again")
        hints = _hints(cls)
        values = {item.name: _decode(data[item.name], hints[item.name], f"{cls.__name__}.{item.name}")
                  for item in dataclasses.fields(cls) if item.name in data}  # type: ignore[arg-type]
        return cls(**values)

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (atomically; non-finite numbers become ``null``)."""
        return write_json(path, self.to_json())

    @classmethod
    def read(cls: type[_R], path: str | Path, error: type[ConceptLensError] = ResultsError, fix: str = "run the step that writes it again") -> _R:
        """Read the record from the JSON file ``path``; raise ``error`` naming the file and ``fix``."""
        data = read_json(path, error, fix=fix)
        try:
            return cls.from_json(data)
        except ResultsError as problem:
            raise error(str(path), f"{problem.culprit} {problem.problem}", fix) from problem


def _encode(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_json()
    if isinstance(value, Mapping):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint``: records, tuples and dicts are built, scalars kept as they are."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        return _decode(value, options[0], where) if len(options) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ResultsError(where, f"is a {_kind(value)}, not a list", "write the file again")
        item = typing.get_args(hint)[0]
        return tuple(_decode(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ResultsError(where, f"is a {_kind(value)}, not a JSON object", "write the file again")
        item = typing.get_args(hint)[1]
        return {key: _decode(v, item, f"{where}[{key!r}]") for key, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, _Record):
        try:
            return hint.from_json(value)
        except ResultsError as problem:  # the culprit's path, from the file's top: Comparison.blocks[0].ridge …
            inner = problem.culprit
            culprit = where + inner[len(hint.__name__):] if inner == hint.__name__ or inner.startswith(f"{hint.__name__}.") else inner
            raise ResultsError(culprit, problem.problem, problem.fix) from problem
    return _scalar(value, hint, where)


#: What a scalar field accepts (a float field takes integers too; booleans are never numbers).
_SCALARS: dict[Any, tuple[str, Any]] = {
    str: ("a string", lambda v: isinstance(v, str)),
    bool: ("a boolean", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
}


def _scalar(value: Any, hint: Any, where: str) -> Any:
    """``value`` when it is of the scalar type ``hint`` (any value for other hints), else a ResultsError."""
    expected, accepts = _SCALARS.get(hint, (None, None))
    if accepts is not None and not accepts(value):
        raise ResultsError(where, f"is {_a(_kind(value))}, not {expected}", "write the file again")
    return value


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _kind(value: Any) -> str:
    return {dict: "JSON object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


Matrix = tuple[tuple[Any, ...], ...]  # rows of numbers (None where undefined)


def _is_matrix(value: Any) -> bool:
    """True for a decoded :data:`Matrix` (a tuple of tuples)."""
    return isinstance(value, tuple) and all(isinstance(row, tuple) for row in value)


# ---------------------------------------------------------------------------------------------
# run.json


@dataclass(frozen=True)
class WorkerTime(_Record):
    """One Ray worker's share of a step: its processes (a restarted worker gets a new one), node, time and work done."""

    worker: int = 0
    pids: tuple[int, ...] = ()
    node: str | None = None
    seconds: float | None = None
    units: int = 0  # images embedded, or banks fitted


@dataclass(frozen=True)
class StepTime(_Record):
    """One step of a run: its name, wall time and whether it was skipped (results up to date).

    ``workers``: per Ray worker, for the steps that ran on a Ray cluster (absent otherwise).
    """

    name: str = ""
    seconds: float | None = None
    skipped: bool = False
    workers: tuple[WorkerTime, ...] | None = field(default=None, metadata=_OMIT_IF_NONE)


@dataclass(frozen=True)
class DataInfo(_Record):
    """The concept dataset of a run."""

    spec: str | None = None
    name: str | None = None
    n_images: int | None = None
    concepts: tuple[str, ...] = ()
    splits: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo(_Record):
    """One probed model of a run; ``depths`` / ``module_depths`` are None when no probe ran."""

    name: str | None = None
    spec: str | None = None
    weights: str | None = None
    hash: str | None = None
    layers: tuple[str, ...] = ()
    depths: tuple[float, ...] | None = None
    module_depths: tuple[float, ...] | None = None


@dataclass(frozen=True)
class RunSummary(_Record):
    """``run.json``: the config, data, models, versions and time per step of a pipeline run."""

    name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str | None = None
    seed: int | None = None
    device: str | None = None
    threads: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    data: DataInfo | None = None
    models: tuple[ModelInfo, ...] = ()
    steps: tuple[StepTime, ...] = ()
    started: str | None = None
    total_seconds: float | None = None
    results_key: str | None = field(default=None, metadata=_OMIT_IF_NONE)
    sample_size: dict[str, Any] | None = field(default=None, metadata=_OMIT_IF_NONE)


# ---------------------------------------------------------------------------------------------
# probe_<model>_<method>.json


@dataclass(frozen=True)
class BestLayer(_Record):
    """The layer where a concept's test set IoU is highest, with its relative depth."""

    layer: str | None = None
    depth: float | None = None
    set_iou: float | None = None


@dataclass(frozen=True)
class ProbeResults(_Record):
    """A probe's test metrics per layer and concept (``probe_<model>_<method>.json``).

    ``metrics[layer][concept]`` holds the bank's metrics (Net2Vec: ``set_iou``, ``mean_iou`` …;
    NMF, per NCAV: ``matched_concept``, ``set_iou``, ``fidelity`` …). ``best_layer`` is written
    for Net2Vec only.
    """

    model: str | None = None
    dataset: str | None = field(default=None, metadata=_OMIT_IF_NONE)
    spec: str | None = field(default=None, metadata=_OMIT_IF_NONE)
    method: str | None = None
    layers: tuple[str, ...] | None = field(default=None, metadata=_OMIT_IF_NONE)
    depths: tuple[float, ...] | None = field(default=None, metadata=_OMIT_IF_NONE)
    module_depths: tuple[float, ...] | None = field(default=None, metadata=_OMIT_IF_NONE)
    metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    provenance: dict[str, Any] | None = field(default=None, metadata=_OMIT_IF_NONE)
    best_layer: dict[str, BestLayer] | None = field(default=None, metadata=_OMIT_IF_NONE)
    sample_size: dict[str, Any] | None = field(default=None, metadata=_OMIT_IF_NONE)

    def curve(self, concept: str) -> tuple[list[str], list[float], list[float]]:
        """Layers in depth order, their relative depths and ``concept``'s test set IoU (NaN where missing).

        Without depths (or with a wrong number of them) the layers are spread evenly over [0, 1].
        """
        layers, depths = list(self.layers or self.metrics.keys()), list(self.depths or [])
        if len(depths) != len(layers):
            depths = [i / max(1, len(layers) - 1) for i in range(len(layers))]
        order = sorted(range(len(layers)), key=lambda i: (number(depths[i]), i))
        ious = [number((self.metrics.get(layers[i], {}).get(concept) or {}).get("set_iou")) for i in order]
        return [layers[i] for i in order], [number(depths[i]) for i in order], ious

    def best(self, concept: str) -> BestLayer | None:
        """``concept``'s best layer (as written, else from :meth:`curve`); None without any set IoU."""
        written = (self.best_layer or {}).get(concept)
        if written is not None and written.layer is not None:
            return BestLayer(written.layer, number(written.depth), number(written.set_iou))
        layers, depths, ious = self.curve(concept)
        if not any(math.isfinite(v) for v in ious):
            return None
        i = int(np.nanargmax(ious))
        return BestLayer(layers[i], depths[i], ious[i])


# ---------------------------------------------------------------------------------------------
# compare_<method>/compare.json


@dataclass(frozen=True)
class LayerInfo(_Record):
    """One compared layer: its label ``<model>:<layer>`` and both relative depths."""

    label: str = ""
    model: str | None = None
    layer: str | None = None
    depth: float | None = None
    module_depth: float | None = None


@dataclass(frozen=True)
class RidgePair(_Record):
    """Row ``a``'s best-matching column ``b``, their depths and the similarity."""

    a: int = 0
    b: int = 0
    depth_a: float | None = None
    depth_b: float | None = None
    score: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> RidgePair:
        """Also reads a bare ``[a, b]`` pair (depths and score then come from the block)."""
        if isinstance(data, (list, tuple)) and len(data) == 2:
            return cls(_scalar(data[0], int, "RidgePair[0]"), _scalar(data[1], int, "RidgePair[1]"))
        return super().from_json(data)


@dataclass(frozen=True)
class Ridge(_Record):
    """Every row's best match and the correlation of the matched depths (None under 3 pairs)."""

    pairs: tuple[RidgePair, ...] = ()
    depth_correlation: float | None = None
    depth_correlation_ci: tuple[float | None, ...] | None = field(default=None, metadata=_OMIT_IF_NONE)


@dataclass(frozen=True)
class Block(_Record):
    """The sub-matrices of one model pair (``a`` rows, ``b`` columns) and the similarity's ridge."""

    a: str = ""
    b: str = ""
    rows: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    similarity: Matrix = ()
    cka_pooled: Matrix | None = None
    cka_spatial: Matrix | None = None
    ridge: Ridge | None = None
    # controls (absent when the run had them off): the similarity's permutation null, chance-corrected
    # score, p-value, bootstrap CI and Holm significance over the block's cells, then the same for CKA
    null_mean: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    corrected: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    p_value: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    ci_low: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    ci_high: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    significant: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_pooled_null_mean: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_pooled_corrected: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_pooled_p_value: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_pooled_ci_low: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_pooled_ci_high: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_pooled_significant: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_spatial_null_mean: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_spatial_corrected: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_spatial_p_value: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_spatial_ci_low: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_spatial_ci_high: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)
    cka_spatial_significant: Matrix | None = field(default=None, metadata=_OMIT_IF_NONE)

    @classmethod
    def from_json(cls, data: Any) -> Block:
        """Also checks that every matrix is rows × columns and every ridge pair indexes a row and a column."""
        block = super().from_json(data)
        shape = (len(block.rows), len(block.columns))
        for item in dataclasses.fields(cls):
            matrix = getattr(block, item.name)
            if _is_matrix(matrix) and matrix and (
                    len(matrix) != shape[0] or any(len(row) != shape[1] for row in matrix)):
                raise ResultsError(f"Block.{item.name}", f"is not {shape[0]} × {shape[1]} (rows × columns)", "write the file again")
        for i, pair in enumerate(block.ridge.pairs if block.ridge else ()):
            if not (0 <= pair.a < shape[0] and 0 <= pair.b < shape[1]):
                raise ResultsError(f"Block.ridge.pairs[{i}]", f"({pair.a}, {pair.b}) is outside the {shape[0]} × {shape[1]} block", "write the file again")
        return block

    def controlled(self, prefix: str = "") -> dict[str, Matrix] | None:
        """The control matrices of the similarity (``prefix`` ``""``) or of CKA (``"cka_pooled_"``,
        ``"cka_spatial_"``): ``null_mean``, ``corrected``, ``p_value``, ``ci_low``, ``ci_high``,
        ``significant``; None when the run had no controls for it."""
        keys = ("null_mean", "corrected", "p_value", "ci_low", "ci_high", "significant")
        values = {key: getattr(self, prefix + key) for key in keys}
        return values if values["corrected"] is not None else None

    def ridge_pairs(self, depth_of: Mapping[str, float]) -> list[tuple[int, int, float, float, float]]:
        """Ridge pairs as (row, column, depth_a, depth_b, score), missing depths and scores filled in."""
        pairs = []
        for pair in (self.ridge.pairs if self.ridge else ()):
            i, j = int(pair.a), int(pair.b)
            da, db, score = number(pair.depth_a), number(pair.depth_b), number(pair.score)
            if math.isnan(da):
                da = depth_of.get(f"{self.a}:{self.rows[i]}", math.nan)
            if math.isnan(db):
                db = depth_of.get(f"{self.b}:{self.columns[j]}", math.nan)
            if math.isnan(score):
                score = number(self.similarity[i][j])
            pairs.append((i, j, da, db, score))
        return pairs

    def depth_ranks(self, depth_of: Mapping[str, float], side: str = "rows") -> list[int]:
        """Rank of each row (or column) of the block by relative depth."""
        model = self.a if side == "rows" else self.b
        names = self.rows if side == "rows" else self.columns
        depths = [depth_of.get(f"{model}:{name}", float(i)) for i, name in enumerate(names)]
        order = sorted(range(len(names)), key=lambda i: (depths[i], i))
        ranks = [0] * len(names)
        for rank, i in enumerate(order):
            ranks[i] = rank
        return ranks


@dataclass(frozen=True)
class Comparison(_Record):
    """``compare.json``: the layer × layer similarity of every compared layer, per model pair.

    ``matrix`` covers all layers × all layers; ``details`` the method's own matrices (per concept,
    or the NCAV matches); ``cka`` the pooled and spatial linear CKA (None without CKA).
    """

    method: str | None = None
    grid: tuple[int, ...] = ()
    n_test_images: int | None = None
    layers: tuple[LayerInfo, ...] = ()
    matrix: Matrix = ()
    details: dict[str, Any] = field(default_factory=dict)
    cka: dict[str, Matrix] | None = None
    blocks: tuple[Block, ...] = ()
    provenance: dict[str, Any] | None = field(default=None, metadata=_OMIT_IF_NONE)
    null: dict[str, Any] | None = field(default=None, metadata=_OMIT_IF_NONE)
    bootstrap: dict[str, Any] | None = field(default=None, metadata=_OMIT_IF_NONE)
    sample_size: dict[str, Any] | None = field(default=None, metadata=_OMIT_IF_NONE)
    step_key: str | None = field(default=None, metadata=_OMIT_IF_NONE)

    def depth_of(self) -> dict[str, float]:
        """Relative depth per layer label ``<model>:<layer>``."""
        return {layer.label: number(layer.depth) for layer in self.layers}


# ---------------------------------------------------------------------------------------------
# tcav.json


@dataclass(frozen=True)
class TCAVRow(_Record):
    """One TCAV hypothesis (concept, layer, target) with its statistic, the null and the test.

    ``metric_means`` holds the mean of every score metric; in the file each is a key
    ``<metric>_mean`` after ``ci_high``.
    """

    concept: str = ""
    layer: str = ""
    target: str = ""
    statistic: str | None = None
    n_inputs: int | None = None
    n_runs: int | None = None
    mean: float | None = None
    std: float | None = None
    null_mean: float | None = None
    null_std: float | None = None
    t: float | None = None
    p: float | None = None
    p_holm: float | None = None
    p_bonferroni: float | None = None
    significant: bool = False
    ci_low: float | None = None
    ci_high: float | None = None
    metric_means: dict[str, float | None] = field(default_factory=dict)
    # the test's validity (tcav.json of conceptlens.attribution.tcav, in its order): which test, run
    # spread, the naive input-only CI beside the corrected one, degenerate layers, robustness, power
    test: str | None = None
    run_std: float | None = None
    ci_naive_low: float | None = None
    ci_naive_high: float | None = None
    degenerate_layer: bool | None = None
    robust: bool | None = None
    random_sets_needed: int | None = None
    scores: dict[str, tuple[float | None, ...]] = field(default_factory=dict)
    null_scores: dict[str, tuple[float | None, ...]] = field(default_factory=dict)
    null_statistics: tuple[float | None, ...] | None = None
    null_complete: bool | None = None
    degenerate_reason: str | None = None
    variants: dict[str, dict[str, Any]] | None = None
    power: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The row with ``metric_means`` spelled out as ``<metric>_mean`` keys."""
        out = {}
        for key, value in super().to_json().items():
            if key == "metric_means":
                out.update({f"{metric}_mean": mean for metric, mean in value.items()})
            else:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Any) -> TCAVRow:
        """Reads the ``<metric>_mean`` keys into ``metric_means``."""
        row = super().from_json(data)
        names = {item.name for item in dataclasses.fields(cls)}
        means = {key[: -len("_mean")]: value for key, value in data.items() if key.endswith("_mean") and key not in names}
        return dataclasses.replace(row, metric_means=means)

    def adjusted_p(self, correction: str) -> float | None:
        """The p-value after ``correction`` (``holm`` or ``bonferroni``); the raw p for another name."""
        return getattr(self, f"p_{correction}") if f"p_{correction}" in {"p_holm", "p_bonferroni"} else self.p


@dataclass(frozen=True)
class TCAVResults(_Record):
    """``tcav.json``: every TCAV hypothesis, the test's settings and the inputs left out."""

    statistic: str = "sign_count"
    correction: str = "holm"
    alpha: float = 0.05
    n_bootstrap: int | None = None
    seed: int | None = None
    n_hypotheses: int | None = None
    test: str | None = None
    missing: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    records: tuple[TCAVRow, ...] = ()
    provenance: dict[str, Any] | None = None
    missing_lines: tuple[str, ...] = ()
    sample_size: dict[str, Any] | None = field(default=None, metadata=_OMIT_IF_NONE)
    step_key: str | None = field(default=None, metadata=_OMIT_IF_NONE)
    #: target name -> display name with the class name (``"vgg:top:1" -> "vgg:top:1 (car)"``), where the model's class names are known
    target_labels: dict[str, str] | None = field(default=None, metadata=_OMIT_IF_NONE)

    @classmethod
    def from_result(cls, result: Any, provenance: dict[str, Any]) -> TCAVResults:
        """The record of a :class:`conceptlens.attribution.tcav.TCAVResult` and its provenance."""
        data = result.to_dict()
        return dataclasses.replace(cls.from_json(data), provenance=provenance, missing_lines=tuple(result.missing_lines()))


# ---------------------------------------------------------------------------------------------
# report inputs: examples/<model>.json and prototypes/<model>.json (artifact metadata)


@dataclass(frozen=True)
class ExamplesMeta(_Record):
    """Segmentation examples of one model: image ids, concepts and each concept's best layer.

    The artifact's tensors: ``image_<i>`` (H, W, 3) uint8, ``truth_<i>`` (K, H, W) uint8 and
    ``pred_<i>`` (K, H, W) float16 probabilities, K = ``len(concepts)``.
    """

    model: str | None = None
    ids: tuple[Any, ...] = ()
    concepts: tuple[str, ...] = ()
    best_layers: dict[str, str] = field(default_factory=dict)
    n_examples: int | None = None
    step_key: str | None = field(default=None, metadata=_OMIT_IF_NONE)


@dataclass(frozen=True)
class NCAVLabel(_Record):
    """An NCAV and the known concept its map overlaps best (None: no match), with that set IoU.

    With controls on, ``control_iou``: the same match's IoU against masks permuted across the test
    images (seeded derangement) — the floor the match must clear by the controls' margin.
    """

    name: str | None = None
    label: str | None = None
    set_iou: float | None = None
    control_iou: float | None = field(default=None, metadata=_OMIT_IF_NONE)


@dataclass(frozen=True)
class PrototypesMeta(_Record):
    """NCAV prototypes of one model: per layer the NCAVs' labels and the held-out fidelity.

    With controls on, each label has its ``control_iou`` and ``control_margin`` is the controls'
    margin a match must clear its control by (omitted with controls off).

    The artifact's tensors: ``patches_<n>`` (k, p, s, s, 3) uint8 for the n-th layer of ``layers`` and, from
    this version on, ``heat_<n>`` (k, p, s, s) uint8: where each NCAV fires on its patches (255: its peak).
    """

    model: str | None = None
    layers: tuple[str, ...] = ()
    ncavs: dict[str, tuple[NCAVLabel, ...]] = field(default_factory=dict)
    fidelity: dict[str, float | None] = field(default_factory=dict)
    control_margin: float | None = field(default=None, metadata=_OMIT_IF_NONE)
    step_key: str | None = field(default=None, metadata=_OMIT_IF_NONE)

"""Read a results folder into one :class:`Results` (typed records, artifact tensors as numpy).

Two layouts are read. A pipeline run (``conceptlens run`` / ``demo``): ``run.json``,
``probe_<model>_<method>.json``, ``compare_<method>/``, ``tcav.json``, ``examples/`` and
``prototypes/``. The single commands' output folders: ``conceptlens probe`` writes
``probe_<method>.json`` (its model named by the file's ``model`` key), ``conceptlens compare``
writes ``compare.json`` with ``heatmaps/`` beside it, ``conceptlens tcav`` writes ``tcav.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.store.artifacts import read_artifact
from conceptlens.report.results import (
    EXAMPLES_KIND,
    PROTOTYPES_KIND,
    REPORT_INPUTS_VERSION,
    Comparison,
    ExamplesMeta,
    NCAVLabel,
    ProbeResults,
    PrototypesMeta,
    ResultsError,
    RunSummary,
    TCAVResults,
)

__all__ = ["ReportError", "ReportInput", "Results", "load_results"]

_FIX = "run the step that writes it again"
_M = TypeVar("_M", ExamplesMeta, PrototypesMeta)
_Record = TypeVar("_Record", RunSummary, ProbeResults, Comparison, TCAVResults)


class ReportError(ConceptLensError):
    """A results directory (or one of its files) cannot be read into a report."""


@dataclass(frozen=True)
class ReportInput(Generic[_M]):
    """A report-input artifact of one model: its metadata and its tensors as numpy arrays."""

    meta: _M
    tensors: dict[str, np.ndarray]


@dataclass(frozen=True)
class Results:
    """Everything a results folder holds for the report.

    ``models`` and ``concepts`` are in run order (run.json first, then what the probe files add);
    ``probes[model][method]``, ``compare[method]`` (Net2Vec first), ``heatmaps[method][file name]``
    (the comparison's PNG files), ``examples[model]`` and ``prototypes[model]``.
    """

    root: Path
    run: RunSummary | None = None
    models: tuple[str, ...] = ()
    concepts: tuple[str, ...] = ()
    probes: dict[str, dict[str, ProbeResults]] = field(default_factory=dict)
    compare: dict[str, Comparison] = field(default_factory=dict)
    heatmaps: dict[str, dict[str, Path]] = field(default_factory=dict)
    tcav: TCAVResults | None = None
    examples: dict[str, ReportInput[ExamplesMeta]] = field(default_factory=dict)
    prototypes: dict[str, ReportInput[PrototypesMeta]] = field(default_factory=dict)

    def probe(self, model: str, method: str) -> ProbeResults | None:
        """The ``method`` probe of ``model``, None when it did not run."""
        return (self.probes.get(model) or {}).get(method)

    def ncav_labels(self, model: str) -> dict[str, list[NCAVLabel]]:
        """Per layer, ``model``'s NCAVs with their matched concept and set IoU (NMF probe, else prototypes)."""
        probe = self.probe(model, "nmf")
        if probe:
            return {layer: [NCAVLabel(name, m.get("matched_concept"), m.get("set_iou")) for name, m in by_ncav.items()]
                    for layer, by_ncav in probe.metrics.items()}
        prototypes = self.prototypes.get(model)
        return {layer: list(ncavs) for layer, ncavs in (prototypes.meta.ncavs if prototypes else {}).items()}


def load_results(out: str | Path) -> Results:
    """Read the results folder ``out`` written by the pipeline.

    Parameters
    ----------
    out : str or Path
        The folder: ``run.json``, ``probe_<model>_<method>.json``, ``compare_<method>/``,
        ``tcav.json``, ``examples/<model>.*`` and ``prototypes/<model>.*``, each optional.

    Returns
    -------
    Results

    Raises
    ------
    ReportError
        ``out`` is not a folder, holds none of these files, or one of them cannot be read.
    """
    root = Path(out)
    if not root.is_dir():
        raise ReportError(str(root), "is not a directory", "give the results folder written by the pipeline")
    run = _read(RunSummary, root / "run.json") if (root / "run.json").is_file() else None
    models = [str(m.name) for m in (run.models if run else ()) if m.name is not None]
    probes = _probes(root, models)
    compare, heatmaps = _comparisons(root)
    models += [m for m in dict.fromkeys(str(layer.model) for c in compare.values() for layer in c.layers if layer.model) if m not in models]
    tcav = _read(TCAVResults, root / "tcav.json") if (root / "tcav.json").is_file() else None
    if run is None and not probes and not compare and tcav is None:
        raise ReportError(str(root), "holds no results (run.json, probe_*.json, compare.json, compare_*/, tcav.json)",
                          "give the folder a pipeline run, conceptlens probe, compare or tcav wrote (their --out)")
    return Results(
        root=root, run=run, models=tuple(models), concepts=tuple(_concepts(run, probes)), probes=probes, compare=compare, heatmaps=heatmaps,
        tcav=tcav, examples=_inputs(root / "examples", models, EXAMPLES_KIND, ExamplesMeta),
        prototypes=_inputs(root / "prototypes", models, PROTOTYPES_KIND, PrototypesMeta),
    )


def _read(record: type[_Record], path: Path) -> _Record:
    return record.read(path, ReportError, _FIX)


def _probe_methods() -> tuple[str, ...]:
    """The methods whose ``probe_<model>_<method>.json`` the report reads, in report order: the
    registry's pixel-level methods (``net2vec``, ``nmf``, then any registered later), then the
    image-level ones (``linear``: CAV accuracies)."""
    from conceptlens.probes.registry import method_names

    return method_names("pixel") + method_names("image")


def _probes(root: Path, models: list[str]) -> dict[str, dict[str, ProbeResults]]:
    """Every ``probe_<model>_<method>.json``, and the ``probe_<method>.json`` of ``conceptlens probe``
    (its model named by the file's ``model`` key); models not in run.json are appended to ``models``."""
    probes: dict[str, dict[str, ProbeResults]] = {}
    for method in _probe_methods():
        suffix = f"_{method}.json"
        for path in sorted(root.glob(f"probe_*{suffix}")):
            model = path.name[len("probe_"):-len(suffix)]
            if model not in models:
                models.append(model)
            probes.setdefault(model, {})[method] = _read(ProbeResults, path)
        single = root / f"probe_{method}.json"
        if single.is_file():
            record = _read(ProbeResults, single)
            model = _model_label(record.model)
            if model not in models:
                models.append(model)
            probes.setdefault(model, {})[method] = record
    return probes


def _model_label(spec: str | None) -> str:
    """How the report names the model of a ``conceptlens probe`` folder: its spec, a file's stem for a path, else "model"."""
    if not spec:
        return "model"
    text = str(spec)
    return Path(text).stem if ("/" in text or "\\" in text) else text


def _comparisons(root: Path) -> tuple[dict[str, Comparison], dict[str, dict[str, Path]]]:
    compare: dict[str, Comparison] = {}
    heatmaps: dict[str, dict[str, Path]] = {}
    rank = {method: i for i, method in enumerate(_probe_methods())}
    folders = sorted(root.glob("compare_*/compare.json"), key=lambda p: (rank.get(p.parent.name[len("compare_"):], len(rank)), p.parent.name))
    for path in folders:
        method = path.parent.name[len("compare_"):]
        compare[method] = _read(Comparison, path)
        heatmaps[method] = {f.name: f for f in sorted((path.parent / "heatmaps").glob("*.png"))}
    if (root / "compare.json").is_file():  # a `conceptlens compare` folder: one method, heatmaps/ beside it
        record = _read(Comparison, root / "compare.json")
        method = str(record.method or "compare")
        if method not in compare:
            compare[method] = record
            heatmaps[method] = {f.name: f for f in sorted((root / "heatmaps").glob("*.png"))}
    return compare, heatmaps


def _inputs(folder: Path, models: list[str], kind: str, meta_type: type[_M]) -> dict[str, ReportInput[_M]]:
    found = {}
    for model in models:
        if (folder / f"{model}.json").is_file():
            meta, tensors = read_artifact(folder / model, kind=kind, format_version=REPORT_INPUTS_VERSION, required=(), error=ReportError)
            try:
                record = meta_type.from_json(meta)
            except ResultsError as problem:
                raise ReportError(str(folder / f"{model}.json"), f"{problem.culprit} {problem.problem}", _FIX) from problem
            arrays = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in tensors.items()}
            found[model] = ReportInput(record, arrays)
    return found


def _concepts(run: RunSummary | None, probes: dict[str, dict[str, ProbeResults]]) -> list[str]:
    concepts = [str(c) for c in ((run.data.concepts if run and run.data else ()) or ())]
    for by_method in probes.values():
        net2vec = by_method.get("net2vec")
        for by_concept in (net2vec.metrics if net2vec else {}).values():
            concepts += [c for c in by_concept if c not in concepts]
    return concepts

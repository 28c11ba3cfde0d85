"""``conceptlens run CONFIG``: every step of a config, reusing the store and skipping finished steps.

Steps, in order: open the data; per model, Net2Vec and NMF probes (embedding first; activations
come from the store and banks from ``banks/`` when their provenance matches); layer comparison per
method; TCAV; report inputs (example overlays and NCAV prototypes, computed from stored
activations, without a forward pass); the HTML report. Steps that take gradients (TCAV) or write
report inputs keep a key — a hash of everything they depend on — next to their results and are
skipped when the key matches, so a second run of the same config runs no forward pass at all.

Results (one JSON per step plus CSV tables, each with provenance) and ``report.html`` go to the
output folder; ``run.json`` summarises the run (models, layers, data, seeds, versions, time per
step).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptlens.concepts.progress import progress_scope
from conceptlens.concepts.store.artifacts import artifact_paths, write_artifact
from conceptlens.concepts.data.concept_sets import concept_set_indices
from conceptlens.concepts.data.concept_sets import mask_coverage as _coverage
from conceptlens.concepts.data.dataset import ConceptDataset
from conceptlens.concepts.environment import package_versions, resolve_device
from conceptlens.concepts.errors import ConceptLensError, DataError, closest_names
from conceptlens.concepts.geometry import Geometry, features_to_grid
from conceptlens.concepts.models.loading import LoadedModel, load_model, weights_used
from conceptlens.concepts.store.activations import ActivationStore, EntryReader, StoreEntry
from conceptlens.concepts.data.permuted import PermutedMasks
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.attribution.tcav import random_sets_problem
from conceptlens.compare_output import write_comparison
from conceptlens.config import PipelineConfig, RunFolders, check_paths, config_hash, config_to_dict, run_folders
from conceptlens.data_spec import open_dataset
from conceptlens.execution import ProbeWork, open_executor
from conceptlens.concepts.store.artifacts import read_json, write_json
from conceptlens.concepts.store.schema import Record, Str
from conceptlens.concepts.vectors.probed import ProbedModel
from conceptlens.probes.registry import get_method
from conceptlens.probes.workflow import probe_model
from conceptlens.report.results import (
    EXAMPLES_KIND,
    PROTOTYPES_KIND,
    REPORT_INPUTS_VERSION,
    BestLayer,
    DataInfo,
    ExamplesMeta,
    ModelInfo,
    NCAVLabel,
    ProbeResults,
    PrototypesMeta,
    RunSummary,
    StepTime,
)

__all__ = ["PipelineResult", "run_pipeline"]

PATCH_SIZE = 48  # pixels of a prototype patch in the report


@dataclass
class PipelineResult:
    """What a run produced: the output folder, the run summary and the report path (if written)."""

    out: Path
    summary: dict[str, Any]
    report: Path | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)


class _Run:
    """State shared by the steps of one run: config, folders, timing log."""

    def __init__(self, config: PipelineConfig, folders: RunFolders, progress: bool, verbose: bool) -> None:
        self.config, self.out, self.banks, self.progress, self.verbose = config, folders.out, folders.banks, progress, verbose
        self.store = ActivationStore(folders.store)
        self.steps: list[dict[str, Any]] = []
        self.executor: Any = None  # while the executor is open: where the comparison's and TCAV's shards run

    def step(self, name: str, work: Callable[[], Any], skipped: Callable[[], bool] | None = None) -> Any:
        """Run ``work`` (unless ``skipped()`` says its results are current) and log its time."""
        started = time.perf_counter()
        if skipped is not None and skipped():
            self.steps.append(StepTime(name, round(time.perf_counter() - started, 3), skipped=True).to_json())
            return None
        value = work()
        workers = self.executor.worker_times() if self.executor is not None else None  # a Ray step: each worker's share
        self.steps.append(StepTime(name, round(time.perf_counter() - started, 3), skipped=False, workers=workers).to_json())
        if self.verbose:
            print(f"  {name}: {self.steps[-1]['seconds']:.1f} s", flush=True)
        return value


def run_pipeline(
    config: PipelineConfig, out: str | Path | None = None, *, progress: bool = False, verbose: bool = False, source: str = "<config>",
    banks: str | Path | None = None,
) -> PipelineResult:
    """Run every enabled step of ``config``; write results and the report under ``out``.

    Parameters
    ----------
    config : PipelineConfig
        A validated config (:func:`conceptlens.config.load_config`).
    out : str or Path, optional
        Output folder; default ``config.out``, else ``./conceptlens-<name>``
        (:func:`~conceptlens.config.run_folders` decides, for ``--dry-run`` too).
    progress : bool
        Progress bars.
    verbose : bool
        Print a line per finished step.
    source : str
        The config's file name, for error messages.
    banks : str or Path, optional
        A banks folder shared across output folders (default ``<out>/banks``): banks trained for
        the same provenance are reused from it.
    """
    check_paths(config, source)
    folders = run_folders(config, out, banks)
    out = folders.out
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(config, folders, progress, verbose)
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()

    with open_executor(config.execution, [folders.store, folders.banks]) as executor:  # local, or the Ray cluster (README, "Scale-out on Ray")
        dataset = run.step("open data", lambda: _open_data(config, progress))
        models = run.step("load models", lambda: {m.name: load_model(m.spec, m.weights, tuple(m.input_size) if m.input_size else None, m.kwargs) for m in config.models})
        run.steps += executor.prepare_probes(ProbeWork(config, dataset, models, run.store, folders.banks, _probe_params(config), progress))
        probed = _probe_all(run, dataset, models)
        run.executor = executor
        try:
            _compare_all(run, dataset, probed)
            if config.tcav.enabled:
                _tcav(run, dataset, models)
        finally:
            run.executor = None
    if config.report.enabled and _first_method(probed, "supervised"):
        _report_inputs(run, dataset, probed)

    results_key = _results_key(out)
    previous = _previous_summary(out)
    if previous.get("results_key") == results_key and previous.get("config_hash") == config_hash(config) and (out / "report.html").is_file():
        # nothing changed: run.json and the report keep describing the run that made these results
        run.step("report", lambda: None, skipped=lambda: True)
        return PipelineResult(out, previous, out / "report.html" if config.report.enabled else None, run.steps)
    summary = _summary(config, dataset, models, probed, run.steps, started, time.perf_counter() - clock, results_key)
    summary.write(out / "run.json")
    report = None
    if config.report.enabled:
        from conceptlens.report import write_report

        report = run.step("report", lambda: write_report(out))  # its own time lands in run.json only
        summary = _summary(config, dataset, models, probed, run.steps, started, time.perf_counter() - clock, results_key)
        summary.write(out / "run.json")
    return PipelineResult(out, summary.to_json(), report, run.steps)


def _results_key(out: Path) -> str:
    """Hash of every result file the report reads (not run.json itself, whose times change)."""
    digest = hashlib.sha256()
    patterns = ("probe_*.json", "tcav.json", "compare_*/compare.json", "examples/*.json", "prototypes/*.json")
    for path in sorted(p for pattern in patterns for p in out.glob(pattern)):
        digest.update(f"{path.relative_to(out)}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:24]


def _previous_summary(out: Path) -> dict[str, Any]:
    """The last run's ``run.json`` when it reads as a :class:`RunSummary`, else ``{}`` (it is written again)."""
    path = out / "run.json"
    if not path.is_file():
        return {}
    try:
        previous = read_json(path)
        RunSummary.from_json(previous)  # its shape: a malformed run.json is no previous run
    except ConceptLensError:
        return {}
    return previous


# ---------------------------------------------------------------------------------------------- data


def _open_data(config: PipelineConfig, progress: bool) -> ConceptDataset:
    data = config.data
    dataset = open_dataset(data.spec, data.coco_images, seed=config.seed, progress=progress, area_range=tuple(data.area_range))
    return dataset.select_concepts(list(data.concepts)) if data.concepts else dataset


def _input_size(config: PipelineConfig, name: str) -> tuple[int, int]:
    model = next(m for m in config.models if m.name == name)
    return tuple(model.input_size) if model.input_size else (224, 224)


# ---------------------------------------------------------------------------------------------- probes


def _probe_params(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """The estimator parameters of each enabled pixel-level method, in the order the probe step runs them."""
    params = {
        "net2vec": {"max_epochs": config.probes.net2vec.max_epochs, "lr": config.probes.net2vec.lr, "batch_size": config.probes.net2vec.batch_size, "seed": config.seed},
        "nmf": {"n_components": config.probes.nmf.k, "seed": config.seed},
    }
    return {method: values for method, values in params.items() if getattr(config.probes, method).enabled}


def _probe_all(run: _Run, dataset: ConceptDataset, models: dict[str, LoadedModel]) -> dict[str, dict[str, ProbedModel]]:
    """``{method: {model name: ProbedModel}}`` for the enabled pixel-level methods."""
    config = run.config
    params = _probe_params(config)
    probed: dict[str, dict[str, ProbedModel]] = {m: {} for m in params}
    for method in params:
        for spec in config.models:
            probe = partial(_probe_one, run, dataset, models[spec.name], spec.name, spec.layers, method, params[method])
            probed[method][spec.name] = run.step(f"probe {spec.name} {method}", probe)
    return probed


def _probe_one(run: _Run, dataset: ConceptDataset, model: LoadedModel, name: str, layers: list[str], method: str, params: dict[str, Any]) -> ProbedModel:
    config = run.config
    probed = probe_model(model, dataset, layers, method, run.store, banks_dir=run.banks, label=name, grid=tuple(config.embed.grid),
                         params=params, batch_size=config.embed.batch_size, device=config.device, progress=run.progress,
                         input_size=_input_size(config, name), dtype=config.embed.dtype, controls=_probe_controls(config, method),
                         decode_workers=config.embed.decode_workers)
    supervised = get_method(method).comparison == "supervised"  # named concepts: the layer each is found best at
    size = _sample_size(config, dataset, probed.metrics, len(dataset.concepts) * len(layers)) if _probe_controls(config, method) else None
    result = ProbeResults(model=name, spec=model.spec, method=method, layers=list(layers), depths=probed.depths, module_depths=probed.module_depths,
                          metrics=probed.metrics, provenance={layer: bank.provenance for layer, bank in probed.banks.items()},
                          best_layer=_best_layers(probed) if supervised else None, sample_size=size)
    result.write(run.out / f"probe_{name}_{method}.json")
    return probed


def _probe_controls(config: PipelineConfig, method: str) -> dict[str, Any] | bool:
    """``probe_model``'s ``controls`` argument: the config's probe controls for Net2Vec, else False."""
    controls = config.controls
    if not controls.enabled or not controls.probe_controls or method != "net2vec":
        return False
    return {"kinds": list(controls.probe_controls), "epochs": controls.control_epochs, "n_bootstrap": controls.n_bootstrap,
            "margin": controls.margin, "seed": config.seed}


def _compare_controls(config: PipelineConfig) -> dict[str, Any] | None:
    """``write_comparison``'s ``controls`` argument (None with controls off)."""
    controls = config.controls
    if not controls.enabled:
        return None
    return {"n_permutations": controls.n_permutations, "n_bootstrap": controls.n_bootstrap, "seed": config.seed, "alpha": controls.alpha}


def _sample_size(config: PipelineConfig, dataset: ConceptDataset, metrics: dict[str, dict[str, Any]] | None, n_hypotheses: int) -> dict[str, Any]:
    """The ``sample_size`` record: whether the test split supports ``n_hypotheses`` claims.

    The per-image standard deviation comes from the probe controls' selectivity CIs when there are
    any (median over concepts and layers, :func:`sigma_from_ci`), else the module's default.
    """
    from conceptlens.concepts.data.sample_size import DEFAULT_SIGMA, sigma_from_ci

    n_test = len(dataset.split_indices("test"))
    sigmas = [sigma_from_ci(float(ci[0]), float(ci[1]), n_test) for by_concept in (metrics or {}).values() for entry in by_concept.values()
              if isinstance(entry, dict) and isinstance(ci := entry.get("selectivity_ci"), (list, tuple)) and len(ci) == 2
              and all(isinstance(v, (int, float)) and np.isfinite(v) for v in ci) and ci[1] >= ci[0] and n_test > 0]
    sigma = float(np.median(sigmas)) if sigmas else DEFAULT_SIGMA
    return _size_record(config, n_test, n_hypotheses, sigma)


def _size_record(config: PipelineConfig, n_test: int, n_hypotheses: int, sigma: float | None = None, alpha: float | None = None) -> dict[str, Any]:
    """:func:`sample_size_check` with the config's ``controls`` settings (``alpha`` overrides theirs; ``sigma`` None: the default)."""
    from conceptlens.concepts.data.sample_size import DEFAULT_SIGMA, sample_size_check

    controls = config.controls
    check = sample_size_check(n_test, max(1, n_hypotheses), controls.alpha if alpha is None else alpha, effect=controls.effect,
                              sigma=DEFAULT_SIGMA if sigma is None else sigma, power=controls.power)
    return check.to_json()


def _compare_sample_size(config: PipelineConfig, result: Any) -> dict[str, Any]:
    """The comparison's ``sample_size``: whether its test images support the largest Holm family of a block.

    Each block is corrected on its own (:func:`~conceptlens.concepts.compare.workflow.add_similarity_statistics`):
    within a model the cells above the diagonal, across two models every cell; the family counts the cells
    that were tested (``significant`` not None; all cells when there is no null). The per-image standard
    deviation comes from the bootstrap CIs of the tested cells (median, :func:`sigma_from_ci`), else the default.
    """
    from conceptlens.concepts.data.sample_size import sigma_from_ci

    n_test = int(result.n_test_images or 0)
    families, sigmas = [], []
    for block in result.blocks:
        controls = block.controlled("") or {}
        n_rows, n_columns = len(block.rows), len(block.columns)
        significant = controls.get("significant")
        if significant is not None:
            tested = [(i, j) for i in range(n_rows) for j in range(n_columns) if significant[i][j] is not None]
            families.append(len([1 for i, j in tested if block.a != block.b or i < j]))
        else:
            families.append(n_rows * (n_rows - 1) // 2 if block.a == block.b else n_rows * n_columns)
            tested = [(i, j) for i in range(n_rows) for j in range(n_columns) if block.a != block.b or i != j]
        low, high = controls.get("ci_low"), controls.get("ci_high")
        if low is not None and high is not None and n_test > 0:
            sigmas += [sigma_from_ci(float(low[i][j]), float(high[i][j]), n_test) for i, j in tested
                       if low[i][j] is not None and high[i][j] is not None and high[i][j] >= low[i][j]]
    return _size_record(config, n_test, max(families, default=1), float(np.median(sigmas)) if sigmas else None)


def _tcav_sample_size(config: PipelineConfig, result: Any, n_inputs: list[int]) -> dict[str, Any]:
    """TCAV's ``sample_size``: whether the fewest scored inputs of any target support every hypothesis of the
    test (``n_hypotheses``, corrected together at ``tcav.alpha``)."""
    return _size_record(config, min(n_inputs, default=0), len(result.records), alpha=config.tcav.alpha)


def _best_layers(probed: ProbedModel) -> dict[str, BestLayer]:
    best = {}
    concepts = probed.banks[probed.layers[0]].concepts
    for concept in concepts:
        scores = [(probed.metrics[layer].get(concept, {}).get("set_iou"), i) for i, layer in enumerate(probed.layers)]
        scores = [(s, i) for s, i in scores if isinstance(s, float)]
        if scores:
            score, i = max(scores)
            best[concept] = BestLayer(probed.layers[i], probed.depths[i], score)
    return best


# ---------------------------------------------------------------------------------------------- compare


def _compare_all(run: _Run, dataset: ConceptDataset, probed: dict[str, dict[str, ProbedModel]]) -> None:
    config = run.config
    if not config.compare.enabled:
        return
    for method in probed:
        if method in config.compare.methods:
            models = list(probed[method].values())
            cka = "cka" in config.compare.methods
            key = _step_key("compare", method, config.embed.grid, [(m.label, {layer: b.provenance for layer, b in m.banks.items()}) for m in models],
                            dataset.image_fingerprint(), dataset.mask_fingerprint(), cka, _compare_controls(config),
                            (config.controls.effect, config.controls.power) if config.controls.enabled else None)
            folder = run.out / f"compare_{method}"
            run.step(f"compare {method}", lambda models=models, method=method, key=key, folder=folder, cka=cka: _write_compare(
                run, dataset, models, method, folder, cka, key), skipped=lambda key=key, folder=folder: _current(folder / "compare.json", key))


def _write_compare(run: _Run, dataset: ConceptDataset, models: list[ProbedModel], method: str, folder: Path, cka: bool, key: str) -> None:
    """One comparison's files; with controls on, its ``sample_size`` goes into compare.json before the step's key."""
    config = run.config
    runner = run.executor.shard_runner(run.progress) if run.executor is not None else None  # the Ray workers sum shards of the test images
    written = write_comparison(models, dataset, run.store, method, tuple(config.embed.grid), folder, run.progress, cka, _compare_controls(config), runner)
    if config.controls.enabled:
        data = read_json(written["json"], fix="run the comparison again")
        data["sample_size"] = _compare_sample_size(config, written["result"])
        write_json(written["json"], data)
    _mark_current(written["json"], key)


# ---------------------------------------------------------------------------------------------- TCAV


def _step_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _folder_fingerprint(root: Path) -> str:
    """sha256 over every file below ``root`` (relative path and content): the image sets' identity."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)):
        digest.update(f"{path.relative_to(root)}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _current(path: Path, key: str) -> bool:
    """True when the JSON at ``path`` records ``key`` (its step is finished and up to date)."""
    if not path.is_file():
        return False
    try:
        return read_json(path, schema=Record(optional={"step_key": Str()})).get("step_key") == key
    except ConceptLensError:  # unreadable or malformed: the step runs again and writes it anew
        return False


def _mark_current(path: Path, key: str) -> None:
    """Record ``key`` in the step's JSON once every output of the step is written.

    The key is the step's completion mark, so it goes in last: a step killed after its JSON but
    before its tables or figures (written without a key) runs again on the next run.
    """
    data = read_json(path, fix="run the step again")
    data["step_key"] = key
    write_json(path, data)


def _tcav(run: _Run, dataset: ConceptDataset, models: dict[str, LoadedModel]) -> None:
    config = run.config
    key = _step_key(config_to_dict(config.tcav), config_to_dict(config.data), config.seed, config.embed.batch_size, config_to_dict(config.controls),
                    {name: (m.hash, next(c.layers for c in config.models if c.name == name)) for name, m in models.items()}, dataset.image_fingerprint(),
                    _folder_fingerprint(Path(config.data.image_sets)) if config.data.image_sets else None)
    path = run.out / "tcav.json"
    run.step("tcav", lambda: _run_tcav(run, dataset, models, key), skipped=lambda: _current(path, key))


def _run_tcav(run: _Run, dataset: ConceptDataset, models: dict[str, LoadedModel], key: str) -> None:
    from conceptlens.attribution.targets import target_from_spec
    from conceptlens.attribution.tcav import mark_robust, merge_results, tcav_scores, tcav_variants
    from conceptlens.probes.image_cavs import fit_cav_variants, fit_image_cavs
    from conceptlens.tcav_step import target_labels, write_tcav

    settings = run.config.tcav
    controls = run.config.controls
    robustness = controls.enabled and controls.tcav_robustness
    # controls off: the reference t-test, exactly as before the controls; on: the permutation test
    test = {"test": "permutation" if controls.enabled else "ttest"}
    # the permutation test is exact with a null CAV for every pair of random sets; the t-test keeps today's ring
    null_pairs = "all" if controls.enabled else "ring"
    sources = _tcav_sources(run.config, dataset)
    results, provenance = [], {"sets": sources.provenance, "models": {}}
    by_variant: dict[str, list[Any]] = {}
    n_inputs: list[int] = []  # scored inputs per target and model: the TCAV score is a fraction over them
    labels: dict[str, str] = {}  # target name -> display name with the class name
    for spec in run.config.models:
        targets = [t for t in settings.targets if t.models is None or spec.name in t.models]
        layers = [layer for layer in (settings.layers or spec.layers) if layer in spec.layers]
        if not targets or not layers:
            continue
        model = models[spec.name]
        with progress_scope(spec.name, "TCAV"):
            by_set = sources.activations(model, layers, run)
        named = {f"{spec.name}:{t.spec}": t for t in targets}
        scored = {name: sources.inputs(t.inputs, t.max_inputs) for name, t in named.items()}
        images = {name: [source.image(i) for i in range(len(source))] for name, source in scored.items()}
        ids = {name: list(source.ids) for name, source in scored.items()}
        n_inputs += [len(source) for source in scored.values()]
        score_settings = {"statistic": settings.statistic, "correction": settings.correction, "alpha": settings.alpha,
                          "n_bootstrap": settings.n_bootstrap, "seed": run.config.seed, **test}
        chosen = {name: target_from_spec(t.spec, categories=model.categories) for name, t in named.items()}
        labels.update(target_labels(chosen))
        cav_sets = fit_image_cavs(by_set, sources.concepts, sources.randoms, seed=run.config.seed, null_pairs=null_pairs,
                                  provenance={"model_hash": model.hash})
        # on Ray, the gradient passes run on the workers (shards of whole batches); CAVs and tests stay here
        gradient_pass = run.executor.gradient_pass(spec.name, {name: t.spec for name, t in named.items()}, run.progress) if run.executor else None
        results.append(tcav_scores(model, images, None, cav_sets, chosen, batch_size=run.config.embed.batch_size, input_ids=ids,
                                   gradient_pass=gradient_pass, **score_settings))
        if robustness:
            # a linear SVM and half the random sets, in one gradient pass of their own: the base (pooled) scores
            # stay bit-identical to a run without controls (scoring variants together rounds differently)
            # flattened maps (C·h·w) where every image gives one map size; without them the variant is left out
            variants = fit_cav_variants(by_set, sources.flattened(model, layers, run), sources.concepts, sources.randoms, seed=run.config.seed,
                                        provenance={"model_hash": model.hash}, variants=("svm", "half_random_sets", "flattened"))
            by_variant.setdefault("pooled", []).append(results[-1])
            for name, result in tcav_variants(model, images, None, variants, chosen, batch_size=run.config.embed.batch_size, input_ids=ids,
                                              gradient_pass=gradient_pass, **score_settings).items():
                by_variant.setdefault(name, []).append(result)
        provenance["models"][spec.name] = {"spec": spec.spec, "hash": model.hash, "layers": layers, "accuracy": {
            layer: cavs.to_bank(layer).metrics for layer, cavs in cav_sets.items()}}
    if not results:
        raise ConceptLensError("tcav.targets", "no target applies to any model layer", "check tcav.targets[].models and tcav.layers")
    merged = merge_results(results)
    if by_variant:  # after merging: the correction runs over every model's hypotheses, in each variant alike
        mark_robust(merged, {name: merge_results(parts) for name, parts in by_variant.items()})
    paths = write_tcav(merged, run.out, provenance, labels=labels)  # tcav.json first, without its key; then tcav.csv
    if controls.enabled:
        data = read_json(paths["json"], fix="run TCAV again")
        data["sample_size"] = _tcav_sample_size(run.config, merged, n_inputs)
        write_json(paths["json"], data)
    _mark_current(paths["json"], key)


class _DatasetSets:
    """TCAV sets drawn from the concept dataset (see :func:`_tcav_image_sets`); one pooled embedding serves them all."""

    def __init__(self, config: PipelineConfig, dataset: ConceptDataset) -> None:
        self.dataset = dataset
        self.sets, self.scored = _tcav_image_sets(config, dataset)
        self.concepts = [name for name in self.sets if not name.startswith("random_")]
        self.randoms = [name for name in self.sets if name.startswith("random_")]
        self.provenance = {name: [dataset.ids[i] for i in idx] for name, idx in self.sets.items()}

    def activations(self, model: LoadedModel, layers: list[str], run: _Run) -> dict[str, dict[str, torch.Tensor]]:
        """Pooled over each image's cells from the native maps the probes embedded (the same store entries:
        no second forward pass over the dataset)."""
        from conceptlens.concepts.embedding.embed import embed
        from conceptlens.probes.linear import pooled_activations

        config = run.config
        result = embed(model, self.dataset, layers, run.store, dtype=config.embed.dtype, batch_size=config.embed.batch_size,
                       device=config.device, progress=run.progress, decode_workers=config.embed.decode_workers)
        pooled = {layer: pooled_activations(result.entries[layer]) for layer in layers}
        return {layer: {name: pooled[layer][idx] for name, idx in self.sets.items()} for layer in layers}

    def flattened(self, model: LoadedModel, layers: list[str], run: _Run) -> dict[str, dict[str, torch.Tensor]] | None:
        """The same stored maps flattened to ``(n, C·h·w)`` (the flattened-CAV variant); None when their
        map sizes differ between images (:func:`pooled_activations` cannot flatten them)."""
        from conceptlens.concepts.embedding.embed import embed
        from conceptlens.probes.linear import CAVError, pooled_activations

        config = run.config
        result = embed(model, self.dataset, layers, run.store, dtype=config.embed.dtype, batch_size=config.embed.batch_size,
                       device=config.device, progress=run.progress, decode_workers=config.embed.decode_workers)
        try:
            flat = {layer: pooled_activations(result.entries[layer], flatten=True) for layer in layers}
        except CAVError:
            return None
        return {layer: {name: flat[layer][idx] for name, idx in self.sets.items()} for layer in layers}

    def inputs(self, concept: str | None, limit: int) -> ConceptDataset:
        return self.dataset.subset(self.scored[concept or "test"][:limit])


class _FolderSets:
    """TCAV sets from ``data.image_sets``: ``<concept>/`` and ``random_*/`` folders; target inputs are a set
    folder there (or, when no folder has that name, the concept dataset's test images showing it)."""

    def __init__(self, config: PipelineConfig, dataset: ConceptDataset) -> None:
        from conceptlens.concepts.data.image_sets import ImageSets

        root = Path(config.data.image_sets)
        inputs = {t.inputs for t in config.tcav.targets if t.inputs and (root / t.inputs).is_dir()}
        default = [name for name in ImageSets(root).concepts if name not in inputs]
        self.folders = ImageSets(root, concepts=list(config.tcav.concepts or default), seed=config.seed)
        self.concepts = list(self.folders.concepts)
        self.randoms = list(self.folders.random_sets[: config.tcav.random_sets])
        if (problem := random_sets_problem(len(self.randoms))) is not None:
            raise ConceptLensError(f"data.image_sets: {root}", problem, f"add random_1/, random_2/ … beside {self.randoms[0]}/, each with random images")
        self.dataset, self.root, self.config = dataset, root, config
        self.provenance = {name: self.folders.dataset(name).ids for name in [*self.concepts, *self.randoms]}

    def activations(self, model: LoadedModel, layers: list[str], run: _Run) -> dict[str, dict[str, torch.Tensor]]:
        from conceptlens.probes.image_cavs import set_activations

        sets = {name: self.folders.dataset(name) for name in [*self.concepts, *self.randoms]}
        return set_activations(model, sets, layers, run.store, run.config.embed.batch_size, run.config.device, run.progress)

    def flattened(self, model: LoadedModel, layers: list[str], run: _Run) -> dict[str, dict[str, torch.Tensor]] | None:
        """The sets' native maps flattened to ``(n, C·h·w)``; None when their sizes differ between images."""
        from conceptlens.probes.image_cavs import set_activations
        from conceptlens.probes.linear import CAVError

        sets = {name: self.folders.dataset(name) for name in [*self.concepts, *self.randoms]}
        try:
            return set_activations(model, sets, layers, run.store, run.config.embed.batch_size, run.config.device, run.progress, flatten=True)
        except CAVError:
            return None

    def inputs(self, name: str | None, limit: int) -> ConceptDataset:
        from conceptlens.concepts.data.image_sets import ImageFolderDataset
        from conceptlens.concepts.data.imageio import list_image_files

        if name and (self.root / name).is_dir():
            files = list_image_files(self.root / name, f"the image set {name}/")
            return ImageFolderDataset(files[:limit], name=name, seed=self.config.seed)
        scored = _tcav_inputs(self.config, self.dataset, _coverage(self.dataset), [name] if name else [])
        return self.dataset.subset(scored[name or "test"][:limit])


def _tcav_sources(config: PipelineConfig, dataset: ConceptDataset) -> _DatasetSets | _FolderSets:
    return _FolderSets(config, dataset) if config.data.image_sets else _DatasetSets(config, dataset)


def _tcav_image_sets(config: PipelineConfig, dataset: ConceptDataset) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Concept and random image sets drawn from the concept dataset, and the scored inputs per concept.

    A concept's set: images where it covers at least ``min_fraction`` (train and val splits), up to
    ``images_per_set``, drawn with the config's seed. Random sets: ``random_sets`` draws of
    ``images_per_set`` from the same splits. Inputs: test images showing the named concept (``test``:
    all test images).
    """
    settings = config.tcav
    coverage = _coverage(dataset)
    try:
        sets = concept_set_indices(dataset, settings.concepts, min_fraction=settings.min_fraction, images_per_set=settings.images_per_set,
                                   random_sets=settings.random_sets, seed=config.seed, coverage=coverage)
    except DataError as error:
        raise ConceptLensError(f"tcav.concepts: {error.culprit}", error.problem, "lower tcav.min_fraction or drop the concept") from error
    return sets, _tcav_inputs(config, dataset, coverage, [t.inputs for t in settings.targets if t.inputs])


def _tcav_inputs(config: PipelineConfig, dataset: ConceptDataset, coverage: np.ndarray, concepts: list[str]) -> dict[str, np.ndarray]:
    """Test images showing each named concept (≥ ``tcav.min_fraction``), and all test images as ``test``."""
    test = dataset.split_indices("test")
    inputs = {"test": test}
    for concept in concepts:
        if concept not in dataset.concepts:
            raise ConceptLensError(f"tcav.targets inputs: {concept}", "is neither a set folder of data.image_sets nor a concept of the dataset",
                                   closest_names(concept, dataset.concepts))
        inputs[concept] = test[coverage[test, dataset.concepts.index(concept)] >= config.tcav.min_fraction]
        if len(inputs[concept]) == 0:
            raise ConceptLensError(f"tcav.targets inputs: {concept}", "no test image shows it", "use more images or lower tcav.min_fraction")
    return inputs


# ---------------------------------------------------------------------------------------------- report inputs


def _first_method(probed: dict[str, dict[str, ProbedModel]], comparison: str) -> str | None:
    """The first probed method that feeds ``comparison`` (the report shows one of each kind)."""
    return next((method for method in probed if get_method(method).comparison == comparison), None)


def _report_inputs(run: _Run, dataset: ConceptDataset, probed: dict[str, dict[str, ProbedModel]]) -> None:
    """Segmentation examples of the supervised method's banks; NCAV prototypes of the unsupervised one's."""
    settings = run.config.report
    for name, model in probed[_first_method(probed, "supervised")].items():
        key = _step_key("examples", settings.examples, {layer: bank.provenance for layer, bank in model.banks.items()}, dataset.image_fingerprint())
        path = artifact_paths(run.out / "examples" / name)[0]
        run.step(f"examples {name}", lambda model=model, key=key: _write_examples(run, dataset, model, key), skipped=lambda: _current(path, key))
    for name, model in probed.get(_first_method(probed, "unsupervised"), {}).items():
        key = _step_key("prototypes", settings.prototypes, {layer: bank.provenance for layer, bank in model.banks.items()}, dataset.image_fingerprint(),
                        *_ncav_control_key(run.config))
        path = artifact_paths(run.out / "prototypes" / name)[0]
        run.step(f"prototypes {name}", lambda model=model, key=key: _write_prototypes(run, dataset, model, key), skipped=lambda: _current(path, key))


def _stored_maps(model: ProbedModel, layer: str, index: int) -> tuple[torch.Tensor, Geometry]:
    rows = EntryReader(model.activations[layer]).rows([index])
    return rows["activations"].float(), Geometry.from_list(rows["geometry"][0].tolist())


def _example_indices(dataset: ConceptDataset, count: int) -> list[int]:
    """Test images showing the most concepts (ties: dataset order), ``count`` of them."""
    test = dataset.split_indices("test")
    shown = [(-(dataset.masks(i).reshape(len(dataset.concepts), -1).mean(1) > 0.005).sum(), i) for i in test]
    return [int(i) for _, i in sorted(shown)[:count]]


def _write_examples(run: _Run, dataset: ConceptDataset, model: ProbedModel, key: str) -> None:
    best = _best_layers(model)
    concepts = [c for c in dataset.concepts if c in best]
    tensors: dict[str, torch.Tensor] = {}
    indices = _example_indices(dataset, run.config.report.examples)
    for n, index in enumerate(indices):
        image = dataset.image(index)
        size = image.shape[:2]
        predicted = []
        for concept in concepts:
            layer = best[concept].layer
            activations, geometry = _stored_maps(model, layer, index)
            bank = model.banks[layer]
            logits = bank.logits(activations)[:, [bank.concepts.index(concept)]]
            predicted.append(torch.sigmoid(features_to_grid(logits, [geometry], size))[0, 0])
        tensors[f"image_{n}"] = torch.from_numpy(np.ascontiguousarray(image))
        masks = dataset.masks(index)[[dataset.concepts.index(c) for c in concepts]]
        tensors[f"truth_{n}"] = torch.from_numpy(masks.astype(np.uint8))
        tensors[f"pred_{n}"] = torch.stack(predicted).half() if predicted else torch.zeros((0, *size), dtype=torch.float16)
    metadata = ExamplesMeta(model=model.label, ids=[dataset.ids[i] for i in indices], concepts=concepts,
                            best_layers={c: best[c].layer for c in concepts}, n_examples=len(indices), step_key=key)
    write_artifact(run.out / "examples" / model.label, EXAMPLES_KIND, REPORT_INPUTS_VERSION, tensors, metadata.to_json())


def _write_prototypes(run: _Run, dataset: ConceptDataset, model: ProbedModel, key: str) -> None:
    count = run.config.report.prototypes
    test = [int(i) for i in dataset.split_indices("test")]
    tensors, ncavs, fidelity = {}, {}, {}
    controls = run.config.controls.enabled
    permuted = embed_masks(PermutedMasks(dataset, run.config.seed), run.store, grid=model.grid, progress=run.progress) if controls else None
    for number, layer in enumerate(model.layers):
        bank: ConceptBank = model.banks[layer]
        peaks = _ncav_peaks(model, layer, bank, test)  # (k, n_test) best value and its cell per image
        patches = np.zeros((bank.n_concepts, count, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
        heat = np.zeros((bank.n_concepts, count, PATCH_SIZE, PATCH_SIZE), dtype=np.uint8)
        maps: dict[int, torch.Tensor] = {}  # the NCAV maps of each test image used, computed once
        for j in range(bank.n_concepts):
            order = np.argsort(-peaks["value"][j], kind="stable")[:count]
            for p, t in enumerate(order):
                patches[j, p] = _patch(dataset.image(test[t]), peaks["cell"][j][t], peaks["geometry"][t], peaks["shape"])
                if t not in maps:
                    maps[t] = bank.concept_maps(_stored_maps(model, layer, test[t])[0])
                heat[j, p] = _patch_heat(maps[t][:, [j]], dataset.image(test[t]).shape[:2], peaks, j, t, float(peaks["value"][j][order[0]]))
        tensors[f"patches_{number}"] = torch.from_numpy(patches)
        tensors[f"heat_{number}"] = torch.from_numpy(heat)
        control = _ncav_control_ious(run, model, layer, bank, permuted, test) if controls else {}
        ncavs[layer] = [NCAVLabel(c, bank.metrics.get(c, {}).get("matched_concept"), bank.metrics.get(c, {}).get("set_iou"), control.get(c))
                        for c in bank.concepts]
        fidelity[layer] = next((m.get("fidelity") for m in bank.metrics.values() if "fidelity" in m), None)
    metadata = PrototypesMeta(model=model.label, layers=model.layers, ncavs=ncavs, fidelity=fidelity,
                              control_margin=run.config.controls.margin if controls else None, step_key=key)
    write_artifact(run.out / "prototypes" / model.label, PROTOTYPES_KIND, REPORT_INPUTS_VERSION, tensors, metadata.to_json())


def _ncav_control_key(config: PipelineConfig) -> tuple[Any, ...]:
    """The prototypes step key's extra parts with controls on (none with them off: the key stays as it was)."""
    return ("ncav_controls", config.seed, config.controls.margin) if config.controls.enabled else ()


def _ncav_control_ious(run: _Run, model: ProbedModel, layer: str, bank: ConceptBank, permuted: StoreEntry, test: list[int]) -> dict[str, float | None]:
    """Per NCAV with a match: the same matching IoU against the permuted test masks (its control).

    The stored activations give the NCAV maps (no forward pass); only the masks differ from the
    labelling's, so the per-NCAV maxima, the threshold and the concept are the match's own.
    """
    from conceptlens.probes.nmf import match_labels

    labels = match_labels(bank.concept_maps, model.activations[layer], permuted, test, device="cpu")  # as _ncav_peaks: the bank's maps on CPU
    out = {}
    for j, name in enumerate(bank.concepts):
        concept = bank.metrics.get(name, {}).get("matched_concept")
        if concept is not None:
            out[name] = labels[j]["all"].get(concept)
    return out


def _ncav_peaks(model: ProbedModel, layer: str, bank: ConceptBank, indices: list[int]) -> dict[str, Any]:
    """Per NCAV and image: the largest NCAV map value over the image's cells and where it is."""
    from conceptlens.concepts.geometry import image_cells

    reader = EntryReader(model.activations[layer])
    values = np.zeros((bank.n_concepts, len(indices)))
    cells = [[(0, 0)] * len(indices) for _ in range(bank.n_concepts)]
    geometries, shape = [], (1, 1)
    for t, index in enumerate(indices):
        rows = reader.rows([index])
        geometry = Geometry.from_list(rows["geometry"][0].tolist())
        maps = bank.concept_maps(rows["activations"].float())[0]  # (k, h, w): NNLS codes for NMF banks
        shape = tuple(maps.shape[-2:])
        maps = maps * image_cells(geometry, shape)
        flat = maps.flatten(1)
        best = flat.argmax(1)
        for j in range(bank.n_concepts):
            values[j, t] = float(flat[j, best[j]])
            cells[j][t] = divmod(int(best[j]), shape[1])
        geometries.append(geometry)
    return {"value": values, "cell": cells, "geometry": geometries, "shape": shape}


def _patch(image: np.ndarray, cell: tuple[int, int], geometry: Geometry, shape: tuple[int, int]) -> np.ndarray:
    """A square crop of the original image around a feature cell (a quarter of the image's longer side)."""
    from PIL import Image

    top, left, size = _patch_window(image.shape[:2], cell, geometry, shape)
    crop = image[top: top + size, left: left + size]
    return np.asarray(Image.fromarray(crop).resize((PATCH_SIZE, PATCH_SIZE), Image.BILINEAR))


def _patch_window(size: tuple[int, int], cell: tuple[int, int], geometry: Geometry, shape: tuple[int, int]) -> tuple[int, int, int]:
    """Top, left and side in image pixels of the prototype crop around a feature cell (see :func:`_patch`)."""
    canvas_y = (cell[0] + 0.5) * geometry.canvas_size[0] / shape[0]
    canvas_x = (cell[1] + 0.5) * geometry.canvas_size[1] / shape[1]
    y = (canvas_y - geometry.offset[0]) * geometry.image_size[0] / geometry.resized_size[0]
    x = (canvas_x - geometry.offset[1]) * geometry.image_size[1] / geometry.resized_size[1]
    half = max(size) / 8
    top, left = int(np.clip(y - half, 0, max(0, size[0] - 2 * half))), int(np.clip(x - half, 0, max(0, size[1] - 2 * half)))
    return top, left, int(2 * half)


def _patch_heat(ncav_map: torch.Tensor, size: tuple[int, int], peaks: dict[str, Any], j: int, t: int, peak: float) -> np.ndarray:
    """Where NCAV ``j`` fires on its prototype patch of test image ``t``: its map over the image, cropped like the
    patch, scaled so that the NCAV's largest peak over its patches is 255 (uint8, ``PATCH_SIZE`` square)."""
    from PIL import Image

    grid = features_to_grid(ncav_map.float(), [peaks["geometry"][t]], size)[0, 0].cpu().numpy()
    top, left, side = _patch_window(size, peaks["cell"][j][t], peaks["geometry"][t], peaks["shape"])
    crop = Image.fromarray(np.ascontiguousarray(grid[top: top + side, left: left + side], dtype=np.float32))
    scaled = np.asarray(crop.resize((PATCH_SIZE, PATCH_SIZE), Image.BILINEAR)) / (peak if peak > 0 else 1.0)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- summary


def _summary(config: PipelineConfig, dataset: ConceptDataset, models: dict[str, LoadedModel], probed: dict[str, dict[str, ProbedModel]],
             steps: list[dict[str, Any]], started: datetime, seconds: float, results_key: str) -> RunSummary:
    depths = next(iter(probed.values()), {})
    return RunSummary(
        name=config.name, config=config_to_dict(config), config_hash=config_hash(config), seed=config.seed,
        device=resolve_device(config.device, culprit=f"device {config.device}").type,  # the device actually used, not "auto"
        threads=torch.get_num_threads(),  # CPU results are bitwise reproducible at a fixed thread count only
        versions=package_versions(),
        data=DataInfo(spec=config.data.spec, name=dataset.name, n_images=len(dataset), concepts=list(dataset.concepts),
                      splits={split: len(ids) for split, ids in dataset.splits.items()}),
        models=[ModelInfo(name=m.name, spec=m.spec, weights=weights_used(m.spec, m.weights), hash=models[m.name].hash, layers=list(m.layers),
                          depths=depths[m.name].depths if m.name in depths else None,
                          module_depths=depths[m.name].module_depths if m.name in depths else None) for m in config.models],
        steps=[StepTime.from_json(step) for step in steps], started=started.strftime("%Y-%m-%dT%H:%M:%SZ"), total_seconds=round(seconds, 3),
        results_key=results_key, sample_size=_run_sample_size(config, dataset, probed),
    )


def _run_sample_size(config: PipelineConfig, dataset: ConceptDataset, probed: dict[str, dict[str, ProbedModel]]) -> dict[str, Any] | None:
    """The run's ``sample_size``: the probes' claims, every concept at every probed layer of every model (None with controls off)."""
    if not config.controls.enabled:
        return None
    n_layers = sum(len(m.layers) for m in config.models)
    metrics = {f"{name}:{layer}": by_concept for name, model in probed.get("net2vec", {}).items() for layer, by_concept in model.metrics.items()}
    return _sample_size(config, dataset, metrics, len(dataset.concepts) * n_layers)

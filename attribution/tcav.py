"""TCAV scores with significance tests (docs/METHODS.md §6; Kim et al. 2018, arXiv 1711.11279).

Conceptual sensitivity of input ``x`` to CAV ``v`` at layer ``L`` for target scalar ``h``:
``S(x) = ∇_{A_L} h(x) · v``. Per CAV run (concept ``c`` vs random set ``r``) over the inputs:

- ``sign_count`` — fraction of inputs with ``S > 0`` (the TCAV score; captum's ``sign_count``);
- ``magnitude`` — ``Σ_{S>0} S / Σ |S|`` (docs/METHODS.md §6; captum's docstring formula);
- ``mean_sensitivity`` — ``mean S``. This is what captum 0.9.0's ``TCAV.interpret`` actually
  returns under the key ``"magnitude"`` (``torch.mean(tcav_score, dim=1)``), despite its docstring.

Significance: the R scores of a concept's CAVs (one per random set) against the R scores of the
random-vs-random CAVs of :class:`conceptlens.probes.linear.CAVSet` (the null), two-sided Student
t-test (``scipy.stats.ttest_ind``, equal variances, as the TCAV reference code does), then Holm
and Bonferroni adjustment over every (concept, layer, target) hypothesis of one call. Bootstrap
confidence intervals resample the inputs (seeded) and recompute the mean over runs of the score.

Pooled vs flattened CAVs. Flattened CAVs (``D = C·h·w``) are dotted with the flattened layer
gradient, exactly as captum does. Pooled CAVs (``D = C``, trained on ``a = mean_hw A``) are
dotted with the *spatial sum* of the gradient, ``g = Σ_hw ∂h/∂A_hw``: it is the directional
derivative of ``h`` when every cell is shifted by ``v`` (``A_hw → A_hw + εv``, which moves ``a`` by
exactly ``εv``), and it equals ``∂h/∂a`` whenever ``h`` depends on ``A`` only through ``a``
(``∂h/∂A_hw = (∂h/∂a)/(h·w)``, so the sum over the ``h·w`` cells gives back ``∂h/∂a``). The spatial
mean would differ by the positive factor ``h·w``: same sign counts and magnitude ratios, but
``mean_sensitivity`` would not equal ``∂h/∂a · v``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.models.loading import LoadedModel
from conceptlens.probes.linear import CAVSet

from conceptlens.attribution.gradients import iter_layer_gradients, layer_modules_of

__all__ = [
    "METRICS",
    "TCAVError",
    "TCAVRecord",
    "TCAVResult",
    "bonferroni",
    "holm",
    "layer_gradients",
    "merge_results",
    "run_scores",
    "sensitivities",
    "tcav_scores",
]

METRICS = ("sign_count", "magnitude", "mean_sensitivity")
CSV_FIELDS = (
    "concept", "layer", "target", "statistic", "n_inputs", "n_runs", "mean", "std", "null_mean", "null_std",
    "t", "p", "p_holm", "p_bonferroni", "significant", "ci_low", "ci_high",
    "sign_count_mean", "magnitude_mean", "mean_sensitivity_mean",
)


class TCAVError(ConceptLensError):
    """Bad TCAV input: CAVs that do not fit a layer, unknown layers or targets, bad settings."""


Target = Callable[[Any], Any]


# ----------------------------------------------------------------------------------------------
# gradients and sensitivities


def layer_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    layer_modules: Mapping[str, nn.Module],
    target: Target | int,
    batch_size: int = 32,
) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
    """Stream per-batch gradients of a target scalar w.r.t. each layer's output.

    The two-value form of :func:`conceptlens.attribution.gradients.iter_layer_gradients` (which also takes
    loaded models with raw images, and reports invalid detector targets).

    Yields
    ------
    (slice, dict of str to Tensor)
        The rows of ``inputs`` of the batch, and per layer the gradient ``(B, *layer_shape)``.
    """
    for batch in iter_layer_gradients(model, inputs, layer_modules, target, batch_size):
        yield batch.rows, batch.gradients


def sensitivities(gradients: torch.Tensor, cavs: torch.Tensor, pooling: str = "auto") -> torch.Tensor:
    """Conceptual sensitivities ``(B, N)`` of a batch of layer gradients to N CAVs.

    Parameters
    ----------
    gradients : Tensor
        ``(B, C)`` or ``(B, C, h, w)`` (any trailing shape for flattened CAVs).
    cavs : Tensor
        ``(N, D)``.
    pooling : {'auto', 'flatten', 'sum'}
        ``'flatten'``: ``D = C·h·w``, flattened dot product (captum). ``'sum'``: pooled CAVs,
        ``D = C``, dotted with the spatial sum of the gradient (see the module docstring).
        ``'auto'``: flatten when ``D`` equals the flattened size, else sum when ``D = C``.
    """
    if cavs.dim() != 2:
        raise TCAVError("cavs", f"have shape {tuple(cavs.shape)}", "give (N, D)")
    b, d = gradients.shape[0], cavs.shape[1]
    flat_size = gradients[0].numel()
    if pooling == "auto":
        if d == flat_size:
            pooling = "flatten"
        elif gradients.dim() >= 2 and d == gradients.shape[1]:
            pooling = "sum"
        else:
            raise TCAVError("cavs", f"have {d} features; the layer gradient has shape {tuple(gradients.shape[1:])}", "use CAVs trained on this layer (pooled: C features, flattened: C·h·w)")
    if pooling == "flatten":
        if d != flat_size:
            raise TCAVError("cavs", f"have {d} features, flattened gradients {flat_size}", "use flattened CAVs of this layer")
        features = gradients.reshape(b, -1)
    elif pooling == "sum":
        if gradients.dim() < 2 or d != gradients.shape[1]:
            raise TCAVError("cavs", f"have {d} features, the layer {tuple(gradients.shape[1:])}", "use pooled CAVs of this layer")
        features = gradients.reshape(b, d, -1).sum(-1)
    else:
        raise TCAVError("pooling", f"is {pooling!r}", "use 'auto', 'flatten' or 'sum'")
    return features.float() @ cavs.to(device=features.device, dtype=torch.float32).T


def run_scores(sens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-CAV scores ``(N,)`` from sensitivities ``(n_inputs, N)``: see :data:`METRICS`."""
    sens = sens.double()
    positive = sens.clamp(min=0)
    total = sens.abs().sum(0)
    return {
        "sign_count": (sens > 0).double().mean(0),
        "magnitude": torch.where(total > 0, positive.sum(0) / total.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(total)),
        "mean_sensitivity": sens.mean(0),
    }


# ----------------------------------------------------------------------------------------------
# multiple testing


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (NaNs stay NaN and do not count as hypotheses).

    Sorted ascending ``p_(1) ≤ … ≤ p_(m)``: ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def bonferroni(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Bonferroni adjusted p-values ``min(1, m p)`` (m = number of non-NaN p-values)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = int((~np.isnan(p)).sum())
    return np.minimum(1.0, m * p)


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class TCAVRecord:
    """One hypothesis: a concept's TCAV scores at a layer for a target, against the null.

    ``scores[metric]`` has the R per-run scores (run r = CAV against random set r),
    ``null_scores[metric]`` the scores of the R random-vs-random CAVs. ``mean``, ``t``, ``p``,
    the adjusted p-values, ``significant`` and the CI refer to ``statistic``.
    """

    concept: str
    layer: str
    target: str
    statistic: str
    n_inputs: int
    scores: dict[str, np.ndarray]
    null_scores: dict[str, np.ndarray]
    t: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    p_bonferroni: float = math.nan
    significant: bool = False
    ci_low: float = math.nan
    ci_high: float = math.nan

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores[self.statistic]))

    @property
    def null_mean(self) -> float:
        null = self.null_scores[self.statistic]
        return float(np.mean(null)) if null.size else math.nan

    def row(self) -> dict[str, Any]:
        s, n = self.scores[self.statistic], self.null_scores[self.statistic]
        row = {
            "concept": self.concept, "layer": self.layer, "target": self.target, "statistic": self.statistic,
            "n_inputs": self.n_inputs, "n_runs": int(s.size), "mean": self.mean,
            "std": float(np.std(s, ddof=1)) if s.size > 1 else math.nan, "null_mean": self.null_mean,
            "null_std": float(np.std(n, ddof=1)) if n.size > 1 else math.nan,
            "t": self.t, "p": self.p, "p_holm": self.p_holm, "p_bonferroni": self.p_bonferroni,
            "significant": bool(self.significant), "ci_low": self.ci_low, "ci_high": self.ci_high,
        }
        for metric in METRICS:
            row[f"{metric}_mean"] = float(np.mean(self.scores[metric]))
        return row

    def to_dict(self) -> dict[str, Any]:
        out = self.row()
        out["scores"] = {m: _floats(v) for m, v in self.scores.items()}
        out["null_scores"] = {m: _floats(v) for m, v in self.null_scores.items()}
        return out


def _floats(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(float(x)) else float(x) for x in np.asarray(values).ravel()]


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass
class TCAVResult:
    """All hypotheses of one :func:`tcav_scores` call.

    ``sensitivities[(layer, target)]`` keeps the per-input sensitivities ``(n_inputs, K·R + R)``
    (concept CAVs in (K, R) order, then the R null CAVs) of the inputs with a valid target, for
    further analysis; ``missing[target]`` lists the inputs (ids or positions) left out because a
    detector target found no matching detection on them.
    """

    records: list[TCAVRecord]
    statistic: str
    correction: str
    alpha: float
    n_bootstrap: int
    seed: int
    sensitivities: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)
    missing: dict[str, list[Any]] = field(default_factory=dict)

    def missing_lines(self) -> list[str]:
        """One line per target with inputs that have no valid target (detections not found)."""
        lines = []
        for target, ids in self.missing.items():
            if ids:
                n = next((r.n_inputs for r in self.records if r.target == target), 0) + len(ids)
                shown = ", ".join(str(i) for i in ids[:10]) + (f", … (+{len(ids) - 10})" if len(ids) > 10 else "")
                lines.append(f"{len(ids)} of {n} inputs have no valid target for {target}; left out: {shown}")
        return lines

    def get(self, concept: str, layer: str, target: str) -> TCAVRecord:
        for record in self.records:
            if (record.concept, record.layer, record.target) == (concept, layer, target):
                return record
        raise KeyError((concept, layer, target))

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic, "correction": self.correction, "alpha": self.alpha,
            "n_bootstrap": self.n_bootstrap, "seed": self.seed, "n_hypotheses": len(self.records),
            "missing": {target: list(ids) for target, ids in self.missing.items()},
            "records": [{k: _json_value(v) for k, v in r.to_dict().items()} for r in self.records],
        }

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(CSV_FIELDS))
            writer.writeheader()
            for record in self.records:
                writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in record.row().items()})
        return path


# ----------------------------------------------------------------------------------------------
# main entry


def tcav_scores(
    model: nn.Module | LoadedModel,
    inputs: Any,
    layer_modules: Mapping[str, nn.Module] | Sequence[str] | None,
    cav_sets: Mapping[str, CAVSet],
    targets: Mapping[str, Target | int],
    *,
    batch_size: int = 32,
    statistic: str = "sign_count",
    correction: str = "holm",
    alpha: float = 0.05,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    pooling: str = "auto",
    input_ids: Mapping[str, Sequence[Any]] | Sequence[Any] | None = None,
) -> TCAVResult:
    """TCAV scores and significance for every concept × layer × target.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        A plain module takes a prepared tensor batch; a loaded model (classifier or detector)
        takes raw uint8 ``(H, W, 3)`` images and prepares them with its adapter.
    inputs : Tensor, sequence of arrays, or mapping of str to either
        The inputs scored (TCAV: images of the target class); one set for every target, or
        one per target name.
    layer_modules : mapping of str to nn.Module, sequence of str, or None
        Layer name → module, or layer names (None: the layers of ``cav_sets``). Every layer of
        ``cav_sets`` must be here.
    cav_sets : mapping of str to CAVSet
        Layer name → CAVs (pooled or flattened; see :func:`sensitivities`).
    targets : mapping of str to callable or int
        Target name → ``output -> TargetValues`` or ``(B,)`` tensor (or a class index). Inputs on
        which a detector target finds no detection are left out of that target's scores and
        reported in ``TCAVResult.missing``.
    batch_size : int
        Per target, one forward/backward pass per batch serves every layer and every CAV.
    statistic : {'sign_count', 'magnitude', 'mean_sensitivity'}
        Score tested for significance.
    correction : {'holm', 'bonferroni'}
        Which adjusted p decides ``significant`` (``p_adj < alpha``); both are reported.
    n_bootstrap, ci, seed : bootstrap over inputs (0 disables); percentile interval.
    pooling : see :func:`sensitivities`.
    input_ids : sequence or mapping of str to sequence, optional
        Names of the inputs (default: positions), used to report inputs without a target.
    """
    if statistic not in METRICS:
        raise TCAVError("statistic", f"is {statistic!r}", f"use one of {METRICS}")
    if correction not in ("holm", "bonferroni"):
        raise TCAVError("correction", f"is {correction!r}", "use 'holm' or 'bonferroni'")
    if not 0 < alpha < 1 or not 0 < ci < 1:
        raise TCAVError("alpha/ci", f"are {alpha}, {ci}", "use values in (0, 1)")
    modules = layer_modules_of(model, list(cav_sets) if layer_modules is None else layer_modules)
    missing_layers = [layer for layer in cav_sets if layer not in modules]
    if missing_layers:
        raise TCAVError(", ".join(missing_layers), "has CAVs but no module", "add it to layer_modules")
    if not targets:
        raise TCAVError("targets", "is empty", "give at least one target")
    layers = list(cav_sets)
    modules = {layer: modules[layer] for layer in layers}
    all_cavs = {layer: torch.cat([cav_sets[layer].vectors.reshape(-1, cav_sets[layer].vectors.shape[-1]), cav_sets[layer].random_vectors]) for layer in layers}

    records: list[TCAVRecord] = []
    kept: dict[tuple[str, str], torch.Tensor] = {}
    missing: dict[str, list[Any]] = {}
    for target_name, target in targets.items():
        x = _per_target(inputs, target_name, "inputs")
        ids = _per_target(input_ids, target_name, "input_ids") if input_ids is not None else None
        sens, valid = _target_sensitivities(model, x, modules, all_cavs, target, target_name, batch_size, pooling)
        missing[target_name] = [int(i) if ids is None else ids[int(i)] for i in torch.nonzero(~valid).flatten()]
        if not bool(valid.any()):
            raise TCAVError(target_name, f"no input has a valid target ({len(valid)} inputs, none with a matching detection)",
                            "choose inputs that show the target class, or lower the score threshold")
        for layer in layers:
            kept[(layer, target_name)] = sens[layer][valid]
            records.extend(_layer_records(cav_sets[layer], layer, target_name, kept[(layer, target_name)], statistic, n_bootstrap, ci, seed))

    _correct(records, correction, alpha)
    return TCAVResult(records, statistic, correction, alpha, n_bootstrap, seed, kept, missing)


def _correct(records: list[TCAVRecord], correction: str, alpha: float) -> None:
    """Holm and Bonferroni adjustment over every record; ``significant`` from the chosen one."""
    p = np.array([r.p for r in records])
    for record, ph, pb in zip(records, holm(p), bonferroni(p)):
        record.p_holm, record.p_bonferroni = float(ph), float(pb)
        chosen = ph if correction == "holm" else pb
        record.significant = bool(not math.isnan(chosen) and chosen < alpha)


def merge_results(results: Sequence[TCAVResult]) -> TCAVResult:
    """One result from several :func:`tcav_scores` calls (e.g. one per model), with the multiple-
    testing correction redone over all their hypotheses together. Target names must be unique."""
    if not results:
        raise TCAVError("results", "is empty", "merge at least one result")
    first = results[0]
    settings = {(r.statistic, r.correction, r.alpha, r.n_bootstrap, r.seed) for r in results}
    if len(settings) > 1:
        raise TCAVError("results", f"were computed with different settings {sorted(settings)}", "merge results of one configuration")
    targets = [t for r in results for t in r.missing]
    if len(set(targets)) != len(targets):
        raise TCAVError("results", "share target names", "name targets uniquely (e.g. prefix the model name)")
    records = [dataclasses.replace(record) for r in results for record in r.records]  # inputs stay as they were
    _correct(records, first.correction, first.alpha)
    sensitivities = {key: value for r in results for key, value in r.sensitivities.items()}
    missing = {target: ids for r in results for target, ids in r.missing.items()}
    return TCAVResult(records, first.statistic, first.correction, first.alpha, first.n_bootstrap, first.seed, sensitivities, missing)


def _per_target(values: Any, target_name: str, what: str) -> Any:
    if isinstance(values, Mapping):
        if target_name not in values:
            raise TCAVError(target_name, f"has no {what}", f"give {what} for every target")
        return values[target_name]
    return values


def _target_sensitivities(
    model: nn.Module | LoadedModel, x: Any, modules: dict[str, nn.Module], all_cavs: dict[str, torch.Tensor],
    target: Target | int, target_name: str, batch_size: int, pooling: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sensitivities ``(n, n_cavs)`` per layer and the ``(n,)`` valid mask of one target."""
    n = x.shape[0] if isinstance(x, torch.Tensor) else len(x)
    if n == 0:
        raise TCAVError(target_name, "has no inputs", "give at least one input")
    sens = {layer: torch.empty(n, cavs.shape[0], dtype=torch.float32) for layer, cavs in all_cavs.items()}
    valid = torch.empty(n, dtype=torch.bool)
    for batch in iter_layer_gradients(model, x, modules, target, batch_size):
        valid[batch.rows] = batch.valid
        for layer, cavs in all_cavs.items():
            sens[layer][batch.rows] = sensitivities(batch.gradients[layer], cavs, pooling).cpu()
    return sens, valid


def _layer_records(cav_set: CAVSet, layer: str, target: str, sens: torch.Tensor, statistic: str, n_bootstrap: int, ci: float, seed: int) -> list[TCAVRecord]:
    k, r = len(cav_set.concepts), len(cav_set.random_sets)
    scores = {m: v.numpy() for m, v in run_scores(sens).items()}
    boot = _bootstrap(sens, statistic, n_bootstrap, seed) if n_bootstrap > 0 else None  # (n_boot, N)
    out = []
    for i, concept in enumerate(cav_set.concepts):
        runs = slice(i * r, (i + 1) * r)
        record = TCAVRecord(
            concept, layer, target, statistic, int(sens.shape[0]),
            scores={m: v[runs].copy() for m, v in scores.items()},
            null_scores={m: v[k * r:].copy() for m, v in scores.items()},
        )
        concept_scores, null = record.scores[statistic], record.null_scores[statistic]
        if concept_scores.size >= 2 and null.size >= 2:
            record.t, record.p = _t_test(concept_scores, null)
        if boot is not None:
            means = boot[:, runs].mean(1)
            tail = (1 - ci) / 2 * 100
            record.ci_low, record.ci_high = (float(v) for v in np.percentile(means, [tail, 100 - tail]))
        out.append(record)
    return out


def _t_test(sample: np.ndarray, null: np.ndarray) -> tuple[float, float]:
    """Two-sided Student t-test; degenerate samples (both constant) get t = ±inf, p = 0 when the
    constants differ, and t = 0, p = 1 when equal. A single constant sample (e.g. every run
    scores 1.0, common for a strong concept) is an ordinary case: scipy's precision warning on it
    is silenced."""
    if np.ptp(sample) == 0 and np.ptp(null) == 0:
        diff = float(sample[0] - null[0])
        return (math.copysign(math.inf, diff), 0.0) if diff != 0 else (0.0, 1.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        test = stats.ttest_ind(sample, null)
    return float(test.statistic), float(test.pvalue)


def _bootstrap(sens: torch.Tensor, statistic: str, n_bootstrap: int, seed: int) -> np.ndarray:
    """Per-run scores ``(n_bootstrap, N)`` on inputs resampled with replacement (seeded).

    Resamples are counts ``(n_bootstrap, n)``, so every score is a matrix product: no
    ``(n_bootstrap, n, N)`` tensor.
    """
    n = sens.shape[0]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_bootstrap, n))
    counts = np.zeros((n_bootstrap, n))
    np.add.at(counts, (np.repeat(np.arange(n_bootstrap), n), draws.ravel()), 1.0)
    s = sens.double().numpy()
    if statistic == "sign_count":
        return counts @ (s > 0) / n
    if statistic == "mean_sensitivity":
        return counts @ s / n
    total = counts @ np.abs(s)
    return np.divide(counts @ np.clip(s, 0, None), total, out=np.zeros_like(total), where=total > 0)

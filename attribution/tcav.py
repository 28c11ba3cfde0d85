"""TCAV scores with significance tests (docs/METHODS.md §6; Kim et al. 2018, arXiv 1711.11279).

Conceptual sensitivity of input ``x`` to CAV ``v`` at layer ``L`` for target scalar ``h``:
``S(x) = ∇_{A_L} h(x) · v``. Per CAV run (concept ``c`` vs random set ``r``) over the inputs:

- ``sign_count`` — fraction of inputs with ``S > 0`` (the TCAV score; captum's ``sign_count``);
- ``magnitude`` — ``Σ_{S>0} S / Σ |S|`` (docs/METHODS.md §6; captum's docstring formula);
- ``mean_sensitivity`` — ``mean S``. This is what captum 0.9.0's ``TCAV.interpret`` actually
  returns under the key ``"magnitude"`` (``torch.mean(tcav_score, dim=1)``), despite its docstring.

Significance (``test='permutation'``, the default): an exact rank test. Under the null the concept
set is exchangeable with the R random sets, so the concept's statistic ``T_c = mean_k s(c, r_k)``
ranks uniformly among the R + 1 statistics ``T_X = mean_{Y≠X} s(X, Y)`` of all sets, where
``s(X, Y)`` is the score of the CAV "X vs Y" and ``s(Y, X)`` the score of the opposite CAV
(sensitivities negated). ``p = (1 + #{j: |T_j − m| ≥ |T_c − m|}) / (R + 1)`` with ``m`` the
score's neutral value (0.5 for ``sign_count``/``magnitude``, 0 for ``mean_sensitivity``); valid
whatever the dependence between runs (they share the concept set), exact when the CAV set holds
the random-vs-random CAV of every pair of random sets (``fit_image_cavs(null_pairs='all')``),
conservative with fewer pairs. ``test='ttest'`` is the reference code's two-sided Student t-test
of the R concept scores against the null scores (anti-conservative: the runs are not
independent). Then Holm and Bonferroni adjustment over every (concept, layer, target) hypothesis
of one call. Confidence intervals: a two-level bootstrap (inputs resampled, then CAV runs
resampled) of the mean over runs; the inputs-only interval is kept as ``ci_naive_*``. Power: the
number of random sets the permutation test needs for the correction in use and the observed
effect. Degenerate layers (zero gradients, CAVs at chance, every score 0 or 1) are flagged.
:func:`tcav_variants` and :func:`mark_robust` rerun the test for CAV variants in one gradient pass
and mark which findings survive every variant (docs/METHODS.md §6).

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
    "MIN_RANDOM_SETS",
    "bonferroni",
    "holm",
    "layer_gradients",
    "mark_robust",
    "merge_results",
    "null_statistics",
    "permutation_p",
    "power",
    "random_sets_problem",
    "run_scores",
    "sensitivities",
    "target_sensitivities",
    "tcav_robustness",
    "tcav_scores",
    "tcav_variants",
]

METRICS = ("sign_count", "magnitude", "mean_sensitivity")
CSV_FIELDS = (
    "concept", "layer", "target", "statistic", "n_inputs", "n_runs", "mean", "std", "null_mean", "null_std",
    "t", "p", "p_holm", "p_bonferroni", "significant", "ci_low", "ci_high",
    "sign_count_mean", "magnitude_mean", "mean_sensitivity_mean",
    "test", "run_std", "ci_naive_low", "ci_naive_high", "degenerate_layer", "robust", "random_sets_needed",
)
TESTS = ("permutation", "ttest")
#: The neutral value of each score: no concept sensitivity (half the inputs positive, or a zero mean).
CENTERS = {"sign_count": 0.5, "magnitude": 0.5, "mean_sensitivity": 0.0}
#: A layer's CAVs are "at chance" when the best concept's mean held-out accuracy is at most 0.5 + this.
CHANCE_MARGIN = 0.05
#: Gradients whose largest absolute entry over every input is at most this count as zero.
GRADIENT_TOL = 1e-12
#: Random sets a significance test needs: the null is made of random-vs-random CAVs.
MIN_RANDOM_SETS = 2


class TCAVError(ConceptLensError):
    """Bad TCAV input: CAVs that do not fit a layer, unknown layers or targets, bad settings."""


Target = Callable[[Any], Any]
#: What computes :func:`target_sensitivities` for :func:`tcav_scores` (the same arguments and results).
GradientPass = Callable[..., tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]]


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
    ``null_scores[metric]`` the scores of the random-vs-random CAVs. ``mean``, ``t``, ``p``,
    the adjusted p-values, ``significant`` and the CI refer to ``statistic``.

    ``p`` is the p-value of ``test``; ``t`` is Student's t (informative under either test).
    ``null_statistics`` are the R exchangeable null statistics ``T_j`` of the permutation test,
    ``null_complete`` whether every pair of random sets had its CAV (exact test). ``ci_low`` /
    ``ci_high`` come from the two-level bootstrap (inputs and CAV runs), ``ci_naive_*`` from
    inputs only. ``robust`` is None until :func:`mark_robust` ran; ``variants`` then holds each
    variant's verdict. ``power`` is filled by the multiple-testing correction (:func:`power`).
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
    test: str = "permutation"
    null_statistics: np.ndarray = field(default_factory=lambda: np.zeros(0))
    null_complete: bool = False
    ci_naive_low: float = math.nan
    ci_naive_high: float = math.nan
    degenerate_layer: bool = False
    degenerate_reason: str = ""
    robust: bool | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    power: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores[self.statistic]))

    @property
    def run_std(self) -> float:
        """Standard deviation of ``statistic`` over the CAV runs (ddof 1; NaN for one run)."""
        s = self.scores[self.statistic]
        return float(np.std(s, ddof=1)) if s.size > 1 else math.nan

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
        row.update({
            "test": self.test, "run_std": self.run_std, "ci_naive_low": self.ci_naive_low, "ci_naive_high": self.ci_naive_high,
            "degenerate_layer": bool(self.degenerate_layer), "robust": self.robust,
            "random_sets_needed": self.power.get("random_sets_needed"),
        })
        return row

    def to_dict(self) -> dict[str, Any]:
        out = self.row()
        out["scores"] = {m: _floats(v) for m, v in self.scores.items()}
        out["null_scores"] = {m: _floats(v) for m, v in self.null_scores.items()}
        out.update({
            "null_statistics": _floats(self.null_statistics), "null_complete": bool(self.null_complete),
            "degenerate_reason": self.degenerate_reason, "variants": {name: dict(v) for name, v in self.variants.items()},
            "power": {k: _finite(v) for k, v in self.power.items()},
        })
        return out


def _floats(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(float(x)) else float(x) for x in np.asarray(values).ravel()]


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class TCAVResult:
    """All hypotheses of one :func:`tcav_scores` call.

    ``sensitivities[(layer, target)]`` keeps the per-input sensitivities ``(n_inputs, K·R + P)``
    (concept CAVs in (K, R) order, then the P null CAVs) of the inputs with a valid target, for
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
    test: str = "permutation"

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
            "n_bootstrap": self.n_bootstrap, "seed": self.seed, "n_hypotheses": len(self.records), "test": self.test,
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


@dataclass(frozen=True)
class _Settings:
    statistic: str = "sign_count"
    correction: str = "holm"
    alpha: float = 0.05
    n_bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    pooling: str = "auto"
    test: str = "permutation"

    def check(self) -> None:
        if self.statistic not in METRICS:
            raise TCAVError("statistic", f"is {self.statistic!r}", f"use one of {METRICS}")
        if self.correction not in ("holm", "bonferroni"):
            raise TCAVError("correction", f"is {self.correction!r}", "use 'holm' or 'bonferroni'")
        if not 0 < self.alpha < 1 or not 0 < self.ci < 1:
            raise TCAVError("alpha/ci", f"are {self.alpha}, {self.ci}", "use values in (0, 1)")
        if self.test not in TESTS:
            raise TCAVError("test", f"is {self.test!r}", f"use one of {TESTS}")


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
    test: str = "permutation",
    gradient_pass: GradientPass | None = None,
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
    n_bootstrap, ci, seed : bootstrap over inputs and CAV runs (0 disables); percentile interval.
    pooling : see :func:`sensitivities`.
    input_ids : sequence or mapping of str to sequence, optional
        Names of the inputs (default: positions), used to report inputs without a target.
    test : {'permutation', 'ttest'}
        The exact rank test against the random sets (default; see the module docstring), or the
        reference code's t-test (anti-conservative, kept for comparison).
    gradient_pass : callable, optional
        Computes :func:`target_sensitivities` (same arguments, same results), e.g. on workers
        over shards of whole batches of the inputs; default: :func:`target_sensitivities` here.
    """
    settings = _Settings(statistic, correction, alpha, n_bootstrap, ci, seed, pooling, test)
    return _score_variants(model, inputs, layer_modules, {"": cav_sets}, targets, settings, batch_size, input_ids, gradient_pass)[""]


def tcav_variants(
    model: nn.Module | LoadedModel,
    inputs: Any,
    layer_modules: Mapping[str, nn.Module] | Sequence[str] | None,
    variants: Mapping[str, Mapping[str, CAVSet]],
    targets: Mapping[str, Target | int],
    *,
    batch_size: int = 32,
    input_ids: Mapping[str, Sequence[Any]] | Sequence[Any] | None = None,
    gradient_pass: GradientPass | None = None,
    **settings: Any,
) -> dict[str, TCAVResult]:
    """:func:`tcav_scores` for several CAV variants of the same layers, in one gradient pass.

    Sensitivities are gradient · CAV, so one forward/backward pass per batch serves every
    variant (pooled and flattened CAVs both use the full layer gradient).

    Parameters
    ----------
    variants : mapping of str to mapping of str to CAVSet
        Variant name → layer → CAVs (e.g. from
        :func:`conceptlens.probes.image_cavs.fit_cav_variants`).
    gradient_pass : callable, optional
        As for :func:`tcav_scores`.
    **settings
        ``statistic``, ``correction``, ``alpha``, ``n_bootstrap``, ``ci``, ``seed``, ``pooling``,
        ``test`` as for :func:`tcav_scores`; each variant is corrected over its own hypotheses.

    Returns
    -------
    dict of str to TCAVResult
    """
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(_Settings)})
    if unknown:
        raise TCAVError(", ".join(unknown), "are not TCAV settings", f"use {', '.join(f.name for f in dataclasses.fields(_Settings))}")
    if not variants:
        raise TCAVError("variants", "is empty", "give at least one variant's CAV sets")
    return _score_variants(model, inputs, layer_modules, variants, targets, _Settings(**settings), batch_size, input_ids, gradient_pass)


def tcav_robustness(
    model: nn.Module | LoadedModel,
    inputs: Any,
    layer_modules: Mapping[str, nn.Module] | Sequence[str] | None,
    variants: Mapping[str, Mapping[str, CAVSet]],
    targets: Mapping[str, Target | int],
    *,
    base: str | None = None,
    **kwargs: Any,
) -> TCAVResult:
    """The ``base`` variant's result (default: the first) with every record's ``variants`` and
    ``robust`` filled (:func:`tcav_variants` then :func:`mark_robust`)."""
    results = tcav_variants(model, inputs, layer_modules, variants, targets, **kwargs)
    base = next(iter(results)) if base is None else base
    if base not in results:
        raise TCAVError(f"base={base!r}", f"is not a variant ({', '.join(results)})", "name one of the variants")
    mark_robust(results[base], results)
    return results[base]


def mark_robust(result: TCAVResult, variant_results: Mapping[str, TCAVResult]) -> TCAVResult:
    """Fill each record's ``variants`` (per variant: ``significant``, ``p_value``, ``p_adjusted``,
    ``mean``) and ``robust``: significant in ``result`` and in every variant. A hypothesis that a
    variant does not have counts as not significant there. Call it after :func:`merge_results`
    (on the merged result of every variant), since merging redoes the correction."""
    index = {name: {(r.concept, r.layer, r.target): r for r in res.records} for name, res in variant_results.items()}
    for record in result.records:
        key = (record.concept, record.layer, record.target)
        record.variants = {}
        for name, res in variant_results.items():
            other = index[name].get(key)
            if other is None:
                record.variants[name] = {"significant": False, "p_value": None, "p_adjusted": None, "mean": None}
                continue
            adjusted = other.p_holm if res.correction == "holm" else other.p_bonferroni
            record.variants[name] = {"significant": bool(other.significant), "p_value": _finite(float(other.p)),
                                     "p_adjusted": _finite(float(adjusted)), "mean": _finite(other.mean)}
        record.robust = bool(record.significant and all(v["significant"] for v in record.variants.values()))
    return result


def _score_variants(
    model: nn.Module | LoadedModel, inputs: Any, layer_modules: Mapping[str, nn.Module] | Sequence[str] | None,
    variants: Mapping[str, Mapping[str, CAVSet]], targets: Mapping[str, Target | int], settings: _Settings,
    batch_size: int, input_ids: Any, gradient_pass: GradientPass | None = None,
) -> dict[str, TCAVResult]:
    settings.check()
    layers = list(dict.fromkeys(layer for cav_sets in variants.values() for layer in cav_sets))
    modules = layer_modules_of(model, layers if layer_modules is None else layer_modules)
    missing_layers = [layer for layer in layers if layer not in modules]
    if missing_layers:
        raise TCAVError(", ".join(missing_layers), "has CAVs but no module", "add it to layer_modules")
    if not targets:
        raise TCAVError("targets", "is empty", "give at least one target")
    modules = {layer: modules[layer] for layer in layers}
    groups = {(name, layer): _all_cavs(cav_set) for name, cav_sets in variants.items() for layer, cav_set in cav_sets.items()}

    records: dict[str, list[TCAVRecord]] = {name: [] for name in variants}
    kept: dict[str, dict[tuple[str, str], torch.Tensor]] = {name: {} for name in variants}
    missing: dict[str, list[Any]] = {}
    for target_name, target in targets.items():
        x = _per_target(inputs, target_name, "inputs")
        ids = _per_target(input_ids, target_name, "input_ids") if input_ids is not None else None
        sens, valid, grad_max = (gradient_pass or target_sensitivities)(model, x, modules, groups, target, target_name, batch_size, settings.pooling)
        missing[target_name] = [int(i) if ids is None else ids[int(i)] for i in torch.nonzero(~valid).flatten()]
        if not bool(valid.any()):
            raise TCAVError(target_name, f"no input has a valid target ({len(valid)} inputs, none with a matching detection)",
                            "choose inputs that show the target class, or lower the score threshold")
        for name, cav_sets in variants.items():
            for layer, cav_set in cav_sets.items():
                kept[name][(layer, target_name)] = sens[(name, layer)][valid]
                largest = float(grad_max[layer][valid].max())
                records[name].extend(_layer_records(cav_set, layer, target_name, kept[name][(layer, target_name)], settings, largest))

    out = {}
    for name in variants:
        _correct(records[name], settings.correction, settings.alpha)
        out[name] = TCAVResult(records[name], settings.statistic, settings.correction, settings.alpha, settings.n_bootstrap,
                               settings.seed, kept[name], dict(missing), settings.test)
    return out


def _all_cavs(cav_set: CAVSet) -> torch.Tensor:
    """The K·R concept CAVs (in (K, R) order), then the null CAVs: ``(K·R + P, D)``."""
    return torch.cat([cav_set.vectors.reshape(-1, cav_set.vectors.shape[-1]), cav_set.random_vectors])


def _correct(records: list[TCAVRecord], correction: str, alpha: float) -> None:
    """Holm and Bonferroni adjustment over every record; ``significant`` from the chosen one;
    ``power`` for the number of hypotheses corrected over."""
    p = np.array([r.p for r in records])
    n_hypotheses = int((~np.isnan(p)).sum()) if p.size else 0
    for record, ph, pb in zip(records, holm(p), bonferroni(p)):
        record.p_holm, record.p_bonferroni = float(ph), float(pb)
        chosen = ph if correction == "holm" else pb
        record.significant = bool(not math.isnan(chosen) and chosen < alpha)
        record.power = power(record.mean, record.null_statistics, CENTERS[record.statistic], alpha, max(n_hypotheses, 1))


def merge_results(results: Sequence[TCAVResult]) -> TCAVResult:
    """One result from several :func:`tcav_scores` calls (e.g. one per model), with the multiple-
    testing correction redone over all their hypotheses together. Target names must be unique."""
    if not results:
        raise TCAVError("results", "is empty", "merge at least one result")
    first = results[0]
    settings = {(r.statistic, r.correction, r.alpha, r.n_bootstrap, r.seed, r.test) for r in results}
    if len(settings) > 1:
        raise TCAVError("results", f"were computed with different settings {sorted(settings)}", "merge results of one configuration")
    targets = [t for r in results for t in r.missing]
    if len(set(targets)) != len(targets):
        raise TCAVError("results", "share target names", "name targets uniquely (e.g. prefix the model name)")
    records = [dataclasses.replace(record) for r in results for record in r.records]  # inputs stay as they were
    _correct(records, first.correction, first.alpha)
    sensitivities = {key: value for r in results for key, value in r.sensitivities.items()}
    missing = {target: ids for r in results for target, ids in r.missing.items()}
    return TCAVResult(records, first.statistic, first.correction, first.alpha, first.n_bootstrap, first.seed, sensitivities, missing, first.test)


def _per_target(values: Any, target_name: str, what: str) -> Any:
    if isinstance(values, Mapping):
        if target_name not in values:
            raise TCAVError(target_name, f"has no {what}", f"give {what} for every target")
        return values[target_name]
    return values


def target_sensitivities(
    model: nn.Module | LoadedModel, x: Any, modules: Mapping[str, nn.Module], groups: Mapping[tuple[str, str], torch.Tensor],
    target: Target | int, target_name: str, batch_size: int, pooling: str,
) -> tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """The gradient pass of one target: one forward/backward pass per batch of ``batch_size`` inputs serves every CAV.

    Parameters
    ----------
    model, x, batch_size, pooling
        As for :func:`tcav_scores` (``x``: this target's inputs).
    modules : mapping of str to nn.Module
        Layer name -> module.
    groups : mapping of (str, str) to Tensor
        (variant, layer) -> CAVs ``(n_cavs, D)``.
    target, target_name
        The target and its name (for errors).

    Returns
    -------
    (dict, Tensor, dict)
        Sensitivities ``(n, n_cavs)`` float32 per (variant, layer), the ``(n,)`` valid mask, and
        per layer each input's largest absolute gradient entry ``(n,)`` float64. Each row depends
        only on its batch: shards of whole batches give the same rows.
    """
    n = x.shape[0] if isinstance(x, torch.Tensor) else len(x)
    if n == 0:
        raise TCAVError(target_name, "has no inputs", "give at least one input")
    sens = {key: torch.empty(n, cavs.shape[0], dtype=torch.float32) for key, cavs in groups.items()}
    grad_max = {layer: torch.zeros(n, dtype=torch.float64) for layer in modules}
    valid = torch.empty(n, dtype=torch.bool)
    for batch in iter_layer_gradients(model, x, modules, target, batch_size):
        valid[batch.rows] = batch.valid
        for layer in modules:
            gradient = batch.gradients[layer]
            grad_max[layer][batch.rows] = gradient.reshape(gradient.shape[0], -1).abs().amax(1).double().cpu()
        for (name, layer), cavs in groups.items():
            sens[(name, layer)][batch.rows] = sensitivities(batch.gradients[layer], cavs, pooling).cpu()
    return sens, valid, grad_max


def _layer_records(cav_set: CAVSet, layer: str, target: str, sens: torch.Tensor, settings: _Settings, grad_max: float) -> list[TCAVRecord]:
    k, r = len(cav_set.concepts), len(cav_set.random_sets)
    statistic = settings.statistic
    scores = {m: v.numpy() for m, v in run_scores(sens).items()}
    opposite = run_scores(-sens)[statistic].numpy()  # s(Y, X): the CAV "Y vs X" is −(CAV "X vs Y")
    pairs, complete = _pair_index(cav_set)
    degenerate, reason = _degenerate(cav_set, scores["sign_count"], grad_max)
    boot = _bootstrap(sens, statistic, settings.n_bootstrap, settings.seed) if settings.n_bootstrap > 0 else None  # (n_boot, N)
    run_draws = np.random.default_rng([settings.seed, 1]).integers(0, r, size=(settings.n_bootstrap, r))
    tail = (1 - settings.ci) / 2 * 100
    out = []
    for i, concept in enumerate(cav_set.concepts):
        runs = slice(i * r, (i + 1) * r)
        record = TCAVRecord(
            concept, layer, target, statistic, int(sens.shape[0]),
            scores={m: v[runs].copy() for m, v in scores.items()},
            null_scores={m: v[k * r:].copy() for m, v in scores.items()},
            test=settings.test, null_complete=complete, degenerate_layer=degenerate, degenerate_reason=reason,
        )
        record.null_statistics = null_statistics(opposite[runs], scores[statistic][k * r:], opposite[k * r:], pairs, r)
        concept_scores, null = record.scores[statistic], record.null_scores[statistic]
        if concept_scores.size >= 2 and null.size >= 2:
            record.t, p_t = _t_test(concept_scores, null)
            if settings.test == "ttest":
                record.p = p_t
        if settings.test == "permutation":
            record.p = permutation_p(record.mean, record.null_statistics, CENTERS[statistic])
        if boot is not None:
            per_run = boot[:, runs]
            record.ci_naive_low, record.ci_naive_high = (float(v) for v in np.percentile(per_run.mean(1), [tail, 100 - tail]))
            two_level = np.take_along_axis(per_run, run_draws, axis=1).mean(1)
            record.ci_low, record.ci_high = (float(v) for v in np.percentile(two_level, [tail, 100 - tail]))
        out.append(record)
    return out


# ----------------------------------------------------------------------------------------------
# the permutation test, its power, degenerate layers


def null_statistics(concept_opposite: np.ndarray, pair_scores: np.ndarray, pair_opposite: np.ndarray, pairs: np.ndarray, n_random: int) -> np.ndarray:
    """The exchangeable null statistics ``T_j = mean_{Y ≠ r_j} s(r_j, Y)`` of the R random sets.

    Parameters
    ----------
    concept_opposite : ndarray
        ``(R,)``: ``s(r_j, c)``, the score of the concept's run ``j`` with its CAV negated.
    pair_scores, pair_opposite : ndarray
        ``(P,)``: ``s(a, b)`` and ``s(b, a)`` of each random-vs-random CAV.
    pairs : ndarray
        ``(P, 2)`` int: the random-set indices ``(a, b)`` of each null CAV (rows with a negative
        index or ``a = b`` are skipped).
    n_random : int
        R.

    Returns
    -------
    ndarray
        ``(R,)``. With every pair present each ``T_j`` averages R scores, like ``T_c``.

    Examples
    --------
    >>> import numpy as np
    >>> null_statistics(np.array([0.4, 0.6]), np.array([0.7]), np.array([0.3]), np.array([[0, 1]]), 2)
    array([0.55, 0.45])
    """
    sums = np.asarray(concept_opposite, dtype=np.float64).copy()
    counts = np.ones(n_random)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    use = (pairs >= 0).all(1) & (pairs[:, 0] != pairs[:, 1])
    a, b = pairs[use, 0], pairs[use, 1]
    np.add.at(sums, a, np.asarray(pair_scores, dtype=np.float64)[use])
    np.add.at(sums, b, np.asarray(pair_opposite, dtype=np.float64)[use])
    np.add.at(counts, a, 1.0)
    np.add.at(counts, b, 1.0)
    return sums / counts


def permutation_p(statistic: float, null: np.ndarray, center: float) -> float:
    """Two-sided rank p-value ``(1 + #{j: |T_j − m| ≥ |T − m|}) / (R + 1)`` (ties count against).

    Examples
    --------
    >>> permutation_p(0.9, np.array([0.5, 0.6, 0.1, 0.45]), 0.5)  # 0.1 is as far from 0.5 as 0.9
    0.4
    """
    null = np.asarray(null, dtype=np.float64)
    distance = abs(float(statistic) - center)
    tolerance = 1e-12 * max(1.0, distance)
    return float((1 + np.sum(np.abs(null - center) >= distance - tolerance)) / (null.size + 1))


def power(statistic: float, null: np.ndarray, center: float, alpha: float, n_hypotheses: int) -> dict[str, Any]:
    """How many random sets the permutation test needs, for the correction and the observed effect.

    The smallest p is ``1/(R + 1)``, and Holm's (or Bonferroni's) first step needs
    ``p < α/H``: ``min_for_correction = ⌊H/α⌋``. The effect ``z = |T − m| / rms_j(T_j − m)``
    gives ``q = 2(1 − Φ(z))``, the chance that a null statistic is as extreme; the expected p
    ``(1 + Rq)/(R + 1)`` is below ``α/H`` from ``R = ⌊(1 − a)/(a − q)⌋ + 1`` on (``a = α/H``),
    ``random_sets_needed`` (None when ``q ≥ a``: no number of random sets suffices at this
    spread). The null spread shrinks as runs grow, so the estimate is conservative.

    Examples
    --------
    >>> power(0.5, np.array([0.4, 0.6]), 0.5, 0.05, 1)["random_sets_needed"] is None
    True
    >>> power(1.0, np.array([0.45, 0.55]), 0.5, 0.05, 2)["random_sets_needed"]  # z = 10: q ≈ 0
    40
    """
    null = np.asarray(null, dtype=np.float64)
    a = alpha / n_hypotheses
    minimum = int(math.floor(n_hypotheses / alpha + 1e-9))
    distance = abs(float(statistic) - center)
    spread = float(np.sqrt(np.mean((null - center) ** 2))) if null.size else math.nan
    if not math.isfinite(spread):
        effect = math.nan
    elif spread > 0:
        effect = distance / spread
    else:
        effect = math.inf if distance > 0 else 0.0
    q = 2 * float(stats.norm.sf(effect)) if math.isfinite(effect) else (0.0 if effect == math.inf else 1.0)
    needed = int(math.floor((1 - a) / (a - q) + 1e-9)) + 1 if q < a else None
    return {"random_sets_needed": needed, "effect": effect, "min_for_correction": minimum, "n_random_sets": int(null.size),
            "alpha_per_test": a}


def random_sets_problem(n_random: int) -> str | None:
    """Why ``n_random`` random sets give no p-values, or None when they can.

    The permutation test ranks the concept among the R random sets: its null statistics are made
    of random-vs-random CAVs (none with one set), and its smallest p-value is ``1/(R + 1)`` (0.5
    with R = 1, so nothing could be significant); the t-test needs two null scores too.

    Examples
    --------
    >>> random_sets_problem(10) is None
    True
    >>> random_sets_problem(1)  # doctest: +ELLIPSIS
    'only 1 random set: no p-values — a significance test needs at least 2 ...'
    """
    if n_random >= MIN_RANDOM_SETS:
        return None
    return (f"only {n_random} random set{'' if n_random == 1 else 's'}: no p-values — a significance test needs at least {MIN_RANDOM_SETS} "
            "(the null is made of random-vs-random CAVs, and with R random sets the smallest p-value is 1/(R + 1): "
            f"{1 / (n_random + 1):.2g} here, so nothing could be significant)")


def _pair_index(cav_set: CAVSet) -> tuple[np.ndarray, bool]:
    """``(P, 2)`` random-set indices of the null CAVs (−1 for a set not among the runs) and
    whether every unordered pair of the R random sets has a CAV."""
    position = {name: i for i, name in enumerate(cav_set.random_sets)}
    pairs = np.array([[position.get(a, -1), position.get(b, -1)] for a, b in cav_set.random_pairs], dtype=np.int64).reshape(-1, 2)
    r = len(cav_set.random_sets)
    present = {frozenset((int(a), int(b))) for a, b in pairs if a >= 0 and b >= 0 and a != b}
    return pairs, len(present) == r * (r - 1) // 2


def _degenerate(cav_set: CAVSet, sign_scores: np.ndarray, grad_max: float) -> tuple[bool, str]:
    """Whether a layer's test means nothing, and why: zero gradients for every input, the
    concepts' CAVs at chance on held-out rows, or every CAV's sign-count score 0 or 1."""
    reasons = []
    if grad_max <= GRADIENT_TOL:
        reasons.append("the target's gradient is zero at this layer for every input")
    accuracy = cav_set.accuracies.double().mean(1)
    if accuracy.numel() and float(accuracy.max()) <= 0.5 + CHANCE_MARGIN:
        reasons.append(f"the CAVs' held-out accuracy is at chance (best concept {float(accuracy.max()):.2f})")
    if sign_scores.size and bool(np.all((sign_scores == 0) | (sign_scores == 1))):
        reasons.append("every CAV's TCAV score is 0 or 1 (the gradient's direction does not vary over the inputs)")
    return bool(reasons), "; ".join(reasons)


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

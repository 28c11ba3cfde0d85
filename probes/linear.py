"""Image-level concept activation vectors (TCAV; Kim et al. 2018): linear concept-vs-random probes.

A CAV is the unit normal of a linear boundary that separates a layer's activations of concept
images from those of random images, pointing to the concept. Activations are pooled ``(N, C)``
(default) or flattened ``(N, C·h·w)``; maps ``(N, C, h, w)`` are flattened on input.

Objective
---------
Both classifiers minimise, over ``w`` and an unpenalised bias ``b``::

    (1/n) Σ_i loss(y_i (w·x_i + b)) + (λ/2) ‖w‖²,   y = +1 concept, −1 random

with ``loss(m) = log(1 + e^{−m})`` (logistic) or ``max(0, 1 − m)²`` (linear SVM, the squared
hinge of scikit-learn's ``LinearSVC``), ``n`` the number of training rows and ``λ`` the
``regularization``. Multiplying by ``n/λ`` gives scikit-learn's ``C·Σ loss + ½‖w‖²``, so
``C = 1 / (λ · n)``. Features are centred (and, with ``standardize``, scaled) on the training rows
before the fit; the learned boundary is mapped back to raw activation space.

Solvers
-------
``torch``: Newton's method in float64 with an Armijo backtracking line search (for the squared
hinge the generalised Hessian, as in liblinear's primal solver), batched over many problems: the
rows of problems of one feature dimension are padded to a common count and masked, and every
problem takes its own step and stops on its own gradient. The Newton system is solved in feature
space when ``D < n`` and otherwise in the span of the training rows (the optimal ``w`` lies there,
so the ``(n+1)``-dimensional system gives the same Newton step exactly) — flattened maps with
``D`` in the tens of thousands cost no more than pooled ones. ``sklearn``: ``LogisticRegression``
(lbfgs) or ``LinearSVC`` on the same centred features with ``C = 1/(λ n)``.

Held-out accuracy follows TCAV: each class is split at random (seeded), a third of it held out; the
CAV is trained on the rest and its accuracy measured on the held-out rows.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning

from conceptlens.concepts.store.artifacts import artifact_paths, read_artifact, write_artifact
from conceptlens.concepts.embedding.embed import reduce_features
from conceptlens.concepts.environment import resolve_device
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.geometry import Geometry
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.vectors.bank import ConceptBank

__all__ = [
    "CAVError",
    "CAVFit",
    "CAVRuns",
    "CAVSet",
    "LinearCAV",
    "CAVSET_FORMAT_VERSION",
    "pooled_activations",
    "train_cavs",
    "train_layer_cavs",
]

CLASSIFIERS = ("logistic", "svm")
SOLVERS = ("torch", "sklearn")
CAVSET_FORMAT_VERSION = 1
CAVSET_KIND = "linear-cav-set"
# float64 bytes one batched solve may hold (the stacked rows dominate); more problems are chunked.
BATCH_BYTES = 1 << 30
# Damping of the bias's Newton curvature: keeps the system regular when no squared-hinge row is
# active; it changes the path, never the optimum (where the gradient is zero).
BIAS_DAMPING = 1e-10
ARMIJO = 1e-4
MAX_HALVINGS = 50
# LinearSVC penalises its intercept as the weight of a synthetic feature of value s. On centred data
# s much larger than the rows' norm makes that penalty negligible; liblinear's primal solver
# (D < n) converges with s = 100·rms norm, its dual solver (D ≥ n) only with s about the rms norm
# (there the intercept is tiny anyway: D ≥ n rows are separable and centred).
SVC_INTERCEPT_SCALING = {"primal": 100.0, "dual": 1.0}


class CAVError(ConceptLensError):
    """Activations cannot give a CAV (empty, too small, constant, mismatched), or bad settings."""


@dataclass(frozen=True)
class CAVFit:
    """One solved concept-vs-random problem (float64, on the CPU).

    Attributes
    ----------
    vector : Tensor
        ``(D,)`` unit normal of the boundary, pointing to the concept.
    bias : float
        Offset of that unit normal: ``vector·a + bias`` is the signed distance of ``a`` to the
        boundary (positive on the concept side).
    accuracy : float
        Accuracy on the held-out rows of both classes.
    coef, intercept : Tensor, float
        The classifier itself in raw activation space: logit ``coef·a + intercept``.
    n_iter : int
        Solver iterations.
    converged : bool
        Whether the solver met ``tol`` within ``max_iter``.
    n_train, n_test : int
        Rows used for training and held out (both classes).
    """

    vector: torch.Tensor
    bias: float
    accuracy: float
    coef: torch.Tensor
    intercept: float
    n_iter: int
    converged: bool
    n_train: int
    n_test: int


@dataclass
class _Problem:
    """One validated problem: float64 features (N, D) of both sets, their names and split seed."""

    concept: torch.Tensor
    random: torch.Tensor
    seed: int
    concept_name: str = "concept activations"
    random_name: str = "random activations"


class LinearCAV(BaseEstimator):
    """A TCAV concept activation vector: a linear classifier of concept vs random activations.

    Parameters
    ----------
    classifier : {'logistic', 'svm'}
        Logistic regression, or a linear SVM with the squared hinge (as ``LinearSVC``).
    solver : {'torch', 'sklearn'}
        Batched float64 Newton solver (CPU or CUDA), or scikit-learn's ``LogisticRegression`` /
        ``LinearSVC``. Both solve the same problem.
    regularization : float
        L2 strength ``λ`` of ``(1/n) Σ loss + (λ/2)‖w‖²`` (``n`` training rows); scikit-learn's
        ``C`` is ``1 / (λ n)``.
    max_iter : int
        Maximum solver iterations (Newton steps for ``torch``).
    tol : float
        Stop when the largest absolute gradient entry of the objective is at most ``tol``.
    standardize : bool
        Scale each feature by its standard deviation over the training rows before the fit (the
        penalty then acts on standardised weights). Features are always centred. The CAV is
        reported in raw activation space either way.
    seed : int
        Seed of the held-out split (and of ``LinearSVC``'s coordinate order).
    device : str
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``; the ``torch`` solver runs there.
    test_size : float
        Fraction of each class held out to measure ``accuracy_`` (TCAV: a third).

    Attributes
    ----------
    vector_ : Tensor
        ``(D,)`` float64 unit normal of the boundary, pointing to the concept.
    bias_ : float
        ``vector_·a + bias_`` is the signed distance to the boundary.
    coef_, intercept_ : Tensor, float
        The classifier's logit ``coef_·a + intercept_`` in raw activation space.
    accuracy_ : float
        Held-out accuracy.
    n_features_ : int
        ``D``.
    feature_shape_ : tuple of int
        Shape of one input row before flattening (``(C,)`` or ``(C, h, w)``).
    n_iter_ : int
    converged_ : bool

    Examples
    --------
    >>> cav = LinearCAV(classifier="svm").fit(striped, random_0)  # doctest: +SKIP
    >>> cav.vector_.shape, cav.accuracy_  # doctest: +SKIP
    (torch.Size([256]), 0.93)
    """

    def __init__(
        self,
        classifier: str = "logistic",
        solver: str = "torch",
        regularization: float = 1e-2,
        max_iter: int = 500,
        tol: float = 1e-6,
        standardize: bool = False,
        seed: int = 0,
        device: str = "auto",
        test_size: float = 1 / 3,
    ) -> None:
        self.classifier = classifier
        self.solver = solver
        self.regularization = regularization
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.seed = seed
        self.device = device
        self.test_size = test_size

    def fit(self, concept_activations: torch.Tensor, random_activations: torch.Tensor) -> LinearCAV:
        """Learn the CAV separating ``concept_activations`` from ``random_activations``.

        Parameters
        ----------
        concept_activations : Tensor
            ``(N1, D)``, or ``(N1, C, h, w)`` (flattened).
        random_activations : Tensor
            ``(N2, D)`` or ``(N2, C, h, w)``, the same ``D``.

        Returns
        -------
        LinearCAV
            ``self``, fitted.
        """
        result = self.fit_many([(concept_activations, random_activations)])[0]
        self.vector_, self.bias_ = result.vector, result.bias
        self.coef_, self.intercept_ = result.coef, result.intercept
        self.accuracy_, self.n_iter_, self.converged_ = result.accuracy, result.n_iter, result.converged
        self.n_features_ = int(result.vector.numel())
        self.feature_shape_ = tuple(concept_activations.shape[1:])
        return self

    def fit_many(
        self, problems: Sequence[tuple[torch.Tensor, torch.Tensor]], seeds: Sequence[int] | None = None
    ) -> list[CAVFit]:
        """Solve many concept-vs-random problems; the ``torch`` solver batches them.

        Problems of one feature dimension are stacked (rows padded and masked) and solved together;
        each result equals that of solving the problem alone. The estimator itself stays unfitted.

        Parameters
        ----------
        problems : sequence of (Tensor, Tensor)
            ``(concept_activations, random_activations)`` pairs as in :meth:`fit`.
        seeds : sequence of int, optional
            Held-out split seed per problem (default: ``seed`` for every problem).

        Returns
        -------
        list of CAVFit
            One per problem, in order.
        """
        if seeds is not None and len(seeds) != len(problems):
            raise CAVError("fit_many(seeds=...)", f"{len(seeds)} seeds for {len(problems)} problems", "give one seed per problem")
        seeds = [self.seed] * len(problems) if seeds is None else list(seeds)
        prepared = [_Problem(_features(c, "concept activations"), _features(r, "random activations"), int(s)) for (c, r), s in zip(problems, seeds)]
        return self._solve(prepared)

    def decision_function(self, activations: torch.Tensor) -> torch.Tensor:
        """Logits ``coef_·a + intercept_`` of rows ``(N, D)`` or maps ``(N, C, h, w)``: ``(N,)`` float64."""
        self._check_fitted()
        rows = _features(activations, "activations")
        if rows.shape[1] != self.n_features_:
            raise CAVError("activations", f"have {rows.shape[1]} features, the CAV {self.n_features_}", "use activations of the layer the CAV was trained on")
        return rows @ self.coef_ + self.intercept_

    def predict(self, activations: torch.Tensor) -> torch.Tensor:
        """True where a row is classified as the concept: ``(N,)`` bool."""
        return self.decision_function(activations) > 0

    # -------------------------------------------------------------------------------- internals
    def _check_fitted(self) -> None:
        if not hasattr(self, "vector_"):
            raise CAVError("LinearCAV", "is not fitted", "call fit() first")

    def _check_params(self) -> None:
        name = type(self).__name__
        if self.classifier not in CLASSIFIERS:
            raise CAVError(f"{name}(classifier={self.classifier!r})", "unknown classifier", f"use one of {', '.join(CLASSIFIERS)}")
        if self.solver not in SOLVERS:
            raise CAVError(f"{name}(solver={self.solver!r})", "unknown solver", f"use one of {', '.join(SOLVERS)}")
        if not (isinstance(self.regularization, numbers.Real) and self.regularization > 0 and math.isfinite(self.regularization)):
            raise CAVError(f"{name}(regularization={self.regularization!r})", "must be a positive number", "use e.g. 1e-2")
        if not (isinstance(self.max_iter, numbers.Integral) and self.max_iter >= 1):
            raise CAVError(f"{name}(max_iter={self.max_iter!r})", "must be a positive integer", "use e.g. 500")
        if not (isinstance(self.tol, numbers.Real) and self.tol > 0):
            raise CAVError(f"{name}(tol={self.tol!r})", "must be positive", "use e.g. 1e-6")
        if not (isinstance(self.test_size, numbers.Real) and 0 < self.test_size < 1):
            raise CAVError(f"{name}(test_size={self.test_size!r})", "must lie strictly between 0 and 1", "use e.g. 1/3")

    def _solve(self, problems: list[_Problem]) -> list[CAVFit]:
        """Validate, split and solve prepared problems (grouped by feature dimension)."""
        self._check_params()
        if not problems:
            return []
        checked: set[int] = set()  # a set shared by many problems (R runs) is checked once
        for problem in problems:
            _check_problem(problem, checked)
        splits = [_split(p, self.test_size) for p in problems]
        results: list[CAVFit | None] = [None] * len(problems)
        for indices in _batches(problems):
            solved = self._solve_torch(problems, splits, indices) if self.solver == "torch" else [self._solve_sklearn(problems[i], splits[i]) for i in indices]
            for index, result in zip(indices, solved):
                results[index] = result
        _warn_unconverged(problems, results)
        return results  # type: ignore[return-value]

    def _solve_torch(self, problems: list[_Problem], splits: list[_Split], indices: list[int]) -> list[CAVFit]:
        device = resolve_device(self.device)
        features, labels, weights = _stack([problems[i] for i in indices], [splits[i] for i in indices], device)
        mean, scale = _train_statistics(features, weights, self.standardize)
        features.sub_(mean[:, None])
        if self.standardize:
            features.div_(scale[:, None])
        features.mul_((weights > 0)[..., None])
        loss = "logistic" if self.classifier == "logistic" else "squared_hinge"
        solution = _newton(features, labels, weights, loss, float(self.regularization), self.max_iter, float(self.tol))
        coef = solution.weights / scale
        intercept = solution.bias - (coef * mean).sum(1)
        return [
            _result(problems[i], splits[i], coef[k], intercept[k], int(solution.n_iter[k]), bool(solution.converged[k]))
            for k, i in enumerate(indices)
        ]

    def _solve_sklearn(self, problem: _Problem, split: _Split) -> CAVFit:
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC

        rows, labels = _rows(problem, split, "train")
        mean = rows.mean(0)
        scale = _safe_scale(rows.std(0, correction=0)) if self.standardize else torch.ones_like(mean)
        inputs = ((rows - mean) / scale).numpy()
        n_rows, n_features = inputs.shape
        strength = 1.0 / (self.regularization * n_rows)
        if self.classifier == "logistic":
            model = LogisticRegression(C=strength, tol=self.tol, max_iter=self.max_iter)
        else:
            dual = n_features >= n_rows
            rms_norm = max(1.0, float(np.sqrt((inputs**2).sum(1).mean())))
            model = LinearSVC(
                C=strength, loss="squared_hinge", dual=dual, tol=self.tol, max_iter=self.max_iter, random_state=problem.seed,
                intercept_scaling=SVC_INTERCEPT_SCALING["dual" if dual else "primal"] * rms_norm,
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(inputs, labels.numpy() > 0)
        converged = True
        for warning in caught:  # convergence is reported once for all problems by _solve
            if issubclass(warning.category, ConvergenceWarning):
                converged = False
            else:
                warnings.warn(warning.message, warning.category, stacklevel=2)
        coef = torch.from_numpy(np.asarray(model.coef_, dtype=np.float64).reshape(-1)) / scale
        intercept = float(np.asarray(model.intercept_).reshape(-1)[0]) - float(coef @ mean)
        return _result(problem, split, coef, torch.tensor(intercept, dtype=torch.float64), int(np.max(model.n_iter_)), converged)


# ------------------------------------------------------------------------------ validation
def _features(activations: torch.Tensor, name: str) -> torch.Tensor:
    """Rows ``(N, D)`` float64 on the CPU from ``(N, D)`` or ``(N, C, h, w)`` activations."""
    if not isinstance(activations, torch.Tensor):
        activations = torch.as_tensor(np.asarray(activations))
    if activations.dim() < 2:
        raise CAVError(name, f"have shape {tuple(activations.shape)}", "give (N, D) pooled or (N, C, h, w) activations")
    return activations.detach().to("cpu", torch.float64).flatten(1)


def _check_problem(problem: _Problem, checked: set[int]) -> None:
    """Raise CAVError for empty, too small, non-finite, constant or mismatched sets."""
    for rows, name in ((problem.concept, problem.concept_name), (problem.random, problem.random_name)):
        if id(rows) not in checked:
            _check_set(rows, name)
            checked.add(id(rows))
    if problem.concept.shape[1] != problem.random.shape[1]:
        raise CAVError(
            f"{problem.concept_name} vs {problem.random_name}",
            f"have {problem.concept.shape[1]} and {problem.random.shape[1]} features",
            "use activations of the same layer and reduction for both sets",
        )


def _check_set(rows: torch.Tensor, name: str) -> None:
    if rows.shape[0] == 0:
        raise CAVError(name, "is empty (no images)", "give the set at least 2 images (TCAV uses tens)")
    if rows.shape[0] < 2:
        raise CAVError(name, f"has {rows.shape[0]} example; a CAV needs at least 2 per class (one to train, one to test)", "add images to the set")
    if rows.shape[1] == 0:
        raise CAVError(name, "have no features", "check the layer's activations")
    if not torch.isfinite(rows).all():
        raise CAVError(name, "contain NaN or inf", "check the model and the embedding")
    if bool((rows == rows[:1]).all()):
        raise CAVError(
            name,
            f"are constant: all {rows.shape[0]} examples have identical activations",
            "check that the images differ and the layer is not dead (all-zero)",
        )


# ---------------------------------------------------------------------------- held-out split
class _Split(NamedTuple):
    concept_train: torch.Tensor
    concept_test: torch.Tensor
    random_train: torch.Tensor
    random_test: torch.Tensor


def _split(problem: _Problem, test_size: float) -> _Split:
    """Hold out ``test_size`` of each class (at least one row, leaving at least one), seeded."""
    rng = np.random.default_rng(problem.seed)
    parts = []
    for rows in (problem.concept, problem.random):
        n = rows.shape[0]
        n_test = max(1, min(n - 1, int(round(n * test_size))))
        order = torch.from_numpy(rng.permutation(n))
        parts += [order[n_test:].sort().values, order[:n_test].sort().values]
    return _Split(*parts)


def _rows(problem: _Problem, split: _Split, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and ±1 labels (concept first) of the ``train`` or ``test`` part."""
    concept = problem.concept[split.concept_train if part == "train" else split.concept_test]
    random = problem.random[split.random_train if part == "train" else split.random_test]
    labels = torch.cat([torch.ones(len(concept), dtype=torch.float64), -torch.ones(len(random), dtype=torch.float64)])
    return torch.cat([concept, random]), labels


def _result(problem: _Problem, split: _Split, coef: torch.Tensor, intercept: torch.Tensor, n_iter: int, converged: bool) -> CAVFit:
    """Unit vector, offset and held-out accuracy of a raw-space classifier."""
    coef = coef.detach().to("cpu", torch.float64)
    intercept = float(intercept)
    norm = float(coef.norm())
    if norm == 0.0:
        raise CAVError(
            f"{problem.concept_name} vs {problem.random_name}",
            "the classifier's weight vector is zero (the two sets cannot be told apart)",
            "check that the sets differ, or lower regularization",
        )
    rows, labels = _rows(problem, split, "test")
    predicted = torch.where(rows @ coef + intercept > 0, 1.0, -1.0).to(torch.float64)
    return CAVFit(
        vector=coef / norm,
        bias=intercept / norm,
        accuracy=float((predicted == labels).double().mean()),
        coef=coef,
        intercept=intercept,
        n_iter=n_iter,
        converged=converged,
        n_train=len(split.concept_train) + len(split.random_train),
        n_test=len(split.concept_test) + len(split.random_test),
    )


def _warn_unconverged(problems: list[_Problem], results: list[CAVFit | None]) -> None:
    failed = [f"{p.concept_name} vs {p.random_name}" for p, r in zip(problems, results) if r is not None and not r.converged]
    if failed:
        shown = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        warnings.warn(f"CAV solver did not reach tol for {shown}; raise max_iter or regularization", ConvergenceWarning, stacklevel=3)


# ----------------------------------------------------------------------------- batching
def _batches(problems: list[_Problem]) -> list[list[int]]:
    """Indices of problems grouped by feature dimension, chunked to about BATCH_BYTES each."""
    by_dimension: dict[int, list[int]] = {}
    for index, problem in enumerate(problems):
        by_dimension.setdefault(problem.concept.shape[1], []).append(index)
    batches = []
    for dimension, indices in by_dimension.items():
        rows = max(len(problems[i].concept) + len(problems[i].random) for i in indices)
        size = min(rows, dimension) + 1
        per_problem = 8 * (3 * rows * dimension + 3 * size * size)
        chunk = max(1, BATCH_BYTES // per_problem)
        batches += [indices[start : start + chunk] for start in range(0, len(indices), chunk)]
    return batches


def _stack(problems: list[_Problem], splits: list[_Split], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training rows padded to one count: features (P, n, D), labels (P, n) ±1 / 0, weights 1/n_p / 0."""
    counts = [len(split.concept_train) + len(split.random_train) for split in splits]
    shape = (len(problems), max(counts))
    features = torch.zeros(*shape, problems[0].concept.shape[1], dtype=torch.float64)
    labels = torch.zeros(shape, dtype=torch.float64)
    weights = torch.zeros(shape, dtype=torch.float64)
    for k, (problem, split, count) in enumerate(zip(problems, splits, counts)):
        n_concept = len(split.concept_train)
        torch.index_select(problem.concept, 0, split.concept_train, out=features[k, :n_concept])
        torch.index_select(problem.random, 0, split.random_train, out=features[k, n_concept:count])
        labels[k, :n_concept], labels[k, n_concept:count] = 1.0, -1.0
        weights[k, :count] = 1.0 / count
    return features.to(device), labels.to(device), weights.to(device)


def _safe_scale(std: torch.Tensor) -> torch.Tensor:
    """Standard deviations with constant features left unscaled."""
    return torch.where(std > 1e-12 * std.abs().max().clamp(min=1e-300), std, torch.ones_like(std))


def _train_statistics(features: torch.Tensor, weights: torch.Tensor, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-problem feature mean and scale over the (weighted, unpadded) training rows: (P, D) each."""
    mean = torch.einsum("pn,pnd->pd", weights, features)
    if not standardize:
        return mean, torch.ones_like(mean)
    variance = torch.einsum("pn,pnd->pd", weights, (features - mean[:, None]) ** 2)
    return mean, torch.stack([_safe_scale(v) for v in variance.sqrt()])


# ----------------------------------------------------------------------------- Newton solver
class _Solution(NamedTuple):
    weights: torch.Tensor  # (P, D)
    bias: torch.Tensor  # (P,)
    n_iter: torch.Tensor  # (P,)
    converged: torch.Tensor  # (P,) bool


def _loss_value(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, loss: str) -> torch.Tensor:
    """Weighted mean loss per problem, (P, n) scores -> (P,)."""
    margins = labels * scores
    values = torch.nn.functional.softplus(-margins) if loss == "logistic" else (1 - margins).clamp(min=0) ** 2
    return (weights * values).sum(1)


def _loss_derivatives(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted first and second derivatives of the loss with respect to each score: (P, n) each."""
    margins = labels * scores
    if loss == "logistic":
        first = -labels * torch.sigmoid(-margins)
        second = torch.sigmoid(margins) * torch.sigmoid(-margins)
    else:
        slack = (1 - margins).clamp(min=0)
        first = -2 * labels * slack
        second = 2 * (slack > 0).to(scores.dtype)
    return weights * first, weights * second


class _PrimalSpace:
    """Newton steps from the (D+1)-dimensional feature-space system (for D < n); parameters ``w``."""

    def __init__(self, features: torch.Tensor, strength: float) -> None:
        self.features = features
        self.strength = strength
        ones = torch.ones(*features.shape[:2], 1, dtype=features.dtype, device=features.device)
        self.augmented = torch.cat([features, ones], dim=2)
        diagonal = torch.full((features.shape[2] + 1,), strength, dtype=features.dtype, device=features.device)
        diagonal[-1] = BIAS_DAMPING
        self.regulariser = torch.diag(diagonal)
        self.w = torch.zeros(features.shape[0], features.shape[2], dtype=features.dtype, device=features.device)

    def gradient(self, first: torch.Tensor, tol: float, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight gradient ``Xᵀr + λw`` (P, D) and its largest absolute entry per problem."""
        grad_w = (first[:, None] @ self.features).squeeze(1) + self.strength * self.w
        return grad_w, grad_w.abs().amax(1)

    def step(self, first: torch.Tensor, second: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Newton direction ``Δw`` (P, D), ``Δb`` (P,) and the change of the scores ``XΔw`` (P, n)."""
        hessian = self.augmented.transpose(1, 2) @ (second[..., None] * self.augmented) + self.regulariser
        gradient = torch.cat([grad_w, grad_b[:, None]], dim=1)
        direction = -torch.linalg.solve(hessian, gradient)
        step_w = direction[:, :-1]
        return step_w, direction[:, -1], (self.features @ step_w[..., None]).squeeze(2)

    def slope(self, grad_w: torch.Tensor, step_w: torch.Tensor) -> torch.Tensor:
        return (grad_w * step_w).sum(1)

    def norms(self, step_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``‖w‖²``, ``w·Δw`` and ``‖Δw‖²`` per problem."""
        return (self.w * self.w).sum(1), (self.w * step_w).sum(1), (step_w * step_w).sum(1)

    def advance(self, step: torch.Tensor, step_w: torch.Tensor) -> None:
        self.w = self.w + step[:, None] * step_w

    def weights(self) -> torch.Tensor:
        return self.w


class _KernelSpace:
    """Newton steps in the span of the training rows (D > n); parameters ``α`` with ``w = Xᵀα``.

    Every iterate from ``w = 0`` lies in the row span (the gradient and the Newton step do), so
    the whole solve runs on the Gram matrix ``K = XXᵀ``: scores ``Kα``, ``‖w‖² = αᵀKα``, gradient
    ``Xᵀ(r + λα)``, and the Newton equations reduce to
    ``[[diag(h)K + λI, h], [hᵀK, Σh]] [β; Δb] = −[r + λα; Σr]`` with ``Δw = Xᵀβ``. The
    ``(P, n, D)`` features are read once for ``K``, once for ``w`` at the end, and for the exact
    largest gradient entry only while ``‖g‖₂ ≤ 2√D·tol`` (elsewhere ``‖g‖₂/√D ≤ max|g|`` already
    exceeds ``tol``): flattened maps cost about as much as pooled ones.
    """

    def __init__(self, features: torch.Tensor, strength: float) -> None:
        self.features = features
        self.strength = strength
        self.gram = features @ features.transpose(1, 2)
        self.alpha = torch.zeros(features.shape[:2], dtype=features.dtype, device=features.device)
        self.identity = torch.eye(features.shape[1], dtype=features.dtype, device=features.device)
        self.root = math.sqrt(features.shape[2])
        self.largest = torch.full(features.shape[:1], math.inf, dtype=features.dtype, device=features.device)

    def _inner(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``(Xᵀa)·(Xᵀc) = aᵀKc`` per problem."""
        return ((a[:, None] @ self.gram).squeeze(1) * c).sum(1)

    def gradient(self, first: torch.Tensor, tol: float, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight gradient as row coefficients ``r + λα`` (P, n) and its largest absolute entry.

        The entry is exact where it may be at most ``tol``; elsewhere the lower bound ``‖g‖₂/√D``.
        Problems already ``done`` no longer move: their previous value is kept.
        """
        coefficients = first + self.strength * self.alpha
        norm = self._inner(coefficients, coefficients).clamp(min=0).sqrt()
        largest = torch.where(done, self.largest, norm / self.root)
        for index in torch.nonzero((norm <= 2 * self.root * tol) & ~done).flatten().tolist():
            largest[index] = (coefficients[index] @ self.features[index]).abs().amax()
        self.largest = largest
        return coefficients, largest

    def step(self, first: torch.Tensor, second: torch.Tensor, coefficients: torch.Tensor, grad_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Newton direction ``β`` (P, n) with ``Δw = Xᵀβ``, ``Δb`` (P,) and the score change ``Kβ``."""
        top = torch.cat([second[..., None] * self.gram + self.strength * self.identity, second[..., None]], dim=2)
        bottom = torch.cat([(second[:, None] @ self.gram), (second.sum(1) + BIAS_DAMPING)[:, None, None]], dim=2)
        system = torch.cat([top, bottom], dim=1)
        rhs = -torch.cat([coefficients, grad_b[:, None]], dim=1)
        solution = torch.linalg.solve(system, rhs)
        beta = solution[:, :-1]
        return beta, solution[:, -1], (self.gram @ beta[..., None]).squeeze(2)

    def slope(self, coefficients: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return self._inner(coefficients, beta)

    def norms(self, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``‖w‖²``, ``w·Δw`` and ``‖Δw‖²`` per problem, from the Gram matrix."""
        return self._inner(self.alpha, self.alpha), self._inner(self.alpha, beta), self._inner(beta, beta)

    def advance(self, step: torch.Tensor, beta: torch.Tensor) -> None:
        self.alpha = self.alpha + step[:, None] * beta

    def weights(self) -> torch.Tensor:
        return (self.alpha[:, None] @ self.features).squeeze(1)


def _newton(
    features: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    loss: str,
    strength: float,
    max_iter: int,
    tol: float,
    space: str = "auto",
) -> _Solution:
    """Minimise ``Σ_i weights·loss(y_i(w·x_i + b)) + (λ/2)‖w‖²`` for P problems at once.

    ``features`` (P, n, D) are zero on padded rows, whose ``weights`` are zero. ``space`` picks the
    Newton system: ``primal`` (D+1 unknowns), ``kernel`` (n+1) or ``auto`` (the smaller).
    """
    n_problems, n_rows, dimension = features.shape
    use_kernel = space == "kernel" or (space == "auto" and dimension > n_rows)
    system = _KernelSpace(features, strength) if use_kernel else _PrimalSpace(features, strength)
    b = torch.zeros(n_problems, dtype=features.dtype, device=features.device)
    scores = torch.zeros(n_problems, n_rows, dtype=features.dtype, device=features.device)  # X w, without b
    done = torch.zeros(n_problems, dtype=torch.bool, device=features.device)
    converged = torch.zeros_like(done)
    n_iter = torch.zeros(n_problems, dtype=torch.int64, device=features.device)
    for iteration in range(max_iter + 1):
        first, second = _loss_derivatives(scores + b[:, None], labels, weights, loss)
        gradient, largest = system.gradient(first, tol, done)
        grad_b = first.sum(1)
        converged = torch.maximum(largest, grad_b.abs()) <= tol
        done = done | converged
        if bool(done.all()) or iteration == max_iter:
            break
        direction, step_b, step_scores = system.step(first, second, gradient, grad_b)
        slope = system.slope(gradient, direction) + grad_b * step_b
        squared, cross, quadratic = system.norms(direction)
        objective = _loss_value(scores + b[:, None], labels, weights, loss) + strength / 2 * squared
        step = _line_search(scores + b[:, None], step_scores + step_b[:, None], labels, weights, loss, strength, (squared, cross, quadratic), objective, slope, done)
        done = done | (step == 0)
        b = b + step * step_b
        scores = scores + step[:, None] * step_scores
        system.advance(step, direction)
        n_iter = n_iter + (step > 0).long()
    return _Solution(system.weights(), b, n_iter.cpu(), converged.cpu())


def _line_search(
    scores: torch.Tensor,
    step_scores: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    loss: str,
    strength: float,
    norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    objective: torch.Tensor,
    slope: torch.Tensor,
    done: torch.Tensor,
) -> torch.Tensor:
    """Per-problem Armijo backtracking from the full Newton step; 0 where done or no descent.

    ``norms`` are ``‖w‖²``, ``w·Δw`` and ``‖Δw‖²`` per problem (the penalty along the step).
    """
    squared, cross, quadratic = norms
    # Below float64 resolution of the objective the full Newton step is taken (it is safe there).
    tiny = slope.abs() <= 1e-15 * objective.abs().clamp(min=1e-300)
    accepted = done | (slope >= 0) | tiny
    step = torch.ones_like(objective)
    for _ in range(MAX_HALVINGS):
        trial = _loss_value(scores + step[:, None] * step_scores, labels, weights, loss)
        trial = trial + strength / 2 * (squared + 2 * step * cross + step * step * quadratic)
        accepted = accepted | (trial <= objective + ARMIJO * step * slope)
        if bool(accepted.all()):
            break
        step = torch.where(accepted, step, step / 2)
    usable = accepted & ~done & ((slope < 0) | tiny)
    return torch.where(usable, step, torch.zeros_like(step))


# ----------------------------------------------------------------------------- CAV sets
class CAVRuns(NamedTuple):
    """The R CAVs of one concept (or the random-vs-random CAVs): vectors (R, D), biases, accuracies."""

    vectors: torch.Tensor
    biases: torch.Tensor
    accuracies: torch.Tensor


@dataclass
class CAVSet:
    """CAVs of concepts against R random sets at one layer, and random-vs-random CAVs (the null).

    Run ``r`` of every concept was trained against ``random_sets[r]``. Random-vs-random CAV ``r``
    separates ``random_pairs[r][0]`` (as the "concept") from ``random_pairs[r][1]``: random set ``r``
    against random set ``(r + 1) mod R`` — one null CAV per random set, R in all (none when
    ``R = 1``). Vectors are unit normals (float32) pointing to the positive set; biases make
    ``vector·a + bias`` the signed distance to the boundary.

    Attributes
    ----------
    concepts : list of str
    random_sets : list of str
    vectors : Tensor
        ``(K, R, D)``.
    biases, accuracies : Tensor
        ``(K, R)``; accuracies on each run's held-out rows.
    random_pairs : list of (str, str)
    random_vectors : Tensor
        ``(R, D)`` (``(0, D)`` when ``R = 1``).
    random_biases, random_accuracies : Tensor
        ``(R,)``.
    layer : str
    feature_shape : list of int
        One activation row before flattening: ``[C]`` pooled, ``[C, h, w]`` flattened.
    settings : dict
        The :class:`LinearCAV` parameters used.
    provenance : dict
        Free-form: store keys, model hash, data ids.
    """

    concepts: list[str]
    random_sets: list[str]
    vectors: torch.Tensor
    biases: torch.Tensor
    accuracies: torch.Tensor
    random_pairs: list[tuple[str, str]]
    random_vectors: torch.Tensor
    random_biases: torch.Tensor
    random_accuracies: torch.Tensor
    layer: str = ""
    feature_shape: list[int] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vectors", "biases", "accuracies", "random_vectors", "random_biases", "random_accuracies"):
            setattr(self, name, torch.as_tensor(getattr(self, name), dtype=torch.float32).detach().cpu().contiguous())
        self.concepts, self.random_sets = list(self.concepts), list(self.random_sets)
        self.random_pairs = [(str(a), str(b)) for a, b in self.random_pairs]
        self.feature_shape = [int(s) for s in self.feature_shape]
        self._check()

    def _check(self) -> None:
        name = f"CAV set (layer {self.layer!r})"
        k, r = len(self.concepts), len(self.random_sets)
        if self.vectors.dim() != 3 or tuple(self.vectors.shape[:2]) != (k, r):
            raise CAVError(name, f"vectors have shape {tuple(self.vectors.shape)} for {k} concepts × {r} random sets", "give (K, R, D) vectors")
        for tensor_name in ("biases", "accuracies"):
            if tuple(getattr(self, tensor_name).shape) != (k, r):
                raise CAVError(name, f"{tensor_name} have shape {tuple(getattr(self, tensor_name).shape)}", f"give ({k}, {r})")
        n_null = len(self.random_pairs)
        if tuple(self.random_vectors.shape) != (n_null, self.n_features):
            raise CAVError(name, f"random vectors have shape {tuple(self.random_vectors.shape)} for {n_null} pairs", f"give ({n_null}, {self.n_features})")
        for tensor_name in ("random_biases", "random_accuracies"):
            if tuple(getattr(self, tensor_name).shape) != (n_null,):
                raise CAVError(name, f"{tensor_name} have shape {tuple(getattr(self, tensor_name).shape)}", f"give ({n_null},)")
        if self.feature_shape and math.prod(self.feature_shape) != self.n_features:
            raise CAVError(name, f"feature shape {self.feature_shape} does not hold {self.n_features} features", "record the shape of one activation row")

    @property
    def n_runs(self) -> int:
        return len(self.random_sets)

    @property
    def n_features(self) -> int:
        return int(self.vectors.shape[2])

    def runs(self, concept: str) -> CAVRuns:
        """The R CAVs of ``concept``."""
        if concept not in self.concepts:
            raise CAVError(concept, f"no such concept in the CAV set; known: {', '.join(self.concepts)}", "use a trained concept name")
        k = self.concepts.index(concept)
        return CAVRuns(self.vectors[k], self.biases[k], self.accuracies[k])

    def random_runs(self) -> CAVRuns:
        """The random-vs-random CAVs (the null distribution of the significance test)."""
        return CAVRuns(self.random_vectors, self.random_biases, self.random_accuracies)

    def to_bank(self, layer: str | None = None, provenance: dict[str, Any] | None = None) -> ConceptBank:
        """A ``linear`` ConceptBank of the mean-direction CAV per concept.

        The vector of a concept is the normalised mean of its R unit vectors; its bias is the
        mean of the runs' biases. Metrics per concept: ``accuracy_mean``, ``accuracy_std``
        (over runs; 0 for one run), ``n_runs`` and ``direction_consistency`` (length of the mean of
        the unit vectors: 1 when all runs agree). For flattened CAVs the bank's channel count is
        ``C·h·w``: give its ``logits`` flattened activations ``(N, C·h·w)``.
        """
        layer = self.layer if layer is None else layer
        if not layer:
            raise CAVError("CAVSet.to_bank", "the CAV set records no layer", "pass layer=")
        mean = self.vectors.double().mean(1)
        consistency = mean.norm(dim=1)
        accuracy_std = self.accuracies.double().std(1) if self.n_runs > 1 else torch.zeros(len(self.concepts), dtype=torch.float64)
        metrics = {
            concept: {
                "accuracy_mean": float(self.accuracies[k].double().mean()),
                "accuracy_std": float(accuracy_std[k]),
                "n_runs": self.n_runs,
                "direction_consistency": float(consistency[k]),
            }
            for k, concept in enumerate(self.concepts)
        }
        details = {
            "method": "tcav-linear",
            "settings": self.settings,
            "random_sets": self.random_sets,
            "feature_shape": self.feature_shape,
            "features": "pooled" if len(self.feature_shape) <= 1 else "flattened",
            **self.provenance,
            **(provenance or {}),
        }
        return ConceptBank(
            method="linear",
            layer=layer,
            concepts=self.concepts,
            vectors=(mean / consistency.clamp(min=1e-12)[:, None]).float(),
            biases=self.biases.double().mean(1).float(),
            metrics=metrics,
            provenance=details,
        )

    # ----------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (all runs) and ``<path>.json`` atomically; return the JSON path."""
        metadata = {
            "layer": self.layer,
            "concepts": self.concepts,
            "random_sets": self.random_sets,
            "random_pairs": [list(pair) for pair in self.random_pairs],
            "n_features": self.n_features,
            "feature_shape": self.feature_shape,
            "settings": self.settings,
            "provenance": self.provenance,
        }
        return write_artifact(path, CAVSET_KIND, CAVSET_FORMAT_VERSION, {name: getattr(self, name) for name in _CAVSET_TENSORS}, metadata)

    @classmethod
    def load(cls, path: str | Path) -> CAVSet:
        """Load a set saved by :meth:`save`, checking format, checksum and shapes."""
        required = ("concepts", "random_sets", "random_pairs", "n_features")
        metadata, tensors = read_artifact(path, CAVSET_KIND, CAVSET_FORMAT_VERSION, required, CAVError)
        _, tensor_path = artifact_paths(path)
        missing = [name for name in _CAVSET_TENSORS if name not in tensors]
        if missing:
            raise CAVError(str(tensor_path), f"missing tensors {missing}", "save the CAV set again")
        cav_set = cls(
            concepts=metadata["concepts"],
            random_sets=metadata["random_sets"],
            random_pairs=[tuple(pair) for pair in metadata["random_pairs"]],
            layer=metadata.get("layer", ""),
            feature_shape=metadata.get("feature_shape", []),
            settings=metadata.get("settings", {}),
            provenance=metadata.get("provenance", {}),
            **{name: tensors[name] for name in _CAVSET_TENSORS},
        )
        if cav_set.n_features != metadata["n_features"]:
            raise CAVError(str(tensor_path), f"holds {cav_set.n_features} features, its JSON says {metadata['n_features']}", "save the CAV set again")
        return cav_set


_CAVSET_TENSORS = ("vectors", "biases", "accuracies", "random_vectors", "random_biases", "random_accuracies")


# ---------------------------------------------------------------------------- training
def train_cavs(
    concept_activations: Mapping[str, torch.Tensor],
    random_activations: Mapping[str, torch.Tensor],
    n_runs: int | None = None,
    *,
    layer: str = "",
    provenance: dict[str, Any] | None = None,
    **params: Any,
) -> CAVSet:
    """Train R CAVs per concept (one per random set) and R random-vs-random CAVs, in one batched solve.

    Parameters
    ----------
    concept_activations : mapping of str to Tensor
        Per concept, its images' activations ``(N, D)`` or ``(N, C, h, w)``.
    random_activations : mapping of str to Tensor
        Per random set, its activations (same features). The first ``n_runs`` (in mapping order)
        are used.
    n_runs : int, optional
        R; default: every random set given.
    layer : str
        Layer name recorded in the set.
    provenance : dict, optional
        Recorded in the set (store keys, model hash, ...).
    **params
        :class:`LinearCAV` parameters (``classifier``, ``solver``, ``regularization``, ...).

    Returns
    -------
    CAVSet
        Run ``r`` of each concept uses random set ``r`` and split seed ``seed + r``; the null CAV
        ``r`` is random set ``r`` vs random set ``(r + 1) mod R`` with the same seed.
    """
    return train_layer_cavs({layer: (concept_activations, random_activations)}, n_runs, provenance=provenance, **params)[layer]


def train_layer_cavs(
    layers: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
    n_runs: int | None = None,
    *,
    provenance: dict[str, Any] | None = None,
    **params: Any,
) -> dict[str, CAVSet]:
    """:func:`train_cavs` for several layers at once: every problem of every layer in one ``fit_many``.

    Parameters
    ----------
    layers : mapping of str to (concept activations, random activations)
        Per layer name, the two mappings of :func:`train_cavs`.
    n_runs, provenance, **params
        As in :func:`train_cavs`.

    Returns
    -------
    dict of str to CAVSet
    """
    estimator = LinearCAV(**params)
    plans = {layer: _plan_layer(layer, concepts, randoms, n_runs, estimator.seed) for layer, (concepts, randoms) in layers.items()}
    problems = [problem for plan in plans.values() for problem in plan.problems]
    results = iter(estimator._solve(problems))
    return {layer: _assemble(plan, [next(results) for _ in plan.problems], estimator, provenance) for layer, plan in plans.items()}


@dataclass
class _LayerPlan:
    layer: str
    concepts: list[str]
    random_sets: list[str]
    random_pairs: list[tuple[str, str]]
    feature_shape: list[int]
    problems: list[_Problem]


def _plan_layer(
    layer: str, concepts: Mapping[str, torch.Tensor], randoms: Mapping[str, torch.Tensor], n_runs: int | None, seed: int
) -> _LayerPlan:
    """Validate one layer's sets and list its problems: K·R concept runs, then the R null pairs."""
    where = f"layer {layer!r}: " if layer else ""
    if not concepts:
        raise CAVError(f"{where}concept activations", "no concept sets given", "give at least one concept's activations")
    if not randoms:
        raise CAVError(f"{where}random activations", "no random sets given", "give at least one random set's activations (TCAV uses 10–50)")
    both = sorted(set(concepts) & set(randoms))
    if both:
        raise CAVError(", ".join(both), "named both as a concept and a random set", "use each set in one role")
    available = list(randoms)
    runs = len(available) if n_runs is None else n_runs
    if not (isinstance(runs, int) and 1 <= runs <= len(available)):
        raise CAVError(f"n_runs={n_runs!r}", f"must be between 1 and the {len(available)} random sets given", "give more random sets or fewer runs")
    random_sets = available[:runs]
    sets = {**{c: concepts[c] for c in concepts}, **{r: randoms[r] for r in random_sets}}
    rows = {name: _features(acts, f"{where}{name}") for name, acts in sets.items()}
    feature_shape = _common_feature_shape(sets, where)
    problems = [
        _Problem(rows[c], rows[r], seed + i, f"{where}concept {c!r}", f"random set {r!r}") for c in concepts for i, r in enumerate(random_sets)
    ]
    pairs = [(random_sets[i], random_sets[(i + 1) % runs]) for i in range(runs)] if runs > 1 else []
    problems += [_Problem(rows[a], rows[b], seed + i, f"{where}random set {a!r}", f"random set {b!r}") for i, (a, b) in enumerate(pairs)]
    return _LayerPlan(layer, list(concepts), random_sets, pairs, feature_shape, problems)


def _common_feature_shape(sets: Mapping[str, torch.Tensor], where: str) -> list[int]:
    """The shape of one row, which every set must share (naming the first two that differ)."""
    names = list(sets)
    first = tuple(sets[names[0]].shape[1:])
    for name in names[1:]:
        if tuple(sets[name].shape[1:]) != first:
            raise CAVError(
                f"{where}{names[0]!r} vs {name!r}",
                f"have activation shapes {list(first)} and {list(sets[name].shape[1:])}",
                "use activations of the same layer and reduction for every set",
            )
    return list(first)


def _assemble(plan: _LayerPlan, results: list[CAVFit], estimator: LinearCAV, provenance: dict[str, Any] | None) -> CAVSet:
    k, r = len(plan.concepts), len(plan.random_sets)
    concept_results, null_results = results[: k * r], results[k * r :]
    dimension = results[0].vector.numel()

    def stack(items: list[CAVFit], attribute: str) -> torch.Tensor:
        values = [torch.as_tensor(getattr(item, attribute), dtype=torch.float64) for item in items]
        return torch.stack(values) if values else torch.zeros((0, dimension) if attribute == "vector" else (0,), dtype=torch.float64)

    return CAVSet(
        concepts=plan.concepts,
        random_sets=plan.random_sets,
        vectors=stack(concept_results, "vector").reshape(k, r, dimension),
        biases=stack(concept_results, "bias").reshape(k, r),
        accuracies=stack(concept_results, "accuracy").reshape(k, r),
        random_pairs=plan.random_pairs,
        random_vectors=stack(null_results, "vector"),
        random_biases=stack(null_results, "bias"),
        random_accuracies=stack(null_results, "accuracy"),
        layer=plan.layer,
        feature_shape=plan.feature_shape,
        settings=estimator.get_params(),
        provenance=dict(provenance or {}),
    )


# ---------------------------------------------------------------------------- store helper
def pooled_activations(entry: StoreEntry, flatten: bool = False) -> torch.Tensor:
    """Image-level activations of a store entry: ``(N, C)``, or ``(N, C·h·w)`` with ``flatten``.

    Pooled entries (``reduce='mean'``/``'max'``) are returned as stored. Maps (``native`` or
    ``grid``) are mean-pooled over the cells that lie on the image (padding excluded, as
    ``reduce='mean'`` does), or flattened when ``flatten`` is true — which needs one map size.

    Raises
    ------
    CAVError
        If flattened maps differ in size between shards (a detector pads each batch differently)
        or the entry holds activations of another rank.
    """
    reduce = entry.manifest().get("request", {}).get("reduce")
    parts, sizes = [], set()
    for _, _, tensors in entry.iter_shards():
        activations = tensors["activations"].float()
        if activations.dim() == 2:
            parts.append(activations)
        elif activations.dim() == 4:
            sizes.add(tuple(activations.shape[1:]))
            parts.append(activations.flatten(1) if flatten else _pool_maps(activations, tensors.get("geometry"), reduce))
        else:
            raise CAVError(str(entry.path), f"holds activations of shape {tuple(activations.shape)}", "embed with reduce='mean', 'native' or 'grid'")
    if flatten and len(sizes) > 1:
        raise CAVError(
            str(entry.path),
            f"native maps have different sizes {sorted(sizes)} (the model pads each batch differently); they cannot be flattened into one feature space",
            "embed with reduce='grid' (one size) or use pooled activations (flatten=False)",
        )
    return torch.cat(parts)


def _pool_maps(activations: torch.Tensor, geometry: torch.Tensor | None, reduce: str | None) -> torch.Tensor:
    """Mean over the map: over the image's cells for native maps, over every cell for grid maps."""
    if reduce == "grid" or geometry is None:
        return activations.mean(dim=(2, 3))
    geometries = [Geometry.from_list(g.tolist()) for g in geometry]
    return reduce_features(activations, geometries, "mean", (1, 1))

"""Image-level concept activation vectors (TCAV; Kim et al. 2018): linear concept-vs-random probes.

A CAV is the unit normal of a linear boundary that separates a layer's activations of concept
images from those of random images, pointing to the concept. Activations are pooled ``(N, C)``
(default) or flattened ``(N, C·h·w)``; maps ``(N, C, h, w)`` are flattened on input.

:class:`LinearCAV` is a scikit-learn classifier: ``fit(X, y)`` with binary labels (1 = concept,
0 = random), ``decision_function``, ``predict``, ``classes_``, ``get_params`` / ``set_params`` and
``sklearn.base.clone``. ``fit_sets(concept, random)`` is the TCAV form of the same fit, and
``fit_many`` / :func:`train_cavs` solve many concept-vs-random problems in one batched solve. The
objective (L2-regularised logistic regression or squared-hinge linear SVM, ``C = 1/(λ n)`` in
scikit-learn's terms) and its solvers (batched float64 Newton in torch, or scikit-learn) live in
:mod:`conceptlens.probes.linear_solvers`.

Held-out accuracy follows TCAV: each class is split at random (seeded), a third of it held out; the
CAV is trained on the rest and its accuracy measured on the held-out rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils import Tags, check_array
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

from conceptlens.concepts.embedding.embed import reduce_features
from conceptlens.concepts.environment import resolve_device
from conceptlens.concepts.errors import ConceptLensError, closest_names
from conceptlens.concepts.geometry import Geometry
from conceptlens.concepts.store.activations import StoreEntry
from conceptlens.concepts.store.artifacts import artifact_paths, read_artifact, write_artifact
from conceptlens.concepts.vectors.bank import ConceptBank
from conceptlens.probes.linear_solvers import problems_per_batch, solve_sklearn, solve_torch
from conceptlens.probes.params import Interval, Options, Predicate, validate_params

__all__ = [
    "CAVError",
    "CAVFit",
    "CAVNotFittedError",
    "CAVRuns",
    "CAVSet",
    "CAVTypeError",
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


class CAVError(ConceptLensError, ValueError):
    """Activations cannot give a CAV (empty, too small, constant, mismatched), or bad labels.

    Also a ``ValueError``, as scikit-learn expects of bad input.
    """


class CAVTypeError(CAVError, TypeError):
    """Activations of a type that cannot be read as real numbers (a sparse matrix, objects)."""


class CAVNotFittedError(CAVError, NotFittedError):
    """A :class:`LinearCAV` used before it was fitted (also scikit-learn's ``NotFittedError``)."""


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


class LinearCAV(ClassifierMixin, BaseEstimator):
    """A TCAV concept activation vector: a linear classifier of concept vs random activations.

    A scikit-learn binary classifier (``clone``, ``get_params`` / ``set_params``, ``score``)
    on torch tensors or NumPy arrays. Outputs follow the input: a tensor ``X`` gives CPU tensors,
    anything else NumPy arrays (and string class labels are always NumPy).

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
        ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; the ``torch`` solver runs there.
    test_size : float
        Fraction of each class held out to measure ``accuracy_`` (TCAV: a third).

    Attributes
    ----------
    classes_ : ndarray
        The two labels, sorted; ``classes_[1]`` is the concept (``[0, 1]`` after :meth:`fit_sets`).
    vector_ : Tensor
        ``(D,)`` float64 unit normal of the boundary, pointing to the concept.
    bias_ : float
        ``vector_·a + bias_`` is the signed distance to the boundary.
    coef_, intercept_ : Tensor, float
        The classifier's logit ``coef_·a + intercept_`` in raw activation space.
    accuracy_ : float
        Held-out accuracy.
    n_features_in_ : int
        ``D`` (``C·h·w`` for maps).
    feature_shape_ : tuple of int
        Shape of one input row before flattening (``(C,)`` or ``(C, h, w)``).
    n_iter_ : int
    converged_ : bool

    Examples
    --------
    >>> import torch
    >>> X = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    >>> y = torch.arange(60) % 2  # 1 = concept, 0 = random
    >>> X[y == 1, 0] += 3  # the concept raises channel 0
    >>> cav = LinearCAV(device="cpu").fit(X, y)
    >>> cav.classes_, int(cav.vector_.argmax()), cav.predict(X[:4])
    (array([0, 1]), 0, tensor([0, 1, 0, 1]))
    >>> torch.equal(LinearCAV(device="cpu").fit_sets(X[y == 1], X[y == 0]).vector_, cav.vector_)  # TCAV form
    True
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "classifier": [Options(*CLASSIFIERS)],
        "solver": [Options(*SOLVERS)],
        "regularization": [Interval(float, 0, None, closed="neither")],
        "max_iter": [Interval(int, 1, None)],
        "tol": [Interval(float, 0, None, closed="neither")],
        "standardize": [Options(True, False)],
        "seed": [Interval(int, 0, None)],
        "device": [Predicate(lambda value: isinstance(value, (str, torch.device)), "a device: 'auto', 'cpu', 'cuda' or 'cuda:N'")],
        "test_size": [Interval(float, 0, 1, closed="neither")],
    }

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

    def __sklearn_tags__(self) -> Tags:
        """scikit-learn's tags: a binary classifier (``y`` of two classes)."""
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X: Any, y: Any) -> LinearCAV:
        """Learn the CAV separating the rows of ``X`` labelled concept from the others.

        Parameters
        ----------
        X : Tensor or array-like
            ``(N, D)`` pooled activations, or ``(N, C, h, w)`` maps (flattened).
        y : Tensor or array-like
            ``(N,)`` labels of two classes: the larger one (``classes_[1]``: 1, or ``True``) marks
            concept rows, the smaller (0) random / negative rows.

        Returns
        -------
        LinearCAV
            ``self``, fitted. Equal to :meth:`fit_sets` of the concept rows and the random rows
            (each in the order of ``X``).
        """
        validate_params(self)
        rows, feature_shape = _input(X, "X")
        classes, index = np.unique(_labels(y, len(rows)), return_inverse=True)
        _check_binary(classes)
        concept = torch.from_numpy(index.reshape(-1) == 1)
        low, high = classes.tolist()
        problem = _Problem(rows[concept], rows[~concept], int(self.seed), f"X rows with y={high!r} (concept)", f"X rows with y={low!r} (random)")
        return self._fit_problem(problem, classes, feature_shape)

    def fit_sets(self, concept_activations: Any, random_activations: Any) -> LinearCAV:
        """The TCAV form of :meth:`fit`: learn the CAV separating a concept set from a random set.

        Parameters
        ----------
        concept_activations : Tensor or array-like
            ``(N1, D)``, or ``(N1, C, h, w)`` (flattened).
        random_activations : Tensor or array-like
            ``(N2, D)`` or ``(N2, C, h, w)``, the same ``D``.

        Returns
        -------
        LinearCAV
            ``self``, fitted with ``classes_ = [0, 1]``: the same CAV as ``fit`` on the stacked
            rows with labels 1 (concept) and 0 (random).
        """
        validate_params(self)
        concept, feature_shape = _input(concept_activations, "concept activations")
        problem = _Problem(concept, _features(random_activations, "random activations"), int(self.seed))
        return self._fit_problem(problem, np.array([0, 1]), feature_shape)

    def fit_many(
        self, problems: Sequence[tuple[Any, Any]], seeds: Sequence[int] | None = None
    ) -> list[CAVFit]:
        """Solve many concept-vs-random problems; the ``torch`` solver batches them.

        Problems of one feature dimension are stacked (rows padded and masked) and solved together;
        each result equals that of solving the problem alone. The estimator itself stays unfitted.

        Parameters
        ----------
        problems : sequence of (Tensor, Tensor)
            ``(concept_activations, random_activations)`` pairs as in :meth:`fit_sets`.
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

    def decision_function(self, X: Any) -> torch.Tensor | np.ndarray:
        """Logits ``coef_·x + intercept_``, positive on the concept side.

        Parameters
        ----------
        X : Tensor or array-like
            Rows ``(N, D)`` or maps ``(N, C, h, w)`` of the layer the CAV was trained on.

        Returns
        -------
        Tensor or ndarray
            ``(N,)`` float64: a CPU tensor when ``X`` is a tensor, else a NumPy array.
        """
        self._check_fitted()
        rows = _features(X, "X")
        name = type(self).__name__
        if rows.shape[1] != self.n_features_in_:
            raise CAVError(
                f"{name}.decision_function(X)",
                f"X has {rows.shape[1]} features, but {name} is expecting {self.n_features_in_} features as input",
                "use activations of the layer (and pooling) the CAV was trained on",
            )
        if not bool(torch.isfinite(rows).all()):
            raise CAVError(f"{name}.decision_function(X)", "X contains NaN or inf", "check the model and the embedding")
        scores = rows @ self.coef_ + self.intercept_
        return scores if isinstance(X, torch.Tensor) else scores.numpy()

    def predict(self, X: Any) -> torch.Tensor | np.ndarray:
        """The class of each row: ``classes_[1]`` (the concept) where :meth:`decision_function` is positive.

        Parameters
        ----------
        X : Tensor or array-like
            As in :meth:`decision_function`.

        Returns
        -------
        Tensor or ndarray
            ``(N,)`` labels from ``classes_``: a CPU tensor when ``X`` is a tensor and the labels
            are numbers or booleans, else a NumPy array.
        """
        on_concept_side = self.decision_function(X) > 0
        if isinstance(on_concept_side, torch.Tensor) and self.classes_.dtype.kind in "bif":
            return torch.from_numpy(self.classes_)[on_concept_side.long()]
        return self.classes_[np.asarray(on_concept_side).astype(np.intp)]

    # -------------------------------------------------------------------------------- internals
    def _fit_problem(self, problem: _Problem, classes: np.ndarray, feature_shape: tuple[int, ...]) -> LinearCAV:
        result = self._solve([problem])[0]
        self.classes_ = classes
        self.vector_, self.bias_ = result.vector, result.bias
        self.coef_, self.intercept_ = result.coef, result.intercept
        self.accuracy_, self.n_iter_, self.converged_ = result.accuracy, result.n_iter, result.converged
        self.n_features_in_ = int(result.vector.numel())
        self.feature_shape_ = feature_shape
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "vector_"):
            raise CAVNotFittedError(type(self).__name__, "is not fitted", "call fit(X, y) or fit_sets(concept, random) first")

    def _solve(self, problems: list[_Problem]) -> list[CAVFit]:
        """Validate, split and solve prepared problems (grouped by feature dimension)."""
        validate_params(self)
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
        device = resolve_device(self.device, culprit=f"{type(self).__name__}(device={self.device!r})")
        features, labels, weights = _stack([problems[i] for i in indices], [splits[i] for i in indices], device)
        solution = solve_torch(
            features, labels, weights, classifier=self.classifier, regularization=self.regularization,
            max_iter=self.max_iter, tol=self.tol, standardize=self.standardize,
        )
        return [
            _result(problems[i], splits[i], solution.coef[k], solution.intercept[k], int(solution.n_iter[k]), bool(solution.converged[k]))
            for k, i in enumerate(indices)
        ]

    def _solve_sklearn(self, problem: _Problem, split: _Split) -> CAVFit:
        rows, labels = _rows(problem, split, "train")
        solution = solve_sklearn(
            rows, labels, classifier=self.classifier, regularization=self.regularization,
            max_iter=self.max_iter, tol=self.tol, standardize=self.standardize, seed=problem.seed,
        )
        return _result(problem, split, solution.coef[0], solution.intercept[0], int(solution.n_iter[0]), bool(solution.converged[0]))


# ------------------------------------------------------------------------------ validation
def _input(activations: Any, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Rows ``(N, D)`` float64 on the CPU and the shape of one row, from ``(N, D)`` or ``(N, C, h, w)``."""
    if isinstance(activations, torch.Tensor):
        if activations.dim() < 2:
            raise CAVError(name, f"have shape {tuple(activations.shape)}; Reshape your data to rows (N, D) or maps (N, C, h, w)", "give (N, D) pooled or (N, C, h, w) activations")
        if activations.is_complex():
            raise CAVError(name, "are complex: Complex data not supported", "give real activations")
        return activations.detach().to("cpu", torch.float64).flatten(1), tuple(activations.shape[1:])
    try:
        array = check_array(activations, allow_nd=True, dtype=np.float64, ensure_min_samples=0, input_name=name)
    except TypeError as error:
        raise CAVTypeError(name, str(error), "give a dense tensor or array of real numbers") from error
    except ValueError as error:
        raise CAVError(name, str(error), "give finite (N, D) pooled or (N, C, h, w) activations") from error
    rows = torch.from_numpy(array if array.flags.writeable else array.copy())
    return rows.flatten(1), tuple(array.shape[1:])


def _features(activations: Any, name: str) -> torch.Tensor:
    """Rows ``(N, D)`` float64 on the CPU from ``(N, D)`` or ``(N, C, h, w)`` activations."""
    return _input(activations, name)[0]


def _labels(y: Any, n_rows: int) -> np.ndarray:
    """``y`` as a 1-d NumPy array of class labels, one per row."""
    labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y
    try:
        labels = column_or_1d(labels, warn=True)
        check_classification_targets(labels)
    except ValueError as error:
        raise CAVError("y", str(error), "give one class label per row: 1 for concept rows, 0 for random rows") from error
    if len(labels) != n_rows:
        raise CAVError("y", f"has {len(labels)} labels for {n_rows} rows of X", "give one label per row of X")
    return labels


def _check_binary(classes: np.ndarray) -> None:
    """Raise CAVError unless ``y`` held exactly two classes (concept and random)."""
    if len(classes) < 2:
        raise CAVError(
            "y",
            f"has {len(classes)} class {classes.tolist()}; a CAV separates two classes",
            "label concept rows 1 and random rows 0, with rows of both",
        )
    if len(classes) > 2:
        raise CAVError(
            "y",
            f"has {len(classes)} classes {classes.tolist()}. Only binary classification is supported.",
            "fit one CAV per concept, its rows labelled 1 against random rows labelled 0",
        )


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
    """Indices of problems grouped by feature dimension, chunked to the solver's memory budget."""
    by_dimension: dict[int, list[int]] = {}
    for index, problem in enumerate(problems):
        by_dimension.setdefault(problem.concept.shape[1], []).append(index)
    batches = []
    for dimension, indices in by_dimension.items():
        rows = max(len(problems[i].concept) + len(problems[i].random) for i in indices)
        chunk = problems_per_batch(rows, dimension)
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
            raise CAVError(concept, "no such concept in the CAV set", f"use a trained concept name: {closest_names(concept, self.concepts)}")
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
            projection="sigmoid_affine",
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
        from conceptlens.concepts.store.schema import Int, ListOf, MapOf, Record, Str

        required = ("concepts", "random_sets", "random_pairs", "n_features")
        schema = Record({"concepts": ListOf(Str()), "random_sets": ListOf(Str()), "random_pairs": ListOf(ListOf(Str(), 2, 2)), "n_features": Int(min=1)},
                        optional={"layer": Str(), "feature_shape": ListOf(Int(min=1)), "settings": MapOf(), "provenance": MapOf()})
        metadata, tensors = read_artifact(path, CAVSET_KIND, CAVSET_FORMAT_VERSION, required, CAVError, schema=schema)
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

"""Solvers of the L2-regularised linear classifiers behind :class:`~conceptlens.probes.linear.LinearCAV`.

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
:func:`solve_torch`: Newton's method in float64 with an Armijo backtracking line search (for the
squared hinge the generalised Hessian, as in liblinear's primal solver), batched over many
problems: the rows of problems of one feature dimension are padded to a common count and masked,
and every problem takes its own step and stops on its own gradient. The Newton system is solved
in feature space when ``D < n`` and otherwise in the span of the training rows (the optimal ``w``
lies there, so the ``(n+1)``-dimensional system gives the same Newton step exactly) — flattened
maps with ``D`` in the tens of thousands cost no more than pooled ones. :func:`solve_sklearn`:
``LogisticRegression`` (lbfgs) or ``LinearSVC`` on the same centred features with
``C = 1/(λ n)``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

__all__ = ["LOSSES", "LinearSolution", "NewtonSolution", "newton", "problems_per_batch", "solve_sklearn", "solve_torch"]

# The loss each classifier minimises.
LOSSES = {"logistic": "logistic", "svm": "squared_hinge"}
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


class LinearSolution(NamedTuple):
    """P solved problems, each a classifier in raw feature space: logit ``coef·x + intercept``.

    Attributes
    ----------
    coef : Tensor
        ``(P, D)`` float64.
    intercept : Tensor
        ``(P,)`` float64.
    n_iter : Tensor
        ``(P,)`` int64 solver iterations, on the CPU.
    converged : Tensor
        ``(P,)`` bool, on the CPU: whether the solver met ``tol`` within ``max_iter``.
    """

    coef: torch.Tensor
    intercept: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor


def problems_per_batch(n_rows: int, dimension: int) -> int:
    """How many problems of at most ``n_rows`` rows and ``dimension`` features one batched solve holds.

    Parameters
    ----------
    n_rows : int
        Rows of the largest problem (both classes).
    dimension : int
        Features ``D``.

    Returns
    -------
    int
        At least 1; about :data:`BATCH_BYTES` of float64 rows and Newton systems in all.
    """
    size = min(n_rows, dimension) + 1
    per_problem = 8 * (3 * n_rows * dimension + 3 * size * size)
    return max(1, BATCH_BYTES // per_problem)


def solve_torch(
    features: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    classifier: str,
    regularization: float,
    max_iter: int,
    tol: float,
    standardize: bool,
) -> LinearSolution:
    """Fit P padded problems at once with the batched Newton solver, on the features' device.

    Parameters
    ----------
    features : Tensor
        ``(P, n, D)`` float64 training rows, zero on padded rows. Centred (and scaled) in place:
        pass the solver its own copy.
    labels : Tensor
        ``(P, n)`` ±1 (0 on padded rows).
    weights : Tensor
        ``(P, n)``: ``1/n_p`` on the ``n_p`` rows of problem ``p``, 0 on padded rows.
    classifier : {'logistic', 'svm'}
    regularization : float
        ``λ``.
    max_iter : int
        Maximum Newton steps.
    tol : float
        Stop a problem when the largest absolute gradient entry is at most ``tol``.
    standardize : bool
        Scale each feature by its standard deviation over the problem's rows before the fit.

    Returns
    -------
    LinearSolution
        The classifiers in raw feature space, on the features' device (``n_iter``, ``converged``
        on the CPU).
    """
    mean, scale = _train_statistics(features, weights, standardize)
    features.sub_(mean[:, None])
    if standardize:
        features.div_(scale[:, None])
    features.mul_((weights > 0)[..., None])
    solution = newton(features, labels, weights, LOSSES[classifier], float(regularization), max_iter, float(tol))
    coef = solution.weights / scale
    intercept = solution.bias - (coef * mean).sum(1)
    return LinearSolution(coef, intercept, solution.n_iter, solution.converged)


def solve_sklearn(
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    classifier: str,
    regularization: float,
    max_iter: int,
    tol: float,
    standardize: bool,
    seed: int,
) -> LinearSolution:
    """Fit one problem with scikit-learn's ``LogisticRegression`` or ``LinearSVC`` (``C = 1/(λ n)``).

    Parameters
    ----------
    rows : Tensor
        ``(n, D)`` float64 training rows on the CPU.
    labels : Tensor
        ``(n,)`` ±1.
    classifier, regularization, max_iter, tol, standardize
        As in :func:`solve_torch`.
    seed : int
        ``LinearSVC``'s ``random_state``.

    Returns
    -------
    LinearSolution
        One problem (``P = 1``). A ``ConvergenceWarning`` of scikit-learn sets ``converged`` to
        false instead of being shown; other warnings pass through.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    mean = rows.mean(0)
    scale = _safe_scale(rows.std(0, correction=0)) if standardize else torch.ones_like(mean)
    inputs = ((rows - mean) / scale).numpy()
    n_rows, n_features = inputs.shape
    strength = 1.0 / (regularization * n_rows)
    if classifier == "logistic":
        model = LogisticRegression(C=strength, tol=tol, max_iter=max_iter)
    else:
        dual = n_features >= n_rows
        rms_norm = max(1.0, float(np.sqrt((inputs**2).sum(1).mean())))
        model = LinearSVC(
            C=strength, loss="squared_hinge", dual=dual, tol=tol, max_iter=max_iter, random_state=seed,
            intercept_scaling=SVC_INTERCEPT_SCALING["dual" if dual else "primal"] * rms_norm,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(inputs, labels.numpy() > 0)
    converged = True
    for warning in caught:  # the caller reports convergence once for all problems
        if issubclass(warning.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn(warning.message, warning.category, stacklevel=2)
    coef = torch.from_numpy(np.asarray(model.coef_, dtype=np.float64).reshape(-1)) / scale
    intercept = float(np.asarray(model.intercept_).reshape(-1)[0]) - float(coef @ mean)
    return LinearSolution(
        coef[None], torch.tensor([intercept], dtype=torch.float64), torch.tensor([int(np.max(model.n_iter_))]), torch.tensor([converged])
    )


# ------------------------------------------------------------------------ train statistics
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
class NewtonSolution(NamedTuple):
    """The solution of :func:`newton` for P problems, in the (centred) space it was given."""

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


def newton(
    features: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    loss: str,
    strength: float,
    max_iter: int,
    tol: float,
    space: str = "auto",
) -> NewtonSolution:
    """Minimise ``Σ_i weights·loss(y_i(w·x_i + b)) + (λ/2)‖w‖²`` for P problems at once.

    Parameters
    ----------
    features : Tensor
        ``(P, n, D)`` float64, zero on padded rows (whose ``weights`` are zero).
    labels : Tensor
        ``(P, n)`` ±1.
    weights : Tensor
        ``(P, n)`` row weights (``1/n_p``, 0 on padded rows).
    loss : {'logistic', 'squared_hinge'}
    strength : float
        ``λ``.
    max_iter : int
        Maximum Newton steps.
    tol : float
        A problem stops when the largest absolute entry of its gradient (weights and bias) is at
        most ``tol``.
    space : {'auto', 'primal', 'kernel'}
        The Newton system: ``primal`` (D+1 unknowns), ``kernel`` (n+1) or ``auto`` (the smaller).

    Returns
    -------
    NewtonSolution
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
    return NewtonSolution(system.weights(), b, n_iter.cpu(), converged.cpu())


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

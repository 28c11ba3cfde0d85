"""Can a test split support a run's claims? The smallest test split that would.

Every control, null and confidence interval of a run is computed over the test images, so their
number ``n`` limits what a run can claim. :func:`sample_size_check` applies one simple rule to
``m`` hypotheses tested together at family-wise level ``alpha`` (Holm's strictest step, the same as
Bonferroni's, is ``alpha / m``):

1. **Power of a mean over images.** A claim is a difference of a per-image quantity from its
   control or null (set IoU minus control set IoU, a similarity minus its null …). To detect a
   difference ``effect`` with per-image standard deviation ``sigma`` at level ``alpha / m``
   (two-sided) with probability ``power``, the usual normal-approximation rule needs

   ``n ≥ ((z[1 − alpha/(2m)] + z[power]) · sigma / effect)²``.

2. **Resolution of an image permutation test.** ``n`` test images have ``n!`` orderings; a
   permutation p-value cannot be below ``1 / n!``, so ``n! ≥ m / alpha`` is needed for any
   hypothesis to be significant at ``alpha / m``.

``needed`` is the larger of the two; the split is ``adequate`` when ``n ≥ needed``. With the
defaults (``effect`` 0.1 set IoU, ``sigma`` 0.25, power 0.8, ``alpha`` 0.05) one hypothesis needs
50 test images and 13 concepts × 7 layers need 116, so a 40-image test split supports neither.
:func:`permutation_check` says whether a number of permutations can reach ``alpha / m`` at all
(``1 / (P + 1) ≤ alpha / m``). :func:`sigma_from_ci` turns a confidence interval of a mean over
``n`` images back into the per-image standard deviation it implies, so that ``sigma`` can come
from the run's own bootstrap intervals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

from conceptlens.concepts.errors import ConceptLensError

__all__ = ["DEFAULT_EFFECT", "DEFAULT_POWER", "DEFAULT_SIGMA", "SampleSize", "SampleSizeError", "permutation_check", "sample_size_check", "sigma_from_ci"]

#: The smallest difference (in set IoU or similarity units) a claim should be able to detect.
DEFAULT_EFFECT = 0.1
#: Per-image standard deviation assumed when the run gives no estimate (half the largest possible, 0.5, of a [0, 1] quantity).
DEFAULT_SIGMA = 0.25
#: Probability of detecting a difference of ``effect``.
DEFAULT_POWER = 0.8


class SampleSizeError(ConceptLensError):
    """A sample-size question with impossible arguments (no hypotheses, alpha outside (0, 1) …)."""


@dataclass(frozen=True)
class SampleSize:
    """Whether ``n_test`` test images support ``n_hypotheses`` claims, and the size that would.

    ``to_json`` gives the shared schema's ``sample_size`` record: ``n_test``, ``adequate``,
    ``needed``, ``reason``, then the rule's inputs.
    """

    n_test: int
    adequate: bool
    needed: int
    reason: str
    n_hypotheses: int
    alpha: float
    effect: float
    sigma: float
    power: float

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-able dict, keys in field order."""
        return asdict(self)


def _check(n_test: int, n_hypotheses: int, alpha: float, effect: float, sigma: float, power: float) -> None:
    problems = [
        (n_test < 0, "n_test", f"must be ≥ 0, got {n_test}"),
        (n_hypotheses < 1, "n_hypotheses", f"must be ≥ 1, got {n_hypotheses}"),
        (not 0 < alpha < 1, "alpha", f"must lie in (0, 1), got {alpha}"),
        (not effect > 0, "effect", f"must be > 0, got {effect}"),
        (not sigma >= 0, "sigma", f"must be ≥ 0, got {sigma}"),
        (not 0 < power < 1, "power", f"must lie in (0, 1), got {power}"),
    ]
    for bad, name, problem in problems:
        if bad:
            raise SampleSizeError(f"sample size: {name}", problem, "pass a value in the stated range")


def _power_size(n_hypotheses: int, alpha: float, effect: float, sigma: float, power: float) -> int:
    normal = NormalDist()
    z = normal.inv_cdf(1 - alpha / (2 * n_hypotheses)) + normal.inv_cdf(power)
    return max(1, math.ceil((z * sigma / effect) ** 2 - 1e-9))


def _permutation_size(n_hypotheses: int, alpha: float) -> int:
    """The smallest n with n! ≥ m / alpha."""
    n, orderings = 1, 1
    while orderings < n_hypotheses / alpha:
        n += 1
        orderings *= n
    return n


def sample_size_check(
    n_test: int, n_hypotheses: int, alpha: float = 0.05, *, effect: float = DEFAULT_EFFECT, sigma: float = DEFAULT_SIGMA,
    power: float = DEFAULT_POWER,
) -> SampleSize:
    """Whether ``n_test`` test images can support ``n_hypotheses`` claims tested together.

    Parameters
    ----------
    n_test : int
        Test images.
    n_hypotheses : int
        Claims tested together (concepts × layers for probes, cells of a block, TCAV hypotheses).
    alpha : float
        Family-wise level (Holm or Bonferroni over the hypotheses).
    effect : float
        The difference from the control or null each claim should detect.
    sigma : float
        Per-image standard deviation of the compared quantity (:func:`sigma_from_ci` estimates it).
    power : float
        Probability of detecting ``effect``.

    Returns
    -------
    SampleSize
        ``needed`` = max(power rule, permutation rule) (module docstring); ``reason`` says which
        rule decides and by how much.

    Examples
    --------
    >>> check = sample_size_check(40, 13 * 7)
    >>> check.adequate, check.needed
    (False, 116)
    >>> sample_size_check(120, 13 * 7).adequate
    True
    """
    _check(n_test, n_hypotheses, alpha, effect, sigma, power)
    by_power = _power_size(n_hypotheses, alpha, effect, sigma, power)
    by_permutation = _permutation_size(n_hypotheses, alpha)
    needed = max(by_power, by_permutation)
    claims = f"{n_hypotheses} hypothes{'is' if n_hypotheses == 1 else 'es'} at α = {alpha:g}"
    if by_power >= by_permutation:
        rule = f"to detect a difference of {effect:g} (per-image sd {sigma:.2g}) with power {power:g} for {claims}"
    else:
        rule = f"for an image permutation test to reach α/m = {alpha / n_hypotheses:.2g} ({claims})"
    if n_test >= needed:
        reason = f"{n_test} test images suffice {rule} (needs {needed})"
    else:
        reason = f"{n_test} test images are too few {rule}: needs {needed}"
    return SampleSize(n_test, n_test >= needed, needed, reason, n_hypotheses, alpha, effect, sigma, power)


def permutation_check(n_permutations: int, n_hypotheses: int, alpha: float = 0.05) -> tuple[bool, int]:
    """Whether ``P`` permutations can give a p-value ``(1 + #null ≥ s) / (P + 1)`` of at most ``alpha / m``.

    Returns
    -------
    (bool, int)
        Whether ``1 / (P + 1) ≤ alpha / m``, and the smallest ``P`` for which it is: ``⌈m / alpha⌉ − 1``.

    Examples
    --------
    >>> permutation_check(199, 12)
    (False, 239)
    >>> permutation_check(239, 12)
    (True, 239)
    """
    _check(0, n_hypotheses, alpha, 1.0, 0.0, 0.5)
    needed = math.ceil(n_hypotheses / alpha - 1e-9) - 1
    return n_permutations >= needed, needed


def sigma_from_ci(low: float, high: float, n: int, level: float = 0.95) -> float:
    """The per-image standard deviation implied by a normal CI of a mean over ``n`` images.

    ``sigma = (high − low) · √n / (2 · z[(1 + level) / 2])``.

    Examples
    --------
    >>> round(sigma_from_ci(0.4, 0.6, 100, 0.95), 4)
    0.5102
    """
    if n < 1 or not 0 < level < 1 or not high >= low:
        raise SampleSizeError("sample size: sigma_from_ci", f"needs n ≥ 1, 0 < level < 1 and high ≥ low (got n={n}, level={level}, [{low}, {high}])",
                              "pass a confidence interval of a mean over n ≥ 1 images")
    return (high - low) * math.sqrt(n) / (2 * NormalDist().inv_cdf((1 + level) / 2))

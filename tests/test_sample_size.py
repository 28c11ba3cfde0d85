"""Sample-size checks: hand-computed cases of the power rule, the permutation rule and the CI inversion."""

from __future__ import annotations

import math

import pytest

from conceptlens.concepts.data.sample_size import SampleSizeError, permutation_check, sample_size_check, sigma_from_ci

Z975 = 1.959963984540054  # standard normal quantiles, from tables
Z80 = 0.8416212335729143


def test_power_rule_one_hypothesis_by_hand():
    # power 0.5: z[power] = 0, n = (1.96 · 0.5 / 0.196)² = 4.99991² = 24.9991 → 25
    check = sample_size_check(25, 1, 0.05, effect=0.196, sigma=0.5, power=0.5)
    assert check.needed == 25 and check.adequate
    assert not sample_size_check(24, 1, 0.05, effect=0.196, sigma=0.5, power=0.5).adequate
    # defaults: ((1.95996 + 0.84162) · 0.25 / 0.1)² = 7.00396² = 49.055 → 50
    assert ((Z975 + Z80) * 2.5) ** 2 == pytest.approx(49.0555, abs=1e-3)
    assert sample_size_check(49, 1).needed == 50


def test_the_issue_example_is_too_small_and_says_what_it_needs():
    # 13 concepts × 7 layers at α = 0.05: z[1 − 0.05/182] = 3.45541; ((3.45541 + 0.84162) · 2.5)² = 115.45 → 116
    check = sample_size_check(40, 13 * 7)
    assert (check.adequate, check.needed, check.n_test, check.n_hypotheses) == (False, 116, 40, 91)
    assert "40 test images are too few" in check.reason and "needs 116" in check.reason
    assert sample_size_check(116, 91).adequate
    record = check.to_json()
    assert list(record)[:4] == ["n_test", "adequate", "needed", "reason"]


def test_more_hypotheses_or_a_smaller_effect_need_more_images():
    sizes = [sample_size_check(10, m).needed for m in (1, 5, 20, 100, 1000)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # the power rule scales with (sigma / effect)²: halving the effect quadruples n (up to rounding)
    one, half = sample_size_check(1, 10, effect=0.2).needed, sample_size_check(1, 10, effect=0.1).needed
    assert abs(half - 4 * one) <= 4


def test_permutation_rule_decides_for_tiny_splits():
    # a huge effect makes the power rule need 1 image; n! ≥ m/α: 20 → 4 (3! = 6 < 20 ≤ 24 = 4!)
    check = sample_size_check(3, 1, effect=10.0)
    assert (check.needed, check.adequate) == (4, False) and "permutation" in check.reason
    # m = 10: m/α = 200 → 6 (5! = 120 < 200 ≤ 720)
    assert sample_size_check(6, 10, effect=10.0).needed == 6


def test_permutation_count_check():
    # Holm over a 3 × 4 block at α = 0.05: 1/(P+1) ≤ 0.05/12 ⇔ P ≥ 239
    assert permutation_check(199, 12) == (False, 239)
    assert permutation_check(239, 12) == (True, 239)
    assert permutation_check(19, 1) == (True, 19)


def test_sigma_from_ci_inverts_the_normal_interval():
    # a 95 % CI of a mean over 100 images with sd 0.5 is ± 1.96 · 0.05
    assert sigma_from_ci(0.5 - Z975 * 0.05, 0.5 + Z975 * 0.05, 100) == pytest.approx(0.5)
    assert sigma_from_ci(0.3, 0.3, 10) == 0.0
    assert math.isclose(sigma_from_ci(0.4, 0.6, 100), 0.2 * 10 / (2 * Z975))


@pytest.mark.parametrize("kwargs", [{"n_hypotheses": 0}, {"alpha": 1.0}, {"effect": 0.0}, {"power": 1.0}, {"sigma": -1.0}])
def test_bad_arguments_are_named(kwargs):
    arguments = {"n_test": 10, "n_hypotheses": 3} | kwargs
    with pytest.raises(SampleSizeError) as info:
        sample_size_check(**arguments)
    assert next(iter(kwargs)) in info.value.culprit

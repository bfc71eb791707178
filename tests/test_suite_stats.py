"""Intervals and interval-based verdicts (experiments.suite.stats) against direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from experiments.suite.base import make_interval_verdict
from experiments.suite.stats import (
    Interval,
    bootstrap_interval,
    decide_interval,
    hierarchical_interval,
    mean_interval,
    non_inferiority,
    paired_difference,
)

SUPPORT, REFUTE = (">=", 0.9), ("<", 0.7)


def test_mean_interval_is_the_student_t_formula():
    x = np.array([0.3, 0.5, 0.45, 0.61, 0.2, 0.38])
    iv = mean_interval(x)
    half = sps.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    assert iv.estimate == pytest.approx(x.mean(), abs=1e-15)
    assert (iv.low, iv.high) == pytest.approx((x.mean() - half, x.mean() + half), abs=1e-15)
    assert iv.n == 6


def test_one_seed_has_no_interval_and_is_inconclusive():
    iv = mean_interval([0.99])
    assert math.isnan(iv.low) and math.isnan(iv.high)
    verdict, why = decide_interval(iv, support_if=SUPPORT, refute_if=REFUTE)
    assert verdict == "inconclusive" and "more seeds" in why


@pytest.mark.parametrize(("low", "high", "expected", "bound"), [
    (0.91, 0.97, "supported", "lower bound 0.91"),        # whole interval above the support line
    (0.89, 0.97, "inconclusive", "meets neither"),         # straddles the support line
    (0.60, 0.69, "not supported", "upper bound 0.69"),     # whole interval below the refute line
    (0.65, 0.75, "inconclusive", "meets neither"),         # straddles the refute line
    (0.75, 0.85, "inconclusive", "meets neither"),         # between the lines
])
def test_decide_interval_on_both_sides_of_each_threshold(low, high, expected, bound):
    interval = Interval((low + high) / 2, low, high, 5)
    verdict, why = decide_interval(interval, support_if=SUPPORT, refute_if=REFUTE)
    assert verdict == expected
    assert bound in why


def test_decide_interval_for_upper_rules():
    # an error: supported if small
    rules = {"support_if": ("<=", 0.2), "refute_if": (">", 0.5)}
    assert decide_interval(Interval(0.15, 0.1, 0.19, 5), **rules)[0] == "supported"
    assert decide_interval(Interval(0.6, 0.55, 0.7, 5), **rules)[0] == "not supported"
    assert decide_interval(Interval(0.3, 0.1, 0.6, 5), **rules)[0] == "inconclusive"


def test_overlapping_rules_and_bad_input_raise():
    with pytest.raises(ValueError, match="overlap"):
        decide_interval(Interval(0.8, 0.8, 0.8, 3), support_if=(">=", 0.7), refute_if=("<", 0.9))
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
    with pytest.raises(ValueError, match="same units"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="does not contain"):
        Interval(1.0, 0.0, 0.5, 3)
    with pytest.raises(ValueError, match="positive"):
        non_inferiority(Interval(0, -1, 1, 3), margin=0)


def test_paired_difference_removes_the_shared_seed_effect():
    seed_effect = np.array([0.1, -0.2, 0.3, 0.0, -0.1])
    a, b = 0.8 + seed_effect, 0.79 + seed_effect + np.array([0.001, -0.001, 0.0, 0.002, -0.002])
    paired = paired_difference(a, b)
    unpaired = mean_interval(a).width + mean_interval(b).width
    assert paired.estimate == pytest.approx(0.01)
    assert paired.width < unpaired / 50


@pytest.mark.parametrize(("diff", "expected"), [
    ((0.0, -0.01, 0.01), "supported"), ((-0.05, -0.07, -0.03), "not supported"),
    ((-0.02, -0.04, 0.0), "inconclusive"),
])
def test_non_inferiority_on_both_sides_of_the_margin(diff, expected):
    assert non_inferiority(Interval(*diff, n=4), margin=0.025)[0] == expected


def test_bootstrap_interval_is_reproducible_and_covers_the_estimate():
    x = np.random.default_rng(1).normal(size=40)
    a, b = bootstrap_interval(x, seed=3), bootstrap_interval(x, seed=3)
    assert a == b and a.low < x.mean() < a.high
    assert bootstrap_interval(np.ones(5)).width == 0.0


def test_hierarchical_interval_widens_with_example_noise():
    est = [0.8, 0.82, 0.79, 0.81, 0.8]
    tight = hierarchical_interval(est, [[e] * 20 for e in est])
    rng = np.random.default_rng(0)
    noisy = hierarchical_interval(est, [e + 0.05 * rng.standard_normal(50) for e in est])
    assert tight.estimate == pytest.approx(np.mean(est))
    assert noisy.width > tight.width
    with pytest.raises(ValueError, match="replicate sets"):
        hierarchical_interval(est, [[0.1]])


def test_interval_verdict_names_the_deciding_bound():
    interval = mean_interval([0.95, 0.96, 0.955])
    v = make_interval_verdict(claim="c", statement="s", measurement="m", interval=interval, what="x",
                              support_if=SUPPORT, refute_if=REFUTE, figure=None, experiment="e")
    assert v.verdict == "supported" and v.decided_by.startswith("lower bound")
    assert "[" in v.value_text and "n = 3" in v.value_text


def test_identical_seeds_are_shown_without_an_interval():
    """A metric that no seed moves (fixed pre-trained weights) has no spread to show: the value
    says so instead of printing a zero-width interval as if it were one."""
    interval = mean_interval([1.5, 1.5, 1.5, 1.5, 1.5])
    v = make_interval_verdict(claim="c", statement="s", measurement="m", interval=interval, what="x",
                              support_if=SUPPORT, refute_if=REFUTE, figure=None, experiment="e")
    assert "[" not in v.value_text and "same value in all n = 5 seeds" in v.value_text


def test_a_gate_makes_the_verdict_inconclusive_and_is_named():
    """A measurement that must not be judged (the compared runs did not learn) is inconclusive
    whatever its interval, and the report names the gate rather than asking for more seeds."""
    interval = mean_interval([0.95, 0.96, 0.955])
    v = make_interval_verdict(claim="c", statement="s", measurement="m", interval=interval, what="x",
                              support_if=SUPPORT, refute_if=REFUTE, figure=None, experiment="e",
                              gate="the runs did not learn")
    assert v.verdict == "inconclusive" and v.decided_by == "the gate: the runs did not learn"

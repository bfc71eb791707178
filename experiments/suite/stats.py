"""Intervals and interval-based verdicts: a claim is decided on a 95% interval, never on one seed.

* :class:`Interval` - a point estimate with its lower and upper bound, the level and the number
  of independent units (seeds) behind it.
* :func:`mean_interval` - Student-t interval of the mean over seeds (the honest choice for 3-10
  seeds, where percentile bootstraps are too narrow).
* :func:`bootstrap_interval` - percentile bootstrap of any statistic (``scipy.stats.bootstrap``).
* :func:`hierarchical_interval` - two-level bootstrap: seeds drawn with replacement, and for each
  drawn seed one of its replicates over examples (e.g. kernel metrics recomputed on resampled
  example subsets), so both sources of variation widen the interval.
* :func:`paired_difference` - interval of the mean paired difference ``a - b`` over shared seeds
  (same seeds and splits for both methods), for non-inferiority tests.
* :func:`decide_interval` - ``supported`` only if the whole interval meets the support rule,
  ``not supported`` only if the whole interval meets the refute rule, else ``inconclusive``;
  returns the bound that decided, in words.

Example:
    >>> iv = mean_interval([0.91, 0.93, 0.95, 0.92, 0.94])
    >>> round(iv.estimate, 3), round(iv.low, 3), round(iv.high, 3)
    (0.93, 0.91, 0.95)
    >>> decide_interval(iv, support_if=(">=", 0.9), refute_if=("<", 0.7))
    ('supported', 'lower bound 0.9104 >= 0.9')
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Interval", "mean_interval", "bootstrap_interval", "hierarchical_interval",
           "paired_difference", "decide_interval", "non_inferiority", "LEVEL"]

LEVEL = 0.95
Rule = tuple[str, float]
VerdictName = Literal["supported", "not supported", "inconclusive"]
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
}


@dataclass(frozen=True)
class Interval:
    """``estimate`` with a two-sided ``level`` interval ``[low, high]`` over ``n`` units."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = LEVEL
    method: str = "t"

    def __post_init__(self) -> None:
        values = (self.estimate, self.low, self.high)
        if not any(math.isnan(v) for v in values) and not self.low <= self.estimate <= self.high:
            raise ValueError(f"interval [{self.low}, {self.high}] does not contain its estimate "
                             f"{self.estimate}")

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"

    @property
    def width(self) -> float:
        return self.high - self.low


def _values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name}: no values (an interval needs at least one measurement)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: non-finite values {arr[~np.isfinite(arr)][:5].tolist()}; "
                         "a failed run must be excluded or fixed before it enters an interval")
    return arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def mean_interval(values: Sequence[float] | np.ndarray, *, level: float = LEVEL) -> Interval:
    """Student-t interval of the mean: ``m +- t_{n-1} s / sqrt(n)``.

    With one value the bounds are NaN (no interval can be claimed), so any verdict on it is
    inconclusive. Identical values give a zero-width interval.
    """
    from scipy import stats

    _check_level(level)
    arr = _values(values, "mean_interval")
    m = float(arr.mean())
    if arr.size < 2:
        return Interval(m, math.nan, math.nan, 1, level, "t")
    half = float(stats.t.ppf(0.5 + level / 2, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return Interval(m, m - half, m + half, int(arr.size), level, "t")


def bootstrap_interval(values: Sequence[float] | np.ndarray,
                       statistic: Callable[[np.ndarray], float] = np.mean, *, level: float = LEVEL,
                       n_resamples: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (``scipy.stats.bootstrap``)."""
    from scipy import stats

    _check_level(level)
    arr = _values(values, "bootstrap_interval")
    estimate = float(statistic(arr))
    if arr.size < 2 or np.all(arr == arr[0]):
        low = high = estimate if arr.size >= 2 else math.nan
        return Interval(estimate, low, high, int(arr.size), level, "bootstrap")
    res = stats.bootstrap((arr,), lambda x, axis: np.apply_along_axis(statistic, axis, x),
                          confidence_level=level, n_resamples=n_resamples, method="percentile",
                          rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Interval(estimate, min(low, estimate), max(high, estimate), int(arr.size), level, "bootstrap")


def hierarchical_interval(estimates: Sequence[float], replicates: Sequence[Sequence[float]], *,
                          level: float = LEVEL, n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Two-level percentile bootstrap of the mean over seeds.

    Args:
        estimates: (S,) the statistic of each seed on all its examples; their mean is the estimate.
        replicates: S sequences, seed s's statistic recomputed on B_s resamples of its examples.

    Each bootstrap draw takes S seeds with replacement and, for each, one of its replicates at
    random; the interval is the percentile interval of the draws' means. With one seed it is the
    example-level interval of that seed alone (stated by ``n = 1``).
    """
    _check_level(level)
    est = _values(estimates, "hierarchical_interval estimates")
    if len(replicates) != est.size:
        raise ValueError(f"hierarchical_interval: {est.size} estimates but {len(replicates)} replicate sets")
    reps = [_values(r, f"hierarchical_interval replicates of seed {i}") for i, r in enumerate(replicates)]
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, est.size, size=(n_resamples, est.size))
    draws = np.empty(n_resamples)
    for b in range(n_resamples):
        draws[b] = np.mean([reps[s][rng.integers(0, reps[s].size)] for s in seeds[b]])
    alpha = (1 - level) / 2
    m = float(est.mean())
    low, high = (float(q) for q in np.quantile(draws, [alpha, 1 - alpha]))
    return Interval(m, min(low, m), max(high, m), int(est.size), level, "hierarchical bootstrap")


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = LEVEL) -> Interval:
    """Student-t interval of the mean of ``a_i - b_i`` over paired units (same seed and split)."""
    arr_a, arr_b = _values(a, "paired_difference a"), _values(b, "paired_difference b")
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"paired_difference needs the same units for both: {arr_a.size} vs {arr_b.size} "
                         "values (run both methods on the same seeds)")
    return mean_interval(arr_a - arr_b, level=level)


def _check_rule(rule: Rule, name: str) -> None:
    if not (isinstance(rule, tuple) and len(rule) == 2 and rule[0] in _OPS):
        raise ValueError(f"{name} must be (op, number) with op in {list(_OPS)}, got {rule!r}")


def _whole_interval(interval: Interval, rule: Rule) -> tuple[bool, str]:
    """Does every point of the interval meet ``rule``? Also the bound that decides it, in words."""
    op, thr = rule
    bound, name = (interval.low, "lower") if op in (">=", ">") else (interval.high, "upper")
    return _OPS[op](bound, thr), f"{name} bound {bound:.4g} {op} {thr:g}"


def decide_interval(interval: Interval, *, support_if: Rule, refute_if: Rule) -> tuple[VerdictName, str]:
    """The verdict an interval allows, and the bound that decided it.

    ``supported`` if the whole interval meets ``support_if`` (for ``>=``/``>`` its lower bound,
    for ``<=``/``<`` its upper bound); ``not supported`` if the whole interval meets
    ``refute_if``; otherwise (or with NaN bounds, e.g. one seed) ``inconclusive``, with the
    bounds that straddle the thresholds named.

    Raises:
        ValueError: a malformed rule, or an interval meeting both rules (overlapping rules).
    """
    _check_rule(support_if, "support_if")
    _check_rule(refute_if, "refute_if")
    if math.isnan(interval.low) or math.isnan(interval.high):
        return "inconclusive", f"no interval (n = {interval.n}): more seeds are needed to decide"
    support, why_support = _whole_interval(interval, support_if)
    refute, why_refute = _whole_interval(interval, refute_if)
    if support and refute:
        raise ValueError(f"rules overlap on {interval}: support_if {support_if} and refute_if {refute_if}")
    if support:
        return "supported", why_support
    if refute:
        return "not supported", why_refute
    return "inconclusive", (f"interval [{interval.low:.4g}, {interval.high:.4g}] meets neither "
                            f"'{support_if[0]} {support_if[1]:g}' nor '{refute_if[0]} {refute_if[1]:g}' "
                            "as a whole")


def non_inferiority(difference: Interval, margin: float) -> tuple[VerdictName, str]:
    """Non-inferiority of a method to a reference from the interval of ``method - reference``.

    ``supported`` (non-inferior) if the lower bound is above ``-margin``; ``not supported``
    (inferior) if the upper bound is below ``-margin``; otherwise inconclusive.

    Example:
        >>> non_inferiority(Interval(-0.004, -0.012, 0.004, 5), margin=0.02)
        ('supported', 'lower bound -0.012 > -0.02')
    """
    if not margin > 0:
        raise ValueError(f"the non-inferiority margin must be positive, got {margin}")
    return decide_interval(difference, support_if=(">", -margin), refute_if=("<", -margin))

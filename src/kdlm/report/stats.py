"""Statistics for comparing distillation methods over training seeds and test examples (numpy only, no torch).

The quantities (issue 20's protocol, ``benchmarks/compare.py``):

* :func:`t_interval`: mean ± the Student-t 95 % interval of a handful of values (one per training seed): the
  ``mean ± CI`` of a row. Exact for normal values; with 3 seeds ``t(0.975, 2) = 4.303`` makes it wide, honestly.
* :func:`bootstrap`: a percentile bootstrap interval of any statistic of one or more *paired* score matrices
  ``values[seed, example]`` (every row scored on the same test examples, seed ``i`` of every row trained with the
  same training seed ``i``). Each replicate draws seeds with replacement and, within each domain, examples with
  replacement (the per-domain sample sizes stay fixed, as the test sample is fixed per domain), and applies the
  SAME draw to every matrix: the pairing survives the resampling. A matrix with a single seed row (the teacher,
  which has no training seed) is broadcast. Built on it: :func:`paired_difference` (``stat(a) − stat(b)``),
  :func:`gap_closed` (``(method − SFT) / (teacher − SFT)``) and the statistics :func:`mean_score` and
  :func:`worst_domain_mean`.

A caveat the numbers carry: with 3 seeds the seed level of the bootstrap resamples only 3 values, so its
intervals are narrower than the truth when seeds matter more than examples (the t-interval is the honest one for
a row's mean over seeds; the bootstrap is what pairs rows example by example).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["Interval", "Statistic", "bootstrap", "gap_closed", "mean_score", "paired_difference",
           "student_t_quantile", "t_interval", "worst_domain_mean"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval ``[low, high]`` at ``level`` (NaN bounds: not defined)."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    method: str = ""

    def above(self, value: float = 0.0) -> bool:
        """The whole interval lies above ``value`` (a NaN bound is never above)."""
        return self.low > value

    def below(self, value: float = 0.0) -> bool:
        """The whole interval lies below ``value``."""
        return self.high < value

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def format(self, digits: int = 2) -> str:
        """``1.23 [0.45, 2.01]``; ``1.23`` alone when the interval is not defined."""
        if math.isnan(self.low) or math.isnan(self.high):
            return f"{self.estimate:.{digits}f}"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def format_pm(self, digits: int = 2) -> str:
        """``1.23 ± 0.78`` (half the interval's width; for symmetric intervals such as :func:`t_interval`)."""
        if math.isnan(self.low) or math.isnan(self.high):
            return f"{self.estimate:.{digits}f}"
        return f"{self.estimate:.{digits}f} ± {(self.high - self.low) / 2:.{digits}f}"


# ------------------------------------------------------------------------------------------------ Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom: ``1 − ½·I_{df/(df+t²)}(df/2, ½)`` for t ≥ 0."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF, 1e-12 accurate).

    E.g. ``student_t_quantile(0.975, 2) = 4.3027``, ``(0.975, 1) = 12.706``; large ``df`` tends to the normal
    1.95996."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"student_t_quantile: p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"student_t_quantile: df must be > 0, got {df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``values`` ± ``t(1 − (1 − level)/2, n − 1) · s / √n`` (``s`` the sample std, ddof 1).

    One value: the mean with NaN bounds (no spread can be estimated from one seed)."""
    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        raise ValueError("t_interval: no values")
    mean = float(array.mean())
    if array.size == 1:
        return Interval(mean, math.nan, math.nan, level, "t")
    half = student_t_quantile(1.0 - (1.0 - level) / 2.0, array.size - 1) * float(array.std(ddof=1)) / math.sqrt(array.size)
    return Interval(mean, mean - half, mean + half, level, "t")


# ------------------------------------------------------------------------------------------------ bootstrap
# A statistic maps one score matrix values[seed, example] (numpy) to a number.
Statistic = Callable[[np.ndarray], float]


def mean_score(values: np.ndarray) -> float:
    """The mean over seeds and examples (every example of every seed counts once)."""
    return float(np.mean(values))


def worst_domain_mean(domains: Sequence[str], *, higher_is_better: bool = False) -> Statistic:
    """The statistic "the worst domain's mean": per domain the mean over seeds and that domain's examples, then the
    largest (``higher_is_better=False``, e.g. a gap or KL) or the smallest (a score such as ROUGE-L).

    ``domains`` labels the columns (examples) of the matrices it is applied to; under :func:`bootstrap`'s
    stratified resampling every column keeps its domain."""
    labels = np.asarray(list(domains))
    groups = [np.flatnonzero(labels == d) for d in dict.fromkeys(labels.tolist())]
    pick = np.min if higher_is_better else np.max

    def statistic(values: np.ndarray) -> float:
        return float(pick([values[:, g].mean() for g in groups]))

    return statistic


def _as_matrix(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty matrix values[seed, example], got shape {array.shape}")
    return array


def bootstrap(
    combine: Callable[..., float],
    matrices: Sequence[np.ndarray],
    domains: Optional[Sequence[str]] = None,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    resample_seeds: bool = True,
) -> Interval:
    """Percentile bootstrap interval of ``combine(*matrices)`` (each ``values[seed, example]``).

    Every replicate draws one set of seed indices (with replacement, if ``resample_seeds``) and one set of
    example indices (with replacement within each domain of ``domains``; all examples one stratum without it) and
    applies it to every matrix, so paired rows stay paired. Matrices must share their example columns and have
    either the same number of seed rows or one (broadcast: the teacher). The estimate is ``combine`` on the data
    itself; the interval the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the replicates (replicates that
    are not finite, e.g. a ratio over a zero gap, are dropped). ``seed`` fixes the generator: same inputs, same
    interval.
    """
    arrays = [_as_matrix(m, f"bootstrap: matrix {i}") for i, m in enumerate(matrices)]
    n_examples = arrays[0].shape[1]
    if any(a.shape[1] != n_examples for a in arrays):
        raise ValueError(f"bootstrap: matrices have different example counts {[a.shape[1] for a in arrays]}")
    seed_counts = {a.shape[0] for a in arrays if a.shape[0] > 1}
    if len(seed_counts) > 1:
        raise ValueError(f"bootstrap: matrices have different seed counts {[a.shape[0] for a in arrays]}")
    n_seeds = seed_counts.pop() if seed_counts else 1
    labels = np.asarray(list(domains)) if domains is not None else np.zeros(n_examples, dtype=int)
    if labels.shape[0] != n_examples:
        raise ValueError(f"bootstrap: {labels.shape[0]} domain labels for {n_examples} examples")
    strata = [np.flatnonzero(labels == d) for d in dict.fromkeys(labels.tolist())]
    rng = np.random.default_rng(seed)
    estimate = float(combine(*arrays))
    # All draws at once (one generator call per stratum): seed rows (n_boot × n_seeds), example columns
    # (n_boot × n_examples, each stratum's columns resampled within it).
    seed_draws = (rng.integers(0, n_seeds, (n_boot, n_seeds)) if resample_seeds
                  else np.broadcast_to(np.arange(n_seeds), (n_boot, n_seeds)))
    column_draws = np.concatenate([s[rng.integers(0, s.size, (n_boot, s.size))] for s in strata], axis=1)
    single = np.zeros(1, dtype=int)
    replicates = np.empty(n_boot)
    for b in range(n_boot):
        drawn = [a[seed_draws[b] if a.shape[0] > 1 else single][:, column_draws[b]] for a in arrays]
        with np.errstate(divide="ignore", invalid="ignore"):
            replicates[b] = combine(*drawn)
    finite = replicates[np.isfinite(replicates)]
    if finite.size < n_boot / 2:  # the statistic is undefined for most resamples: no interval
        return Interval(estimate, math.nan, math.nan, level, "bootstrap")
    low, high = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(estimate, float(low), float(high), level, "bootstrap")


def paired_difference(a: np.ndarray, b: np.ndarray, domains: Optional[Sequence[str]] = None, *,
                      statistic: Statistic = mean_score, **options) -> Interval:
    """``statistic(a) − statistic(b)`` with a paired :func:`bootstrap` interval (same seeds, same examples)."""
    return bootstrap(lambda x, y: statistic(x) - statistic(y), [a, b], domains, **options)


def gap_closed(method: np.ndarray, sft: np.ndarray, teacher: np.ndarray, domains: Optional[Sequence[str]] = None, *,
               statistic: Statistic = mean_score, **options) -> Interval:
    """The share of the teacher–SFT gap a method closes: ``(method − SFT) / (teacher − SFT)``, each term the
    ``statistic`` of its matrix, with a paired :func:`bootstrap` interval. 0: no better than SFT; 1: as good as the
    teacher; negative: worse than SFT. The sign convention needs no care: for a lower-is-better metric (KL) both
    differences change sign. Undefined (NaN) when the teacher and SFT are equal."""

    def ratio(m: np.ndarray, s: np.ndarray, t: np.ndarray) -> float:
        gap = statistic(t) - statistic(s)
        return (statistic(m) - statistic(s)) / gap if gap != 0 else math.nan

    return bootstrap(ratio, [method, sft, teacher], domains, **options)

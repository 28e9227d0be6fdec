"""The seed papers' claims, checked against a comparison's scores: holds / does not hold / not resolved.

Each :class:`Claim` is one paper's headline claim as the paper states it, made testable as one or more paired
comparisons "row A beats row B" on one metric (``benchmarks/compare.py``'s rows and per-example scores). Every
comparison gets a paired bootstrap interval of its *improvement* (A − B for a higher-is-better metric such as
ROUGE-L, B − A for a lower-is-better one such as KL; :func:`kdlm.report.stats.paired_difference`):

* the interval lies above 0 → the comparison **holds**; below 0 → it **does not hold**; it contains 0 → **not
  resolved** (at this budget and sample size);
* a claim holds when all its comparisons hold, does not hold when any does not hold, and is not resolved
  otherwise; a claim whose rows were not run (yet) is **not run**.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from kdlm.report.stats import Interval, mean_score, paired_difference, worst_domain_mean

HOLDS, FAILS, UNRESOLVED, NOT_RUN = "holds", "does not hold", "not resolved at this budget", "not run"


@dataclass(frozen=True)
class Claim:
    """One paper's claim: every ``(better, worse)`` pair of rows in ``comparisons`` should hold on ``metric``."""

    paper: str
    claim: str
    comparisons: tuple[tuple[str, str], ...]
    metric: str
    higher_is_better: bool = True
    worst_domain: bool = False  # the statistic is the worst domain's mean, not the overall mean


# The issue-20 claims. Metric names are the per-example score names of benchmarks/compare.py: rouge_l_sample
# (ROUGE-L under the MiniLLM sampling protocol, the papers' metric) and kl (held-out KL(teacher‖student) per
# example; DDK's "gap" to the teacher per domain).
CLAIMS: tuple[Claim, ...] = (
    Claim("AKL (Wu et al., COLING 2025)", "AKL beats FKL and RKL", (("akl", "fkl"), ("akl", "rkl")), "rouge_l_sample"),
    Claim("RLKD (Peng & Zhang, COLING 2025)", "adding the ranking loss improves its base divergence (FKL+R > FKL, "
          "AKL+R > AKL)", (("fkl_rlkd", "fkl"), ("akl_rlkd", "akl")), "rouge_l_sample"),
    Claim("GKD (Agarwal et al., ICLR 2024)", "on-policy GKD with JSD (λ 1) beats supervised KD (FKL on the dataset)",
          (("gkd_lambda1", "fkl"),), "rouge_l_sample"),
    Claim("DPKD (Li et al., 2024), token form", "DPKD beats the KD baselines (FKL, RKL)",
          (("dpkd", "fkl"), ("dpkd", "rkl")), "rouge_l_sample"),
    Claim("DPKD (Li et al., 2024), sequence form", "DPKD beats the KD baselines (FKL, RKL)",
          (("dpkd_sequence", "fkl"), ("dpkd_sequence", "rkl")), "rouge_l_sample"),
    Claim("DDK (Liu et al., NeurIPS 2024)", "DDK lowers the worst domain's gap to the teacher (held-out KL) against "
          "natural mixing", (("ddk", "ddk_natural"),), "kl", higher_is_better=False, worst_domain=True),
)


@dataclass(frozen=True)
class ComparisonResult:
    better: str
    worse: str
    improvement: Optional[Interval]  # None: a row is missing
    verdict: str


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    comparisons: tuple[ComparisonResult, ...]
    verdict: str


def comparison_verdict(improvement: Interval) -> str:
    """:data:`HOLDS` when the improvement's interval is above 0, :data:`FAILS` below 0, else :data:`UNRESOLVED`."""
    if improvement.above(0.0):
        return HOLDS
    if improvement.below(0.0):
        return FAILS
    return UNRESOLVED


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """All hold → holds; any does not hold → does not hold; any row missing → not run; else not resolved."""
    if any(v == FAILS for v in verdicts):
        return FAILS
    if any(v == NOT_RUN for v in verdicts):
        return NOT_RUN
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return UNRESOLVED


Scores = Union[np.ndarray, Mapping[int, Sequence[float]]]


def _paired(a: Scores, b: Scores) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Two rows' matrices over the same seeds: given as ``{seed: per-example scores}``, the seeds both have (sorted;
    ``(None, None)`` when they share none); given as matrices, as they are (row i of each is seed i)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        common = sorted(set(a) & set(b))
        if not common:
            return None, None
        return np.array([a[s] for s in common], dtype=float), np.array([b[s] for s in common], dtype=float)
    return np.asarray(a, dtype=float), np.asarray(b, dtype=float)


def check_claim(claim: Claim, scores: Mapping[str, Mapping[str, Scores]], domains: Sequence[str], *,
                n_boot: int = 2000, seed: int = 0) -> ClaimResult:
    """Check ``claim`` on ``scores[metric][row]`` (a matrix ``values[seed, example]``, or ``{training seed:
    per-example scores}`` so that rows run with different seeds are paired on the seeds they share; columns labelled
    by ``domains``): one paired bootstrap interval of the improvement per comparison, and the verdicts."""
    by_row = scores.get(claim.metric, {})
    statistic = (worst_domain_mean(domains, higher_is_better=claim.higher_is_better) if claim.worst_domain
                 else mean_score)
    results = []
    for better, worse in claim.comparisons:
        if better not in by_row or worse not in by_row:
            results.append(ComparisonResult(better, worse, None, NOT_RUN))
            continue
        a, b = _paired(by_row[better], by_row[worse])
        if a is None:
            results.append(ComparisonResult(better, worse, None, NOT_RUN))
            continue
        first, second = (a, b) if claim.higher_is_better else (b, a)
        interval = paired_difference(first, second, domains, statistic=statistic, n_boot=n_boot, seed=seed)
        results.append(ComparisonResult(better, worse, interval, comparison_verdict(interval)))
    return ClaimResult(claim, tuple(results), combine_verdicts([r.verdict for r in results]))


def check_claims(scores: Mapping[str, Mapping[str, Scores]], domains: Sequence[str], *,
                 claims: Sequence[Claim] = CLAIMS, n_boot: int = 2000, seed: int = 0) -> list[ClaimResult]:
    """:func:`check_claim` for every claim (default: the issue-20 claims of the five seed papers)."""
    return [check_claim(claim, scores, domains, n_boot=n_boot, seed=seed) for claim in claims]


def on_metric(claims: Sequence[Claim], metric: str, higher_is_better: bool) -> tuple[Claim, ...]:
    """The same comparisons judged on another per-example score, by its overall mean (claims judged on a domain's
    mean, such as DDK's worst domain, are left out): supporting evidence beside each claim's own metric, e.g. the
    held-out KL, which resolves smaller differences than ROUGE-L of sampled text on the same examples."""
    return tuple(replace(c, metric=metric, higher_is_better=higher_is_better) for c in claims if not c.worst_domain)


def claims_markdown(results: Sequence[ClaimResult], labels: Optional[Mapping[str, str]] = None, digits: int = 2) -> str:
    """The claims table in markdown: paper, claim, metric, each comparison's improvement [95 % CI], verdict."""
    labels = labels or {}
    lines = ["| paper | claim | metric | improvement [95 % CI] | verdict |", "|---|---|---|---|---|"]
    for result in results:
        claim = result.claim
        metric = claim.metric + (", worst domain" if claim.worst_domain else "") + (
            "" if claim.higher_is_better else " (lower is better)")
        parts = []
        for c in result.comparisons:
            name = f"{labels.get(c.better, c.better)} vs {labels.get(c.worse, c.worse)}"
            value = c.improvement.format(digits) if c.improvement is not None else "not run"
            parts.append(f"{name}: {value} ({c.verdict})")
        lines.append(f"| {claim.paper} | {claim.claim} | {metric} | {'; '.join(parts)} | **{result.verdict}** |")
    return "\n".join(lines)

"""kdlm.report.stats and kdlm.report.claims: hand-computed cases, pairing, stratification, coverage on simulated
normal data (binomially justified tolerances, fixed RNG seeds), and every claim verdict on synthetic scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdlm.report.claims import (
    CLAIMS, FAILS, HOLDS, NOT_RUN, UNRESOLVED, Claim, check_claim, check_claims, claims_markdown, combine_verdicts,
)
from kdlm.report.stats import (
    Interval, bootstrap, gap_closed, mean_score, paired_difference, student_t_quantile, t_interval, worst_domain_mean,
)


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423),
                                          (1000, 1.9623)])
def test_t_quantile_matches_the_printed_table(df, expected):
    # Student-t table values (two-sided 95 %), as printed in any statistics textbook.
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_interval_hand_computed():
    # [1, 2, 3]: mean 2, s = 1, half-width 4.302653 / sqrt(3) = 2.484138.
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval.estimate == 2.0
    assert interval.low == pytest.approx(2.0 - 2.484138, abs=1e-5)
    assert interval.high == pytest.approx(2.0 + 2.484138, abs=1e-5)
    assert interval.format_pm(2) == "2.00 ± 2.48"
    one = t_interval([5.0])
    assert one.estimate == 5.0 and math.isnan(one.low) and one.format() == "5.00"
    with pytest.raises(ValueError, match="no values"):
        t_interval([])


def test_t_interval_coverage_on_normal_seeds():
    """3 normal 'seeds' per row, 2000 rows: the exact t-interval covers the true mean in 95 % of them.
    Binomial sd of the observed share: sqrt(.95 * .05 / 2000) = 0.0049; tolerance 3 sd."""
    rng = np.random.default_rng(1234)
    data = rng.normal(3.0, 2.0, size=(2000, 3))
    covered = np.mean([t_interval(row).contains(3.0) for row in data])
    assert abs(covered - 0.95) < 3 * math.sqrt(0.95 * 0.05 / 2000)


def test_bootstrap_coverage_on_normal_examples():
    """Percentile bootstrap of a mean of 40 normal examples (one seed), 250 simulated data sets: coverage near 95 %.
    Binomial sd of the share over 250 sets: 0.0138; tolerance 3 sd (the percentile bootstrap under-covers by about
    a point at n = 40, well inside it)."""
    rng = np.random.default_rng(99)
    hits = 0
    for k in range(250):
        values = rng.normal(1.0, 1.0, size=(1, 40))
        hits += bootstrap(mean_score, [values], n_boot=300, seed=k).contains(1.0)
    assert abs(hits / 250 - 0.95) < 3 * math.sqrt(0.95 * 0.05 / 250)


def test_bootstrap_is_paired_and_deterministic():
    rng = np.random.default_rng(0)
    b = rng.normal(0.0, 10.0, size=(3, 30))  # large spread between examples and seeds
    a = b + 1.0  # every (seed, example) exactly 1 better
    diff = paired_difference(a, b, n_boot=300)
    # Paired: every replicate draws the same seeds and examples for a and b, so the difference is exactly 1.
    assert diff.estimate == pytest.approx(1.0) and diff.low == pytest.approx(1.0) and diff.high == pytest.approx(1.0)
    # The same inputs and seed give the same interval; another seed another (a real resampling happens).
    one = bootstrap(mean_score, [b], n_boot=300, seed=5)
    assert one == bootstrap(mean_score, [b], n_boot=300, seed=5)
    assert one != bootstrap(mean_score, [b], n_boot=300, seed=6)
    assert one.low < mean_score(b) < one.high


def test_bootstrap_keeps_the_domain_sample_sizes():
    # Domain x: 1 example of value 0; domain y: 3 examples of value 1. Stratified resampling keeps 1 x and 3 y in
    # every replicate, so the mean is 0.75 in all of them; resampling all four together would vary it.
    values = np.array([[0.0, 1.0, 1.0, 1.0]])
    stratified = bootstrap(mean_score, [values], ["x", "y", "y", "y"], n_boot=200)
    assert (stratified.low, stratified.high) == (0.75, 0.75)
    pooled = bootstrap(mean_score, [values], None, n_boot=200)
    assert pooled.low < 0.75 or pooled.high > 0.75


def test_seed_resampling_and_teacher_broadcast():
    # Seeds differ by a constant, examples identical: the interval comes from the seeds alone.
    values = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    interval = bootstrap(mean_score, [values], n_boot=500)
    assert interval.estimate == 2.0 and interval.low < 2.0 < interval.high and interval.low >= 1.0
    fixed = bootstrap(mean_score, [values], n_boot=50, resample_seeds=False)
    assert (fixed.low, fixed.high) == (2.0, 2.0)
    # gap closed with a one-row teacher (broadcast over seeds): (6 - 2) / (10 - 2) = 0.5 exactly.
    method, sft, teacher = np.full((3, 4), 6.0), np.full((3, 4), 2.0), np.full((1, 4), 10.0)
    gap = gap_closed(method, sft, teacher, n_boot=100)
    assert (gap.estimate, gap.low, gap.high) == (0.5, 0.5, 0.5)
    # Lower-is-better metric (KL): teacher 0, SFT 4, method 3 -> (3 - 4) / (0 - 4) = 0.25.
    assert gap_closed(np.full((3, 4), 3.0), np.full((3, 4), 4.0), np.zeros((1, 4)), n_boot=50).estimate == 0.25
    # No gap to close: undefined, no interval.
    undefined = gap_closed(method, sft, np.full((1, 4), 2.0), n_boot=50)
    assert math.isnan(undefined.estimate) and math.isnan(undefined.low)


def test_worst_domain_and_bad_shapes():
    values = np.array([[1.0, 3.0, 10.0, 20.0]])
    domains = ["x", "x", "y", "y"]
    assert worst_domain_mean(domains)(values) == 15.0  # lower is better: the largest domain mean
    assert worst_domain_mean(domains, higher_is_better=True)(values) == 2.0
    with pytest.raises(ValueError, match="different seed counts"):
        bootstrap(lambda a, b: 0.0, [np.zeros((2, 3)), np.zeros((3, 3))])
    with pytest.raises(ValueError, match="different example counts"):
        bootstrap(lambda a, b: 0.0, [np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="2 domain labels for 3 examples"):
        bootstrap(mean_score, [np.zeros((2, 3))], ["a", "b"])


# ------------------------------------------------------------------------------------------------ claims
DOMAINS = ["a"] * 10 + ["b"] * 10


def _rows(rng, **means) -> dict[str, np.ndarray]:
    """Per row a 3 × 20 matrix: the given mean plus small noise."""
    return {row: mean + rng.normal(0.0, 0.5, size=(3, 20)) for row, mean in means.items()}


def test_every_verdict_is_reachable():
    rng = np.random.default_rng(7)
    rouge = _rows(rng, fkl=20.0, rkl=20.0, akl=30.0, akl_rlkd=25.0, fkl_rlkd=20.1, gkd_lambda1=20.0, dpkd=30.0)
    rouge["dpkd_sequence"] = rouge["fkl"] - 5.0  # worse than FKL: does not hold
    # DDK: a lower mean KL than natural mixing (1.5 vs 2.0) but a worse worst domain (b: 2.5 vs 2.0): the
    # worst-domain claim does not hold although the overall mean favours DDK.
    natural = np.full((3, 20), 2.0)
    ddk = np.concatenate([np.full((3, 10), 0.5), np.full((3, 10), 2.5)], axis=1)
    scores = {"rouge_l_sample": rouge, "kl": {"ddk": ddk, "ddk_natural": natural}}
    results = {r.claim.paper: r for r in check_claims(scores, DOMAINS, n_boot=400)}
    assert results["AKL (Wu et al., COLING 2025)"].verdict == HOLDS
    assert results["DPKD (Li et al., 2024), token form"].verdict == HOLDS
    rlkd = results["RLKD (Peng & Zhang, COLING 2025)"]
    assert [c.verdict for c in rlkd.comparisons] == [UNRESOLVED, FAILS]  # +0.1 inside the noise; AKL+R 5 below AKL
    assert rlkd.verdict == FAILS
    gkd = results["GKD (Agarwal et al., ICLR 2024)"]
    assert gkd.verdict == UNRESOLVED and gkd.comparisons[0].improvement.contains(0.0)
    assert results["DPKD (Li et al., 2024), sequence form"].verdict == FAILS
    ddk_result = results["DDK (Liu et al., NeurIPS 2024)"]
    # Lower is better: improvement = natural's worst domain - DDK's worst domain = 2.0 - 2.5.
    assert ddk_result.comparisons[0].improvement.estimate == pytest.approx(-0.5)
    assert ddk_result.verdict == FAILS
    # DDK lowering the worst domain (natural 3.0 on b) holds.
    better = {"kl": {"ddk": ddk, "ddk_natural": np.concatenate([np.full((3, 10), 0.5), np.full((3, 10), 3.0)], 1)}}
    ddk_claim = [c for c in CLAIMS if c.metric == "kl"][0]
    assert check_claim(ddk_claim, better, DOMAINS, n_boot=200).verdict == HOLDS
    # A missing row: not run (and no interval), whatever the other comparison says.
    del rouge["rkl"]
    akl = check_claim(CLAIMS[0], scores, DOMAINS, n_boot=200)
    assert akl.verdict == NOT_RUN and akl.comparisons[1].improvement is None
    assert akl.comparisons[0].verdict == HOLDS


def test_combine_verdicts_and_markdown():
    assert combine_verdicts([HOLDS, HOLDS]) == HOLDS
    assert combine_verdicts([HOLDS, UNRESOLVED]) == UNRESOLVED
    assert combine_verdicts([UNRESOLVED, FAILS]) == FAILS
    assert combine_verdicts([HOLDS, NOT_RUN]) == NOT_RUN
    assert combine_verdicts([]) == UNRESOLVED
    claim = Claim("Paper", "x beats y", (("x", "y"),), "m")
    scores = {"m": {"x": np.full((2, 4), 3.0), "y": np.full((2, 4), 1.0)}}
    table = claims_markdown([check_claim(claim, scores, ["d"] * 4, n_boot=50)], {"x": "X row"})
    assert table.splitlines()[2] == "| Paper | x beats y | m | X row vs y: 2.00 [2.00, 2.00] (holds) | **holds** |"
    assert Interval(1.0, 0.5, 1.5).format(1) == "1.0 [0.5, 1.5]"


def test_rows_given_by_seed_are_paired_on_shared_seeds():
    claim = Claim("Paper", "x beats y", (("x", "y"),), "m")
    # x has seeds 0, 1, 2; y only 1 and 2: the comparison uses seeds 1 and 2 (x's seed 0 is far worse and ignored).
    scores = {"m": {"x": {0: [-100.0, -100.0], 1: [3.0, 3.0], 2: [4.0, 4.0]}, "y": {1: [1.0, 1.0], 2: [2.0, 2.0]}}}
    result = check_claim(claim, scores, ["d", "d"], n_boot=100)
    assert result.comparisons[0].improvement.estimate == 2.0 and result.verdict == HOLDS
    assert check_claim(claim, {"m": {"x": {0: [1.0]}, "y": {1: [0.0]}}}, ["d"], n_boot=10).verdict == NOT_RUN

"""Tests for kdlm.data.ddk: DDK weight updates (Liu et al., NeurIPS 2024, Eq. 1-2), strategies, validation
split, the domain batch sampler (allocation, cycling, determinism, resume) and the logging record."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from conftest import load_fixture_cases

from kdlm.data.ddk import (
    STRATEGIES,
    DomainBatchSampler,
    DomainStats,
    allocate_counts,
    carve_validation,
    ddk_init,
    ddk_update,
    initial_weights,
    next_weights,
    split_step,
)


@pytest.fixture(scope="module")
def fixture():
    tensors, meta = load_fixture_cases()
    return meta["cases"]["ddk"], tensors


# ------------------------------------------------------------------------------------------- DDK weights


def test_fixture_init_and_update(fixture):
    case, t = fixture
    alpha = case["params"]["alpha"]
    assert alpha == 0.5
    w0 = ddk_init(t["ddk.student_ppl0"], t["ddk.teacher_ppl"])
    torch.testing.assert_close(w0.float(), t["ddk.weights0"], rtol=1e-4, atol=1e-6)
    # the update starts from the fixture's weights0, not from ours
    w1 = ddk_update(t["ddk.weights0"], t["ddk.student_ppl1"], t["ddk.teacher_ppl"], alpha=alpha)
    torch.testing.assert_close(w1.float(), t["ddk.weights1"], rtol=1e-4, atol=1e-6)


def test_init_is_softmax_of_ratio_by_hand():
    student, teacher = [4.0, 6.0, 3.0], [2.0, 2.0, 3.0]  # ratios 2, 3, 1
    e = [math.exp(2), math.exp(3), math.exp(1)]
    expected = torch.tensor([x / sum(e) for x in e], dtype=torch.float64)
    torch.testing.assert_close(ddk_init(student, teacher), expected)


def test_equal_ratios_keep_uniform_weights():
    teacher = torch.tensor([2.0, 5.0, 10.0, 3.0])
    student = 1.7 * teacher
    w = ddk_init(student, teacher)
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))
    for _ in range(3):
        w = ddk_update(w, student, teacher, alpha=0.5)
        torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))


def test_equal_ratios_shrink_nonuniform_weights_towards_uniform():
    # with equal ratios psi / sum(psi) = r / sum(r), so r' = alpha r / sum(r) + (1 - alpha) / N
    r = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    out = ddk_update(r, [3.0, 6.0, 9.0], [1.0, 2.0, 3.0], alpha=0.5)
    expected = torch.tensor([0.35 + 1 / 6, 0.1 + 1 / 6, 0.05 + 1 / 6], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def test_student_worse_on_a_gets_more_a_and_b_keeps_the_floor():
    teacher = torch.tensor([4.0, 8.0], dtype=torch.float64)
    student = torch.tensor([5.0 * 4.0, 1.1 * 8.0], dtype=torch.float64)  # ratio 5 on A, 1.1 on B
    alpha, floor = 0.5, (1 - 0.5) / 2
    # from uniform weights (e.g. after an "equal" warm-up), repeated updates move weight to A
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    history = [w]
    for _ in range(6):
        w = ddk_update(w, student, teacher, alpha=alpha)
        history.append(w)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert float(w[1]) >= floor - 1e-12
    a = [float(h[0]) for h in history]
    assert a[1] > a[0] and a[2] > a[1]
    assert all(later >= earlier for earlier, later in zip(a, a[1:])), a
    # by hand, the first update: psi = r * exp(ratio), r' = 0.5 psi / sum + 0.25
    share = math.exp(5) / (math.exp(5) + math.exp(1.1))
    assert a[1] == pytest.approx(0.5 * share + 0.25, rel=1e-12)
    # from Eq. 1's init (A ~ 0.98) the smoothing pulls A down to the same fixed point r* of Eq. 2:
    # r* = 0.5 r* e^5 / (r* e^5 + (1 - r*) e^1.1) + 0.25
    w = ddk_init(student, teacher)
    assert float(w[0]) > 0.97
    for _ in range(30):
        w = ddk_update(w, student, teacher, alpha=alpha)
        assert float(w[1]) >= floor - 1e-12
    r = float(w[0])
    assert r == pytest.approx(0.5 * r * math.exp(5) / (r * math.exp(5) + (1 - r) * math.exp(1.1)) + 0.25, abs=1e-12)
    assert r == pytest.approx(a[-1], abs=1e-8)
    # alpha = 1: no smoothing floor, the weight of B tends to 0; alpha = 0: uniform
    for _ in range(6):
        w = ddk_update(w, student, teacher, alpha=1.0)
    assert float(w[1]) < 1e-9
    torch.testing.assert_close(ddk_update(w, student, teacher, alpha=0.0), torch.full((2,), 0.5, dtype=torch.float64))


def test_update_is_stable_for_large_ratios():
    teacher = torch.tensor([1.0, 1.0, 1.0])
    student = torch.tensor([2000.0, 1000.0, 1.5])  # exp(2000) overflows float64
    w = ddk_init(student, teacher)
    out = ddk_update(w, student, teacher)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.5 + 0.5 / 3, 0.5 / 3, 0.5 / 3], dtype=torch.float64))
    # all the mass on domains whose exp underflows relative to the max: the log-space path
    out = ddk_update([0.0, 0.0, 1.0], student, teacher)
    torch.testing.assert_close(out, torch.tensor([1 / 6, 1 / 6, 0.5 + 1 / 6], dtype=torch.float64))


# ------------------------------------------------------------------------------------------- strategies


def test_strategies():
    assert STRATEGIES == ("ddk", "ddk_no_smoothing", "equal", "natural")
    teacher = torch.tensor([2.0, 4.0, 8.0])
    sizes = [10, 30, 60]
    ppl_rounds = [torch.tensor([6.0, 6.0, 10.0]), torch.tensor([5.0, 4.4, 9.0]), torch.tensor([3.0, 4.1, 8.5])]
    # ddk_no_smoothing: Eq. 1 each interval, whatever the current weights
    w = initial_weights("ddk_no_smoothing", ppl_rounds[0], teacher)
    torch.testing.assert_close(w, ddk_init(ppl_rounds[0], teacher))
    for ppl in ppl_rounds[1:]:
        w = next_weights("ddk_no_smoothing", w, ppl, teacher, alpha=0.5)
        torch.testing.assert_close(w, ddk_init(ppl, teacher))
    # ddk: Eq. 2 on the current weights
    w = initial_weights("ddk", ppl_rounds[0], teacher)
    w1 = next_weights("ddk", w, ppl_rounds[1], teacher, sizes, alpha=0.3)
    torch.testing.assert_close(w1, ddk_update(w, ppl_rounds[1], teacher, alpha=0.3))
    # equal and natural ignore perplexities
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(initial_weights("equal", domain_sizes=sizes), third)
    torch.testing.assert_close(next_weights("equal", w1, ppl_rounds[2], teacher, sizes), third)
    natural = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    torch.testing.assert_close(initial_weights("natural", domain_sizes=sizes), natural)
    torch.testing.assert_close(next_weights("natural", w1, ppl_rounds[2], teacher, sizes), natural)


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: ddk_init([1.0, 2.0], [1.0, 2.0, 3.0]), "teacher_ppl"),
        (lambda: ddk_init([1.0, -2.0], [1.0, 2.0]), "student_ppl"),
        (lambda: ddk_init([1.0, float("nan")], [1.0, 2.0]), "student_ppl"),
        (lambda: ddk_init([1.0, 2.0], [0.0, 2.0]), "teacher_ppl"),
        (lambda: ddk_init([1.0, 2.0], [1.0, float("inf")]), "teacher_ppl"),
        (lambda: ddk_update([0.5, 0.5], [1.0, 2.0], [1.0, 2.0], alpha=1.5), "alpha"),
        (lambda: ddk_update([0.5, 0.5], [1.0, 2.0], [1.0, 2.0], alpha=float("nan")), "alpha"),
        (lambda: ddk_update([0.5, 0.5, 0.0], [1.0, 2.0], [1.0, 2.0]), "weights"),
        (lambda: ddk_update([0.5, -0.5], [1.0, 2.0], [1.0, 2.0]), "weights"),
        (lambda: ddk_update([0.0, 0.0], [1.0, 2.0], [1.0, 2.0]), "weights"),
        (lambda: ddk_update([0.5, 0.5], [[1.0, 2.0]], [1.0, 2.0]), "student_ppl"),
        (lambda: next_weights("ddk_fs", [0.5, 0.5], [1.0, 2.0], [1.0, 2.0]), "strategy"),
        (lambda: initial_weights("natural", [1.0, 2.0], [1.0, 2.0]), "domain_sizes"),
        (lambda: next_weights("natural", [0.5, 0.5], domain_sizes=[1, 2, 3]), "domain_sizes"),
        (lambda: carve_validation(["a"] * 4, per_domain=0), "per_domain"),
        (lambda: carve_validation(["a"] * 4, max_fraction=1.0), "max_fraction"),
        (lambda: DomainBatchSampler(["a", "b"], per_step=3), "per_step"),
        (lambda: DomainBatchSampler(["a", "b"], per_step=2).set_weights([1.0, 1.0, 1.0]), "weights"),
        (lambda: DomainBatchSampler(["a", "b"], per_step=2).set_weights({"a": 1.0}), "weights"),
        (lambda: split_step(list(range(10)), 2, 0, 3), "indices"),
        (lambda: split_step(list(range(12)), 2, 2, 3), "process_index"),
    ],
)
def test_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ------------------------------------------------------------------------------------------- validation split


def test_carve_validation_respects_limits_and_is_deterministic():
    domains = ["code"] * 1200 + ["math"] * 90 + ["chat"] * 5 + ["law"] * 2
    # interleave so that domain members are not contiguous
    order = torch.randperm(len(domains), generator=torch.Generator().manual_seed(3)).tolist()
    domains = [domains[k] for k in order]
    train, val = carve_validation(domains, per_domain=500, seed=7, max_fraction=0.5)
    assert list(val) == ["chat", "code", "law", "math"]
    assert {name: len(v) for name, v in val.items()} == {"code": 500, "math": 45, "chat": 2, "law": 1}
    for name, indices in val.items():
        assert all(domains[i] == name for i in indices)
        assert indices == sorted(indices)
    held = [i for v in val.values() for i in v]
    assert len(set(held)) == len(held)
    assert set(train).isdisjoint(held) and sorted(train + held) == list(range(len(domains)))
    assert train == sorted(train)
    # each domain keeps training data
    assert Counter(domains[i] for i in train) == {"code": 700, "math": 45, "chat": 3, "law": 1}
    # deterministic; another seed gives another split
    assert carve_validation(domains, per_domain=500, seed=7, max_fraction=0.5) == (train, val)
    assert carve_validation(domains, per_domain=500, seed=8, max_fraction=0.5)[1]["code"] != val["code"]
    # smaller per_domain / max_fraction
    without_law = [d for d in domains if d != "law"]
    _, small = carve_validation(without_law, per_domain=10, seed=7, max_fraction=0.2)
    assert {name: len(v) for name, v in small.items()} == {"code": 10, "math": 10, "chat": 1}
    # floor(0.2 * 2) = 0: law would have no validation example
    with pytest.raises(ValueError, match="'law'"):
        carve_validation(domains, per_domain=10, seed=7, max_fraction=0.2)


def test_carve_validation_small_domain_errors_and_independence():
    with pytest.raises(ValueError, match="'solo'.*1 example"):
        carve_validation(["a", "a", "solo", "a"])
    with pytest.raises(ValueError, match="'b'.*max_fraction"):
        carve_validation(["a"] * 10 + ["b"] * 2, max_fraction=0.3)
    # adding a domain does not change another domain's validation examples
    _, alone = carve_validation(["x"] * 50, per_domain=10, seed=1)
    _, mixed = carve_validation(["x"] * 50 + ["y"] * 20, per_domain=10, seed=1)
    assert mixed["x"] == alone["x"]


# ------------------------------------------------------------------------------------------- allocation


def test_allocate_counts_expectation_is_exact_and_rounding_is_tight():
    weights = [0.47, 0.31, 0.17, 0.05]
    capacity = [100, 100, 100, 100]
    total = 13
    targets = [total * w for w in weights]
    grid = 2000
    sums = [0.0] * 4
    for k in range(grid):
        counts = allocate_counts(weights, capacity, total, (k + 0.5) / grid)
        assert sum(counts) == total
        for i, c in enumerate(counts):
            assert math.floor(targets[i]) <= c <= math.ceil(targets[i])
            sums[i] += c
    # averaging over a uniform grid of u gives the targets up to the grid's resolution
    for i in range(4):
        assert sums[i] / grid == pytest.approx(targets[i], abs=2 / grid)


def test_allocate_counts_caps_and_redistributes_proportionally():
    # domain 0 wants 0.8 * 10 = 8 but has 3 examples: the other 7 go to 1 and 2 in ratio 0.15 : 0.05
    weights, capacity, total = [0.8, 0.15, 0.05], [3, 50, 50], 10
    grid = 2000
    sums = [0] * 3
    for k in range(grid):
        counts = allocate_counts(weights, capacity, total, k / grid)
        assert counts[0] == 3 and sum(counts) == total
        sums = [s + c for s, c in zip(sums, counts)]
    assert sums[1] / grid == pytest.approx(7 * 0.75, abs=1e-3)
    assert sums[2] / grid == pytest.approx(7 * 0.25, abs=1e-3)
    # every weighted domain capped: the rest goes to the zero-weight domain
    assert allocate_counts([1.0, 0.0], [2, 10], 6, 0.3) == [2, 4]
    # a domain of weight 0 gets nothing while others have room
    assert allocate_counts([1.0, 0.0], [20, 10], 6, 0.9) == [6, 0]


# ------------------------------------------------------------------------------------------- sampler


def _domains(sizes: dict[str, int]) -> list[str]:
    out = [name for name, n in sizes.items() for _ in range(n)]
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(11)).tolist()
    return [out[k] for k in order]


def test_sampler_frequencies_follow_the_weights():
    domains = _domains({"a": 60, "b": 50, "c": 40, "d": 30})
    sampler = DomainBatchSampler(domains, per_step=16, seed=5)
    weights = {"a": 0.05, "b": 0.15, "c": 0.3, "d": 0.5}  # deliberately unlike the natural sizes
    sampler.set_weights(weights)
    assert sampler.domains == ("a", "b", "c", "d")
    steps = 1500
    seen = Counter()
    for step in range(steps):
        seen.update(domains[i] for i in sampler.draw_step(step))
    n = steps * 16
    for name, p in weights.items():
        # 4 binomial standard deviations (systematic allocation has less variance than this)
        assert abs(seen[name] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (name, seen[name], n * p)
    # new weights take effect from the next draw
    sampler.set_weights([0.25, 0.25, 0.25, 0.25])
    later = Counter()
    for step in range(steps, steps + 200):
        later.update(domains[i] for i in sampler.draw_step(step))
    for name in weights:
        assert later[name] == pytest.approx(800, abs=4 * math.sqrt(3200 * 0.25 * 0.75))


def test_sampler_step_has_no_duplicates_and_per_step_entries():
    domains = _domains({"a": 7, "b": 9, "c": 30})
    sampler = DomainBatchSampler(domains, per_step=24, seed=0, weights=[0.6, 0.3, 0.1])
    for step in range(200):
        indices = sampler.draw_step(step)
        assert len(indices) == 24 and len(set(indices)) == 24
        assert all(0 <= i < len(domains) for i in indices)
        counts = Counter(domains[i] for i in indices)
        assert counts["a"] <= 7 and counts["b"] <= 9


def test_sampler_cycles_through_a_domain_before_repeating():
    domains = _domains({"small": 7, "big": 40})
    sampler = DomainBatchSampler(domains, per_step=6, seed=2, weights=[0.5, 0.5])  # 3 of each per step
    small = [i for i, d in enumerate(domains) if d == "small"]
    seen = Counter({i: 0 for i in small})
    for step in range(40):
        seen.update(i for i in sampler.draw_step(step) if domains[i] == "small")
        # after every step, no example of the domain has been drawn twice more than another
        assert max(seen.values()) - min(seen.values()) <= 1, (step, seen)
    assert sum(seen.values()) == 40 * 3


def test_sampler_is_deterministic_across_instances():
    domains = _domains({"a": 13, "b": 21, "c": 34})
    ranks = [DomainBatchSampler(domains, per_step=12, seed=9) for _ in range(2)]
    draws = [[], []]
    for step in range(60):
        for k, sampler in enumerate(ranks):
            if step == 20:
                sampler.set_weights([0.7, 0.2, 0.1])
            draws[k].append(sampler.draw_step(step))
    assert draws[0] == draws[1]
    other = DomainBatchSampler(domains, per_step=12, seed=10)
    assert [other.draw_step(s) for s in range(20)] != draws[0][:20]


def test_sampler_refuses_to_redraw_a_step():
    sampler = DomainBatchSampler(["a", "b"] * 5, per_step=4)
    sampler.draw_step(0)
    sampler.draw_step(1)
    with pytest.raises(ValueError, match="step"):
        sampler.draw_step(1)


def test_split_step_partitions_the_step():
    indices = list(range(100, 148))  # 48 = 3 processes * 4 micro-batches * 4
    parts = [split_step(indices, 3, rank, 4) for rank in range(3)]
    flat = [i for rank in parts for micro in rank for i in micro]
    assert all(len(rank) == 4 and all(len(m) == 4 for m in rank) for rank in parts)
    assert sorted(flat) == indices and len(set(flat)) == len(flat)
    assert split_step(indices, 1, 0, 1) == [indices]


def test_state_dict_round_trip_resumes_exactly():
    domains = _domains({"a": 7, "b": 11, "c": 5})  # small domains: steps straddle cycle boundaries
    weights_at = {0: [0.5, 0.3, 0.2], 9: [0.2, 0.2, 0.6], 17: [0.34, 0.33, 0.33]}

    def run(sampler, start, stop):
        out = []
        for step in range(start, stop):
            if step in weights_at:
                sampler.set_weights(weights_at[step])
            out.append(sampler.draw_step(step))
        return out

    straight = run(DomainBatchSampler(domains, per_step=8, seed=4), 0, 30)
    first = DomainBatchSampler(domains, per_step=8, seed=4)
    head = run(first, 0, 13)
    state = json.loads(json.dumps(first.state_dict()))
    # the saved state includes a step that straddled a cycle boundary
    assert any(pos["moved"] for pos in state["positions"].values())
    resumed = DomainBatchSampler(domains, per_step=8, seed=4)
    resumed.load_state_dict(state)
    assert resumed.next_step == 13
    torch.testing.assert_close(resumed.weights, first.weights, rtol=0, atol=0)
    assert head + run(resumed, 13, 30) == straight
    # a state from another setup is refused
    with pytest.raises(ValueError, match="per_step"):
        DomainBatchSampler(domains, per_step=4, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        DomainBatchSampler(domains, per_step=8, seed=5).load_state_dict(state)


# ------------------------------------------------------------------------------------------- logging


def test_domain_stats_log_dict():
    stats = DomainStats(["code", "math"], student_ppl=[10.0, 3.0], teacher_ppl=[4.0, 2.0], weights=[0.7, 0.3])
    out = stats.as_log_dict()
    assert out == pytest.approx(
        {
            "ddk/weight/code": 0.7, "ddk/weight/math": 0.3,
            "ddk/ppl_student/code": 10.0, "ddk/ppl_student/math": 3.0,
            "ddk/ppl_teacher/code": 4.0, "ddk/ppl_teacher/math": 2.0,
            "ddk/ratio/code": 2.5, "ddk/ratio/math": 1.5,
        }
    )
    assert all(isinstance(v, float) for v in out.values())
    json.dumps(out)
    with pytest.raises(ValueError, match="weights"):
        DomainStats(["code"], [1.0], [1.0], [0.5, 0.5]).as_log_dict()

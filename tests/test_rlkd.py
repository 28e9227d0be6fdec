"""RLKD objective: rank term + base divergence per token, fixture-pinned, on the dense and fused paths."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import load_fixture_cases, tiny_config

from kdlm.config import ConfigError, validate
from kdlm.losses import (
    distill_loss,
    fused_kd_terms,
    kd_terms,
    peak_alignment_metrics,
    ranking_loss,
    rlkd_token,
)

from test_fused import STUDENT_LEAVES, dense_logits, leaves, make_problem

TOL = {"rtol": 1e-4, "atol": 1e-6}


@pytest.mark.parametrize("base", ["fkl", "akl"])
def test_rlkd_on_fixture_is_rank_weight_times_rank_k5_plus_base(base: str) -> None:
    """Masked mean of rlkd_token = w·rank_k5 + base, value and gradient, straight from the golden fixture."""
    tensors, _ = load_fixture_cases()
    student = tensors["student_logits"].clone().requires_grad_(True)
    teacher, mask = tensors["teacher_logits"], tensors["mask"]
    fn = functools.partial(rlkd_token, base=base, k=5, rank_weight=2.0)
    loss = distill_loss(student, teacher, mask, fn)
    loss.backward()
    expected = 2.0 * tensors["rank_k5.value"] + tensors[f"{base}.value"]
    expected_grad = 2.0 * tensors["rank_k5.grad"] + tensors[f"{base}.grad"]
    torch.testing.assert_close(loss.detach().reshape(1), expected, **TOL)
    torch.testing.assert_close(student.grad, expected_grad, **TOL)


def test_dynamic_variant_weights_base_by_topk_overlap() -> None:
    """Dynamic RLKD: base divergence weighted per token by |topk(p) ∩ topk(q)|/k, counted here with python sets."""
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(3, 7, 40, generator=gen, requires_grad=True)
    teacher = torch.randn(3, 7, 40, generator=gen)
    student_copy = student.detach().clone().requires_grad_(True)
    mask = torch.rand(3, 7, generator=gen) > 0.3
    k = 4
    per_token = rlkd_token(student, teacher, base="rkl", k=k, rank_weight=0.5, dynamic=True)
    loss = per_token[mask].mean()
    loss.backward()

    overlap = torch.zeros(3, 7)
    for b in range(3):
        for t in range(7):
            top_s = set(student[b, t].topk(k).indices.tolist())
            top_t = set(teacher[b, t].topk(k).indices.tolist())
            overlap[b, t] = len(top_s & top_t) / k
    from kdlm.losses import rkl

    expected = 0.5 * ranking_loss(student_copy, teacher, mask, k=k) + (overlap * rkl(student_copy, teacher))[mask].mean()
    expected.backward()
    torch.testing.assert_close(loss, expected.float(), **TOL)
    torch.testing.assert_close(student.grad, student_copy.grad, **TOL)


def test_rank_weight_zero_equals_base_divergence() -> None:
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(10, 30, generator=gen), torch.randn(10, 30, generator=gen)
    fn = functools.partial(rlkd_token, base="jsd", base_params={"beta": 0.3}, rank_weight=0.0)
    got = distill_loss(student, teacher, torch.ones(10, dtype=torch.bool), fn, temperature=1.7)
    want = distill_loss(student, teacher, torch.ones(10, dtype=torch.bool), "jsd", temperature=1.7, beta=0.3)
    torch.testing.assert_close(got, want, **TOL)


def test_aux_peak_alignment_matches_metrics_function() -> None:
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(2, 9, 50, generator=gen)
    teacher = student + 0.3 * torch.randn(2, 9, 50, generator=gen)  # close: some exact top-k matches
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    terms = kd_terms(student, teacher, mask, None, functools.partial(rlkd_token, k=3))
    count = float(terms.count)
    metrics = peak_alignment_metrics(student, teacher, mask, k=3)
    assert 0 < metrics["cr@3"] < 1  # the case exercises both outcomes
    assert float(terms.aux["cr@3"]) / count == pytest.approx(metrics["cr@3"], abs=1e-6)
    assert float(terms.aux["mor@3"]) / count == pytest.approx(metrics["mor@3"], abs=1e-6)
    rank_mean = float(terms.aux["rank"]) / count
    assert rank_mean == pytest.approx(float(ranking_loss(student, teacher, mask, k=3)), abs=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_fused_rlkd_matches_dense_with_kd_ratio(dynamic: bool) -> None:
    """Rank term computed chunk by chunk inside the fused loss = dense path, values and all three gradients."""
    problem = make_problem(seed=11)
    dense_leaves, fused_leaves = leaves(problem), leaves(problem)
    fn = functools.partial(rlkd_token, base="akl", k=5, rank_weight=2.0, dynamic=dynamic)
    student, teacher = dense_logits({**problem, **dense_leaves})
    dense = kd_terms(student, teacher, problem["mask"], problem["labels"], fn, kd_ratio=0.4)
    fused = fused_kd_terms(
        fused_leaves["student_hidden"], fused_leaves["student_weight"], problem["teacher_hidden"],
        problem["teacher_weight"], problem["mask"], fn, labels=problem["labels"],
        student_bias=fused_leaves["student_bias"], teacher_bias=problem["teacher_bias"], chunk_size=4, kd_ratio=0.4,
    )
    torch.testing.assert_close(fused.loss_sum, dense.loss_sum, **TOL)
    assert fused.aux.keys() == dense.aux.keys() >= {"rank", "base", "cr@5", "mor@5", "akl_head_weight"}
    for key in dense.aux:
        torch.testing.assert_close(fused.aux[key], dense.aux[key], **TOL, msg=key)
    dense.loss_sum.backward()
    fused.loss_sum.backward()
    for key in STUDENT_LEAVES:
        torch.testing.assert_close(fused_leaves[key].grad, dense_leaves[key].grad, **TOL, msg=key)


def test_rank_keys_only_with_rlkd(tiny, tmp_path) -> None:
    with pytest.raises(ConfigError, match="objective.rank_k applies to objective.name=rlkd"):
        tiny_config(tiny, tmp_path, **{"objective.rank_k": 15})
    with pytest.raises(ConfigError, match="objective.rank_k must be >= 1"):
        tiny_config(tiny, tmp_path, **{"objective.name": "rlkd", "objective.rank_k": 0})
    cfg = tiny_config(tiny, tmp_path, **{"objective.name": "rlkd", "objective.rank_k": 15})
    assert validate(cfg).objective.ranking_params()["k"] == 15


def test_k_larger_than_vocabulary_is_an_error() -> None:
    with pytest.raises(ValueError, match="rank k must be in"):
        rlkd_token(torch.randn(2, 6), torch.randn(2, 6), k=7)

"""Fused chunked path: fixtures, equality with the dense path, gradients, numerics."""

from __future__ import annotations

import math

import pytest
import torch

from kdlm.losses import DIVERGENCES, distill_loss, fused_distill_loss, fused_kd_terms, kd_terms

from test_divergences import DIVERGENCE_CASES, case_spec, load_fixture_cases

TOL = {"rtol": 1e-4, "atol": 1e-6}


@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_fixture_fused(case: str) -> None:
    """hidden = logits and weight = identity [V, V]: the product reproduces the fixture logits exactly."""
    tensors, meta = load_fixture_cases()
    divergence, temperature, params = case_spec(meta, case)
    student_logits, teacher_logits = tensors["student_logits"], tensors["teacher_logits"]
    vocab = student_logits.shape[-1]
    identity = torch.eye(vocab)
    hidden = student_logits.reshape(-1, vocab).clone().requires_grad_(True)
    loss = fused_distill_loss(
        hidden, identity, teacher_logits.reshape(-1, vocab), identity, tensors["mask"].reshape(-1),
        divergence, temperature, chunk_size=5, **params,
    )
    loss.backward()
    torch.testing.assert_close(loss.detach().reshape(1), tensors[f"{case}.value"], **TOL)
    # d loss / d hidden = d loss / d logits @ I
    torch.testing.assert_close(hidden.grad.reshape(student_logits.shape), tensors[f"{case}.grad"], **TOL)


def make_problem(seed: int, n: int = 23, hidden: int = 16, hidden_t: int = 12, vocab: int = 97, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    problem = {
        "student_hidden": torch.randn(n, hidden, generator=gen),
        "student_weight": torch.randn(vocab, hidden, generator=gen) * 0.5,
        "student_bias": torch.randn(vocab, generator=gen) * 0.3,
        "teacher_hidden": torch.randn(n, hidden_t, generator=gen),
        "teacher_weight": torch.randn(vocab, hidden_t, generator=gen) * 0.5,
        "teacher_bias": torch.randn(vocab, generator=gen) * 0.3,
        "mask": torch.rand(n, generator=gen) > 0.35,
        "labels": torch.randint(0, vocab, (n,), generator=gen),
    }
    problem["labels"][torch.rand(n, generator=gen) > 0.7] = -100
    for key in ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias"):
        problem[key] = problem[key].to(dtype)
    return problem


def dense_logits(problem, scale_s=1.0, scale_t=1.0, cap_s=None, cap_t=None, bias=True):
    def logits(hidden, weight, b, scale, cap):
        out = hidden @ weight.T
        if bias:
            out = out + b
        out = out.float() * scale
        return cap * torch.tanh(out / cap) if cap is not None else out

    student = logits(problem["student_hidden"], problem["student_weight"], problem["student_bias"], scale_s, cap_s)
    with torch.no_grad():
        teacher = logits(problem["teacher_hidden"], problem["teacher_weight"], problem["teacher_bias"], scale_t, cap_t)
    return student, teacher


STUDENT_LEAVES = ("student_hidden", "student_weight", "student_bias")


def leaves(problem):
    return {key: problem[key].clone().requires_grad_(True) for key in STUDENT_LEAVES}


SETTINGS = [
    # (chunk_size, bias, student scale, teacher scale, student softcap, teacher softcap, temperature)
    (1, False, 1.0, 1.0, None, None, 1.0),
    (7, True, 1.0, 1.0, None, None, 2.0),
    (23, True, 0.5, 2.0, None, None, 1.0),
    (100, True, 1.0, 1.0, 4.0, 3.0, 1.0),
    (None, True, 0.7, 1.3, 5.0, None, 0.8),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"chunk{s[0]}-bias{int(s[1])}-softcap{s[4]}")
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_equals_dense(name: str, setting) -> None:
    chunk, bias, scale_s, scale_t, cap_s, cap_t, temperature = setting
    problem = make_problem(seed=hash((name, chunk)) % 1000)
    dense_leaves, fused_leaves = leaves(problem), leaves(problem)

    dense_problem = {**problem, **dense_leaves}
    student, teacher = dense_logits(dense_problem, scale_s, scale_t, cap_s, cap_t, bias)
    dense = distill_loss(student, teacher, problem["mask"], name, temperature)
    dense.backward()

    fused = fused_distill_loss(
        fused_leaves["student_hidden"], fused_leaves["student_weight"],
        problem["teacher_hidden"], problem["teacher_weight"], problem["mask"], name, temperature,
        student_bias=fused_leaves["student_bias"] if bias else None,
        teacher_bias=problem["teacher_bias"] if bias else None,
        student_logit_scale=scale_s, teacher_logit_scale=scale_t,
        student_softcap=cap_s, teacher_softcap=cap_t, chunk_size=chunk,
    )
    fused.backward()
    torch.testing.assert_close(fused, dense, **TOL)
    for key in STUDENT_LEAVES:
        if key == "student_bias" and not bias:
            assert fused_leaves[key].grad is None
            continue
        torch.testing.assert_close(fused_leaves[key].grad, dense_leaves[key].grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["fkl", "jsd", "akl"])
def test_fused_kd_terms_with_labels_matches_dense(name: str) -> None:
    problem = make_problem(seed=3)
    dense_leaves, fused_leaves = leaves(problem), leaves(problem)
    student, teacher = dense_logits({**problem, **dense_leaves})
    dense = kd_terms(student, teacher, problem["mask"], problem["labels"], name)
    fused = fused_kd_terms(
        fused_leaves["student_hidden"], fused_leaves["student_weight"], problem["teacher_hidden"],
        problem["teacher_weight"], problem["mask"], name, labels=problem["labels"],
        student_bias=fused_leaves["student_bias"], teacher_bias=problem["teacher_bias"], chunk_size=6,
    )
    for field in ("divergence_sum", "ce_sum"):
        torch.testing.assert_close(getattr(fused, field), getattr(dense, field), **TOL)
    assert fused.count == dense.count and fused.ce_count == dense.ce_count
    assert fused.aux.keys() == dense.aux.keys()
    for key in dense.aux:
        torch.testing.assert_close(fused.aux[key], dense.aux[key], **TOL)
    # Mixed loss with different weights on each term: the two gradients are kept apart.
    kd_ratio, num_tokens = 0.3, 40
    for terms, grads in ((dense, dense_leaves), (fused, fused_leaves)):
        ((1 - kd_ratio) * terms.ce_sum / num_tokens + kd_ratio * terms.divergence_sum / num_tokens).backward()
    for key in STUDENT_LEAVES:
        torch.testing.assert_close(fused_leaves[key].grad, dense_leaves[key].grad, **TOL, msg=key)


@pytest.mark.parametrize(
    "name, kd_ratio, compile_",
    [("fkl", 0.5, False), ("jsd", 0.3, False), ("akl", 1.0, False), pytest.param("jsd", 0.3, True, marks=pytest.mark.slow)],
)
def test_fused_kd_ratio_mix_matches_dense(name: str, kd_ratio: float, compile_: bool) -> None:
    """kd_ratio: one combined logit gradient per chunk gives the same loss and gradients as the dense mix."""
    if compile_:
        pytest.importorskip("torch._inductor")
    problem = make_problem(seed=11)
    dense_leaves, fused_leaves = leaves(problem), leaves(problem)
    student, teacher = dense_logits({**problem, **dense_leaves})
    dense = kd_terms(student, teacher, problem["mask"], problem["labels"], name, kd_ratio=kd_ratio)
    fused = fused_kd_terms(
        fused_leaves["student_hidden"], fused_leaves["student_weight"], problem["teacher_hidden"],
        problem["teacher_weight"], problem["mask"], name, labels=problem["labels"],
        student_bias=fused_leaves["student_bias"], teacher_bias=problem["teacher_bias"], chunk_size=5,
        kd_ratio=kd_ratio, compile=compile_,
    )
    expected = (1 - kd_ratio) * dense.ce_sum + kd_ratio * dense.divergence_sum
    torch.testing.assert_close(dense.loss_sum, expected, **TOL)
    torch.testing.assert_close(fused.loss_sum, expected.detach(), **TOL)
    torch.testing.assert_close(fused.divergence_sum, dense.divergence_sum.detach(), **TOL)
    assert not fused.divergence_sum.requires_grad and not fused.ce_sum.requires_grad  # logging only
    (dense.loss_sum / 37).backward()
    (fused.loss_sum / 37).backward()
    for key in STUDENT_LEAVES:
        torch.testing.assert_close(fused_leaves[key].grad, dense_leaves[key].grad, **TOL, msg=key)


def test_kd_ratio_needs_labels() -> None:
    problem = make_problem(seed=12)
    with pytest.raises(ValueError, match="needs labels"):
        fused_kd_terms(problem["student_hidden"], problem["student_weight"], problem["teacher_hidden"],
                       problem["teacher_weight"], problem["mask"], kd_ratio=0.5)


def test_teacher_gets_no_gradient_and_no_grad_mode_works() -> None:
    problem = make_problem(seed=4)
    student_hidden = problem["student_hidden"].requires_grad_(True)
    teacher_weight = problem["teacher_weight"].requires_grad_(True)
    teacher_hidden = problem["teacher_hidden"].requires_grad_(True)
    loss = fused_distill_loss(student_hidden, problem["student_weight"], teacher_hidden, teacher_weight,
                              problem["mask"], "rkl", chunk_size=4)
    loss.backward()
    assert teacher_weight.grad is None and teacher_hidden.grad is None
    assert student_hidden.grad is not None
    with torch.no_grad():
        again = fused_distill_loss(student_hidden, problem["student_weight"], teacher_hidden, teacher_weight,
                                   problem["mask"], "rkl", chunk_size=4)
    torch.testing.assert_close(again, loss.detach())


def test_fused_num_tokens_and_fully_masked() -> None:
    problem = make_problem(seed=5)
    args = (problem["student_hidden"], problem["student_weight"], problem["teacher_hidden"], problem["teacher_weight"])
    terms = fused_kd_terms(*args, problem["mask"], "tvd", chunk_size=5)
    torch.testing.assert_close(
        fused_distill_loss(*args, problem["mask"], "tvd", chunk_size=5, num_tokens=torch.tensor(50)),
        terms.divergence_sum / 50,
    )
    torch.testing.assert_close(fused_distill_loss(*args, problem["mask"], "tvd"), terms.divergence_sum / terms.count)

    hidden = problem["student_hidden"].clone().requires_grad_(True)
    weight = problem["student_weight"].clone().requires_grad_(True)
    loss = fused_distill_loss(hidden, weight, *args[2:], torch.zeros(23, dtype=torch.bool), "jsd")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("teacher_only", [False, True], ids=["both", "teacher-only"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_negative_infinity_bias_stays_finite(name: str, teacher_only: bool) -> None:
    """A padded vocabulary: the last entries have a −inf bias."""
    problem = make_problem(seed=6)
    problem["teacher_bias"][-4:] = -math.inf
    if not teacher_only:
        problem["student_bias"][-4:] = -math.inf
    fused_leaves = leaves(problem)
    loss = fused_distill_loss(
        fused_leaves["student_hidden"], fused_leaves["student_weight"], problem["teacher_hidden"],
        problem["teacher_weight"], problem["mask"], name, student_bias=fused_leaves["student_bias"],
        teacher_bias=problem["teacher_bias"], chunk_size=8,
    )
    loss.backward()
    assert torch.isfinite(loss)
    for key in STUDENT_LEAVES:
        assert torch.isfinite(fused_leaves[key].grad).all(), key


def test_fused_bfloat16_matches_dense_bfloat16() -> None:
    """bf16 hidden states and weights: the matmul runs in bf16 (as the model's lm_head would), the loss
    in float32; fused equals dense on the same bf16 logits, gradients within bf16 rounding."""
    problem = make_problem(seed=7, dtype=torch.bfloat16)
    dense_leaves, fused_leaves = leaves(problem), leaves(problem)
    student, teacher = dense_logits({**problem, **dense_leaves}, bias=False)
    dense = distill_loss(student, teacher, problem["mask"], "jsd")
    dense.backward()
    fused = fused_distill_loss(fused_leaves["student_hidden"], fused_leaves["student_weight"],
                               problem["teacher_hidden"], problem["teacher_weight"], problem["mask"], "jsd",
                               chunk_size=7)
    fused.backward()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, dense, rtol=1e-4, atol=1e-6)
    for key in ("student_hidden", "student_weight"):
        assert fused_leaves[key].grad.dtype == torch.bfloat16
        torch.testing.assert_close(fused_leaves[key].grad.float(), dense_leaves[key].grad.float(),
                                   rtol=2e-2, atol=1e-4, msg=key)


@pytest.mark.slow
def test_compiled_fused_matches_eager() -> None:
    problem = make_problem(seed=8, n=40, vocab=300)
    results = []
    for compiled in (False, True):
        fused_leaves = leaves(problem)
        loss = fused_distill_loss(fused_leaves["student_hidden"], fused_leaves["student_weight"],
                                  problem["teacher_hidden"], problem["teacher_weight"], problem["mask"], "jsd",
                                  chunk_size=16, compile=compiled)
        loss.backward()
        results.append((loss.detach(), fused_leaves["student_hidden"].grad, fused_leaves["student_weight"].grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)

"""Per-token divergences and the dense reducer: reference fixtures, identities and numerics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import load_fixture_cases

from kdlm.losses import (
    DEFAULT_PARAMS,
    DIVERGENCES,
    distill_loss,
    jsd,
    kd_terms,
    token_nll,
)

DIVERGENCE_CASES = [
    "fkl", "rkl", "tvd", "skew_fkl", "skew_rkl", "jsd_beta0.0", "jsd_beta0.1", "jsd_beta0.5",
    "jsd_beta0.9", "jsd_beta1.0", "jsd_beta0.5_T2", "akl",
]


def case_spec(meta: dict, case: str) -> tuple[str, float, dict]:
    """(divergence name, temperature, params) of a fixture case."""
    params = dict(meta["cases"][case]["params"])
    temperature = float(params.pop("temperature", 1.0))
    divergence = "jsd" if case.startswith("jsd") else case
    return divergence, temperature, params


@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_fixture_dense(case: str) -> None:
    tensors, meta = load_fixture_cases()
    divergence, temperature, params = case_spec(meta, case)
    student = tensors["student_logits"].clone().requires_grad_(True)
    loss = distill_loss(student, tensors["teacher_logits"], tensors["mask"], divergence, temperature, **params)
    loss.backward()
    torch.testing.assert_close(loss.detach().reshape(1), tensors[f"{case}.value"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(student.grad, tensors[f"{case}.grad"], rtol=1e-4, atol=1e-6)


def test_fixture_covers_every_divergence() -> None:
    _, meta = load_fixture_cases()
    assert set(DIVERGENCE_CASES) <= set(meta["cases"])
    assert {case_spec(meta, c)[0] for c in DIVERGENCE_CASES} == set(DIVERGENCES)


# ------------------------------------------------------------------ float64 oracle (independent code)


def oracle(name: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, **params):
    """Straight-from-the-formula float64 per-token values (METHODS.md), for finite logits."""
    lq = torch.log_softmax(student.double() / temperature, -1)
    lp = torch.log_softmax(teacher.double() / temperature, -1)
    p, q = lp.exp(), lq.exp()

    def kl(log_a, log_b):
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if name == "fkl":
        return kl(lp, lq)
    if name == "rkl":
        return kl(lq, lp)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        beta = params.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        return beta * kl(lp, m.log()) + (1 - beta) * kl(lq, m.log())
    if name == "skew_fkl":
        a = params.get("alpha", 0.1)
        return kl(lp, (a * p + (1 - a) * q).log())
    if name == "skew_rkl":
        a = params.get("alpha", 0.1)
        return kl(lq, ((1 - a) * p + a * q).log())
    if name == "akl":
        mu = params.get("mu", 0.5)
        sorted_p, order = p.sort(-1, descending=True)
        sorted_q = q.gather(-1, order)
        head = sorted_p.cumsum(-1) <= mu
        head[..., 0] = True
        diff = (sorted_p - sorted_q).abs()
        g_head = (diff * head).sum(-1)
        g_tail = (diff * ~head).sum(-1)
        return (g_head * kl(lp, lq) + g_tail * kl(lq, lp)) / (g_head + g_tail)
    raise KeyError(name)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale, torch.randn(rows, vocab, generator=gen) * scale


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_matches_float64_oracle(name: str) -> None:
    # V = 300 > AKL's top-k window, with flat rows (scale 0.1) so AKL's flat-row path (no top-64 head) runs too.
    student, teacher = random_logits(8, 300, seed=1)
    teacher[:4] *= 0.03
    values = DIVERGENCES[name](student, teacher, temperature=1.5)
    expected = oracle(name, student, teacher, temperature=1.5)
    torch.testing.assert_close(values.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bfloat16_inputs_within_tolerance_of_float64(name: str) -> None:
    """bf16 logits are upcast: the values equal the float64 oracle on the same (bf16-rounded) logits to
    float32 accuracy (stated tolerance: rtol 1e-4, atol 1e-5), and the output is float32."""
    student, teacher = random_logits(6, 500, seed=2)
    student_bf, teacher_bf = student.bfloat16(), teacher.bfloat16()
    values = DIVERGENCES[name](student_bf, teacher_bf)
    assert values.dtype == torch.float32
    expected = oracle(name, student_bf.double(), teacher_bf.double())
    torch.testing.assert_close(values.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_of_a_distribution_with_itself_is_zero(name: str) -> None:
    logits, _ = random_logits(5, 400, seed=3)
    student = logits.clone().requires_grad_(True)
    values = DIVERGENCES[name](student, logits)
    torch.testing.assert_close(values, torch.zeros(5), rtol=0, atol=1e-6)
    values.sum().backward()
    assert torch.isfinite(student.grad).all()
    if name != "tvd":  # |x| has a subgradient at 0; the others are smooth minima
        torch.testing.assert_close(student.grad, torch.zeros_like(student), rtol=0, atol=1e-6)


@pytest.mark.parametrize("beta, other", [(0.0, "fkl"), (1.0, "rkl")])
def test_jsd_endpoints_are_exactly_fkl_and_rkl(beta: float, other: str) -> None:
    student, teacher = random_logits(7, 200, seed=4)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    values_jsd = jsd(a, teacher, beta=beta, temperature=2.0)
    values_other = DIVERGENCES[other](b, teacher, temperature=2.0)
    torch.testing.assert_close(values_jsd, values_other, rtol=0, atol=1e-7)
    values_jsd.sum().backward()
    values_other.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)


def test_jsd_endpoints_are_definitions_not_limits() -> None:
    """GKD/TRL convention: β = 0 and β = 1 *define* FKL and RKL; the mixture form tends to 0 there."""
    student, teacher = random_logits(4, 100, seed=5)
    assert jsd(student, teacher, beta=1e-6).abs().max() < 1e-4
    assert jsd(student, teacher, beta=0.0).min() > 0.1


def padded_logits(teacher_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    student, teacher = random_logits(6, 64, seed=6)
    teacher[:, -5:] = -math.inf
    if not teacher_only:
        student[:, -5:] = -math.inf
    return student, teacher


@pytest.mark.parametrize("teacher_only", [False, True], ids=["both", "teacher-only"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_negative_infinity_logits_stay_finite(name: str, teacher_only: bool) -> None:
    student, teacher = padded_logits(teacher_only)
    student.requires_grad_(True)
    mask = torch.ones(6, dtype=torch.bool)
    loss = distill_loss(student, teacher, mask, name)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    if not teacher_only:
        # Entries that are −inf in both distributions do not exist: same value as without them.
        reference = distill_loss(student.detach()[:, :-5], teacher[:, :-5], mask, name)
        torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fully_masked_gives_zero_and_zero_gradient(name: str) -> None:
    student, teacher = random_logits(6, 32, seed=7)
    student = student.reshape(2, 3, 32).requires_grad_(True)
    loss = distill_loss(student, teacher.reshape(2, 3, 32), torch.zeros(2, 3, dtype=torch.bool), name)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_masked_mean_and_num_tokens() -> None:
    student, teacher = random_logits(10, 50, seed=8)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    per_token = DIVERGENCES["jsd"](student, teacher, beta=0.3)
    total = per_token[mask].sum()
    torch.testing.assert_close(distill_loss(student, teacher, mask, "jsd", beta=0.3), total / 6)
    torch.testing.assert_close(distill_loss(student, teacher, mask, "jsd", num_tokens=17, beta=0.3), total / 17)
    torch.testing.assert_close(
        distill_loss(student, teacher, mask, "jsd", num_tokens=torch.tensor(17), beta=0.3), total / 17
    )


def test_unknown_parameter_is_a_type_error_naming_it() -> None:
    student, teacher = random_logits(2, 10, seed=9)
    with pytest.raises(TypeError, match=r"'beta'.*|.*fkl.*beta"):
        distill_loss(student, teacher, torch.ones(2, dtype=torch.bool), "fkl", beta=0.5)
    with pytest.raises(TypeError) as info:
        distill_loss(student, teacher, torch.ones(2, dtype=torch.bool), "akl", alpha=0.5)
    assert "alpha" in str(info.value) and "akl" in str(info.value)
    with pytest.raises(KeyError):
        distill_loss(student, teacher, torch.ones(2, dtype=torch.bool), "nope")


def test_default_params_match_function_signatures() -> None:
    import inspect

    for name, fn in DIVERGENCES.items():
        signature = inspect.signature(fn)
        declared = {
            key: p.default for key, p in signature.parameters.items()
            if p.kind is p.KEYWORD_ONLY and key not in ("temperature", "aux")
        }
        assert declared == DEFAULT_PARAMS[name], name


def test_token_nll_matches_cross_entropy() -> None:
    logits, _ = random_logits(9, 40, seed=10)
    labels = torch.randint(0, 40, (9,), generator=torch.Generator().manual_seed(0))
    labels[[2, 5]] = -100
    nll = token_nll(logits.bfloat16(), labels)
    assert nll.dtype == torch.float32
    assert nll[2] == 0 and nll[5] == 0
    expected = F.cross_entropy(logits.bfloat16().float(), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(nll, expected)


def test_kd_terms_reports_akl_weights_and_ce() -> None:
    student, teacher = random_logits(8, 80, seed=11)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    labels = torch.arange(8) * 3
    labels[0] = -100
    terms = kd_terms(student, teacher, mask, labels, "akl")
    assert terms.count.item() == 6 and terms.ce_count.item() == 7
    head, tail = terms.aux["akl_head_weight"], terms.aux["akl_tail_weight"]
    torch.testing.assert_close(head + tail, torch.tensor(6.0))
    assert 0 < head.item() < 6
    torch.testing.assert_close(terms.ce_sum, token_nll(student, labels).sum())
    torch.testing.assert_close(terms.divergence_sum, DIVERGENCES["akl"](student, teacher)[mask].sum())


@pytest.mark.parametrize("mu", [0.05, 0.5, 0.9, 1.0])
def test_akl_head_without_sorting_matches_a_full_sort(mu: float) -> None:
    """AKL's head search for flat rows (bins + a top-k of the crossing bin) equals sorting every row, including
    ties, −inf (padded) teacher entries and μ = 1."""
    from kdlm.losses.divergences import _akl_weights

    gen = torch.Generator().manual_seed(5)
    vocab = 5000
    teacher = torch.randn(12, vocab, generator=gen) * torch.tensor([0.01, 0.1, 0.3, 1.0] * 3).unsqueeze(-1)
    teacher[1, -300:] = -float("inf")  # padded vocabulary rows
    student = torch.randn(12, vocab, generator=gen)
    # Exact ties (same p, and same q, so that the order inside a tie cannot matter, as in any sort).
    teacher[0, :2500], student[0, :2500] = teacher[0, 2500:], student[0, 2500:]
    teacher_logp, student_logp = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    head_w, tail_w = _akl_weights(teacher_logp, student_logp, mu)
    p, q = teacher_logp.exp(), student_logp.exp()
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
    head = sorted_p.cumsum(-1) <= mu
    head[:, 0] = True
    diff = (p - q).abs().gather(-1, order)
    g_head, g_tail = (diff * head).sum(-1), (diff * ~head).sum(-1)
    torch.testing.assert_close(head_w, g_head / (g_head + g_tail), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tail_w, g_tail / (g_head + g_tail), rtol=1e-4, atol=1e-5)

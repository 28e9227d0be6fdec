"""Tests for kdlm.losses.dpkd: DPKD token form (LMOps reference code) and sequence form (paper Eq. 9)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import load_fixture_cases

from kdlm.losses.dpkd import (
    dpkd_sequence_loss,
    dpkd_sequence_stats,
    dpkd_token_loss,
    dpkd_token_stats,
    dpkd_token_terms,
    sequence_logps,
)

LOG2 = math.log(2.0)
SEQ = "dpkd_seq."


@pytest.fixture(scope="module")
def fixture():
    tensors, meta = load_fixture_cases()
    return meta, tensors


def _seq_inputs(t):
    return [t[SEQ + name] for name in (
        "student_logp_chosen", "teacher_logp_chosen", "student_logp_rejected", "teacher_logp_rejected",
        "mask_chosen", "mask_rejected",
    )]


# ------------------------------------------------------------------------------------------- golden fixture


def test_fixture_dpkd_token_value_and_grad(fixture):
    meta, t = fixture
    beta = meta["cases"]["dpkd_token"]["params"]["beta"]
    student = t["student_logits"].clone().requires_grad_(True)
    loss = dpkd_token_loss(student, t["teacher_logits"], t["mask"], beta=beta)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.reshape(1), t["dpkd_token.value"], rtol=1e-4, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(student.grad, t["dpkd_token.grad"], rtol=1e-4, atol=1e-6)
    assert torch.all(student.grad[t["mask"] == 0] == 0)


def test_fixture_dpkd_seq_value_and_grad(fixture):
    meta, t = fixture
    beta = meta["cases"]["dpkd_seq"]["params"]["beta"]
    inputs = _seq_inputs(t)
    student_chosen = inputs[0].clone().requires_grad_(True)
    loss = dpkd_sequence_loss(student_chosen, *inputs[1:], beta=beta)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.reshape(1), t[SEQ + "value"], rtol=1e-4, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(student_chosen.grad, t[SEQ + "grad_student_logp_chosen"], rtol=1e-4, atol=1e-6)
    assert torch.all(student_chosen.grad[inputs[4] == 0] == 0)


# ------------------------------------------------------------------------------------------- token form


def _token_loop_reference(student, teacher, mask, beta, temperature):
    """Python loop over positions in float64: the value, and the analytic gradient
    −β·σ(−βh)·(e_a − e_b)/(τ·N) of the masked mean."""
    vocab = student.shape[-1]
    s_rows = student.reshape(-1, vocab).double()
    t_rows = teacher.reshape(-1, vocab).double()
    positions = [i for i, m in enumerate(mask.reshape(-1).tolist()) if m != 0]
    n = len(positions)
    total = 0.0
    grad = torch.zeros_like(s_rows)
    for i in positions:
        s_row, t_row = s_rows[i].tolist(), t_rows[i].tolist()
        a = max(range(vocab), key=lambda v: (t_row[v], -v))  # first index of the max
        b = max(range(vocab), key=lambda v: (s_row[v], -v))
        s_lse = math.log(sum(math.exp(x / temperature) for x in s_row))
        t_lse = math.log(sum(math.exp(x / temperature) for x in t_row))
        log_q = [x / temperature - s_lse for x in s_row]
        log_p = [x / temperature - t_lse for x in t_row]
        h = (log_q[a] - log_q[b]) - (log_p[a] - log_p[b])
        total += math.log1p(math.exp(-beta * h))  # −log σ(βh)
        coeff = -beta / (1.0 + math.exp(beta * h)) / (temperature * n)
        grad[i, a] += coeff
        grad[i, b] -= coeff
    return torch.tensor(total / n, dtype=torch.float64), grad.reshape(student.shape)


@pytest.mark.parametrize("beta,temperature", [(0.1, 1.0), (0.5, 2.0), (2.0, 0.7)])
def test_token_loss_matches_loop_over_positions(beta, temperature):
    g = torch.Generator().manual_seed(int(beta * 10 + temperature * 100))
    B, L, V = 3, 5, 17
    teacher = torch.randn(B, L, V, generator=g) * 3
    student = 0.5 * teacher + torch.randn(B, L, V, generator=g) * 2  # top-1 agrees at some positions only
    mask = (torch.rand(B, L, generator=g) < 0.7).long()
    mask[0, 0] = 1
    expected_value, expected_grad = _token_loop_reference(student, teacher, mask, beta, temperature)
    s = student.clone().requires_grad_(True)
    loss = dpkd_token_loss(s, teacher, mask, beta=beta, temperature=temperature)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    agree = (teacher.argmax(-1) == student.argmax(-1))[mask != 0]
    assert agree.any() and not agree.all(), "test data should mix agreeing and disagreeing positions"


def test_token_terms_rows_equal_batched_and_sign():
    g = torch.Generator().manual_seed(11)
    teacher = torch.randn(2, 7, 33, generator=g) * 2
    student = torch.randn(2, 7, 33, generator=g) * 2
    aux: dict = {}
    batched = dpkd_token_terms(student, teacher, beta=0.3, temperature=1.5, aux=aux)
    rows = dpkd_token_terms(student.reshape(14, 33), teacher.reshape(14, 33), beta=0.3, temperature=1.5)
    assert batched.shape == (2, 7) and rows.shape == (14,) and batched.dtype == torch.float32
    torch.testing.assert_close(rows, batched.reshape(14), rtol=0, atol=0)
    # h ≤ 0 by construction, hence ℓ ≥ log 2; equality exactly where the top-1 tokens coincide
    assert torch.all(aux["dpkd_margin"] <= 0)
    assert torch.all(batched >= LOG2 - 1e-7)
    same = teacher.argmax(-1) == student.argmax(-1)
    torch.testing.assert_close(aux["dpkd_top1_agreement"], same.float())
    assert torch.all(aux["dpkd_margin"][same] == 0) and torch.all(aux["dpkd_margin"][~same] < 0)


def test_token_grad_touches_only_the_two_argmax_tokens():
    g = torch.Generator().manual_seed(12)
    teacher = torch.randn(4, 50, generator=g)
    student = torch.randn(4, 50, generator=g).requires_grad_(True)
    dpkd_token_terms(student, teacher).sum().backward()
    a, b = teacher.argmax(-1), student.detach().argmax(-1)
    for row in range(4):
        nonzero = set(student.grad[row].nonzero().squeeze(-1).tolist())
        assert nonzero == ({a[row].item(), b[row].item()} if a[row] != b[row] else set())
        assert student.grad[row, a[row]] <= 0  # descent raises the teacher's top-1 token


def test_token_identical_logits_give_zero_margin_and_log2():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 4, 20, generator=g) * 3
    student = logits.clone().requires_grad_(True)
    aux: dict = {}
    terms = dpkd_token_terms(student, logits, beta=0.7, aux=aux)
    assert torch.all(aux["dpkd_margin"] == 0)
    torch.testing.assert_close(terms, torch.full((2, 4), LOG2))
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]])
    loss = dpkd_token_loss(student, logits, mask, beta=0.7)
    torch.testing.assert_close(loss, torch.tensor(LOG2))
    loss.backward()
    assert torch.all(student.grad == 0)
    stats = dpkd_token_stats(student, logits, mask)
    assert stats.margin.item() == 0.0 and stats.top1_agreement.item() == 1.0


def test_token_argmax_ties_take_lowest_id():
    # teacher ties at ids 1 and 2 -> a = 1; student ties at ids 2 and 3 -> b = 2.
    # log-softmax cancels in differences: h = (s1 − s2) − (t1 − t2) = (2 − 5) − (3 − 3) = −3
    teacher = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    student = torch.tensor([[0.0, 2.0, 5.0, 5.0]])
    aux: dict = {}
    value = dpkd_token_terms(student, teacher, beta=0.1, aux=aux)
    torch.testing.assert_close(aux["dpkd_margin"], torch.tensor([-3.0]))
    torch.testing.assert_close(value, torch.tensor([math.log1p(math.exp(0.3))]))


def test_token_stats_hand_built():
    # three positions, V = 3; h = (s_a − s_b) − (t_a − t_b) in logits (the log-normalisers cancel)
    teacher = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]])
    student = torch.tensor([[[1.0, 3.0, 0.0], [0.0, 2.0, 0.0], [1.5, 0.0, 0.0]]])
    # pos 0: a=0, b=1: (1 − 3) − (4 − 0) = −6; pos 1: a=b=1: 0;
    # pos 2: a=2, b=0: (0 − 1.5) − (2 − 0) = −3.5
    stats = dpkd_token_stats(student, teacher, torch.ones(1, 3))
    torch.testing.assert_close(stats.margin, torch.tensor(-9.5 / 3))
    torch.testing.assert_close(stats.top1_agreement, torch.tensor(1 / 3))
    stats = dpkd_token_stats(student, teacher, torch.tensor([[1, 0, 1]]))
    torch.testing.assert_close(stats.margin, torch.tensor(-4.75))
    assert stats.as_dict() == {"dpkd/margin": -4.75, "dpkd/top1_agreement": 0.0}


def test_token_bfloat16_inputs():
    g = torch.Generator().manual_seed(14)
    teacher = (torch.randn(2, 5, 40, generator=g) * 2).bfloat16()
    student = (torch.randn(2, 5, 40, generator=g) * 2).bfloat16().requires_grad_(True)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    loss = dpkd_token_loss(student, teacher, mask, beta=0.5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()
    student32 = student.detach().float().requires_grad_(True)
    loss32 = dpkd_token_loss(student32, teacher.float(), mask, beta=0.5)
    loss32.backward()
    torch.testing.assert_close(loss, loss32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(student.grad.float(), student32.grad, rtol=1e-2, atol=1e-4)
    assert dpkd_token_terms(student, teacher).dtype == torch.float32


def test_token_masked_rows_may_hold_garbage():
    g = torch.Generator().manual_seed(15)
    teacher = torch.randn(2, 3, 10, generator=g)
    student = torch.randn(2, 3, 10, generator=g)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    clean = dpkd_token_loss(student, teacher, mask)
    student_dirty = student.clone()
    student_dirty[0, 1] = float("nan")
    student_dirty[1, 2] = float("inf")
    student_dirty.requires_grad_(True)
    dirty = dpkd_token_loss(student_dirty, teacher, mask)
    torch.testing.assert_close(dirty, clean)
    dirty.backward()
    assert torch.isfinite(student_dirty.grad).all()


def test_token_errors():
    s = torch.randn(2, 3, 8)
    t = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="mask"):
        dpkd_token_loss(s, t, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask"):
        dpkd_token_stats(s, t, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        dpkd_token_loss(s, t, torch.ones(2, 4))
    with pytest.raises(ValueError, match="same shape"):
        dpkd_token_loss(s, torch.randn(2, 3, 9), torch.ones(2, 3))
    with pytest.raises(ValueError, match="beta"):
        dpkd_token_loss(s, t, torch.ones(2, 3), beta=0.0)
    with pytest.raises(ValueError, match="temperature"):
        dpkd_token_terms(s, t, temperature=-1.0)


# ------------------------------------------------------------------------------------------- sequence form


def _random_pairs(g, B=3, Lc=6, Lr=4, dtype=torch.float32):
    student_c = torch.randn(B, Lc, generator=g, dtype=dtype) - 2
    teacher_c = torch.randn(B, Lc, generator=g, dtype=dtype) - 2
    student_r = torch.randn(B, Lr, generator=g, dtype=dtype) - 2
    teacher_r = torch.randn(B, Lr, generator=g, dtype=dtype) - 2
    mask_c = (torch.rand(B, Lc, generator=g) < 0.7).long()
    mask_r = (torch.rand(B, Lr, generator=g) < 0.7).long()
    mask_c[:, 0] = 1
    mask_r[:, 0] = 1
    return student_c, teacher_c, student_r, teacher_r, mask_c, mask_r


def test_sequence_loss_matches_explicit_formula():
    g = torch.Generator().manual_seed(20)
    sc, tc, sr, tr, mc, mr = _random_pairs(g)
    beta = 0.3
    expected = 0.0
    for b in range(sc.shape[0]):
        rc = [sc[b, i].item() - tc[b, i].item() for i in range(sc.shape[1]) if mc[b, i]]
        rr = [sr[b, i].item() - tr[b, i].item() for i in range(sr.shape[1]) if mr[b, i]]
        x = beta * (sum(rc) / len(rc) - sum(rr) / len(rr))
        expected += math.log1p(math.exp(-x)) / sc.shape[0]
    got = dpkd_sequence_loss(sc, tc, sr, tr, mc, mr, beta=beta)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_sequence_identical_responses_zero_grad_and_log2():
    g = torch.Generator().manual_seed(21)
    sc, tc, _, _, mc, _ = _random_pairs(g, B=4, Lc=7)
    beta = 0.5
    # one student tensor used as both responses: the two contributions cancel exactly
    student = sc.clone().requires_grad_(True)
    loss = dpkd_sequence_loss(student, tc, student, tc, mc, mc, beta=beta)
    torch.testing.assert_close(loss, torch.tensor(LOG2))
    loss.backward()
    assert torch.all(student.grad == 0)
    # as separate inputs: each gets ∓β·σ(0)/B·mask/|y|, exact negatives of each other
    chosen = sc.clone().requires_grad_(True)
    rejected = sc.clone().requires_grad_(True)
    loss = dpkd_sequence_loss(chosen, tc, rejected, tc, mc, mc, beta=beta)
    torch.testing.assert_close(loss, torch.tensor(LOG2))
    loss.backward()
    expected = -beta * 0.5 / 4 * mc.float() / mc.sum(-1, keepdim=True).float()
    torch.testing.assert_close(chosen.grad, expected)
    assert torch.equal(rejected.grad, -chosen.grad)
    stats = dpkd_sequence_stats(chosen, tc, rejected, tc, mc, mc, beta=beta)
    assert stats.margin.item() == 0.0 and stats.accuracy.item() == 0.0  # a tie is not a win


def test_sequence_teacher_detached_and_padding_garbage():
    g = torch.Generator().manual_seed(22)
    sc, tc, sr, tr, mc, mr = _random_pairs(g)
    teacher_c = tc.clone().requires_grad_(True)
    loss = dpkd_sequence_loss(sc.requires_grad_(True), teacher_c, sr, tr, mc, mr)
    loss.backward()
    assert teacher_c.grad is None and sc.grad is not None
    # −inf / NaN in padded positions change nothing (where, not a product with the mask)
    sc2, sr2 = sc.detach().clone(), sr.detach().clone()
    sc2[mc == 0] = float("-inf")
    sr2[mr == 0] = float("nan")
    sc2.requires_grad_(True)
    loss2 = dpkd_sequence_loss(sc2, tc, sr2, tr, mc, mr)
    torch.testing.assert_close(loss2, loss.detach())
    loss2.backward()
    assert torch.isfinite(sc2.grad).all() and torch.all(sc2.grad[mc == 0] == 0)


def test_sequence_loss_gradcheck():
    g = torch.Generator().manual_seed(23)
    sc, tc, sr, tr, mc, mr = _random_pairs(g, dtype=torch.float64)
    sc.requires_grad_(True)
    sr.requires_grad_(True)
    assert dpkd_sequence_loss(sc, tc, sr, tr, mc, mr).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda c, r: dpkd_sequence_loss(c, tc, r, tr, mc, mr, beta=0.7), (sc, sr))


def test_sequence_stats_hand_built():
    beta = 0.5
    # log-ratio per token = student − teacher; teacher 0 so the ratios are the student values
    student_c = torch.tensor([[1.0, 3.0, 9.0], [0.5, 0.5, 0.5], [-1.0, 0.0, 0.0]])
    student_r = torch.tensor([[0.0, 0.0], [0.5, 7.0], [1.0, -3.0]])
    mask_c = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    mask_r = torch.tensor([[1, 1], [1, 0], [1, 1]])
    zeros_c, zeros_r = torch.zeros(3, 3), torch.zeros(3, 2)
    # r(y_t) = [2, 0.5, −1], r(y_s) = [0, 0.5, −1]: a win, a tie, a tie
    stats = dpkd_sequence_stats(student_c, zeros_c, student_r, zeros_r, mask_c, mask_r, beta=beta)
    assert stats.as_dict() == pytest.approx({
        "rewards/chosen": beta * (2 + 0.5 - 1) / 3,
        "rewards/rejected": beta * (0 + 0.5 - 1) / 3,
        "rewards/margins": beta * 2 / 3,
        "rewards/accuracies": 1 / 3,
    })
    loss = dpkd_sequence_loss(student_c, zeros_c, student_r, zeros_r, mask_c, mask_r, beta=beta)
    torch.testing.assert_close(loss, torch.tensor((math.log1p(math.exp(-1.0)) + 2 * LOG2) / 3))


def test_sequence_empty_mask_errors_name_argument_and_row():
    g = torch.Generator().manual_seed(24)
    sc, tc, sr, tr, mc, mr = _random_pairs(g)
    bad_c = mc.clone()
    bad_c[1] = 0
    with pytest.raises(ValueError, match=r"mask_chosen .*row\(s\) \[1\]"):
        dpkd_sequence_loss(sc, tc, sr, tr, bad_c, mr)
    bad_r = mr.clone()
    bad_r[0] = 0
    bad_r[2] = 0
    with pytest.raises(ValueError, match=r"mask_rejected .*row\(s\) \[0, 2\]"):
        dpkd_sequence_loss(sc, tc, sr, tr, mc, bad_r)
    with pytest.raises(ValueError, match="mask_rejected"):
        dpkd_sequence_stats(sc, tc, sr, tr, mc, bad_r)
    with pytest.raises(ValueError, match="same shape"):
        dpkd_sequence_loss(sc, tc[:, :-1], sr, tr, mc, mr)
    with pytest.raises(ValueError, match="pairs"):
        dpkd_sequence_loss(sc, tc, sr[:2], tr[:2], mc, mr[:2])
    with pytest.raises(ValueError, match="beta"):
        dpkd_sequence_loss(sc, tc, sr, tr, mc, mr, beta=-0.1)


def test_sequence_bfloat16_inputs():
    g = torch.Generator().manual_seed(25)
    sc, tc, sr, tr, mc, mr = _random_pairs(g)
    bf = [x.bfloat16() for x in (sc, tc, sr, tr)]
    chosen = bf[0].clone().requires_grad_(True)
    loss = dpkd_sequence_loss(chosen, bf[1], bf[2], bf[3], mc, mr)
    assert loss.dtype == torch.float32
    loss.backward()
    assert chosen.grad.dtype == torch.bfloat16
    upcast = dpkd_sequence_loss(*[x.float() for x in bf], mc, mr)
    torch.testing.assert_close(loss, upcast, rtol=1e-6, atol=1e-7)
    # and close to the loss of the unrounded float32 inputs
    torch.testing.assert_close(loss, dpkd_sequence_loss(sc, tc, sr, tr, mc, mr), rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------- sequence_logps


def test_sequence_logps_matches_gather_loop():
    g = torch.Generator().manual_seed(30)
    B, L, V = 3, 6, 11
    logits = torch.randn(B, L, V, generator=g) * 3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    labels[2, :] = -100  # nothing to score
    total, count = sequence_logps(logits, labels)
    assert total.dtype == torch.float32 and count.dtype == torch.int64 and total.shape == (B,)
    for b in range(B):
        expected, n = 0.0, 0
        for i in range(L):
            label = labels[b, i].item()
            if label == -100:
                continue
            row = logits[b, i].double().tolist()
            expected += row[label] - math.log(sum(math.exp(x) for x in row))
            n += 1
        assert count[b].item() == n
        assert total[b].item() == pytest.approx(expected, rel=1e-6, abs=1e-5)
    assert count.tolist() == [4, 4, 0] and total[2].item() == 0.0
    # another ignore index; bfloat16 logits give float32 sums close to the upcast logits' sums
    other = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    torch.testing.assert_close(sequence_logps(logits, other, ignore_index=-1)[0], total)
    bf_total, _ = sequence_logps(logits.bfloat16(), labels)
    assert bf_total.dtype == torch.float32
    torch.testing.assert_close(bf_total, sequence_logps(logits.bfloat16().float(), labels)[0])
    with pytest.raises(ValueError, match="labels shape"):
        sequence_logps(logits, labels[:, :-1])


def test_sequence_logps_feed_the_sequence_loss():
    """Per-token log-probs for the loss are −token_nll; their masked mean is sequence_logps' sum / count."""
    from kdlm.losses.divergences import token_nll

    g = torch.Generator().manual_seed(31)
    logits = torch.randn(2, 5, 9, generator=g)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[0, 3:] = -100
    total, count = sequence_logps(logits, labels)
    token_logp = -token_nll(logits, labels)
    mask = labels != -100
    # r(y) with a zero teacher is the student's mean log-prob; the loss of (y, y') is −log σ(β·(r − r'))
    zeros = torch.zeros_like(token_logp)
    loss = dpkd_sequence_loss(token_logp, zeros, token_logp.flip(0), zeros, mask, mask.flip(0), beta=1.0)
    mean = total / count
    diff = mean - mean.flip(0)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(diff).mean())


def test_lm_data_without_a_two_token_text_is_a_data_error(tmp_path):
    """Every text of one character is one token with the character tokenizer: nothing for the LM term to predict."""
    from conftest import make_tokenizer

    from kdlm.errors import DataError
    from kdlm.train.objectives.dpkd import PlainTextBatches

    path = tmp_path / "lm.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"lm\.jsonl: no text of at least two tokens"):
        PlainTextBatches(str(path), make_tokenizer(), max_length=16, batch_size=2, seed=0)

"""Cross-tokenizer losses (kdlm.losses.cross_tokenizer): hand computations and the identical-tokenizer identity."""

from __future__ import annotations

import math

import pytest
import torch

from kdlm import losses
from kdlm.data.align import shared_vocabulary
from kdlm.losses.cross_tokenizer import (
    Head,
    VocabMap,
    binary_chunk_divergence,
    cross_tokenizer_terms,
    hybrid_divergence,
    sorted_l1,
    uld_distance,
)
from xtok_util import TRAIN_TEXTS, byte_level, metaspace


def test_uld_against_a_hand_computation():
    # teacher p = (0.5, 0.3, 0.2) over 3 tokens, student q = (0.1, 0.6, 0.2, 0.1) over 4.
    # sorted: p = .5 .3 .2 0 (padded), q = .6 .2 .1 .1 -> |-.1| + |.1| + |.1| + |-.1| = 0.4
    teacher = torch.tensor([[0.5, 0.3, 0.2]]).log()
    student = torch.tensor([[0.1, 0.6, 0.2, 0.1]]).log().requires_grad_()
    value = uld_distance(student, teacher)
    assert value.item() == pytest.approx(0.4, abs=1e-6)
    # d/dq_j of Σ|p_(i) − q_(i)| is sign(q_(i) − p_(i)) at q_j's rank: q=.6 -> +1, .2 -> -1, .1 (ranks 3, 4) -> -1, +1.
    # Through the softmax, dL/dz_j = q_j (s_j − Σ_k q_k s_k); the two 0.1 entries tie, and either order gives the
    # same Σ_k q_k s_k = .6 − .2 − .1 + .1 = .4; check the entries that do not tie.
    value.sum().backward()
    assert student.grad[0, 1].item() == pytest.approx(0.6 * (1 - 0.4), abs=1e-6)
    assert student.grad[0, 2].item() == pytest.approx(0.2 * (-1 - 0.4), abs=1e-6)


def test_sorted_l1_pads_the_shorter_vector():
    assert sorted_l1(torch.tensor([0.1, 0.7]), torch.tensor([0.2, 0.5, 0.3])).item() == pytest.approx(
        abs(0.7 - 0.5) + abs(0.1 - 0.3) + abs(0 - 0.2))


def test_hybrid_against_a_hand_computation():
    # student ids: 0 'a', 1 'b', 2 'x'; teacher ids: 0 'b', 1 'a', 2 'y', 3 'z'. Shared: a (0 <-> 1), b (1 <-> 0).
    vocab_map = VocabMap.from_pairs([(0, 1), (1, 0)], student_vocab=3, teacher_vocab=4)
    teacher = torch.tensor([[0.2, 0.5, 0.2, 0.1]]).log()  # b .2, a .5, y .2, z .1
    student = torch.tensor([[0.4, 0.4, 0.2]]).log()  # a .4, b .4, x .2
    # Collapsed (a, b, rest): teacher (.5, .2, .3), student (.4, .4, .2); ULD on the rest: (.2, .1) vs (.2) -> 0.1.
    kl = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.4) + 0.3 * math.log(0.3 / 0.2)
    got = hybrid_divergence(student, teacher, vocab_map=vocab_map, uld_weight=2.0)
    assert got.item() == pytest.approx(kl + 2.0 * 0.1, abs=1e-6)
    rkl = 0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.2) + 0.2 * math.log(0.2 / 0.3)
    got = hybrid_divergence(student, teacher, vocab_map=vocab_map, base="rkl", uld_weight=0.0)
    assert got.item() == pytest.approx(rkl, abs=1e-6)


def test_binary_chunk_divergence_against_a_hand_computation():
    teacher, student = torch.tensor([0.3]).log(), torch.tensor([0.6]).log()
    expected = 0.3 * math.log(0.3 / 0.6) + 0.7 * math.log(0.7 / 0.4)
    assert binary_chunk_divergence(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    # A certain teacher (P_T = 1) and student stay finite.
    value = binary_chunk_divergence(torch.tensor([0.0]), torch.tensor([0.0]))
    assert torch.isfinite(value).all() and value.item() == pytest.approx(0.0, abs=1e-5)


def test_shared_vocabulary_of_identical_tokenizers_is_the_identity():
    tok = byte_level(train_texts=TRAIN_TEXTS)
    vocab = len(tok)
    vocab_map = VocabMap.from_pairs(shared_vocabulary(tok, tok, vocab, vocab), vocab, vocab)
    assert vocab_map.identity and vocab_map.student_rest.numel() == 0


def test_shared_vocabulary_across_families():
    student, teacher = byte_level(train_texts=TRAIN_TEXTS, vocab_size=300), metaspace(train_texts=TRAIN_TEXTS, vocab_size=420)
    pairs = dict(shared_vocabulary(student, teacher, len(student), len(teacher)))
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    assert pairs[student.eos_token_id] == teacher.eos_token_id
    assert pairs[s_vocab["a"]] == t_vocab["a"]
    assert pairs[s_vocab["Ġ"]] == t_vocab["▁"]  # both a single space
    if "Ġthe" in s_vocab and "▁the" in t_vocab:
        assert pairs[s_vocab["Ġthe"]] == t_vocab["▁the"]
    assert s_vocab["<|user|>"] in pairs  # same special token name in both


def _heads(seed: int, n: int, h: int, vocab: int, teacher_vocab: int, n_teacher: int):
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    s_weight = (0.5 * torch.randn(vocab, h, generator=g)).requires_grad_()
    t_hidden = torch.randn(n_teacher, h + 3, generator=g)
    t_weight = 0.5 * torch.randn(teacher_vocab, h + 3, generator=g)
    return s_hidden, s_weight, t_hidden, t_weight


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_align_with_identical_vocabularies_is_token_level_kd(divergence):
    """Every row paired with its own teacher row, identity map: value and gradients equal kdlm's own fused KD."""
    n, vocab = 11, 37
    s_hidden, s_weight, t_hidden, t_weight = _heads(0, n, 8, vocab, vocab, n)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))
    vocab_map = VocabMap.from_pairs([(i, i) for i in range(vocab)], vocab, vocab)
    got = cross_tokenizer_terms(s_hidden, Head(s_weight), t_hidden, Head(t_weight), torch.arange(n), labels,
                                method="align", vocab_map=vocab_map, divergence=divergence, kd_ratio=0.3, chunk_size=4)
    grads = torch.autograd.grad(got.loss_sum, [s_hidden, s_weight])
    ref = losses.fused_kd_terms(s_hidden, s_weight, t_hidden, t_weight, torch.ones(n, dtype=torch.bool),
                                divergence=divergence, labels=labels, kd_ratio=0.3, chunk_size=4)
    ref_grads = torch.autograd.grad(ref.loss_sum, [s_hidden, s_weight])
    assert torch.equal(got.loss_sum, ref.loss_sum) and torch.equal(got.divergence_sum, ref.divergence_sum)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    # And the plain (materialised) path, up to float32 rounding of a different summation order.
    dense = losses.kd_terms(s_hidden @ s_weight.T, t_hidden @ t_weight.T, torch.ones(n, dtype=torch.bool),
                            labels=labels, divergence=divergence, kd_ratio=0.3)
    dense_grads = torch.autograd.grad(dense.loss_sum, [s_hidden, s_weight])
    torch.testing.assert_close(got.loss_sum, dense.loss_sum, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _reference(s_hidden, s_weight, t_hidden, t_weight, pairs, labels, s_seg, t_seg, t_targets, vocab_map, kd_ratio):
    """The align loss from materialised logits, written out directly (no chunking, no fused path)."""
    s_logp = torch.log_softmax(s_hidden @ s_weight.T, -1)
    t_logp = torch.log_softmax(t_hidden @ t_weight.T, -1)
    ce = -s_logp.gather(-1, labels[:, None]).sum()
    dist = 0.0
    for row, t_row in enumerate(pairs.tolist()):
        if t_row < 0:
            continue
        p, q = t_logp[t_row].exp(), s_logp[row].exp()
        p_c = torch.cat([p[vocab_map.teacher_ids], p[vocab_map.teacher_rest].sum()[None]])
        q_c = torch.cat([q[vocab_map.student_ids], q[vocab_map.student_rest].sum()[None]])
        dist = dist + (p_c * (p_c.log() - q_c.log())).sum()
        p_r = p[vocab_map.teacher_rest].sort(descending=True).values
        q_r = torch.nn.functional.pad(q[vocab_map.student_rest].sort(descending=True).values, (0, len(p_r) - len(vocab_map.student_rest)))
        dist = dist + (p_r - q_r).abs().sum()
    seg = 0.0
    for k in range(int(s_seg.max()) + 1):
        ls = s_logp[s_seg == k].gather(-1, labels[s_seg == k][:, None]).sum()
        lt = t_logp[t_seg == k].gather(-1, t_targets[t_seg == k][:, None]).sum()
        ps, pt = ls.exp(), lt.exp()
        seg = seg + pt * (lt - ls) + (1 - pt) * (torch.log1p(-pt) - torch.log1p(-ps))
    return (1 - kd_ratio) * ce + kd_ratio * (dist + seg)


def test_align_against_a_direct_reference_with_segments_and_chunks():
    n, n_t, vocab, t_vocab = 9, 12, 23, 31
    s_hidden, s_weight, t_hidden, t_weight = _heads(3, n, 8, vocab, t_vocab, n_t)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, vocab, (n,), generator=g)
    t_targets = torch.randint(0, t_vocab, (n_t,), generator=g)
    pairs_list = [(i, (i * 5) % t_vocab) for i in range(0, vocab, 2)]  # 12 shared tokens, scrambled ids
    vocab_map = VocabMap.from_pairs(pairs_list, vocab, t_vocab)
    # Student rows 0..8; segments: rows (2, 3) <-> teacher rows (3,); row 5 <-> teacher rows (6, 7, 8); others 1:1.
    pairs = torch.tensor([0, 1, 3, -1, 4, 6, 9, 10, 11])
    s_seg = torch.tensor([-1, -1, 0, 0, -1, 1, -1, -1, -1])
    t_seg = torch.tensor([-1, -1, -1, 0, -1, -1, 1, 1, 1, -1, -1, -1])
    expected = _reference(s_hidden, s_weight, t_hidden, t_weight, pairs, labels, s_seg, t_seg, t_targets, vocab_map, 0.4)
    expected_grads = torch.autograd.grad(expected, [s_hidden, s_weight])
    for chunk in (None, 2):
        got = cross_tokenizer_terms(s_hidden, Head(s_weight), t_hidden, Head(t_weight), pairs, labels, method="align",
                                    vocab_map=vocab_map, kd_ratio=0.4, student_segments=s_seg, teacher_segments=t_seg,
                                    teacher_targets=t_targets, chunk_size=chunk)
        torch.testing.assert_close(got.loss_sum, expected, rtol=1e-5, atol=1e-5)
        assert got.count.item() == 8 and got.aux["xtok_segments"].item() == 2
        for a, b in zip(torch.autograd.grad(got.loss_sum, [s_hidden, s_weight]), expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_uld_method_sums_the_distance_at_paired_rows():
    n, vocab, t_vocab = 5, 13, 29
    s_hidden, s_weight, t_hidden, t_weight = _heads(5, n, 6, vocab, t_vocab, 7)
    labels = torch.arange(n)
    pairs = torch.tensor([2, -1, 0, 6, -1])
    got = cross_tokenizer_terms(s_hidden, Head(s_weight), t_hidden, Head(t_weight), pairs, labels, method="uld",
                                kd_ratio=1.0, chunk_size=2)
    rows = pairs >= 0
    expected = uld_distance(s_hidden[rows] @ s_weight.T, t_hidden[pairs[rows]] @ t_weight.T).sum()
    torch.testing.assert_close(got.loss_sum, expected, rtol=1e-5, atol=1e-6)
    assert got.count.item() == 3

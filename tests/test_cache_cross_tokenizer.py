"""The teacher cache across tokenizers: the teacher's top-k on its own tokens + its own-token log-probs, read by
objective.cross_tokenizer instead of running the teacher (kdlm.cache, kdlm.losses.cross_tokenizer)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlm.cache import build_cache
from kdlm.errors import CacheError
from kdlm.losses import sparse
from kdlm.losses.cross_tokenizer import VocabMap, hybrid_divergence, hybrid_topk, uld_distance, uld_topk
from kdlm.train.loop import distill
from test_cross_tokenizer_train import _cross_config, cross_setup, toks  # noqa: F401 (fixtures)

# student ids: 0 'a', 1 'b', 2 'x'; teacher ids: 0 'b', 1 'a', 2 'y', 3 'z'. Shared: a (0 <-> 1), b (1 <-> 0).
HAND_MAP = VocabMap.from_pairs([(0, 1), (1, 0)], student_vocab=3, teacher_vocab=4)
STUDENT = torch.tensor([[0.4, 0.4, 0.2]]).log()  # a .4, b .4, x .2


def _payload(teacher_probs: torch.Tensor, k: int) -> torch.Tensor:
    return sparse.pack_payload(*sparse.topk_signal(teacher_probs.log(), k))


def _hybrid(teacher_probs, k, **kw):
    return hybrid_topk(STUDENT, _payload(teacher_probs, k), vocab_map=HAND_MAP, teacher_vocab=4,
                       teacher_to_student=HAND_MAP.teacher_to_student(4), **kw).item()


def test_hybrid_from_the_top_k_by_hand():
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    # Teacher b .25, a .45, y .2, z .1. k = 2 stores a, b (both shared): the divergence part is the live one,
    # (a .45, b .25, rest .3) vs (a .4, b .4, rest .2). No unshared token is stored; y and z are the 2 of the 2
    # tokens outside the top-2, so the unshared tail mass is all of r = .3: ULD part |.3 − x .2| = .1 (live: .1).
    teacher = torch.tensor([[0.25, 0.45, 0.2, 0.1]])
    assert _hybrid(teacher, 2, uld_weight=2.0) == pytest.approx(kl([.45, .25, .3], [.4, .4, .2]) + 2.0 * 0.1, abs=1e-6)
    # k = 3 also stores y .2 (the largest unshared), z gets r = .1: |.2 − .2| + |.1 − 0| = .1; the live hybrid.
    assert _hybrid(teacher, 3, uld_weight=2.0) == pytest.approx(kl([.45, .25, .3], [.4, .4, .2]) + 2.0 * 0.1, abs=1e-6)
    live = hybrid_divergence(STUDENT, teacher.log(), vocab_map=HAND_MAP, uld_weight=2.0).item()
    assert _hybrid(teacher, 3, uld_weight=2.0) == pytest.approx(live, abs=1e-6)
    # Teacher a .5, y .3, b .15, z .05, k = 2 stores a and y: the shared b falls into the bucket on both sides,
    # (a .5, rest .5) vs (a .4, rest .6). ULD: y .3 stored; z is 1 of the 2 tokens outside the top-2 and gets half
    # of r = .2: |.3 − .2| + |.1 − 0| = .2.
    teacher = torch.tensor([[0.15, 0.5, 0.3, 0.05]])
    assert _hybrid(teacher, 2, uld_weight=1.0) == pytest.approx(kl([.5, .5], [.4, .6]) + 0.2, abs=1e-6)
    # The coarser partition never exceeds the live divergence (data processing inequality).
    assert _hybrid(teacher, 2, uld_weight=0.0) <= hybrid_divergence(STUDENT, teacher.log(), vocab_map=HAND_MAP,
                                                                    uld_weight=0.0).item() + 1e-7


def test_uld_from_the_top_k_by_hand():
    # Teacher (.5, .3, .1, .06, .04), k = 2: (.5, .3) known, tail r = .2; student sorted (.6, .2, .18, .01, .01):
    # |.5 − .6| + |.3 − .2| + |.2 − (.18 + .01 + .01)| = .2. Live: .1 + .1 + .08 + .05 + .03 = .36 (above: a lower bound).
    teacher, student = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]), torch.tensor([[0.01, 0.6, 0.18, 0.2, 0.01]]).log()
    assert uld_topk(student, _payload(teacher, 2)).item() == pytest.approx(0.2, abs=1e-6)
    assert uld_distance(student, teacher.log()).item() == pytest.approx(0.36, abs=1e-6)


def _random_map(student_vocab: int, teacher_vocab: int, shared: int, seed: int) -> VocabMap:
    g = torch.Generator().manual_seed(seed)
    s_ids = torch.randperm(student_vocab, generator=g)[:shared].tolist()
    t_ids = torch.randperm(teacher_vocab, generator=g)[:shared].tolist()
    return VocabMap.from_pairs(list(zip(s_ids, t_ids)), student_vocab, teacher_vocab)


@pytest.mark.parametrize("base", ["fkl", "rkl", "jsd", "tvd"])
def test_full_vocabulary_top_k_equals_the_live_teacher(base):
    """k = V_T: ULD and the hybrid from the stored signal equal the live functions, value and gradient."""
    torch.manual_seed(0)
    n, v_s, v_t, tau = 7, 23, 31, 1.7
    vocab_map = _random_map(v_s, v_t, 15, seed=1)
    student = (2 * torch.randn(n, v_s)).requires_grad_()
    teacher = 3 * torch.randn(n, v_t)
    payload = sparse.dense_payload(torch.log_softmax(teacher / tau, -1))
    pairs = [
        (hybrid_divergence(student, teacher, temperature=tau, vocab_map=vocab_map, base=base, uld_weight=0.7),
         hybrid_topk(student, payload, temperature=tau, vocab_map=vocab_map, base=base, uld_weight=0.7,
                     teacher_to_student=vocab_map.teacher_to_student(v_t), teacher_vocab=v_t)),
        (uld_distance(student, teacher, temperature=tau), uld_topk(student, payload, temperature=tau)),
    ]
    for live, cached in pairs:
        torch.testing.assert_close(cached, live, atol=2e-6, rtol=1e-5)
        g_live, = torch.autograd.grad(live.sum(), student)
        g_cached, = torch.autograd.grad(cached.sum(), student)
        torch.testing.assert_close(g_cached, g_live, atol=2e-6, rtol=1e-5)


def test_uld_from_a_small_top_k_is_a_lower_bound_within_twice_the_tail_mass():
    """k < V_T: |ULD_cached − ULD| ≤ 2 min(r, the student's mass after rank k) ≤ 2r, and ULD_cached ≤ ULD."""
    torch.manual_seed(2)
    student, teacher = torch.randn(64, 40), 2 * torch.randn(64, 50)
    logp = torch.log_softmax(teacher, -1)
    q_sorted = torch.softmax(student, -1).sort(-1, descending=True).values
    for k in (1, 4, 16):
        ids, values, tail = sparse.topk_signal(logp, k)
        cached = uld_topk(student, sparse.pack_payload(ids, values, tail))
        live = uld_distance(student, teacher)
        assert (cached <= live + 1e-6).all()
        assert (live - cached <= 2 * torch.minimum(tail.exp(), q_sorted[:, k:].sum(-1)) + 1e-6).all()
        assert (live - cached).max() > 1e-3  # an approximation indeed (the bound is not vacuous)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["align", "uld"])
def test_training_from_a_full_cross_tokenizer_cache_equals_the_live_teacher(cross_setup, tmp_path, method):  # noqa: F811
    """k = the teacher's vocabulary in float32: every step's loss terms and the final weights equal the live run."""
    from transformers import AutoTokenizer

    teacher_vocab = max(AutoTokenizer.from_pretrained(str(cross_setup["teacher"])).get_vocab().values()) + 1
    common = {"objective.cross_tokenizer": method, "train.max_steps": 6, "train.log_every": 1, "train.lr": 1e-2,
              **({"objective.kd_ratio": 0.5} if method == "uld" else {})}
    cached = _cross_config(cross_setup, tmp_path / "cached", **common, **{
        "cache.dir": str(tmp_path / "tcache"), "cache.k": teacher_vocab, "cache.dtype": "float32", "cache.shard_size": 8})
    manifest = build_cache(cached)
    assert manifest["identity"]["cross_tokenizer"] is True and manifest["identity"]["vocab_size"] == teacher_vocab
    distill(cached)
    live = _cross_config(cross_setup, tmp_path / "live", **common)
    distill(live)
    a, b = _rows(tmp_path / "cached" / "run"), _rows(tmp_path / "live" / "run")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        for key in ("loss", "kd", "ce", "xtok_segment"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    if method == "align":
        assert any(x["xtok_segment"] > 0 for x in a)  # the segment terms (own-token log-probs) took part
    wa = load_file(tmp_path / "cached" / "run" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "live" / "run" / "final" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


def test_a_cache_for_another_teacher_tokenizer_or_objective_is_refused(cross_setup, tmp_path):  # noqa: F811
    from xtok_util import metaspace

    from test_cross_tokenizer_train import TEXTS

    cache_dir = str(tmp_path / "tcache")
    cfg = _cross_config(cross_setup, tmp_path / "ok", **{"cache.dir": cache_dir, "cache.k": 8, "train.max_steps": 2})
    build_cache(cfg)
    distill(cfg)  # a small top-k (k < V_T, float16) trains: the approximate path end to end
    # The same teacher weights with another teacher tokenizer (same size, trained on other text).
    retokenized = tmp_path / "retokenized"
    shutil.copytree(cross_setup["teacher"], retokenized)
    metaspace(train_texts=[t.upper() for t in TEXTS], vocab_size=420).save_pretrained(retokenized)
    other = _cross_config(cross_setup, tmp_path / "x", **{"cache.dir": cache_dir, "cache.k": 8,
                                                          "teacher.name_or_path": str(retokenized)})
    with pytest.raises(CacheError, match=r"another tokenizer \(the teacher's"):
        distill(other)
    # A cache of one-tokenizer KD is not a cross-tokenizer cache, and the reverse.
    plain = _cross_config(cross_setup, tmp_path / "y", **{"cache.dir": cache_dir, "cache.k": 8,
                                                          "objective.cross_tokenizer": None})
    with pytest.raises(CacheError, match="objective.cross_tokenizer .*cache built with True, this run has None"):
        build_cache(plain)

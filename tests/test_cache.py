"""The offline teacher cache: sparse losses (tail bucket, sampled estimator), the on-disk format, and training."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from kdlm import losses
from kdlm.cache import TeacherCache, build_cache, example_key, id_dtype, shard_owner
from kdlm.config import ConfigError, save_resolved
from kdlm.errors import CacheError
from kdlm.losses import sparse
from kdlm.train.loop import distill

DIVERGENCES = ["fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "akl"]


# --------------------------------------------------------------------------------------------------
# Sparse losses.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
def test_k_equals_vocab_is_the_dense_loss(name):
    """With every token stored (k = V) the collapsed distributions are the full ones: value and gradient match."""
    torch.manual_seed(0)
    n, vocab, hidden, tau = 9, 40, 8, 2.0
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    teacher_logits = 3 * torch.randn(n, vocab)
    dense = losses.DIVERGENCES[name](h @ w.T, teacher_logits, temperature=tau)
    payload = sparse.dense_payload(torch.log_softmax(teacher_logits / tau, -1))
    value = sparse.sparse_divergence(h @ w.T, payload, temperature=tau, base=name)
    torch.testing.assert_close(value, dense, atol=2e-6, rtol=1e-5)
    g_dense = torch.autograd.grad(dense.sum(), (h, w))
    g_sparse = torch.autograd.grad(value.sum(), (h, w))
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    # The fused chunked path with a payload instead of a teacher output layer gives the same sums and gradients.
    fn = functools.partial(sparse.sparse_divergence, base=name, base_params={})
    labels = torch.randint(0, vocab, (n,))
    fused = losses.fused_kd_terms(h, w, payload, None, torch.ones(n, dtype=torch.bool), divergence=fn,
                                  temperature=tau, labels=labels, kd_ratio=0.3, chunk_size=4)
    reference = losses.kd_terms(h @ w.T, teacher_logits, torch.ones(n, dtype=torch.bool), labels=labels,
                                divergence=name, temperature=tau, kd_ratio=0.3)
    torch.testing.assert_close(fused.loss_sum, reference.loss_sum, atol=2e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(fused.loss_sum, (h, w)), torch.autograd.grad(reference.loss_sum, (h, w))):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_topk_tail_bucket_by_hand():
    """p = (.5, .3, .15, .05), k = 2: the teacher is (.5, .3, .2); the student's tail is the rest of its mass."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    ids, logp, tail = sparse.topk_signal(p.log(), 2)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(tail.exp(), torch.tensor([0.2]))
    payload = sparse.pack_payload(ids, logp, tail)
    fkl = sparse.sparse_divergence(q.log(), payload, base="fkl")
    expected = 0.5 * math.log(0.5 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.7)
    assert float(fkl) == pytest.approx(expected, rel=1e-5)
    rkl = sparse.sparse_divergence(q.log(), payload, base="rkl")
    expected = 0.1 * math.log(0.1 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.7 * math.log(0.7 / 0.2)
    assert float(rkl) == pytest.approx(expected, rel=1e-5)
    tvd = sparse.sparse_divergence(q.log(), payload, base="tvd")
    assert float(tvd) == pytest.approx(0.5 * (0.4 + 0.1 + 0.5), rel=1e-5)
    # The collapsed divergence never exceeds the dense one (data processing inequality).
    assert float(fkl) <= float(losses.fkl(q.log(), p.log())) + 1e-6


def _sampled_estimates(logp: torch.Tensor, samples: int, top: int, repeats: int, seed: int = 0) -> torch.Tensor:
    """p̂ [repeats, V] of one distribution, each from independent draws."""
    generator = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(repeats, samples, generator=generator, dtype=torch.float64)
    rows = logp.expand(repeats, -1)
    ids, counts, top_ids, top_logp, rest = sparse.sampled_signal(rows, samples, uniforms, top)
    all_ids, all_logp, tail = sparse.sampled_targets(ids, counts, top_ids, top_logp, rest)
    assert torch.isneginf(tail).all()
    estimate = torch.zeros(repeats, logp.shape[-1], dtype=torch.float64)
    estimate.scatter_add_(1, all_ids, all_logp.double().exp())  # empty slots add exp(-inf) = 0
    return estimate


@pytest.mark.parametrize("top", [0, 2])
def test_sampled_estimator_is_unbiased(top):
    """E[p̂] = p on a small vocabulary, within 4.5 standard errors derived from the binomial variance."""
    p = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.05, 0.02])
    samples, repeats = 12, 20000
    estimate = _sampled_estimates(p.log(), samples, top, repeats)
    torch.testing.assert_close(estimate.sum(-1), torch.ones(repeats, dtype=torch.float64))  # each p̂ sums to 1
    mean = estimate.mean(0)
    if top:
        exact = torch.zeros_like(p, dtype=torch.bool)
        exact[:top] = True
        rest = float(p[top:].sum())
        # p̂_i = rest·c_i/K with c_i ~ Binomial(K, p_i/rest): variance rest²·(p_i/rest)(1 − p_i/rest)/K.
        var = torch.where(exact, 0.0, rest**2 * (p / rest) * (1 - p / rest) / samples).double()
        torch.testing.assert_close(mean[:top], p[:top].double(), atol=1e-6, rtol=0)  # exact in every estimate
    else:
        var = (p * (1 - p) / samples).double()
    stderr = (var / repeats).sqrt()
    assert ((mean - p.double()).abs() <= 4.5 * stderr + 1e-6).all(), (mean, p)


def test_sampled_fkl_gradient_is_unbiased():
    """The gradient of FKL(p̂ ‖ q̃) with respect to the student logits is q − p̂; its mean is the dense gradient."""
    torch.manual_seed(3)
    vocab, samples, repeats = 10, 12, 6000
    teacher_logits = 2 * torch.randn(vocab)
    student_logits = torch.randn(vocab)
    logp = torch.log_softmax(teacher_logits, -1)
    generator = torch.Generator().manual_seed(1)
    uniforms = torch.rand(repeats, samples, generator=generator, dtype=torch.float64)
    ids, counts, top_ids, top_logp, rest = sparse.sampled_signal(logp.expand(repeats, -1), samples, uniforms, 0)
    payload = sparse.pack_payload(*sparse.sampled_targets(ids, counts, top_ids, top_logp, rest))
    z = student_logits.expand(repeats, -1).clone().requires_grad_(True)
    grad = torch.autograd.grad(sparse.sparse_divergence(z, payload, base="fkl").sum(), z)[0]
    dense_z = student_logits.clone().requires_grad_(True)
    dense_grad = torch.autograd.grad(losses.fkl(dense_z, teacher_logits), dense_z)[0]
    p = logp.exp()
    stderr = (p * (1 - p) / samples / repeats).sqrt()  # grad_i = q_i − p̂_i
    assert ((grad.mean(0) - dense_grad).abs() <= 4.5 * stderr + 1e-6).all()
    # A top-k cache with k < V is biased by construction (its gradient never sees the tail's shape).
    topk = sparse.pack_payload(*sparse.topk_signal(logp.unsqueeze(0), 2))
    z1 = student_logits.unsqueeze(0).clone().requires_grad_(True)
    biased = torch.autograd.grad(sparse.sparse_divergence(z1, topk, base="fkl").sum(), z1)[0][0]
    assert (biased - dense_grad).abs().max() > 10 * stderr.max()


def test_sampled_draws_only_tokens_with_mass():
    logp = torch.log(torch.tensor([[0.5, 0.0, 0.5, 0.0]])).expand(64, -1)
    uniforms = torch.rand(64, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids, counts, *_ = sparse.sampled_signal(logp, 12, uniforms, 0)
    assert set(ids[counts > 0].tolist()) <= {0, 2}
    assert (counts.sum(-1) == 12).all()


def test_shards_are_dealt_round_robin():
    """Shard i (the one-process layout) is written by process i mod world: any world size writes the same files."""
    assert [shard_owner(i, 2) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [shard_owner(i, 3) for i in range(4)] == [0, 1, 2, 0]
    assert [shard_owner(i, 1) for i in range(3)] == [0, 0, 0]


def test_id_dtype_is_the_smallest_that_fits():
    assert id_dtype(200) == torch.uint8
    assert id_dtype(49152) == torch.uint16
    assert id_dtype(65536) == torch.uint16
    assert id_dtype(65537) == torch.int32


# --------------------------------------------------------------------------------------------------
# The on-disk cache.
# --------------------------------------------------------------------------------------------------


def _cache_cfg(tiny, tmp_path, **overrides):
    base = {"cache.dir": str(tmp_path / "tcache"), "cache.shard_size": 8, "train.log_every": 1}
    base.update(overrides)
    return tiny_config(tiny, tmp_path, **base)


def _teacher_logp(tiny, cfg, items):
    """Reference: the teacher's log-probs at every response position, computed directly per example."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny["teacher"])).eval()
    out = []
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([item.input_ids])
            logits = teacher(ids).logits[0, :-1]
            mask = torch.tensor(item.labels[1:]) != -100
            out.append(torch.log_softmax(logits[mask].float() / cfg.objective.temperature, -1))
    return out


def _train_items(cfg):
    from kdlm.data import load_splits, tokenize_examples
    from kdlm.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.teacher.name_or_path)
    train, _, _ = load_splits(cfg.data, cfg.train.seed)
    items, _ = tokenize_examples(train, tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                 max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    return items


def test_topk_round_trip(tiny, tmp_path):
    cfg = _cache_cfg(tiny, tmp_path, **{"cache.k": 5, "cache.dtype": "float16", "objective.temperature": 1.5})
    manifest = build_cache(cfg)
    items = _train_items(cfg)
    assert manifest["examples"] == len(items) and len(manifest["shards"]) == math.ceil(len(items) / 8)
    assert manifest["identity"]["signal"] == {"mode": "topk", "k": 5, "dtype": "float16", "ids": "uint8"}
    cache = TeacherCache(cfg.cache.dir)
    for item, logp in zip(items, _teacher_logp(tiny, cfg, items)):
        payload = cache.example(example_key(item.input_ids, item.labels), logp.shape[0])
        ids, values, tail = sparse.unpack_payload(payload)
        ref_ids, ref_values, ref_tail = sparse.topk_signal(logp, 5)
        # Ids exact up to ties within float16 resolution; values to float16 rounding.
        torch.testing.assert_close(values, ref_values, atol=1e-2, rtol=1e-3)
        torch.testing.assert_close(torch.gather(logp, 1, ids), ref_values, atol=1e-2, rtol=1e-3)
        torch.testing.assert_close(tail, ref_tail, atol=1e-2, rtol=1e-3)
    # Bytes per token: 5 ids (uint8) + 5 float16 log-probs + a float16 tail = 18, plus the per-example index.
    assert 18 <= manifest["bytes_per_token"] < 18 + 60


def test_sampled_round_trip_is_seeded_per_example(tiny, tmp_path):
    cfg = _cache_cfg(tiny, tmp_path, **{"cache.mode": "sampled", "cache.samples": 6, "cache.top": 2})
    build_cache(cfg)
    items = _train_items(cfg)
    cache = TeacherCache(cfg.cache.dir)
    for item, logp in zip(items[:5], _teacher_logp(tiny, cfg, items[:5])):
        ids, values, tail = sparse.unpack_payload(cache.example(example_key(item.input_ids, item.labels), logp.shape[0]))
        assert torch.isneginf(tail).all()
        torch.testing.assert_close(torch.logsumexp(values, -1), torch.zeros(len(values)), atol=2e-3, rtol=0)
        top_ids = logp.topk(2, -1).indices
        assert torch.equal(ids[:, :2], top_ids)
        drawn = torch.where(torch.isfinite(values[:, 2:]), ids[:, 2:], -1)
        assert not (drawn.unsqueeze(-1) == top_ids.unsqueeze(1)).any()  # the draws come from the rest only
    # Another seed gives other draws; the same seed the same bytes (checked by the resume test).
    other = _cache_cfg(tiny, tmp_path / "other", **{"cache.mode": "sampled", "cache.samples": 6, "cache.top": 2,
                                                     "train.seed": 1})
    build_cache(other)
    a = (Path(cfg.cache.dir) / "shard-00000.safetensors").read_bytes()
    b = (Path(other.cache.dir) / "shard-00000.safetensors").read_bytes()
    assert a != b


@pytest.mark.parametrize("divergence", ["jsd", "akl"])
def test_training_from_a_full_cache_equals_the_live_teacher(tiny, tmp_path, divergence):
    """k = V in float32: every step's loss and the final weights equal training with the live teacher."""
    from safetensors.torch import load_file

    vocab = len(tiny["tokenizer"])
    cached = _cache_cfg(tiny, tmp_path / "cached", **{"cache.k": vocab, "cache.dtype": "float32",
                                                       "objective.divergence": divergence})
    build_cache(cached)
    distill(cached)
    live = tiny_config(tiny, tmp_path / "live", **{"train.log_every": 1, "objective.divergence": divergence})
    distill(live)
    read = lambda run: [json.loads(x) for x in (Path(run.train.output_dir) / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(read(cached), read(live)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4, abs=1e-6)
    wa = load_file(Path(cached.train.output_dir) / "final" / "model.safetensors")
    wb = load_file(Path(live.train.output_dir) / "final" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


def test_training_from_a_sampled_cache_lowers_heldout_kl(tiny, tmp_path):
    """Draws carry the teacher: held-out KL to a peaked teacher falls nearly as far as with the live dense teacher.

    (64 draws: on this 30-step toy run 12 draws get a third of the way, 255 draws within 0.01 nats of dense; the
    estimate is unbiased, its variance is what a short run pays for, measured in benchmarks/teacher_cache.py.)"""
    from transformers import AutoModelForCausalLM

    from conftest import save_model
    from kdlm.eval.teacher_forced import teacher_forced_metrics

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny["teacher"]))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a random tiny model is near-uniform; make its predictions peaked
    teacher_dir = save_model(tmp_path / "peaked", teacher, tiny["tokenizer"])
    cfg = _cache_cfg(tiny, tmp_path, **{"cache.mode": "sampled", "cache.samples": 64, "objective.kd_ratio": 1.0,
                                        "train.max_steps": 30, "train.lr": 1e-2, "teacher.name_or_path": str(teacher_dir),
                                        "student.init": "pretrained", "student.name_or_path": str(tiny["student"])})
    build_cache(cfg)
    distill(cfg)
    start = AutoModelForCausalLM.from_pretrained(str(tiny["student"])).eval()
    trained = AutoModelForCausalLM.from_pretrained(str(Path(cfg.train.output_dir) / "final")).eval()
    items = _train_items(tiny_config(tiny, tmp_path, **{"data.train": str(tiny["eval"])}))
    vocab = len(tiny["tokenizer"])
    kl = lambda model: teacher_forced_metrics(model, teacher.eval(), items, vocab_size=vocab, pad_id=0)["overall"]["kl"]  # noqa: E731
    live_cfg = tiny_config(tiny, tmp_path / "live", **{
        "objective.kd_ratio": 1.0, "train.max_steps": 30, "train.lr": 1e-2, "teacher.name_or_path": str(teacher_dir),
        "student.init": "pretrained", "student.name_or_path": str(tiny["student"])})
    distill(live_cfg)
    live = AutoModelForCausalLM.from_pretrained(str(Path(live_cfg.train.output_dir) / "final")).eval()
    before, sampled, dense = kl(start), kl(trained), kl(live)
    assert sampled < 0.75 * before
    assert sampled - dense < 0.5 * (before - dense)  # most of what the dense teacher teaches gets through


def test_kill_and_resume_writes_the_same_files(tiny, tmp_path):
    """SIGKILL after the first shard, rerun: the same bytes as one uninterrupted run (sampled, so seeds matter too)."""
    overrides = {"cache.mode": "sampled", "cache.samples": 8, "cache.shard_size": 8, "train.progress": False}
    one = _cache_cfg(tiny, tmp_path / "one", **overrides, **{"cache.dir": str(tmp_path / "one_cache")})
    build_cache(one)
    two = _cache_cfg(tiny, tmp_path / "two", **overrides, **{"cache.dir": str(tmp_path / "two_cache")})
    config = tmp_path / "two.yaml"
    save_resolved(two, config)
    command = [sys.executable, "-m", "kdlm", "cache-teacher", "--config", str(config)]
    env = {**os.environ, "KDLM_FAULT_KILL_AFTER_SHARDS": "2"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = Path(two.cache.dir)
    assert not (folder / "manifest.json").exists()
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    first_shard_time = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    with pytest.raises(CacheError, match="unfinished cache"):
        TeacherCache(folder)
    (folder / ".tmp-shard-00002.safetensors").write_bytes(b"half a shard")  # a write cut short
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns == first_shard_time  # not recomputed
    names = sorted(p.name for p in Path(one.cache.dir).iterdir())
    assert names == sorted(p.name for p in folder.iterdir())
    for name in names:
        assert (Path(one.cache.dir) / name).read_bytes() == (folder / name).read_bytes(), name
    assert "bytes per token" in done.stdout


def test_a_cache_for_another_run_is_refused(tiny, tmp_path):
    import shutil

    from conftest import make_tokenizer

    cfg = _cache_cfg(tiny, tmp_path, **{"cache.k": 4})
    build_cache(cfg)
    # The same weights with another tokenizer (same size, another end-of-sequence token).
    retokenized = tmp_path / "retokenized"
    shutil.copytree(tiny["teacher"], retokenized)
    other_tokenizer = make_tokenizer()
    other_tokenizer.eos_token = "<bos>"
    other_tokenizer.save_pretrained(retokenized)
    cases = [
        ({"teacher.name_or_path": str(retokenized)}, "another tokenizer"),
        ({"data.max_length": cfg.data.max_length + 1}, "data.max_length"),
        ({"objective.temperature": 2.0}, "objective.temperature"),
        ({"cache.k": 8}, "cache.k"),
        ({"data.system_prompt": "Be brief."}, "data.system_prompt"),
        ({"teacher.name_or_path": str(tiny["student"]), "student.init": "pretrained",
          "student.name_or_path": str(tiny["student"])}, "another teacher"),
    ]
    for index, (change, message) in enumerate(cases):  # one run dir each: a refused start still leaves config.yaml
        other = _cache_cfg(tiny, tmp_path / f"x{index}", **{"cache.k": 4, "cache.dir": cfg.cache.dir, **change})
        with pytest.raises(CacheError, match=message):
            distill(other)
        with pytest.raises(CacheError, match="another run"):  # and cache-teacher will not overwrite it
            build_cache(other)
    # Other data: the examples are not in the cache.
    changed = tmp_path / "changed.jsonl"
    changed.write_text(json.dumps({"prompt": "Something new?", "response": "Yes.", "domain": "alpha"}) + "\n")
    other = _cache_cfg(tiny, tmp_path / "y", **{"cache.k": 4, "cache.dir": cfg.cache.dir, "data.train": str(changed)})
    with pytest.raises(CacheError, match="not in the teacher cache"):
        distill(other)


def test_torn_missing_and_escaping_shards_are_refused(tiny, tmp_path):
    cfg = _cache_cfg(tiny, tmp_path, **{"cache.k": 4})
    build_cache(cfg)
    folder = Path(cfg.cache.dir)
    shard = folder / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=r"shard-00001.*bytes, the manifest says"):
        distill(cfg)
    with pytest.raises(CacheError, match="shard-00001"):
        build_cache(cfg)  # a finished cache is verified, not silently reused
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-00001.*missing"):
        TeacherCache(folder)
    shard.write_bytes(data)
    TeacherCache(folder)  # whole again
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for evil in ["../shard-00000.safetensors", "/etc/passwd", "shard-00000.safetensors/../../x"]:
        manifest["shards"][0]["file"] = evil
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(CacheError, match="shard name"):
            TeacherCache(folder)
    # A well-named shard that is a link out of the folder.
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(data)
    manifest["shards"][0]["file"] = "shard-00099.safetensors"
    manifest_path.write_text(json.dumps(manifest))
    (folder / "shard-00099.safetensors").symlink_to(outside)
    with pytest.raises(CacheError, match="outside the cache folder"):
        TeacherCache(folder)


def test_missing_cache_and_config_errors(tiny, tmp_path):
    cfg = _cache_cfg(tiny, tmp_path, **{"cache.dir": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match="cache.dir: .*nothing does not exist.*kdlm cache-teacher"):
        distill(cfg)  # checked before any model is loaded
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CacheError, match="manifest.json is missing.*kdlm cache-teacher"):
        distill(cfg)
    with pytest.raises(ConfigError, match="objective.name=kd"):
        _cache_cfg(tiny, tmp_path, **{"objective.name": "gkd"})
    with pytest.raises(ConfigError, match="rkl/akl"):
        _cache_cfg(tiny, tmp_path, **{"cache.mode": "sampled", "objective.divergence": "rkl"})
    with pytest.raises(ConfigError, match="data.mixing"):
        _cache_cfg(tiny, tmp_path, **{"data.mixing.strategy": "ddk"})
    with pytest.raises(ConfigError, match="cross_tokenizer with a teacher cache needs cache.mode=topk"):
        _cache_cfg(tiny, tmp_path, **{"cache.mode": "sampled", "objective.cross_tokenizer": "uld",
                                      "student.init": "pretrained", "student.name_or_path": str(tiny["student"])})


def test_cached_run_evaluates_without_a_teacher(tiny, tmp_path):
    """Before/after evaluation in a cached run reports the student's cross-entropy (no teacher, so no KL) and it falls."""
    cfg = _cache_cfg(tiny, tmp_path, **{"cache.k": 8, "eval.enabled": True, "eval.num_samples": 1,
                                        "train.max_steps": 12, "train.lr": 1e-2})
    build_cache(cfg)
    summary = distill(cfg)
    before, after = summary["before"]["overall"], summary["after"]["overall"]
    assert "kl" not in before and "kl" not in after
    assert after["student_ce"] < before["student_ce"]
    assert (Path(cfg.train.output_dir) / "comparison.md").read_text().count("student cross-entropy") == 1

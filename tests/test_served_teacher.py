"""The served teacher (kdlm.teacher_server) against a fake vLLM server computed from the tiny teacher's own forward
(tests/served_util.py): the parsing by hand, the payload equal to the cache's, malformed answers named, refusals
at start, training equal to training from a top-k cache step by step, a server lost mid-run (retries, clean stop,
exact --resume), cache-teacher through the server. The real vLLM server is in test_served_teacher_slow.py."""

from __future__ import annotations

import copy
import json
import math
import threading
from pathlib import Path

import pytest
import torch

from conftest import make_llama, make_tokenizer, save_model, tiny_config
from served_util import FakeVLLM

import kdlm.teacher_server as ts
from kdlm.cache import TeacherCache, build_cache, example_key, read_manifest
from kdlm.config import ConfigError
from kdlm.data.format import IGNORE, collate
from kdlm.errors import CacheError, TrainingError
from kdlm.losses import sparse
from kdlm.teacher_server import ServedTeacher, TeacherServerError, connect, parse_prompt_logprobs, response_rows
from kdlm.train.checkpoint import latest_intact_checkpoint
from kdlm.train.loop import distill
from kdlm.vllm_server import free_port

K = 5


@pytest.fixture()
def fake(tiny):
    with FakeVLLM(tiny["teacher"]) as server:
        yield server


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(ts, "BACKOFF_S", 0.05)


def _served_cfg(tiny, tmp_path, url, **overrides):
    base = {"teacher.server": url, "cache.k": K, "train.log_every": 1, "train.batch_size": 4}
    base.update(overrides)
    return tiny_config(tiny, tmp_path, **base)


def _metrics(cfg) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# --------------------------------------------------------------------------------------------------
# Parsing, by hand.
# --------------------------------------------------------------------------------------------------


def _entry(pairs: dict[int, float]) -> dict:
    return {str(t): {"logprob": v, "rank": 1, "decoded_token": "?"} for t, v in pairs.items()}


def _hand_answer() -> dict:
    # Prompt [7, 3, 9]: position 1 predicts token 3 (in the top-2), position 2 predicts token 9 (outside: a third entry).
    return {"choices": [{"index": 0, "prompt_logprobs": [
        None,
        _entry({3: math.log(0.5), 4: math.log(0.3)}),
        _entry({1: math.log(0.6), 2: math.log(0.25), 9: math.log(0.01)}),
    ]}]}


def test_parse_keeps_the_top_k_and_the_tail_is_the_rest_by_hand():
    ((ids, logp),) = parse_prompt_logprobs(_hand_answer(), [[7, 3, 9]], 2, 10, "request A")
    assert ids.tolist() == [[3, 4], [1, 2]]  # the actual token 9 (beyond the top-2) is dropped
    torch.testing.assert_close(logp.exp(), torch.tensor([[0.5, 0.3], [0.6, 0.25]], dtype=torch.float64))
    # Labels: the prompt is token 7; tokens 3 and 9 are the response -> both rows are response positions.
    r_ids, r_logp, tail = response_rows(ids, logp, [IGNORE, 3, 9], 10)
    torch.testing.assert_close(tail.exp(), torch.tensor([0.2, 0.15]))
    # Only response positions: with token 3 a prompt token, row 0 is left out.
    r_ids, r_logp, tail = response_rows(ids, logp, [IGNORE, IGNORE, 9], 10)
    assert r_ids.tolist() == [[1, 2]] and tail.exp().item() == pytest.approx(0.15)


def test_tail_is_floored_at_the_float32_uncertainty_and_empty_with_the_whole_vocabulary():
    certain = torch.tensor([[0.0, -40.0]], dtype=torch.float64)  # Σp rounds to 1
    assert ts.tail_logp(certain, 10).item() == pytest.approx(math.log(2 * 2.0**-24))
    assert ts.tail_logp(certain, 2).item() == float("-inf")


def _malformed():
    def positions(answer):
        return answer["choices"][0]["prompt_logprobs"]

    def edit(fn):
        def apply(answer):
            answer = copy.deepcopy(answer)
            fn(answer)
            return answer
        return apply

    return {
        "no choices": (edit(lambda a: a.pop("choices")), "expected 'choices' with 1 entries"),
        "bad index": (edit(lambda a: a["choices"][0].update(index=3)), "index 3"),
        "short list": (edit(lambda a: positions(a).pop()), "one entry per token (3), got 2"),
        "first not null": (edit(lambda a: positions(a).__setitem__(0, {})), "prompt_logprobs[0] must be null"),
        "too few entries": (edit(lambda a: positions(a)[1].pop("4")), "position 1: expected 2 or 3 log-probs"),
        "id not a number": (edit(lambda a: positions(a)[2].update({"x": positions(a)[2].pop("2")})), "position 2: token id 'x'"),
        "id out of vocab": (edit(lambda a: positions(a)[2].update({"10": positions(a)[2].pop("2")})), "token id 10 is outside"),
        "logprob a string": (edit(lambda a: positions(a)[1]["4"].update(logprob="-1.2")), "token 4 has log-prob '-1.2'"),
        "logprob NaN": (edit(lambda a: positions(a)[1]["4"].update(logprob=float("nan"))), "token 4 has log-prob nan"),
        "logprob positive": (edit(lambda a: positions(a)[1]["4"].update(logprob=0.5)), "token 4 has log-prob 0.5"),
        "actual token missing": (edit(lambda a: positions(a)[2].update({"5": positions(a)[2].pop("9")})),
                                 "position 2: the actual token 9 is missing"),
        "sum above one": (edit(lambda a: positions(a)[1]["4"].update(logprob=math.log(0.6))), "sum to 1.1"),
    }


@pytest.mark.parametrize("case", list(_malformed()))
def test_a_malformed_answer_is_an_error_naming_the_request(case):
    fn, message = _malformed()[case]
    with pytest.raises(TeacherServerError, match="request A: malformed answer") as info:
        parse_prompt_logprobs(fn(_hand_answer()), [[7, 3, 9]], 2, 10, "request A")
    assert message in str(info.value)


# --------------------------------------------------------------------------------------------------
# Against the fake server: the cache's payload, refusals.
# --------------------------------------------------------------------------------------------------


def test_payload_equals_the_cache_payload_with_the_same_k(tiny, tmp_path, fake):
    from kdlm.models import load_tokenizer

    cached = tiny_config(tiny, tmp_path / "c", **{"cache.dir": str(tmp_path / "tcache"), "cache.k": K,
                                                   "cache.dtype": "float32"})
    build_cache(cached)
    cache = TeacherCache(cached.cache.dir)
    served = _served_cfg(tiny, tmp_path / "s", fake.url)
    tokenizer = load_tokenizer(str(tiny["teacher"]))
    teacher = connect(served, tokenizer, len(tokenizer))
    assert teacher.fingerprint.startswith("served:teacher:")
    from kdlm.data import load_splits, tokenize_examples

    train, _, _ = load_splits(served.data, 0)
    items, _ = tokenize_examples(train, tokenizer, max_prompt_length=served.data.max_prompt_length,
                                 max_length=served.data.max_length, system_prompt=None)
    batch = collate(items[:6], tokenizer.pad_token_id)
    a_ids, a_logp, a_tail = sparse.unpack_payload(teacher.payload(batch))
    b_ids, b_logp, b_tail = sparse.unpack_payload(cache.payload(batch))
    assert a_ids.shape == b_ids.shape == (int((batch["labels"][:, 1:] != IGNORE).sum()), K)
    assert torch.equal(a_ids.sort(-1).values, b_ids.sort(-1).values)  # the same top-k (order within: by log-prob)
    torch.testing.assert_close(a_logp, b_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_tail, b_tail, atol=1e-5, rtol=1e-5)
    # Token ids were sent as they are: the server saw exactly the unpadded sequences.
    lengths = batch["attention_mask"].sum(1).tolist()
    assert fake.prompts_seen[-6:] == [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]


def test_unreachable_server_is_one_line_before_any_model_is_loaded(tiny, tmp_path, monkeypatch, capsys):
    import kdlm.train.loop as loop
    from kdlm.cli import main
    from kdlm.config import save_resolved

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loop, "load_models", no_loading)
    url = f"http://127.0.0.1:{free_port()}"
    cfg = _served_cfg(tiny, tmp_path, url)
    with pytest.raises(TeacherServerError, match=f"teacher.server {url} cannot be reached"):
        distill(cfg)
    save_resolved(cfg, tmp_path / "run.yaml")
    assert main(["distill", "--config", str(tmp_path / "run.yaml"), "--train.overwrite", "true"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be reached" in err[0] and "Traceback" not in err[0]


def _refusal_cases(tiny, tmp_path):
    other_tok = make_tokenizer(extra_chars="éïü東京")
    other_dir = save_model(tmp_path / "other", make_llama(len(other_tok), layers=1, seed=3), other_tok)
    return {
        "model not served": (dict(), {"teacher.served_model": "llama-70b"}, "'llama-70b' is not served by"),
        "max_model_len": (dict(max_model_len=300), {}, "max_model_len is 300, data.max_length is 384"),
        "max_logprobs": (dict(max_logprobs=4), {}, "start vLLM with --max-logprobs 5 or more"),
        "smaller vocabulary": (dict(vocab_limit=len(tiny["tokenizer"]) - 1), {}, "the served vocabulary is smaller"),
        "other tokenizer": (dict(teacher_dir=other_dir, tokenizer=other_tok), {}, "tokenizer differs"),
    }


@pytest.mark.parametrize("case", ["model not served", "max_model_len", "max_logprobs", "smaller vocabulary", "other tokenizer"])
def test_a_server_of_another_model_or_tokenizer_is_refused_saying_what_differs(tiny, tmp_path, case):
    server_args, overrides, message = _refusal_cases(tiny, tmp_path)[case]
    teacher_dir = server_args.pop("teacher_dir", tiny["teacher"])
    with FakeVLLM(teacher_dir, **server_args) as server:
        cfg = _served_cfg(tiny, tmp_path, server.url, **overrides)
        with pytest.raises(TeacherServerError, match=message):
            distill(cfg)


def test_a_larger_served_vocabulary_is_refused(tiny, tmp_path, fake):
    vocab = len(tiny["tokenizer"])

    def bigger(answer):  # the top-1 of the first position becomes an id past the tokenizer's vocabulary
        entry = answer["choices"][0]["prompt_logprobs"][1]
        first = max(entry, key=lambda t: entry[t]["logprob"])
        entry[str(vocab + 7)] = entry.pop(first)
        return answer

    fake.malform = bigger
    with pytest.raises(TeacherServerError, match=f"token id {vocab + 7} is outside the vocabulary.*larger vocabulary"):
        distill(_served_cfg(tiny, tmp_path, fake.url))


def test_a_malformed_answer_mid_run_stops_naming_the_micro_batch(tiny, tmp_path, fake):
    def drop_a_position(answer):
        if fake.completions > 3:  # after the probe and two micro-batches
            answer["choices"][1]["prompt_logprobs"].pop()
        return answer

    fake.malform = drop_a_position
    with pytest.raises(TeacherServerError, match=r"micro-batch \d+ of this sitting .*malformed answer.*sequence 2 of 4"):
        distill(_served_cfg(tiny, tmp_path, fake.url))


@pytest.mark.parametrize("overrides, message", [
    ({"objective.temperature": 2.0}, "log-probs at temperature 1"),
    ({"cache.mode": "sampled"}, "set cache.mode=topk"),
    ({"objective.name": "gkd"}, "a served teacher works with objective.name=kd"),
    ({"teacher.server_concurrency": 0}, "server_concurrency >= 1"),
])
def test_config_refusals(tiny, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _served_cfg(tiny, tmp_path, "http://127.0.0.1:1", **overrides)
    with pytest.raises(ConfigError, match="must be an http"):
        _served_cfg(tiny, tmp_path, "127.0.0.1:8000")


# --------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------


def test_training_from_the_server_equals_training_from_a_topk_cache(tiny, tmp_path, fake):
    """Same k, float32 cache: every step's loss and divergence, and the final weights, agree (the payloads differ
    only by the tail's float rounding: 1 − Σp here against a log-sum-exp of the rest in the cache)."""
    common = {"train.max_steps": 6, "train.grad_accum": 2, "objective.divergence": "akl"}
    cached = tiny_config(tiny, tmp_path / "cached", **{"cache.dir": str(tmp_path / "tcache"), "cache.k": K,
                                                        "cache.dtype": "float32", "train.log_every": 1,
                                                        "train.batch_size": 4, **common})
    build_cache(cached)
    distill(cached)
    served = _served_cfg(tiny, tmp_path / "served", fake.url, **{**common, "teacher.server_concurrency": 3})
    distill(served)
    a, b = _metrics(served), _metrics(cached)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["kd"] == pytest.approx(y["kd"], rel=1e-5, abs=1e-6)
    wa, wb = _weights(Path(served.train.output_dir) / "final"), _weights(Path(cached.train.output_dir) / "final")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)
    # The probe plus one request per micro-batch (6 steps x 2), some asked ahead; never more than 3 at once.
    assert 1 + 12 <= fake.completions <= 1 + 12 + 3
    assert fake.max_in_flight <= 3


def test_prefetch_keeps_the_position_of_the_batches_trained(tiny, fake):
    """The source advances the data position as it yields; the caller must see the position of what it got."""
    from kdlm.models import load_tokenizer
    from kdlm.train.checkpoint import TrainState

    tokenizer = load_tokenizer(str(tiny["teacher"]))
    batch = collate([_tiny_item(tokenizer)], tokenizer.pad_token_id)
    state = TrainState()

    def source():
        while True:
            for _ in range(3):
                state.batches_in_epoch += 1
                yield {k: v.clone() for k, v in batch.items()}
            state.epoch += 1
            state.batches_in_epoch = 0

    teacher = ServedTeacher(fake.url, "teacher", k=K, vocab_size=len(tokenizer), concurrency=4)
    stream = teacher.prefetch(source(), state)
    seen = []
    for _ in range(7):
        item = next(stream)
        assert ts.PAYLOAD_KEY in item
        seen.append((state.epoch, state.batches_in_epoch))
    stream.close()
    assert seen == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1)]


def _tiny_item(tokenizer):
    from kdlm.data import tokenize_examples
    from kdlm.data.sources import Example

    items, _ = tokenize_examples([Example(messages=[{"role": "user", "content": "Hi?"}], response="Hello there.", domain=None,
                                          origin="x")], tokenizer, max_prompt_length=64, max_length=128, system_prompt=None)
    return items[0]


def test_server_lost_mid_run_retries_then_stops_cleanly_and_resume_is_exact(tiny, tmp_path, fake, caplog):
    common = {"train.max_steps": 6, "train.save_every": 2, "teacher.server_retries": 2, "teacher.server_concurrency": 2}
    reference = _served_cfg(tiny, tmp_path / "ref", fake.url, **common)
    distill(reference)

    cfg = _served_cfg(tiny, tmp_path / "run", fake.url, **common)
    fake.completions, fake.down_after = 0, 1 + 4  # the probe and four micro-batches answered, then nothing
    with pytest.raises(TrainingError, match="teacher server was lost during optimizer step [45].*--resume") as info:
        distill(cfg)
    assert "after 3 attempt(s)" in str(info.value)
    assert fake.refused_while_down >= 3  # the failing request and its two retries
    assert "retry 1 of 2" in caplog.text and "retry 2 of 2" in caplog.text
    run = Path(cfg.train.output_dir)
    newest = latest_intact_checkpoint(run)
    assert newest is not None and newest.name in ("checkpoint-0000002", "checkpoint-0000004")
    assert not (run / "final").exists()

    fake.down, fake.down_after = False, None  # the server is back
    distill(_served_cfg(tiny, tmp_path / "run", fake.url, **common, **{"train.resume": True}))
    wa, wb = _weights(run / "final"), _weights(Path(reference.train.output_dir) / "final")
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert [m["loss"] for m in _metrics(cfg)] == [m["loss"] for m in _metrics(reference)]


# --------------------------------------------------------------------------------------------------
# cache-teacher through the server.
# --------------------------------------------------------------------------------------------------


def test_cache_teacher_from_the_server(tiny, tmp_path, fake):
    served = tiny_config(tiny, tmp_path / "s", **{"teacher.server": fake.url, "cache.dir": str(tmp_path / "scache"),
                                                   "cache.k": K, "cache.dtype": "float32", "cache.shard_size": 8})
    manifest = build_cache(served)
    identity = manifest["identity"]
    assert identity["teacher_weights_fingerprint"].startswith("served:teacher:")
    assert manifest["teacher"]["server"] == fake.url and manifest["teacher"]["served_model"] == "teacher"
    local = tiny_config(tiny, tmp_path / "l", **{"cache.dir": str(tmp_path / "lcache"), "cache.k": K,
                                                 "cache.dtype": "float32", "cache.shard_size": 8})
    build_cache(local)
    a, b = TeacherCache(served.cache.dir), TeacherCache(local.cache.dir)
    assert a.index.keys() == b.index.keys()
    for key, where in b.index.items():
        tokens = int(b.offsets[where.shard][where.row + 1] - b.offsets[where.shard][where.row])
        pa, pb = sparse.unpack_payload(a.example(key, tokens)), sparse.unpack_payload(b.example(key, tokens))
        assert torch.equal(pa[0].sort(-1).values, pb[0].sort(-1).values)
        torch.testing.assert_close(pa[1], pb[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pa[2], pb[2], atol=1e-5, rtol=1e-5)

    # Resumable: a lost manifest and last shard are rebuilt to the same bytes; the rest is kept, not recomputed.
    folder = Path(served.cache.dir)
    shards = sorted(folder.glob("shard-*.safetensors"))
    before = {p.name: p.read_bytes() for p in shards}
    manifest_text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").unlink()
    shards[-1].unlink()
    (folder / "identity.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
    asked = fake.completions
    build_cache(served)
    assert {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))} == before
    assert (folder / "manifest.json").read_text() == manifest_text
    assert fake.completions - asked <= 1 + math.ceil(8 / 4) * 4  # the probe, then the last shard's requests only

    # Training from it: with the server named (its fingerprint checked), not with the local teacher instead.
    distill(tiny_config(tiny, tmp_path / "t", **{"teacher.server": fake.url, "cache.dir": served.cache.dir,
                                                 "cache.k": K, "cache.dtype": "float32"}))
    with pytest.raises(CacheError, match="another teacher"):
        distill(tiny_config(tiny, tmp_path / "u", **{"cache.dir": served.cache.dir, "cache.k": K, "cache.dtype": "float32"}))

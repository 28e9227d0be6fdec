"""The vLLM sampling engine's fast tier (kdlm.train.vllm_engine): config validation, the missing-environment error before
training, the untied weight export, and the engine's batch layout, log-probs and row seeds through sample_window with a scripted server.
The slow tier (tests/test_vllm_engine_slow.py) serves the demo student for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_llama, make_tokenizer, tiny_config
from kdlm.config import ConfigError, LoRAConfig, validate
from kdlm.data.format import IGNORE
from kdlm.train.rollout import SamplingSettings, sample_window
from kdlm.train.vllm_engine import VLLMEngine, export_weights
from kdlm.vllm_server import ServerError


def test_engine_vllm_only_for_objectives_that_sample_and_without_lora(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"objective.name": "gkd", "objective.sampling.engine": "vllm"})
    assert cfg.objective.sampling.engine == "vllm"  # accepted for gkd
    with pytest.raises(ConfigError, match=r"objective\.sampling\.engine vllm applies to gkd .* not to kd"):
        tiny_config(tiny, tmp_path, **{"objective.name": "kd", "objective.sampling.engine": "vllm"})
    cfg = tiny_config(tiny, tmp_path, **{"objective.name": "gkd"})
    cfg.objective.sampling.engine = "vllm"
    cfg.student.lora = LoRAConfig()
    with pytest.raises(ConfigError, match=r"cannot serve a LoRA student \(student\.lora\)"):
        validate(cfg)


def test_missing_vllm_environment_fails_before_training(tiny, tmp_path, monkeypatch):
    from kdlm.train.loop import distill

    monkeypatch.setenv("KDLM_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    cfg = tiny_config(tiny, tmp_path, **{"objective.name": "gkd", "objective.sampling.engine": "vllm"})
    with pytest.raises(ServerError, match="make vllm"):
        distill(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_export_weights_is_untied_and_loads_to_the_same_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_llama(len(make_tokenizer()), layers=2, seed=3, tie=True).eval()
    assert model.config.tie_word_embeddings
    export_weights(model, tmp_path / "w")
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["architectures"] == ["LlamaForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w", dtype=torch.float32).eval()
    assert not loaded.config.tie_word_embeddings
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


class ScriptedEngine(VLLMEngine):
    """An engine without a server: ``complete`` answers from a script and records its calls."""

    def __init__(self, answers):
        self.answers, self.calls, self.synced = answers, [], []
        self.push_seconds = 0.0

    def sync(self, model, version, tokenizer):
        self.synced.append(version)

    def complete(self, prompts, seeds, **settings):
        self.calls.append((prompts, seeds, settings))
        return [self.answers[tuple(p)] for p in prompts]


def test_engine_layout_logprobs_and_row_seeds():
    # Two prompts (right-padded, pad 0): [5, 6, 7] and [8, 9]. Stop token 2.
    batch = {"input_ids": torch.tensor([[5, 6, 7, 11], [8, 9, 0, 0]]),
             "prompt_lengths": torch.tensor([3, 2]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    answers = {(5, 6, 7): ([30, 31, 2], [-0.5, -1.0, -0.25]),  # stops at 2 (kept)
               (8, 9): ([40, 41, 42, 43], [-2.0, -3.0, -4.0, -5.0])}  # budget of 4 tokens, no stop
    engine = ScriptedEngine(answers)
    settings = SamplingSettings(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=5, stop_token_ids=(2,),
                                pad_token_id=0)
    [out], stats = sample_window(torch.nn.Linear(1, 1), [batch], [[11, 12]], settings,
                                 engine=engine.engine(version=3, tokenizer=None))
    assert engine.synced == [3]
    assert out["input_ids"].tolist() == [[5, 6, 7, 30, 31, 2], [8, 9, 40, 41, 42, 43]]  # both end at column 6
    assert out["labels"].tolist() == [[IGNORE] * 3 + [30, 31, 2], [IGNORE] * 2 + [40, 41, 42, 43]]
    assert out["sample_logprobs"].tolist() == [[0, 0, 0, -0.5, -1.0, -0.25], [0, 0, -2.0, -3.0, -4.0, -5.0]]
    assert stats.generated_tokens == 7 and stats.stopped_share == 0.5
    prompts, seeds, sent = engine.calls[0]
    assert prompts == [[5, 6, 7], [8, 9]]  # the left padding is not sent
    assert sent == dict(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=5, stop_token_ids=(2,))
    assert seeds == [11, 12]  # each row's request carries its own row seed


def test_engine_answer_cut_without_stop_is_refused(monkeypatch):
    engine = ScriptedEngine({(5, 6): ([30], [-0.5])})
    engine.complete = VLLMEngine.complete.__get__(engine)  # the real checks, on a scripted answer
    engine.concurrency, engine.request_timeout = 4, 10.0
    answer = {"choices": [{"token_ids": [30], "logprobs": {"token_logprobs": [-0.5]}, "finish_reason": "length"}]}
    monkeypatch.setattr("kdlm.train.vllm_engine._post", lambda url, body, timeout: answer)
    engine.server = type("FakeServer", (), {"url": "http://x"})()
    with pytest.raises(ServerError, match="stopped prompt 0 after 1 of 4 tokens without a stop token"):
        engine.complete([[5, 6]], [1], max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=[2])
    assert engine.complete([[5, 6]], [1], max_new_tokens=1, temperature=1.0, top_p=1.0, top_k=0,
                           stop_token_ids=[2]) == [([30], [-0.5])]


def test_failed_start_stops_the_server_and_removes_the_weights(tmp_path, monkeypatch):
    # A "vLLM python" that dies at start-up: the engine raises with the log, keeps no server, and its weight folder
    # (written before the start) is gone.
    script = tmp_path / "python"
    script.write_text('#!/bin/sh\necho "RuntimeError: engine core died" >&2; exit 3\n')
    script.chmod(0o755)
    monkeypatch.setenv("KDLM_VLLM_PYTHON", str(script))
    import tempfile

    made = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    tokenizer = make_tokenizer()
    engine = VLLMEngine(log_path=tmp_path / "server.log", startup_timeout=60)
    with pytest.raises(ServerError, match=r"exited with code 3(.|\n)*engine core died"):
        engine.sync(make_llama(len(tokenizer), layers=1), 0, tokenizer)
    assert engine.server is None and engine.folder is None
    assert len(made) == 1 and not Path(made[0]).exists()  # the weights it wrote for the server are removed

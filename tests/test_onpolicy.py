"""GKD and DPKD (sequence form) in the training loop: coin, sampling, reward, preference metrics, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from kdlm.config import ConfigError
from kdlm.train.loop import distill
from kdlm.train.objectives.sampling import _seed


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def short_completion_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Toy reward for the RL test: shorter completions are better (the policy only has to learn to stop)."""
    return [-len(c) / 8.0 for c in completions]


def test_lambda_zero_is_exactly_supervised_kd(tiny, tmp_path):
    common = {"train.max_steps": 3, "train.log_every": 1, "objective.divergence": "jsd", "objective.kd_ratio": 1.0}
    distill(tiny_config(tiny, tmp_path / "kd", **common))
    distill(tiny_config(tiny, tmp_path / "gkd", **common, **{"objective.name": "gkd", "objective.lmbda": 0.0}))
    kd, gkd = _metrics(tmp_path / "kd" / "run"), _metrics(tmp_path / "gkd" / "run")
    assert [m["loss"] for m in gkd] == [m["loss"] for m in kd]
    assert all(m["gkd/on_policy"] == 0.0 for m in gkd)


def test_one_coin_per_step_follows_lambda(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 6, "train.log_every": 1, "objective.name": "gkd",
                                         "objective.lmbda": 0.5, "objective.sampling.max_new_tokens": 4})
    distill(cfg)
    coins = [m["gkd/on_policy"] for m in _metrics(tmp_path / "run")]
    expected = [float(random.Random(_seed(0, "gkd-coin", step)).random() < 0.5) for step in range(6)]
    assert coins == expected and 0 < sum(coins) < 6  # both branches taken with this seed
    for m in _metrics(tmp_path / "run"):  # generation stats only on on-policy steps
        assert ("gkd/mean_completion_length" in m) == (m["gkd/on_policy"] == 1.0)


def test_gkd_defaults_are_generalized_jsd_without_ce(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"objective.name": "gkd"})
    assert (cfg.objective.divergence, cfg.objective.kd_ratio) == ("jsd", 1.0)
    assert tiny_config(tiny, tmp_path).objective.divergence == "fkl"


def test_on_policy_samples_are_seeded(tiny, tmp_path):
    def run(where, seed):
        distill(tiny_config(tiny, where, **{"train.max_steps": 2, "train.seed": seed, "objective.name": "gkd",
                                            "objective.lmbda": 1.0, "objective.sampling.max_new_tokens": 6}))
        return (where / "run" / "samples.jsonl").read_text()

    a, b, c = run(tmp_path / "a", 0), run(tmp_path / "b", 0), run(tmp_path / "c", 1)
    assert a == b and a != c
    assert all(json.loads(line)["from"] == "student" for line in a.splitlines())


def test_seq_kd_samples_from_the_teacher(tiny, tmp_path):
    distill(tiny_config(tiny, tmp_path, **{"train.max_steps": 2, "objective.name": "gkd", "objective.lmbda": 0.0,
                                           "objective.seq_kd": True, "objective.sampling.max_new_tokens": 4}))
    assert {json.loads(x)["from"] for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()} == {"teacher"}


def test_toy_reward_rises(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{
        "train.max_steps": 40, "train.log_every": 1, "train.lr": 1e-2, "train.batch_size": 8, "train.warmup_ratio": 0.0,
        "objective.name": "gkd", "objective.lmbda": 1.0, "objective.reward_fn": "test_onpolicy:short_completion_reward",
        "objective.reward_alpha": 0.0, "objective.sampling.max_new_tokens": 8, "objective.sampling.temperature": 1.0,
    })
    distill(cfg)
    rewards = [m["gkd/reward"] for m in _metrics(tmp_path / "run")]
    assert sum(rewards[-8:]) / 8 > sum(rewards[:8]) / 8 + 0.25, rewards


def test_bad_reward_path_names_the_key(tiny, tmp_path):
    with pytest.raises(ConfigError, match="objective.reward_fn must be 'module:function'"):
        tiny_config(tiny, tmp_path, **{"objective.name": "gkd", "objective.reward_fn": "nocolon"})
    cfg = tiny_config(tiny, tmp_path, **{"objective.name": "gkd", "objective.reward_fn": "no_such_module:f"})
    with pytest.raises(ConfigError, match="objective.reward_fn: cannot import 'no_such_module:f'"):
        distill(cfg)


def test_bad_reward_function_on_the_command_line_is_one_message(tiny, tmp_path, capsys):
    """Found only when the run builds the objective: still one line on stderr, exit 1, no traceback."""
    from kdlm.cli import main
    from kdlm.config import save_resolved

    cfg = tiny_config(tiny, tmp_path, **{"objective.name": "gkd", "objective.reward_fn": "no_such_module:f"})
    save_resolved(cfg, tmp_path / "run.yaml")
    assert main(["distill", "--config", str(tmp_path / "run.yaml")]) == 1
    err = capsys.readouterr().err
    assert "kdlm distill: error: objective.reward_fn: cannot import 'no_such_module:f'" in err
    assert "Traceback" not in err


def test_method_keys_belong_to_their_method(tiny, tmp_path):
    with pytest.raises(ConfigError, match="objective.lmbda applies to objective.name=gkd"):
        tiny_config(tiny, tmp_path, **{"objective.lmbda": 0.5})
    with pytest.raises(ConfigError, match="objective.dpkd_beta applies to objective.name=dpkd"):
        tiny_config(tiny, tmp_path, **{"objective.name": "gkd", "objective.dpkd_beta": 0.1})


def test_dpkd_sequence_preference_rises(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{
        "train.max_steps": 12, "train.log_every": 1, "train.warmup_ratio": 0.0, "objective.name": "dpkd",
        "objective.dpkd_form": "sequence", "objective.sampling.max_new_tokens": 8, "objective.refresh_every": 4,
    })
    distill(cfg)
    metrics = _metrics(tmp_path / "run")
    margins = [m["rewards/margins"] for m in metrics]
    accuracy = [m["rewards/accuracies"] for m in metrics]
    assert sum(margins[-4:]) > sum(margins[:4]) and sum(accuracy[-4:]) >= sum(accuracy[:4])
    assert margins[-1] > 0 and accuracy[-1] > 0.5
    # refresh_every 4 with 4 distinct prompts per step: resampled on the first pass only when prompts repeat
    assert metrics[0]["dpkd/resampled"] == 4


def test_dpkd_token_form_logs_margin_and_agreement(tiny, tmp_path):
    distill(tiny_config(tiny, tmp_path, **{"train.max_steps": 2, "train.log_every": 1, "objective.name": "dpkd"}))
    for m in _metrics(tmp_path / "run"):
        assert m["dpkd_margin"] <= 0 and 0 <= m["dpkd_top1_agreement"] <= 1
        assert m["kd"] >= 0.6931  # the token loss is at least log 2 (docs/methods.md)


def test_distributed_ranks_sample_with_different_seeds(tiny, tmp_path):
    """Each process samples with its own seed (same coin): rank 0 and rank 1 get different completions."""
    from conftest import make_llama

    from kdlm.data import collate, read_examples, tokenize_examples
    from kdlm.train.objectives import make_objective

    cfg = tiny_config(tiny, tmp_path, **{"objective.name": "gkd", "objective.lmbda": 1.0,
                                         "objective.sampling.max_new_tokens": 6})
    tokenizer = tiny["tokenizer"]
    student = make_llama(len(tokenizer), layers=2, seed=3)
    objective = make_objective(cfg.objective, make_llama(len(tokenizer), layers=2, seed=4), len(tokenizer),
                               tokenizer=tokenizer, max_length=64, seed=0)
    examples, _ = read_examples(str(tiny["train"]), cfg.data)
    items, _ = tokenize_examples(examples[:4], tokenizer, max_prompt_length=32, max_length=64)
    batch = collate(items, tokenizer.pad_token_id)
    def draw(step):
        return [dict(batch)] if step == 5 else None

    rank0, _ = objective.prepare_window(draw, step=5, student_lm=student, process_index=0)
    again, _ = objective.prepare_window(draw, step=5, student_lm=student, process_index=0)
    rank1, _ = objective.prepare_window(draw, step=5, student_lm=student, process_index=1)
    assert torch.equal(rank0[0]["input_ids"], again[0]["input_ids"])
    assert not torch.equal(rank0[0]["input_ids"], rank1[0]["input_ids"])


@pytest.mark.parametrize("form", ["token", "sequence"])
def test_dpkd_plain_text_lm_term(tiny, tmp_path, form):
    """lm_data adds lm_weight * [(1-r) CE + r FKL] on plain text; with lm_weight 0 the losses are unchanged."""
    from conftest import write_jsonl

    corpus = write_jsonl(tmp_path / "text.jsonl", [{"text": f"Plain text number {i} about cows and the sky."} for i in range(6)])
    common = {"train.max_steps": 3, "train.log_every": 1, "objective.name": "dpkd", "objective.dpkd_form": form,
              "objective.sampling.max_new_tokens": 4}
    distill(tiny_config(tiny, tmp_path / "plain", **common))
    distill(tiny_config(tiny, tmp_path / "zero", **common, **{"objective.lm_data": str(corpus), "objective.lm_weight": 0.0}))
    distill(tiny_config(tiny, tmp_path / "lm", **common, **{"objective.lm_data": str(corpus), "objective.lm_weight": 0.5}))
    plain, zero, lm = (_metrics(tmp_path / d / "run") for d in ("plain", "zero", "lm"))
    assert [m["loss"] for m in zero] == pytest.approx([m["loss"] for m in plain], rel=1e-6)
    first = lm[0]  # same weights at step 1: the difference is exactly 0.5 * the logged LM term
    assert first["lm"] > 0 and first["loss"] == pytest.approx(plain[0]["loss"] + 0.5 * first["lm"], rel=1e-5)


def test_plain_text_field_errors_name_the_line(tiny, tmp_path):
    from conftest import write_jsonl

    corpus = write_jsonl(tmp_path / "text.jsonl", [{"text": "ok"}, {"body": "no text field"}])
    cfg = tiny_config(tiny, tmp_path, **{"objective.name": "dpkd", "objective.lm_data": str(corpus)})
    from kdlm.errors import DataError

    with pytest.raises(DataError, match=r"text.jsonl:2: expected a JSON object with a string field 'text'"):
        distill(cfg)


# --------------------------------------------------------------------------- sampling.steps_per_generation (issue 19)
def _prompt_batch(tokenizer, prompts: list[str]):
    from kdlm.data.format import Tokenized, collate

    items = []
    for text in prompts:
        ids = tokenizer(text)["input_ids"]
        items.append(Tokenized(ids + [1], [-100] * len(ids) + [1], len(ids), "d", text))  # a one-token "response"
    return collate(items, tokenizer.pad_token_id)


@pytest.mark.parametrize("top_k", [0, 5])
def test_row_seeded_sampler_follows_the_softmax(tiny, top_k):
    """Many rows of one prompt, one token each: the empirical token frequencies are within binomial tolerance of
    softmax(logits / 0.9) computed directly from the model's forward pass (restricted to the top k and
    renormalised when top_k is set), and the returned log-probabilities are the model's own (temperature 1)."""
    from conftest import make_llama

    from kdlm.sampler import left_pad, sample_rows

    tokenizer = tiny["tokenizer"]
    model = make_llama(len(tokenizer), layers=2, seed=5, hidden=16)
    # A peaked distribution (logit std about 3), so that a wrong temperature or filter is visible in the counts.
    model.lm_head.weight.data.normal_(0, 0.75, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([tokenizer("Name a fruit.")["input_ids"]])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1].double()
    probs = torch.softmax(logits / 0.9, -1)
    if top_k:
        kept = logits.topk(top_k).indices
        probs = torch.zeros_like(probs).index_fill(0, kept, 1.0) * probs
        probs = probs / probs.sum()
    n = 20000
    ids, mask = left_pad(prompt.repeat(n, 1), torch.full((n,), prompt.shape[1]), tokenizer.pad_token_id)
    tokens, logprobs = sample_rows(model, ids, mask, row_seeds=list(range(n)), max_new_tokens=1, stop_token_ids=[1],
                                   pad_token_id=tokenizer.pad_token_id, temperature=0.9, top_k=top_k)
    counts = torch.bincount(tokens[:, 0], minlength=probs.numel()).double()
    expected = n * probs
    tolerance = 5 * torch.sqrt(expected * (1 - probs)) + 1
    assert bool(((counts - expected).abs() <= tolerance).all()), (counts - expected).abs().max()
    assert bool((counts[probs == 0] == 0).all())
    assert torch.allclose(logprobs[:, 0].double(), torch.log_softmax(logits, -1)[tokens[:, 0]], atol=1e-5)


def test_one_window_call_gives_each_batch_what_its_own_call_gives(tiny):
    """sample_window over three micro-batches (one engine call) == one call per micro-batch with the same row
    seeds: the same tokens, labels, masks and sampling-time log-probabilities."""
    from conftest import make_llama

    from kdlm.train.rollout import SamplingSettings, sample_window

    tokenizer = tiny["tokenizer"]
    model = make_llama(len(tokenizer), layers=2, seed=3)
    batches = [_prompt_batch(tokenizer, [q for q, _ in QA_PROMPTS[i: i + 2]]) for i in (0, 2, 4)]
    seeds = [[11 * i + r for r in range(2)] for i in range(3)]
    settings = SamplingSettings(max_new_tokens=8, stop_token_ids=(1,), pad_token_id=tokenizer.pad_token_id,
                                temperature=0.9, max_length=40)
    together, stats = sample_window(model, batches, seeds, settings)
    assert stats.sequences == 6
    for batch, row_seeds, joint in zip(batches, seeds, together):
        (alone,), _ = sample_window(model, [batch], [row_seeds], settings)
        for key in ("input_ids", "labels", "attention_mask", "prompt_lengths"):
            assert torch.equal(joint[key], alone[key]), key
        assert torch.allclose(joint["sample_logprobs"], alone["sample_logprobs"], atol=1e-5)
        assert bool((joint["sample_logprobs"][joint["labels"] == -100] == 0).all())
        assert bool((joint["sample_logprobs"][joint["labels"] != -100] < 0).all())


QA_PROMPTS = [("What colour is the sky?", ""), ("Name a fruit.", ""), ("What is two plus two?", ""),
              ("Say hello.", ""), ("What do cows drink?", ""), ("Name a planet.", "")]


def test_k1_samples_the_accumulation_window_in_one_call_exactly_on_policy(tiny, tmp_path, monkeypatch):
    """k = 1 with two micro-batches per step: one sampling call per step, and the losses are exactly those of
    sampling each micro-batch in its own call (today's structure), step after step while the student trains.

    Reference: the per-row seeding changed today's samples (kdlm sampled each micro-batch with one seeded
    transformers generator per call, so a row's sample depended on its batch); what k = 1 must keep is exact
    on-policy training, i.e. equality with one call per micro-batch with the current weights."""
    import kdlm.train.objectives.sampling as sampling

    real = sampling.sample_window
    calls: list[int] = []

    def counted(model, batches, seeds, settings, engine=None):
        calls.append(len(batches))
        return real(model, batches, seeds, settings, engine=engine)

    def one_call_per_batch(model, batches, seeds, settings, engine=None):
        outs = [real(model, [b], [s], settings, engine=engine) for b, s in zip(batches, seeds)]
        return [o[0][0] for o in outs], outs[0][1]

    common = {"train.max_steps": 3, "train.log_every": 1, "train.grad_accum": 2, "objective.name": "gkd",
              "objective.lmbda": 1.0, "objective.sampling.max_new_tokens": 6}
    monkeypatch.setattr(sampling, "sample_window", counted)
    distill(tiny_config(tiny, tmp_path / "window", **common))
    monkeypatch.setattr(sampling, "sample_window", one_call_per_batch)
    distill(tiny_config(tiny, tmp_path / "split", **common))
    window, split = _metrics(tmp_path / "window" / "run"), _metrics(tmp_path / "split" / "run")
    assert calls == [2, 2, 2]  # one call per optimizer step, covering both micro-batches
    assert [m["loss"] for m in window] == pytest.approx([m["loss"] for m in split], rel=1e-6)
    assert all(m["gkd/staleness"] == 0 and m["gkd/log_ratio_std"] == 0 for m in window)


def test_k4_at_lr_zero_gives_the_samples_of_separate_calls_and_no_off_policy_gap(tiny, tmp_path):
    """k = 4 samples steps 0-3 in one call at step 0. At lr 1e-30 AdamW changes no float32 weight (the update is
    below half an ulp), so the student of every step is the student of step 0: the samples (and so the losses)
    must be exactly those of k = 1, and the measured log-ratio log q_train − log q_sample is 0 up to rounding."""
    common = {"train.max_steps": 4, "train.log_every": 1, "train.grad_accum": 2, "train.lr": 1e-30,
              "objective.name": "gkd", "objective.lmbda": 1.0, "objective.sampling.max_new_tokens": 6}
    distill(tiny_config(tiny, tmp_path / "k1", **common))
    distill(tiny_config(tiny, tmp_path / "k4", **common, **{"objective.sampling.steps_per_generation": 4}))
    k1, k4 = _metrics(tmp_path / "k1" / "run"), _metrics(tmp_path / "k4" / "run")
    assert (tmp_path / "k1" / "run" / "samples.jsonl").read_text() == (tmp_path / "k4" / "run" / "samples.jsonl").read_text()
    assert [m["loss"] for m in k4] == pytest.approx([m["loss"] for m in k1], rel=1e-6)
    assert [m["gkd/staleness"] for m in k4] == [0, 1, 2, 3]
    assert [m["gkd/sampled_sequences"] for m in k4 if "gkd/sampled_sequences" in m] == [32]  # 4 steps x 2 x 4 rows
    for m in k4[1:]:
        assert abs(m["gkd/log_ratio_mean"]) < 1e-5 and m["gkd/log_ratio_std"] < 1e-4


def test_k4_off_policy_gap_grows_when_the_student_trains(tiny, tmp_path):
    """With a real learning rate the student moves away from the one that sampled: the log-ratio's spread is
    nonzero on the stale steps and grows with the staleness."""
    distill(tiny_config(tiny, tmp_path, **{"train.max_steps": 4, "train.log_every": 1, "train.lr": 1e-2,
                                           "train.warmup_ratio": 0.0, "objective.name": "gkd", "objective.lmbda": 1.0,
                                           "objective.sampling.max_new_tokens": 8,
                                           "objective.sampling.steps_per_generation": 4}))
    metrics = _metrics(tmp_path / "run")
    spread = [m["gkd/log_ratio_std"] for m in metrics]
    assert spread[0] == 0 and all(s > 1e-3 for s in spread[1:]) and spread[3] > spread[1], spread
    assert all(abs(m["gkd/log_ratio_mean"]) > 1e-4 for m in metrics[1:])


def test_gkd_coin_stays_per_step_within_a_window(tiny, tmp_path):
    """λ = 0.5, k = 3: every step keeps its own coin; off-policy steps train on the dataset (as λ = 0 would)."""
    distill(tiny_config(tiny, tmp_path, **{"train.max_steps": 6, "train.log_every": 1, "objective.name": "gkd",
                                           "objective.lmbda": 0.5, "objective.sampling.max_new_tokens": 4,
                                           "objective.sampling.steps_per_generation": 3}))
    metrics = _metrics(tmp_path / "run")
    expected = [float(random.Random(_seed(0, "gkd-coin", step)).random() < 0.5) for step in range(6)]
    assert [m["gkd/on_policy"] for m in metrics] == expected
    for step, m in enumerate(metrics):
        assert ("gkd/staleness" in m) == bool(expected[step])
        if expected[step]:  # sampled at the start of its window (steps 0 and 3)
            assert m["gkd/staleness"] == step % 3


def test_steps_per_generation_is_checked(tiny, tmp_path):
    with pytest.raises(ConfigError, match="objective.sampling.steps_per_generation must be >= 1"):
        tiny_config(tiny, tmp_path, **{"objective.name": "gkd", "objective.sampling.steps_per_generation": 0})
    with pytest.raises(ConfigError, match="steps_per_generation 2 applies to objective.name=gkd, not 'dpkd'"):
        tiny_config(tiny, tmp_path, **{"objective.name": "dpkd", "objective.dpkd_form": "sequence",
                                       "objective.sampling.steps_per_generation": 2})


def _kill_then_resume(tiny, folder, common: dict, kill_after_microbatches: int, between=None) -> Path:
    """``kdlm distill`` of ``common`` in a subprocess, SIGKILLed after ``kill_after_microbatches`` micro-batches
    (asserted), ``between(run)`` called on the killed run, then ``--resume`` to the end (asserted); the run folder."""
    import os
    import subprocess
    import sys

    from kdlm.config import save_resolved

    config_file = folder.with_suffix(".yaml")
    save_resolved(tiny_config(tiny, folder, **common), config_file)
    command = [sys.executable, "-m", "kdlm", "distill", "--config", str(config_file)]
    killed = subprocess.run(command, env={**os.environ, "KDLM_FAULT_KILL_AFTER_MICROBATCHES": str(kill_after_microbatches)},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    if between is not None:
        between(folder / "run")
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return folder / "run"


def test_kill_in_the_middle_of_a_window_then_resume_is_exact(tiny, tmp_path):
    """k = 4, two micro-batches per step, a checkpoint every 3 steps: SIGKILL inside step 7 (micro-batch 13);
    the newest checkpoint (step 6) lies inside the window of steps 4-7, whose samples came from step 4's student.
    The resumed run must train steps 7 and 8 on those same buffered samples: same losses and final weights."""
    from safetensors.torch import load_file

    from kdlm.train.checkpoint import latest_checkpoint

    common = {"train.max_steps": 8, "train.grad_accum": 2, "train.save_every": 3, "train.log_every": 1,
              "train.save_total_limit": 10, "objective.name": "gkd", "objective.lmbda": 1.0,
              "objective.sampling.max_new_tokens": 6, "objective.sampling.steps_per_generation": 4}
    distill(tiny_config(tiny, tmp_path / "full", **common))
    reference = _metrics(tmp_path / "full" / "run")

    def newest_checkpoint_holds_the_window(run):
        checkpoint = latest_checkpoint(run)
        assert checkpoint.name == "checkpoint-0000006" and (checkpoint / "objective-rank0.pt").is_file()

    run = _kill_then_resume(tiny, tmp_path / "killed", common, 13, newest_checkpoint_holds_the_window)
    after = _metrics(run)
    assert [m["step"] for m in after] == list(range(1, 9))
    assert [m["gkd/staleness"] for m in after] == [0, 1, 2, 3, 0, 1, 2, 3]
    for ours, theirs in zip(after, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "full" / "run" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_dpkd_sequence_kill_and_resume_keeps_the_rejected_responses(tiny, tmp_path):
    """DPKD's sequence form reuses a prompt's sampled y_s for refresh_every steps (the tiny data repeats every
    prompt four times per epoch). SIGKILL after step 5's micro-batches, the newest checkpoint at step 3: the resumed
    run must reuse the y_s sampled before the checkpoint (saved with it), so its losses and resample counts equal
    the uninterrupted run's; a resume that forgot them would resample at step 4."""
    common = {"train.max_steps": 6, "train.save_every": 3, "train.log_every": 1, "train.save_total_limit": 10,
              "objective.name": "dpkd", "objective.dpkd_form": "sequence", "objective.sampling.max_new_tokens": 6,
              "objective.refresh_every": 100}
    distill(tiny_config(tiny, tmp_path / "full", **common))
    reference = _metrics(tmp_path / "full" / "run")
    assert reference[3]["dpkd/resampled"] < 4  # step 4 reuses responses sampled before the checkpoint
    after = _metrics(_kill_then_resume(tiny, tmp_path / "killed", common, 5))
    assert [m["step"] for m in after] == list(range(1, 7))
    assert [m["dpkd/resampled"] for m in after] == [m["dpkd/resampled"] for m in reference]
    for ours, theirs in zip(after, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)

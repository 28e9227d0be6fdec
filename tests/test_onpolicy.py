"""GKD and DPKD (sequence form) in the training loop: coin, sampling, reward, preference metrics, errors."""

from __future__ import annotations

import json
import random

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

"""The training loop end to end on tiny models: learning, normalisation, checkpoints and resume."""

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from kdlm.errors import CheckpointError
from kdlm.train.loop import distill


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["sft", "kd"])
def test_loss_falls(tiny, tmp_path, objective):
    cfg = tiny_config(tiny, tmp_path, **{"objective.name": objective, "train.max_steps": 30, "train.log_every": 1,
                                             "train.lr": 1e-2})
    distill(cfg)
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_kd_lowers_heldout_kl(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"objective.kd_ratio": 1.0, "train.max_steps": 25, "eval.enabled": True, "eval.num_samples": 1})
    summary = distill(cfg)
    before, after = summary["before"]["overall"]["kl"], summary["after"]["overall"]["kl"]
    assert after < 0.7 * before
    assert set(summary["after"]) >= {"overall", "domain/alpha", "domain/beta", "samples"}


def test_grad_accumulation_matches_one_big_batch(tiny, tmp_path):
    """Normalising by the response tokens of the whole step makes 2 x 4 with accumulation equal one batch of 8."""
    common = {"train.max_steps": 3, "objective.kd_ratio": 0.5, "train.lr": 1e-2, "train.max_grad_norm": None}
    distill(tiny_config(tiny, tmp_path / "a", **common, **{"train.batch_size": 8, "train.grad_accum": 1}))
    distill(tiny_config(tiny, tmp_path / "b", **common, **{"train.batch_size": 4, "train.grad_accum": 2}))
    a = load_file(tmp_path / "a" / "run" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "final" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5), key
    la, lb = _metrics(tmp_path / "a" / "run"), _metrics(tmp_path / "b" / "run")
    assert abs(la[-1]["loss"] - lb[-1]["loss"]) < 1e-4


def test_resume_reproduces_the_next_steps(tiny, tmp_path):
    """Stop after a checkpoint mid-epoch (in the second, reshuffled epoch); resume; the later losses match."""
    common = {"train.max_steps": 12, "train.save_every": 5, "train.log_every": 1, "train.batch_size": 3,
              "train.save_total_limit": 5}
    full = tiny_config(tiny, tmp_path / "full", **common)
    distill(full)
    reference = _metrics(tmp_path / "full" / "run")

    part = tiny_config(tiny, tmp_path / "part", **common)
    distill(part)
    run = tmp_path / "part" / "run"
    # Pretend the run died after step 10: keep the checkpoint of step 10, drop what came later.
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in reference[:10]))
    shutil.rmtree(run / "final")
    resumed = tiny_config(tiny, tmp_path / "part", **common, **{"train.resume": True})
    distill(resumed)
    after = _metrics(run)
    assert [m["step"] for m in after] == list(range(1, 13))
    for ours, theirs in zip(after[10:], reference[10:]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "full" / "run" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_torn_checkpoint_is_skipped(tiny, tmp_path, caplog):
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 4, "train.save_every": 2, "train.save_total_limit": 5})
    distill(cfg)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000002", "checkpoint-0000004"]
    (run / "checkpoint-0000004" / "manifest.json").unlink()  # as if killed before the manifest was written
    cfg.train.max_steps = 5
    cfg.train.resume = True
    with caplog.at_level("INFO"):
        distill(cfg)
    assert "torn checkpoint" in caplog.text and "resumed from" in caplog.text and "checkpoint-0000002" in caplog.text


def test_resume_without_checkpoint_is_an_error(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"train.resume": True})
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        distill(cfg)


def test_incomplete_checkpoint_state_is_an_error(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 2, "train.save_every": 2})
    distill(cfg)
    (tmp_path / "run" / "checkpoint-0000002" / "optimizer.pt").unlink()
    cfg.train.resume, cfg.train.max_steps = True, 3
    with pytest.raises(CheckpointError, match="optimizer.pt is missing, the manifest says"):
        distill(cfg)


def test_tensorboard_tracker_writes_events(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 2, "train.log_every": 1, "train.trackers": ["tensorboard"]})
    distill(cfg)
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_bf16_autocast_and_periodic_eval(tiny, tmp_path):
    """bf16 autocast trains (loss falls) and keeps finite values; eval_every writes intermediate evaluations."""
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 12, "train.log_every": 1, "train.lr": 1e-2,
                                        "train.mixed_precision": "bf16", "train.eval_every": 5,
                                        "eval.enabled": True, "eval.num_samples": 0})
    summary = distill(cfg)
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert (tmp_path / "run" / "eval_step5.json").is_file() and (tmp_path / "run" / "eval_step10.json").is_file()
    assert math.isfinite(summary["after"]["overall"]["kl"])


def test_peak_rss_is_the_runs_own_peak_for_in_process_runs(tiny, tmp_path):
    """An earlier 1.5 GB allocation in the same process must not show up as the run's peak memory (issue 15)."""
    import resource

    from kdlm.train.loop import distill

    block = bytearray(1536 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page: it is resident
    del block
    process_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    summary = distill(tiny_config(tiny, tmp_path, **{"train.max_steps": 1}))
    assert summary["peak_rss_scope"] == "run"
    assert 0.05 < summary["peak_rss_gb"] < process_peak_gb - 1.0

"""Never lose work: non-finite guard, kill-and-resume, refusing malicious pickles and YAML python tags."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

import kdlm.train.loop as loop
from kdlm.cli import parse_config
from kdlm.config import ConfigError, save_resolved
from kdlm.errors import CheckpointError, TrainingError
from kdlm.train.checkpoint import latest_checkpoint
from kdlm.train.loop import distill


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _poison(monkeypatch, bad_calls: set[int]) -> None:
    """Make the objective return a NaN loss on the given (0-based) micro-batch calls."""
    real = loop.make_objective
    calls = {"n": 0}

    def make(*args, **kwargs):
        objective = real(*args, **kwargs)

        class Poisoned:  # the same objective, whose loss turns NaN on the chosen calls
            prepare_window, units = objective.prepare_window, objective.units
            state_dict, load_state_dict = objective.state_dict, objective.load_state_dict

            def __call__(self, student, batch):
                out = objective(student, batch)
                if calls["n"] in bad_calls:
                    out.loss_sum = out.loss_sum * float("nan")
                calls["n"] += 1
                return out

        return Poisoned()

    monkeypatch.setattr(loop, "make_objective", make)


def test_nonfinite_step_is_skipped_and_changes_no_weight(tiny, tmp_path, monkeypatch):
    _poison(monkeypatch, {1})
    cfg = tiny_config(tiny, tmp_path / "nan", **{"train.max_steps": 3, "train.log_every": 1, "train.save_every": 1,
                                                  "train.save_total_limit": 5})
    distill(cfg)
    run = tmp_path / "nan" / "run"
    metrics = _metrics(run)
    assert [m.get("skipped_nonfinite", 0) for m in metrics] == [0, 1, 0]
    before = load_file(run / "checkpoint-0000001" / "student" / "model.safetensors")
    after = load_file(run / "checkpoint-0000002" / "student" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step moved nothing
    final = load_file(run / "final" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_nonfinite_steps_in_a_row_stop_training_and_keep_the_checkpoint(tiny, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(2, 100)))
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 10, "train.save_every": 2, "train.max_nonfinite_steps": 2})
    with pytest.raises(TrainingError, match="2 optimizer steps in a row had a non-finite loss") as info:
        distill(cfg)
    kept = latest_checkpoint(tmp_path / "run")
    assert kept is not None and kept.name == "checkpoint-0000002" and str(kept) in str(info.value)
    weights = load_file(kept / "student" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_malicious_pickle_in_checkpoint_is_refused(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 2, "train.save_every": 2})
    distill(cfg)
    checkpoint = latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"

    class Exploit:  # unpickling this would run a shell command
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Exploit()}, checkpoint / "optimizer.pt")
    # A tamperer can rewrite the manifest too: the checksum passes, the loader itself must refuse the pickle.
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = {"bytes": (checkpoint / "optimizer.pt").stat().st_size,
                                         "sha256": hashlib.sha256((checkpoint / "optimizer.pt").read_bytes()).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    resumed = tiny_config(tiny, tmp_path, **{"train.max_steps": 4, "train.resume": True})
    with pytest.raises(CheckpointError, match="optimizer.pt: refused to load"):
        distill(resumed)
    assert not marker.exists()


def test_yaml_python_tag_is_refused_like_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'objective:\n  name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="could not determine a constructor for the tag.*python/object/apply"):
        parse_config(["--config", str(evil)], "validate")
    assert not marker.exists()


def test_kill_inside_accumulation_window_then_resume_is_exact(tiny, tmp_path):
    """SIGKILL in the second (reshuffled) epoch, inside a gradient-accumulation window; --resume continues exactly."""
    common = {"train.max_steps": 10, "train.grad_accum": 2, "train.batch_size": 4, "train.save_every": 3,
              "train.log_every": 1, "train.save_total_limit": 10}
    # 32 examples / (4 x 2) = 4 steps per epoch; micro-batch 15 is the first half of step 8's window (epoch 1).
    distill(tiny_config(tiny, tmp_path / "full", **common))
    reference = _metrics(tmp_path / "full" / "run")

    cfg = tiny_config(tiny, tmp_path / "killed", **common)
    config_file = tmp_path / "killed.yaml"
    save_resolved(cfg, config_file)
    env = {**os.environ, "KDLM_FAULT_KILL_AFTER_MICROBATCHES": "15"}
    command = [sys.executable, "-m", "kdlm", "distill", "--config", str(config_file)]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "killed" / "run"
    assert latest_checkpoint(run).name == "checkpoint-0000006" and not (run / "final").exists()
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = _metrics(run)
    assert [m["step"] for m in after] == list(range(1, 11))
    for ours, theirs in zip(after, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "full" / "run" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cache_paths_stay_inside_the_cache_folder(tmp_path):
    """A GGUF file name with '..' components still maps to a folder directly under <cache>/gguf/."""
    from kdlm.models import _gguf_cache_dir

    models = tmp_path / "models" / "deep"
    models.mkdir(parents=True)
    (tmp_path / "evil.gguf").write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    target = _gguf_cache_dir(str(models), "../../evil.gguf", str(cache))
    assert target.resolve().parent == (cache / "gguf").resolve()

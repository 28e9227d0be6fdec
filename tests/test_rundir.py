"""A finished run is never silently replaced: a new run into its directory is refused, or moves it aside."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import tiny_config

from kdlm.cli import main, parse_config
from kdlm.config import ConfigError
from kdlm.errors import RunDirError
from kdlm.train.loop import distill
from kdlm.train.rundir import run_entries


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 of its bytes (a refused run must leave this unchanged)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _no_models(*args, **kwargs):
    raise AssertionError("a refused run must not load any model")


def test_new_run_into_a_finished_run_is_refused_before_anything_is_touched(tiny, tmp_path, monkeypatch):
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 2, "train.save_every": 1})
    distill(cfg)
    run = tmp_path / "run"
    before = _tree(run)
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors"} <= set(before)
    monkeypatch.setattr("kdlm.train.loop.load_models", _no_models)
    with pytest.raises(RunDirError) as error:
        distill(tiny_config(tiny, tmp_path, **{"train.max_steps": 3, "train.lr": 1e-2}))
    message = str(error.value)
    for part in (str(run), "--resume", "--train.output_dir", "--train.overwrite"):
        assert part in message
    assert _tree(run) == before
    assert not list(tmp_path.glob("run.old-*"))  # no backup folder either


def test_overwrite_moves_the_old_run_aside_whole(tiny, tmp_path):
    distill(tiny_config(tiny, tmp_path, **{"train.max_steps": 2, "train.log_every": 1}))
    run = tmp_path / "run"
    (run / "eval_after.json").write_text('{"stale": true}')  # e.g. left by `kdlm eval` on the old model
    before = _tree(run)
    distill(tiny_config(tiny, tmp_path, **{"train.max_steps": 3, "train.log_every": 1, "train.overwrite": True}))
    backups = sorted(tmp_path.glob("run.old-*"))
    assert len(backups) == 1 and _tree(backups[0]) == before  # every old file kept, byte for byte
    assert not (run / "eval_after.json").exists()  # the new run does not inherit the old model's results
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "was moved to" in (run / "train.log").read_text()


def test_the_demo_command_twice_is_refused(tmp_path, monkeypatch, capsys):
    """`kdlm distill` with no arguments writes to runs/demo: a second call must not replace the first demo."""
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / "runs" / "demo"
    (demo / "final").mkdir(parents=True)
    (demo / "config.yaml").write_text("train: {}\n")
    (demo / "final" / "model.safetensors").write_bytes(b"weights")
    before = _tree(demo)
    monkeypatch.setattr("kdlm.train.loop.load_models", _no_models)
    assert main(["distill"]) == 1
    err = capsys.readouterr().err
    assert "runs/demo already holds a run" in err and "--train.overwrite" in err and "Traceback" not in err
    assert _tree(demo) == before


def test_what_counts_as_a_run(tmp_path):
    assert run_entries(tmp_path / "missing") == []
    assert run_entries(tmp_path) == []
    (tmp_path / "notes.txt").write_text("mine")  # other files: not a run
    assert run_entries(tmp_path) == []
    (tmp_path / ".checkpoint-0000004.tmp").mkdir()  # a run killed while writing its first checkpoint
    (tmp_path / "eval_final.json").write_text("{}")
    assert run_entries(tmp_path) == [".checkpoint-0000004.tmp", "eval_final.json"]


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ConfigError, match="train.resume and train.overwrite"):
        parse_config(["--resume", "--train.overwrite", "true"])


def test_a_start_that_failed_before_any_result_can_be_retried(tmp_path):
    """Only config.yaml and train.log (a model that failed to load, say): the retry reuses the directory and keeps
    the failed start's log; one result file (metrics.jsonl) is enough to refuse."""
    (tmp_path / "config.yaml").write_text("train: {}\n")
    (tmp_path / "train.log").write_text("model failed to load\n")
    assert run_entries(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("")
    assert run_entries(tmp_path) == ["metrics.jsonl"]

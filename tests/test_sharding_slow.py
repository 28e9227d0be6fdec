"""train.parallel fsdp (PyTorch FSDP2 on student and teacher), 2 gloo processes on CPU, tiny models. Slow tier.

The references are independent runs: one process with the double batch (no sharding at all) and the same two
processes under ddp. The models are a tiny Llama with *tied* embeddings (the case FSDP can silently untie) and a
vocabulary padded past the tokenizer's (rows the loss must slice off).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_llama, save_model, tiny_config
from safetensors.torch import load_file
from test_distributed_slow import _launch, _metrics

from kdlm.config import save_resolved
from kdlm.train.loop import distill

pytestmark = pytest.mark.slow

PADDED_ROWS = 8  # output-layer rows past the tokenizer's vocabulary


@pytest.fixture(scope="module")
def tied(tiny, tmp_path_factory):
    """A 4-layer teacher with tied embeddings and a padded vocabulary; the student is pruned from it (2 layers)."""
    root = tmp_path_factory.mktemp("tied")
    tokenizer = tiny["tokenizer"]
    teacher = make_llama(len(tokenizer) + PADDED_ROWS, layers=4, seed=3, tie=True)
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight
    return {**tiny, "teacher": save_model(root / "teacher", teacher, tokenizer)}


def _run(tied, folder: Path, processes: int, *extra: str, **overrides) -> Path:
    """distill with ``overrides`` on 1 process (in this one) or on ``processes`` under torchrun; the run folder."""
    cfg = tiny_config(tied, folder, **{"train.max_steps": 4, "train.log_every": 1, **overrides})
    if processes == 1:
        distill(cfg)
    else:
        save_resolved(cfg, folder.with_suffix(".yaml"))
        result = _launch(folder.with_suffix(".yaml"), processes, *extra)
        assert result.returncode == 0, result.stderr[-4000:]
    return folder / "run"


OBJECTIVES = {
    "kd": {"objective.name": "kd", "objective.divergence": "fkl"},
    "rlkd": {"objective.name": "rlkd"},
    "gkd": {"objective.name": "gkd", "objective.lmbda": 1.0, "objective.sampling.max_new_tokens": 5,
            "objective.sampling.temperature": 0.0},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_fsdp_two_processes_equal_one_process_double_batch_and_ddp(tied, tmp_path, name):
    """fsdp 2 × batch 2 = 1 process × batch 4 = ddp 2 × batch 2: per-step losses (rel 1e-5) and final weights (1e-5).

    gkd samples greedily (temperature 0) from the student every step, so its rollouts need the gathered student
    and are the same whichever process draws them."""
    common = {**OBJECTIVES[name], "train.grad_accum": 2}
    one = _run(tied, tmp_path / "one", 1, **common, **{"train.batch_size": 4})
    fsdp = _run(tied, tmp_path / "fsdp", 2, **common, **{"train.batch_size": 2, "train.parallel": "fsdp"})
    ddp = _run(tied, tmp_path / "ddp", 2, **common, **{"train.batch_size": 2, "train.parallel": "ddp"})
    reference = _metrics(one)
    assert len(reference) == 4
    for other in (fsdp, ddp):
        got = _metrics(other)
        assert [m["response_tokens"] for m in got] == [m["response_tokens"] for m in reference]
        for a, b in zip(reference, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    wa = load_file(one / "final" / "model.safetensors")
    for other in (fsdp, ddp):
        wb = load_file(other / "final" / "model.safetensors")
        assert set(wb) == set(wa)
        for key in wa:
            assert torch.allclose(wa[key], wb[key], atol=1e-5), key
    first = load_file(tied["teacher"] / "model.safetensors")
    moved = [k for k in wa if k in first and wa[k].shape == first[k].shape and not torch.equal(wa[k], first[k])]
    assert moved, "training changed no weight: the comparison would be vacuous"

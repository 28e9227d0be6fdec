"""DDK domain mixing in the training loop: weight updates, logging, resume, errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import QA, tiny_config, write_jsonl

from kdlm.errors import DataError
from kdlm.train.loop import distill


def _history(run):
    return [json.loads(line) for line in (run / "mixing.jsonl").read_text().splitlines()]


def test_ddk_weights_follow_equations_1_and_2(tiny, tmp_path):
    """Updates at steps 0, 2, 4; step 0 = softmax of the logged ratios, later = Eq. 2 from the previous weights."""
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 5, "data.mixing.strategy": "ddk",
                                         "data.mixing.interval": 2, "data.mixing.val_per_domain": 3})
    summary = distill(cfg)
    run = tmp_path / "run"
    history = _history(run)
    assert [h["step"] for h in history] == [0, 2, 4]
    domains = ["alpha", "beta"]
    ratios = [[h[f"ddk/ppl_student/{d}"] / h[f"ddk/ppl_teacher/{d}"] for d in domains] for h in history]
    weights = [[h[f"ddk/weight/{d}"] for d in domains] for h in history]
    z = sum(math.exp(r) for r in ratios[0])
    assert weights[0] == pytest.approx([math.exp(r) / z for r in ratios[0]], rel=1e-9)
    for previous, ratio, current in zip(weights, ratios[1:], weights[1:]):
        psi = [w * math.exp(r) for w, r in zip(previous, ratio)]
        assert current == pytest.approx([0.5 * p / sum(psi) + 0.25 for p in psi], rel=1e-9)
    # The teacher's perplexities are measured once: identical at every update.
    assert len({h["ddk/ppl_teacher/alpha"] for h in history}) == 1
    assert (run / "mixing.png").stat().st_size > 1000
    assert summary["mixing"]["updates"] == 3


def test_equal_strategy_draws_both_domains_evenly(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 2, "data.mixing.strategy": "equal", "train.batch_size": 4})
    distill(cfg)
    history = _history(tmp_path / "run")
    assert history[0]["ddk/weight/alpha"] == pytest.approx(0.5) and "ddk/ratio/alpha" not in history[0]


def test_mixing_resume_continues_the_same_schedule(tiny, tmp_path):
    common = {"train.max_steps": 6, "train.save_every": 3, "train.log_every": 1, "train.batch_size": 3,
              "train.save_total_limit": 5, "data.mixing.strategy": "ddk", "data.mixing.interval": 2,
              "data.mixing.val_per_domain": 3}
    distill(tiny_config(tiny, tmp_path / "full", **common))
    reference = [json.loads(x) for x in (tmp_path / "full" / "run" / "metrics.jsonl").read_text().splitlines()]
    distill(tiny_config(tiny, tmp_path / "part", **common))
    run = tmp_path / "part" / "run"
    shutil.rmtree(run / "checkpoint-0000006")
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in reference[:3]))
    distill(tiny_config(tiny, tmp_path / "part", **common, **{"train.resume": True}))
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in after] == list(range(1, 7))
    for ours, theirs in zip(after[3:], reference[3:]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    assert _history(run)[-1] == pytest.approx(_history(tmp_path / "full" / "run")[-1])


def test_mixing_needs_two_domains(tiny, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [{"prompt": p, "response": r} for p, r in QA * 2])
    cfg = tiny_config(tiny, tmp_path, **{"data.train": str(data), "data.mixing.strategy": "ddk"})
    with pytest.raises(DataError, match="at least two domains.*data.domain_field"):
        distill(cfg)

"""benchmarks/compare.py --scale smoke end to end on tiny models: outputs, statistics, claims, the report with
intervals, and resumability cell by cell (a rerun skips done cells; a time budget stops before the next cell)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from conftest import QA, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["alpha", "beta", "gamma"]


@pytest.fixture()
def compare(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("compare", None)
    return importlib.import_module("compare")


@pytest.mark.slow
def test_smoke_protocol_runs_and_resumes(tiny, tmp_path, monkeypatch, compare, capsys):
    import torch

    monkeypatch.setenv("KDLM_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)  # tiny models: one thread is faster on a busy 2-core machine
    data = tmp_path / "t0mix"
    data.mkdir()
    records = [{"prompt": p, "response": r, "domain": DOMAINS[i % 3]} for i, (p, r) in enumerate(QA * 3)]
    for split in ("train", "validation", "test"):
        write_jsonl(data / f"{split}.jsonl", records)
    out = tmp_path / "results" / "compare_smoke"
    argv = ["--scale", "smoke", "--base-teacher", str(tiny["teacher"]), "--data", str(data), "--student-layers", "2",
            "--work", str(tmp_path / "work"), "--out", str(out), "--n-boot", "200", "--per-domain", "2",
            "--batch-size", "4"]
    assert compare.main(argv) == 0
    first = capsys.readouterr().out

    result = json.loads(out.with_suffix(".json").read_text())
    cells_dirs = list(Path(str(out) + "_cells").iterdir())
    assert len(cells_dirs) == 1
    cell_files = sorted(p.name for p in cells_dirs[0].glob("*.json"))
    assert cell_files == ["fkl-seed0.json", "fkl-seed1.json", "sft-seed0.json", "sft-seed1.json", "sft_start.json",
                          "teacher_ft.json"]
    assert result["domains"] == {d: 2 for d in DOMAINS}  # the fixed per-domain sample, every domain
    # Row statistics recomputed from the cells: mean of the two seeds, t-interval half-width t(0.975, 1)·|a − b|/2.
    cells = {name: json.loads((cells_dirs[0] / name).read_text()) for name in cell_files}
    for row in ("sft", "fkl"):
        a, b = (cells[f"{row}-seed{s}.json"]["aggregate"]["kl"] for s in (0, 1))
        stats = result["rows"][row]["kl"]
        assert stats["mean"] == pytest.approx((a + b) / 2)
        assert stats["high"] - stats["mean"] == pytest.approx(12.7062 * abs(a - b) / 2, rel=1e-4)
        per_example = cells[f"{row}-seed0.json"]["per_example"]
        assert len(per_example["rouge_l_sample"]) == len(per_example["kl"]) == 6
    assert result["rows"]["fkl"]["seeds"] == [0, 1] and "diff_vs_sft_kl" in result["rows"]["fkl"]
    assert "gap_closed_rouge_l_sample" in result["rows"]["fkl"]
    assert result["rows"]["teacher_ft"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-6)  # the teacher against itself
    # Claims: every paper has a row; with only SFT and FKL run, each is "not run".
    assert len(result["claims"]) == 6 and {c["verdict"] for c in result["claims"]} == {"not run"}
    markdown = out.with_suffix(".md").read_text()
    assert "## Claims of the seed papers" in markdown and "| FKL + CE (`fkl.yaml`) | 0,1 |" in markdown
    assert " ± " in markdown
    # The kdlm report of the four run directories groups the seeds with intervals.
    page = (Path(str(out) + "_report") / "report.html").read_text()
    assert "Seeds" in page and "95 % CI" in page

    # Rerun: every cell is skipped (files untouched); the outputs are written again from the stored cells.
    stamps = {p.name: p.stat().st_mtime_ns for p in cells_dirs[0].glob("*.json")}
    assert compare.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("done before, skipped") == 4 and "] ..." not in second
    assert {p.name: p.stat().st_mtime_ns for p in cells_dirs[0].glob("*.json")} == stamps
    assert json.loads(out.with_suffix(".json").read_text())["rows"]["fkl"]["kl"] == result["rows"]["fkl"]["kl"]
    assert "[sft seed 0] ..." in first

    # A time budget already spent: no new cell starts, and the command says what is left.
    assert compare.main(argv + ["--seeds", "0,1,2", "--time-budget-min", "0"]) == 0
    third = capsys.readouterr().out
    assert "time budget reached before sft seed 2" in third and "sft:2 fkl:2" in third
    assert sorted(p.name for p in cells_dirs[0].glob("*.json")) == cell_files
    assert "Not run yet (2 cells): sft seed 2, fkl seed 2." in out.with_suffix(".md").read_text()

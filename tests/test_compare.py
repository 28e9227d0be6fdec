"""benchmarks/compare.py: argument errors, the summary and tables from synthetic cells (hand-computed values), and
(slow tier) ``--scale smoke`` end to end on tiny models: outputs, statistics, claims, the report with intervals,
and resumability cell by cell (a rerun skips done cells; a time budget stops before the next cell)."""

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


def _cell(row, seed, rouge, kl, domains=("a", "a", "b", "b")):
    """A stored cell with constant per-example scores (aggregates the same numbers)."""
    n = len(domains)
    per_example = {"rouge_l_sample": [rouge] * n, "exact_match_sample": [0.0] * n, "rouge_l_greedy": [rouge] * n,
                   "exact_match_greedy": [0.0] * n, "kl": [kl] * n, "tokens": [3] * n}
    aggregate = {"kl": kl, "rouge_l_sample": rouge, "rouge_l_greedy": rouge, "exact_match_sample": 0.0,
                 "exact_match_greedy": 0.0, "domains": {d: {"kl": kl, "rouge_l_sample": rouge, "rouge_l_greedy": rouge}
                                                        for d in dict.fromkeys(domains)}}
    return {"row": row, "seed": seed, "aggregate": aggregate, "per_example": per_example, "domains": list(domains),
            "seconds": 100.0 if seed is None else 10.0 * (seed + 1), "s_per_step": 2.0}


def test_arguments_are_checked(compare, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--rows", "sft,bogus"])
    assert "--rows: unknown rows ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--seeds", "0,x"])
    assert "--seeds: expected comma-separated integers, got '0,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--seeds", "1,1"])
    assert "distinct" in capsys.readouterr().err
    args = compare.parse_args(["--scale", "smoke", "--steps", "7"])
    assert (args.steps, args.row_list, args.seed_list, args.sample_seed_list) == (7, ["sft", "fkl"], [0, 1], [10, 20])
    cpu = compare.parse_args([])
    assert cpu.seed_list == [0, 1, 2] and cpu.row_list == list(compare.ROWS) and len(cpu.sample_seed_list) >= 3


def test_summary_from_synthetic_cells(compare, tmp_path):
    cells_dir = tmp_path / "cells"
    cells = [_cell("teacher_ft", None, 10.0, 0.0), _cell("sft_start", None, 1.0, 3.0)]
    for seed, noise in zip((0, 1, 2), (0.0, 0.3, -0.3)):
        cells += [_cell("sft", seed, 2.0 + noise, 2.0), _cell("fkl", seed, 4.0 + noise, 1.5),
                  _cell("akl", seed, 9.0 + noise, 1.0), _cell("rkl", seed, 3.0 + noise, 1.8)]
    for cell in cells:
        compare.store_cell(compare.cell_path(cells_dir, cell["row"], cell["seed"]), cell)
    loaded = compare.load_cells(cells_dir)
    assert sorted(loaded["fkl"]) == [0, 1, 2] and list(loaded["teacher_ft"]) == [None]
    # The duration estimate: the row's median, else any method row's.
    assert compare.estimate_seconds(loaded, "fkl") == 20.0 and compare.estimate_seconds(loaded, "ddk") == 20.0
    args = compare.parse_args(["--rows", "sft,fkl,akl,rkl,ddk", "--seeds", "0,1,2", "--n-boot", "200"])
    summary = compare.summarise(loaded, args)
    rows = summary["rows"]
    # FKL ROUGE-L over seeds 4.0, 4.3, 3.7: mean 4, s = 0.3, half-width 4.3027 * 0.3 / sqrt(3) = 0.7452.
    assert rows["fkl"]["rouge_l_sample"]["mean"] == pytest.approx(4.0)
    assert rows["fkl"]["rouge_l_sample"]["high"] - 4.0 == pytest.approx(0.7452, abs=1e-4)
    # Paired with SFT seed by seed: exactly +2 ROUGE-L and -0.5 KL in every seed and example.
    diff = rows["fkl"]["diff_vs_sft_rouge_l_sample"]
    assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx((2.0, 2.0, 2.0))
    assert rows["fkl"]["diff_vs_sft_kl"]["mean"] == pytest.approx(-0.5)
    # Gap closed: KL (1.5 - 2) / (0 - 2) = 0.25; ROUGE-L (4 - 2) / (10 - 2) = 0.25.
    assert rows["fkl"]["gap_closed_kl"]["mean"] == pytest.approx(0.25)
    assert rows["fkl"]["gap_closed_rouge_l_sample"]["mean"] == pytest.approx(0.25)
    assert summary["teacher_sft_gap"]["rouge_l_sample"] == pytest.approx(8.0)
    assert rows["teacher_ft"]["seeds"] == [None] and "diff_vs_sft_kl" not in rows["teacher_ft"]
    verdicts = {c.claim.paper: c.verdict for c in summary["claims"]}
    assert verdicts["AKL (Wu et al., COLING 2025)"] == "holds"  # AKL +5 over FKL and +6 over RKL in every seed
    assert verdicts["GKD (Agarwal et al., ICLR 2024)"] == "not run"
    out = tmp_path / "results" / "compare_cpu"
    planned = [(row, seed) for row in args.row_list for seed in args.seed_list]
    compare.write_outputs(args, summary, planned, out, {})
    markdown = out.with_suffix(".md").read_text()
    assert "| AKL + CE (`akl.yaml`) | 0,1,2 | 9.0 ± 0.7 |" in markdown
    assert "| DDK mixing, CE + 0.2·KL (`ddk.yaml`) | *not run yet* |" in markdown
    assert "Not run yet (3 cells): ddk seed 0, ddk seed 1, ddk seed 2." in markdown
    assert "| AKL (Wu et al., COLING 2025) | AKL beats FKL and RKL |" in markdown and "**holds**" in markdown
    stored = json.loads(out.with_suffix(".json").read_text())
    assert stored["claims"][0]["verdict"] == "holds" and stored["not_run"][0] == "ddk seed 0"
    # The same comparisons on the held-out KL: AKL 1.0 against FKL 1.5 and RKL 1.8 in every seed and example, so an
    # improvement (lower KL) of exactly 0.5 and 0.8; DDK's claim (a worst-domain one) is not repeated there.
    kl = {c["paper"]: c for c in stored["claims_secondary"]["kl"]}
    assert [x["improvement"]["mean"] for x in kl["AKL (Wu et al., COLING 2025)"]["comparisons"]] == pytest.approx(
        [0.5, 0.8])
    assert kl["AKL (Wu et al., COLING 2025)"]["verdict"] == "holds" and "DDK (Liu et al., NeurIPS 2024)" not in kl
    assert ("| AKL (Wu et al., COLING 2025) | AKL + CE (`akl.yaml`) vs RKL + CE (`rkl.yaml`) | 6.00 [6.00, 6.00] (holds) "
            "| 0.80 [0.80, 0.80] (holds) |") in markdown  # ROUGE-L greedy 9 − 3, KL 1.8 − 1.0


def test_cells_run_side_by_side_are_timed_apart(compare, tmp_path, monkeypatch):
    """Cells run with 1 thread as one of two pieces side by side take longer each: the duration estimate of an
    invocation uses the cells run with its own thread count, and a row timed only by such cells is flagged in the
    s/step column instead of being compared with the rows timed alone."""
    cells_dir = tmp_path / "cells"
    cells = [_cell("teacher_ft", None, 10.0, 0.0), _cell("sft_start", None, 1.0, 3.0)]
    cells += [_cell("sft", seed, 2.0, 2.0) for seed in (0, 1)]  # before the field: the reference machine's 2
    cells += [{**_cell("fkl", seed, 4.0, 1.5), "threads": 1, "seconds": 500.0, "s_per_step": 3.0} for seed in (0, 1)]
    cells += [{**_cell("sft", 2, 2.0, 2.0), "threads": 1, "seconds": 500.0, "s_per_step": 3.5}]
    for cell in cells:
        compare.store_cell(compare.cell_path(cells_dir, cell["row"], cell["seed"]), cell)
    loaded = compare.load_cells(cells_dir)
    monkeypatch.setattr(compare.torch, "get_num_threads", lambda: 2)
    assert compare.estimate_seconds(loaded, "sft") == 15.0  # sft seeds 0, 1 (10 s, 20 s), not the 1-thread seed 2
    assert compare.estimate_seconds(loaded, "rkl") == 15.0  # any row's, still the 2-thread cells
    monkeypatch.setattr(compare.torch, "get_num_threads", lambda: 1)
    assert compare.estimate_seconds(loaded, "sft") == 500.0 and compare.estimate_seconds(loaded, "rkl") == 500.0
    args = compare.parse_args(["--rows", "sft,fkl", "--seeds", "0,1,2", "--n-boot", "100"])
    summary = compare.summarise(loaded, args)
    assert summary["rows"]["sft"]["s_per_step"] == 2.0  # the cells run alone only
    out = tmp_path / "compare_cpu"
    compare.write_outputs(args, summary, [("sft", s) for s in (0, 1, 2)] + [("fkl", s) for s in (0, 1, 2)], out, {})
    markdown = out.with_suffix(".md").read_text()
    assert "| 2.0 |" in markdown and "| 3.0‡ |" in markdown and "‡ s/step from cells run with 1 thread" in markdown


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
    # the student-size measurement first: its cell of the 2-layer SFT start is then the matrix's sft_start cell
    assert compare.main(argv + ["--candidates", "2"]) == 0
    assert "| 2 layers |" in Path(str(out) + "_candidates.md").read_text()
    capsys.readouterr()
    assert compare.main(argv) == 0
    first = capsys.readouterr().out

    result = json.loads(out.with_suffix(".json").read_text())
    cells_dirs = list(Path(str(out) + "_cells").iterdir())
    assert len(cells_dirs) == 1
    cell_files = sorted(p.name for p in cells_dirs[0].glob("*.json") if p.name not in (compare.SHARED_RECORD, compare.SETTINGS_RECORD))
    assert cell_files == ["candidate2.json", "fkl-seed0.json", "fkl-seed1.json", "sft-seed0.json", "sft-seed1.json",
                          "sft_start.json", "teacher_ft.json"]
    start = json.loads((cells_dirs[0] / "sft_start.json").read_text())
    assert start["row"] == "sft_start" and start["candidate"]["layers"] == 2  # not evaluated twice
    # the shared parts the cells were scored against, by their training losses (a fresh machine retrains them)
    shared = json.loads((cells_dirs[0] / compare.SHARED_RECORD).read_text())
    assert set(shared) == {"teacher_ft", "sft_start2", "evaluation"} and shared["evaluation"] == {"eval_batch_size": 9}
    assert all(shared[part]["losses"] for part in ("teacher_ft", "sft_start2"))
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
    assert sorted(p.name for p in cells_dirs[0].glob("*.json") if p.name not in (compare.SHARED_RECORD, compare.SETTINGS_RECORD)) == cell_files
    assert "Not run yet (2 cells): sft seed 2, fkl seed 2." in out.with_suffix(".md").read_text()

    # A piece running beside this one stores a cell after this invocation loaded the cells: the tables include it.
    real_sft_start = compare.ensure_sft_start

    def sft_start_while_another_piece_stores_a_cell(*a, **k):
        beside = json.loads((cells_dirs[0] / "fkl-seed1.json").read_text())
        compare.store_cell(cells_dirs[0] / "rkl-seed1.json", {**beside, "row": "rkl"})
        return real_sft_start(*a, **k)

    monkeypatch.setattr(compare, "ensure_sft_start", sft_start_while_another_piece_stores_a_cell)
    assert compare.main(argv + ["--time-budget-min", "0"]) == 0
    capsys.readouterr()
    assert json.loads(out.with_suffix(".json").read_text())["rows"]["rkl"]["seeds"] == [1]
    assert "| RKL + CE (`rkl.yaml`) | 1 |" in out.with_suffix(".md").read_text()
    (cells_dirs[0] / "rkl-seed1.json").unlink()

    # Another evaluation batch size would draw other samples: refused before any work, nothing rewritten.
    stamps = {p.name: p.stat().st_mtime_ns for p in [*cells_dirs[0].glob("*.json"), out.with_suffix(".md")]}
    with pytest.raises(SystemExit, match="--eval-batch-size 5: the cells in .* were scored with --eval-batch-size 9"):
        compare.main(argv + ["--eval-batch-size", "5"])
    assert {p.name: p.stat().st_mtime_ns for p in [*cells_dirs[0].glob("*.json"), out.with_suffix(".md")]} == stamps

    # Pieces given the same rows: a cell another live process has claimed is skipped; a claim left by a process
    # that is gone is taken over, the cell trained and the claim removed.
    import os

    (cells_dirs[0] / "sft-seed2.claim").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    (cells_dirs[0] / "fkl-seed2.claim").write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))
    assert compare.main(argv + ["--seeds", "0,1,2"]) == 0
    fourth = capsys.readouterr().out
    assert f"[sft seed 2] running in process {os.getppid()}" in fourth and "[fkl seed 2] ..." in fourth
    assert not (cells_dirs[0] / "sft-seed2.json").exists() and (cells_dirs[0] / "sft-seed2.claim").exists()
    assert (cells_dirs[0] / "fkl-seed2.json").exists() and not (cells_dirs[0] / "fkl-seed2.claim").exists()


def test_a_recomputed_shared_part_must_match_the_recorded_one(compare, tmp_path):
    """A fresh machine retrains the teacher and SFT start: the first losses are recorded, the same ones pass, and
    different ones stop the run (the stored cells were scored against the recorded part)."""
    info = {"settings": {"steps": 3}, "metrics": [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]}
    compare.check_shared(tmp_path, "teacher_ft", info)
    assert json.loads((tmp_path / "shared.json").read_text())["teacher_ft"]["losses"] == [2.5, 2.25]
    compare.check_shared(tmp_path, "teacher_ft", info)  # the same part again: fine
    changed = {**info, "metrics": [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.3}]}
    with pytest.raises(SystemExit, match="teacher_ft: its training losses differ"):
        compare.check_shared(tmp_path, "teacher_ft", changed)
    other = {"settings": {"steps": 4}, "metrics": [{"step": 1, "loss": 9.0}]}
    compare.check_shared(tmp_path, "teacher_ft", other)  # other settings: a different part, recorded anew


def test_cells_scored_with_another_eval_batch_size_are_not_mixed(compare, tmp_path, capsys):
    """Sampled generations draw one random stream per evaluation batch, so a folder's cells pair only with cells of
    the same --eval-batch-size: a folder stored before the record existed is read from its cells' commands, the
    record is written, and another batch size stops the invocation before any work (nothing written)."""
    folder = tmp_path / "cells"
    compare.store_cell(folder / "fkl-seed0.json", {"row": "fkl", "seed": 0,
                                                  "command": "kdlm distill --eval.batch_size 16 --eval.decoding greedy"})
    with pytest.raises(SystemExit, match=r"--eval-batch-size 32: the cells in .* were scored with --eval-batch-size "
                                         r"16 \(recorded in the --eval.batch_size of the cells' commands\).*Rerun "
                                         r"with --eval-batch-size 16"):
        compare.check_evaluation(folder, 32)
    assert not (folder / compare.SHARED_RECORD).exists()  # a refused invocation writes nothing
    compare.check_evaluation(folder, 16)
    assert json.loads((folder / compare.SHARED_RECORD).read_text())["evaluation"] == {"eval_batch_size": 16}
    compare.store_cell(folder / "teacher_ft.json", {"row": "teacher_ft", "seed": None})  # no command: the record rules
    (folder / "fkl-seed0.json").unlink()
    with pytest.raises(SystemExit, match=r"scored with --eval-batch-size 16 \(recorded in .*shared.json, evaluation"):
        compare.check_evaluation(folder, 8)
    empty = tmp_path / "empty"  # a record without cells (an earlier invocation stopped before scoring): no constraint
    compare.check_shared(empty, "teacher_ft", {"settings": {}, "metrics": []})
    compare.check_evaluation(empty, 16)
    compare.check_evaluation(empty, 8)
    assert json.loads((empty / compare.SHARED_RECORD).read_text())["evaluation"] == {"eval_batch_size": 8}


def test_the_teacher_cell_is_reused_by_a_folder_with_other_student_settings(compare, tmp_path):
    """Another student size or method budget makes another cells folder; its teacher cell is copied from a folder
    whose teacher settings, test sample and recorded teacher (training losses) are the same, and from no other."""
    settings = {"student_layers": 15, "steps": 40, **{k: k for k in compare.TEACHER_CELL_KEYS}}
    teacher = {"settings": {"steps": 80}, "metrics": [{"step": 1, "loss": 2.5}]}
    old = tmp_path / "old"
    compare.record_settings(old, settings)
    compare.check_shared(old, "teacher_ft", teacher)
    compare.store_cell(old / "teacher_ft.json", {"row": "teacher_ft", "seed": None, "aggregate": {"kl": 0.0}})

    def new_folder(name: str, changes: dict, recorded: dict) -> Path:
        folder = tmp_path / name
        compare.record_settings(folder, {**settings, **changes})
        compare.check_shared(folder, "teacher_ft", recorded)
        return folder

    smaller = new_folder("smaller", {"student_layers": 9, "steps": 20}, teacher)
    assert compare.reuse_teacher_cell(smaller, {**settings, "student_layers": 9, "steps": 20}) == old
    copied = json.loads((smaller / "teacher_ft.json").read_text())
    assert copied["aggregate"] == {"kl": 0.0} and copied["reused_from"] == "old"
    assert set(compare.load_cells(smaller)) == {"teacher_ft"}  # the records beside the cells are not cells
    other_sample = new_folder("other_sample", {"per_domain": 20}, teacher)
    assert compare.reuse_teacher_cell(other_sample, {**settings, "per_domain": 20}) is None
    retrained = new_folder("retrained", {"steps": 20}, {**teacher, "metrics": [{"step": 1, "loss": 2.6}]})
    assert compare.reuse_teacher_cell(retrained, {**settings, "steps": 20}) is None
    assert not (other_sample / "teacher_ft.json").exists() and not (retrained / "teacher_ft.json").exists()


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_pieces_given_the_same_rows_share_the_cells_out(compare, tmp_path):
    import os

    cells = tmp_path / "cells"
    assert compare.claim_cell(cells, "fkl", 0) is None  # claimed: the file names this process
    claim = cells / "fkl-seed0.claim"
    assert json.loads(claim.read_text())["pid"] == os.getpid()
    held = compare.claim_cell(cells, "fkl", 0)  # the process holding it is alive: not trained twice
    assert held and f"process {os.getpid()}" in held and str(claim) in held
    compare.release_cell(cells, "fkl", 0)
    assert not claim.exists()
    # A claim whose process is gone is taken over; one from another host is held (its process cannot be checked).
    claim.write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "since": "earlier"}))
    assert compare.claim_cell(cells, "fkl", 0) is None and json.loads(claim.read_text())["pid"] == os.getpid()
    other = {"pid": os.getpid(), "host": "elsewhere", "since": "earlier"}
    claim.write_text(json.dumps(other))
    assert "on elsewhere" in compare.claim_cell(cells, "fkl", 0) and "remove it" in compare.claim_cell(cells, "fkl", 0)
    compare.release_cell(cells, "fkl", 0)  # not this process's claim: kept
    assert json.loads(claim.read_text()) == other
    # A claim file edited by hand or cut short: held (never a traceback), and the message says what to do.
    for garbled in ("", "[1, 2]", '{"pid": "abc"}', '{"host": "here"}'):
        claim.write_text(garbled)
        assert "remove it if no piece is running" in compare.claim_cell(cells, "fkl", 0), garbled
    assert compare.load_cells(cells) == {}  # claims are not cells

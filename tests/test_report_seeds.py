"""kdlm report's Seeds section: runs that differ only in train.seed are grouped, with mean ± 95 % t-interval
columns and a bar chart with error bars (synthetic run directories, hand-computed intervals)."""

from __future__ import annotations

import json
import re

import yaml

from kdlm.report import build_report
from kdlm.report.plots import _bars
from kdlm.report.sections import seed_groups
from kdlm.report.runs import load_run


def _fake_run(root, name: str, divergence: str, seed: int, kl: float, rouge: float):
    run = root / name
    run.mkdir(parents=True)
    config = {"objective": {"name": "kd", "divergence": divergence}, "train": {"seed": seed, "output_dir": str(run),
                                                                               "lr": 0.001}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2)))
    (run / "summary.json").write_text(json.dumps({"after": {"overall": {"kl": kl}}}))
    (run / "eval_sample.json").write_text(json.dumps({"generation": {"mean": {"overall": {"rouge_l": rouge,
                                                                                          "exact_match": 0.0}}}}))
    return run


def test_seed_groups_with_intervals(tmp_path):
    runs = [_fake_run(tmp_path, f"fkl-seed{s}", "fkl", s, kl, 10.0 + s) for s, kl in zip((0, 1, 2), (1.0, 2.0, 3.0))]
    runs += [_fake_run(tmp_path, f"akl-seed{s}", "akl", s, kl, 20.0) for s, kl in zip((0, 1), (4.0, 6.0))]
    runs.append(_fake_run(tmp_path, "rkl-seed0", "rkl", 0, 7.5, 5.0))
    groups = seed_groups([load_run(r) for r in runs])
    assert [[run.path.name for run in g] for g in groups] == [["fkl-seed0", "fkl-seed1", "fkl-seed2"],
                                                              ["akl-seed0", "akl-seed1"], ["rkl-seed0"]]
    page = build_report(runs, tmp_path / "out").read_text()
    assert '<section id="seeds"><h2>Seeds</h2>' in page
    assert "held-out KL (mean ± 95 % CI)" in page and "ROUGE-L (sample) (mean ± 95 % CI)" in page
    # FKL: KL 1, 2, 3 -> mean 2, s = 1, half-width 4.3027 / sqrt(3) = 2.484; ROUGE-L 10, 11, 12 -> 11 ± 2.484.
    assert '<td class="num">2 ± 2.484</td>' in page and '<td class="num">11 ± 2.484</td>' in page
    # AKL: KL 4, 6 -> mean 5, s = sqrt(2), half-width 12.706 · sqrt(2) / sqrt(2) = 12.71.
    assert '<td class="num">5 ± 12.71</td>' in page
    # A setting with one run: its value, no interval.
    assert '<td class="num">7.5</td>' in page
    # The group's setting names the keys that differ between groups (not the seed).
    assert "<td>objective.divergence=fkl</td>" in page and "train.seed=" not in page
    assert "seeds.png" in page and (tmp_path / "out" / "seeds.png").is_file()
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert re.search(r"\| G1 \| objective.divergence=fkl \| fkl-seed0, fkl-seed1, fkl-seed2 \| 0, 1, 2 \| "
                     r"1 ± 0 \| 2 ± 2\.484 \|", markdown)  # final loss 2/2 in every run


def test_no_seed_section_without_repeated_settings(tmp_path):
    runs = [_fake_run(tmp_path, "a", "fkl", 0, 1.0, 1.0), _fake_run(tmp_path, "b", "akl", 0, 2.0, 2.0)]
    page = build_report(runs, tmp_path / "out").read_text()
    assert 'id="seeds"' not in page and "seeds.png" not in page


def test_error_bars_are_drawn():
    panel = ("KL", ["G1", "G2"], [2.0, 5.0], [2.484, 12.71])
    with_bars, without = _bars([panel]), _bars([(*panel[:3], [float("nan")] * 2)])
    assert with_bars.startswith(b"\x89PNG") and with_bars != without
    assert _bars([("KL", ["G1"], [float("nan")], [1.0])]) is None

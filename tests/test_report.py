"""``kdlm report``: the page's content from real tiny runs, errors, the CLI, and a headless Chromium render.

The Chromium test fails (never skips) when ``chromium`` is missing: ``make test`` installs it (Debian's package).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from conftest import tiny_config

from kdlm.cli import main
from kdlm.errors import KdlmError
from kdlm.report import ReportError, build_report, default_out_dir, fmt_number

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*data-file="([^"]+)"')


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Three real tiny runs: kd+fkl (with `kdlm eval` generation metrics and a mid-training evaluation),
    gkd+akl with DDK domain mixing (AKL weights, GKD coin, DDK weights), and DPKD's sequence form."""
    import torch

    # One thread: these models are tiny, and on a busy 2-core machine two threads contending cost 10x the time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_runs(tiny, tmp_path_factory.mktemp("report_runs"))
    finally:
        torch.set_num_threads(threads)


def _train_runs(tiny, root):
    from kdlm.eval.run import evaluate_command
    from kdlm.train.loop import distill

    common = {"train.max_steps": 6, "train.log_every": 1, "eval.enabled": True, "eval.num_samples": 1}
    fkl = tiny_config(tiny, root / "fkl", **common, **{"train.eval_every": 3, "eval.gen_max_new_tokens": 8})
    distill(fkl)
    evaluate_command(fkl)  # eval_final.json + predictions_final.jsonl next to final/
    distill(tiny_config(tiny, root / "gkd_akl", **common, **{
        "objective.name": "gkd", "objective.divergence": "akl", "objective.lmbda": 0.5,
        "objective.sampling.max_new_tokens": 4, "data.mixing.strategy": "ddk", "data.mixing.interval": 2,
        "data.mixing.val_per_domain": 2}))
    distill(tiny_config(tiny, root / "dpkd", **{
        "train.max_steps": 4, "train.log_every": 1, "objective.name": "dpkd", "objective.dpkd_form": "sequence",
        "objective.sampling.max_new_tokens": 4}))
    return {name: root / name / "run" for name in ("fkl", "gkd_akl", "dpkd")}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out") / "report"
    return build_report([runs["fkl"], runs["gkd_akl"], runs["dpkd"]], out)


def _images(page_html: str) -> dict[str, bytes]:
    return {name: base64.b64decode(data) for data, name in DATA_URI.findall(page_html)}


def test_page_holds_the_tables_and_plots(runs, report):
    from PIL import Image

    page = report.read_text()
    # Evaluation tables: the after-KL of summary.json, overall and per domain, for the runs that evaluated.
    for name in ("fkl", "gkd_akl"):
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert fmt_number(summary["after"]["overall"]["kl"]) in page
        assert fmt_number(summary["after"]["domain/beta"]["student_ce"]) in page
    # `kdlm eval`'s generation metrics (eval_final.json).
    generation = json.loads((runs["fkl"] / "eval_final.json").read_text())["generation"]["mean"]
    assert "ROUGE-L" in page and "self-BLEU" in page
    assert f'<td class="num">{fmt_number(generation["overall"]["distinct_2"])}</td>' in page
    # Config keys that differ between the runs, and each full config collapsible.
    for key in ("objective.name", "objective.divergence", "data.mixing.strategy"):
        assert f"<td>{key}</td>" in page
    assert "<td>train.lr</td>" not in page  # the same in every run
    assert page.count("<details><summary>config.yaml of ") == 3
    # Plots: valid PNGs, embedded, the same bytes as the files beside the page; method plots where metrics exist.
    images = _images(page)
    assert {"training.png", "optimisation.png", "heldout_kl.png", "akl.png", "gkd.png", "dpkd.png"} <= set(images)
    assert any(name.startswith("ddk_") for name in images)
    assert page.count("<img ") == len(images)
    for name, png in images.items():
        assert png.startswith(PNG_MAGIC), name
        with Image.open(io.BytesIO(png)) as img:
            img.verify()
        with Image.open(io.BytesIO(png)) as img:
            assert img.width >= 300 and img.height >= 200, name
        assert (report.parent / name).read_bytes() == png
    # No external resource: everything is inline.
    assert not re.search(r'(src|href)="(https?:|//)', page)


def test_markdown_twin_links_the_png_files(runs, report):
    markdown = (report.parent / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert links and set(links) == set(_images(report.read_text()))
    for link in links:
        assert (report.parent / link).read_bytes().startswith(PNG_MAGIC)
    summary = json.loads((runs["fkl"] / "summary.json").read_text())
    assert fmt_number(summary["after"]["overall"]["kl"]) in markdown
    assert "| objective.divergence |" in markdown


def test_rebuilding_removes_only_the_earlier_reports_figures(runs, tmp_path):
    out = tmp_path / "report"
    build_report([runs["fkl"], runs["gkd_akl"], runs["dpkd"]], out)
    first = {p.name for p in out.glob("*.png")}
    (out / "mine.png").write_bytes(PNG_MAGIC)  # the user's own file in the folder
    # Without the DPKD run and with another order: the DDK figure is renamed, the DPKD figure is gone.
    build_report([runs["gkd_akl"], runs["fkl"]], out)
    links = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text()))
    assert "dpkd.png" in first and "dpkd.png" not in links
    assert {p.name for p in out.glob("*.png")} == links | {"mine.png"}
    assert (out / "mine.png").read_bytes() == PNG_MAGIC


def test_text_is_escaped_and_bad_lines_are_skipped(tmp_path):
    """A fabricated run: only metrics (one line broken), a hostile sample; the page escapes it and notes the line."""
    run = tmp_path / "odd<run>"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 2.0 / s, "ce": 3.0 / s, "kd": 1.0 / s, "gkd/on_policy": float(s % 2),
                         "gkd/reward": 0.1 * s, "rewards/margins": 0.01 * s, "rewards/accuracies": 0.5}) for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + '\n{"step": 3, "lo\n' + lines[2] + "\n")
    (run / "samples.jsonl").write_text(json.dumps({"step": 1, "from": "student", "prompt": "<script>alert(1)</script>",
                                                   "completion": "a & b"}) + "\n")
    page = build_report([run], tmp_path / "out").read_text()
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b" in page
    assert "odd&lt;run&gt;" in page and "odd<run>" not in page
    assert "1 unreadable line(s) skipped (line 3)" in page
    assert "config.yaml: missing" in page
    assert {"training.png", "gkd.png", "dpkd.png"} <= set(_images(page))
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page


def test_not_a_run_directory_names_the_path(tmp_path, capsys, runs):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ReportError, match=re.escape(str(empty)) + r".*neither config.yaml nor metrics.jsonl") as info:
        build_report([runs["fkl"], empty], tmp_path / "out")
    assert isinstance(info.value, KdlmError)
    assert not (tmp_path / "out").exists()  # nothing written before the check
    with pytest.raises(ReportError, match=re.escape(str(tmp_path / "missing")) + ": no such directory"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    assert main(["report", str(empty)]) == 1
    err = capsys.readouterr().err
    assert f"kdlm report: error: {empty}: not a kdlm run directory" in err and "kdlm distill" in err


def test_cli_writes_to_the_default_folders(runs, tmp_path, monkeypatch, capsys):
    one = tmp_path / "one"
    shutil.copytree(runs["dpkd"], one, ignore=shutil.ignore_patterns("final"))
    assert main(["report", str(one)]) == 0
    assert (one / "report" / "report.html").is_file() and (one / "report" / "report.md").is_file()
    assert capsys.readouterr().out.strip() == str(one / "report" / "report.html")
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(one), str(runs["dpkd"])]) == 0
    written = sorted((tmp_path / "reports").glob("*/report.html"))
    assert len(written) == 1 and re.fullmatch(r"\d{8}-\d{6}", written[0].parent.name)
    assert default_out_dir(["a", "b"]).parent.name == "reports"
    assert main(["report", str(one), "--out", str(tmp_path / "custom")]) == 0
    assert (tmp_path / "custom" / "report.html").is_file()


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found: the report render test needs Debian's chromium "
                    "(`make test` installs it; or `sudo apt-get install chromium`)")
    return path


def _run_chromium(args: list[str], profile) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_chromium_renders_the_page(report, tmp_path):
    from PIL import Image

    url = report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    done = _run_chromium([f"--screenshot={shot}", "--window-size=1200,3000", "--hide-scrollbars", url], tmp_path / "p1")
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1200, 3000)
        rgb = img.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500  # text, tables and plots, not a blank or error page
    near_white = sum(count for count, (r, g, b) in colours if min(r, g, b) >= 235)
    assert near_white < 0.95 * rgb.width * rgb.height

    # The DOM after scripts ran: tables present, every <img> decoded (the page's own check sets data-images-ok).
    done = _run_chromium(["--virtual-time-budget=10000", "--dump-dom", url], tmp_path / "p2")
    dom = done.stdout
    assert done.returncode == 0 and "</html>" in dom, done.stderr[-2000:]
    expected = report.read_text().count("<img ")
    assert expected >= 6
    assert dom.count("<img ") == expected
    assert f'data-images-total="{expected}"' in dom
    assert 'data-images-ok="true"' in dom
    assert dom.count("<table>") >= 4 and "KL(teacher‖student)" in dom


def test_malformed_files_are_skipped(tmp_path):
    """Wrong types anywhere in a run's files drop that part of the page, never the page."""
    run = tmp_path / "bad"
    run.mkdir()
    (run / "config.yaml").write_text("- not\n- a mapping\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": "NaN"}\n{"step": 2, "loss": Infinity, "ce": 1}\n[1, 2]\n'
                                       '{"loss": 3}\n{"step": 3, "loss": 1.0, "gkd/on_policy": "yes"}\n')
    (run / "summary.json").write_text('{"before": 3, "after": {"overall": "x", "domain/a": {"kl": "bad"}, "samples": "z"},'
                                      ' "wall_s": "x"}')
    (run / "eval_final.json").write_text('{"generation": {"mean": {"overall": 5, "domains": [1]}, "seeds": "x"}}')
    (run / "eval_before.json").write_text("[]")
    (run / "mixing.jsonl").write_text('{"step": "a", "ddk/weight/x": "b"}\n{"step": 1, "ddk/weight/x": 0.5}\n')
    (run / "samples.jsonl").write_text('{"step": 1}\n"text"\n')
    page = build_report([run], tmp_path / "out").read_text()
    assert "config.yaml: not a mapping" in page and "eval_before.json: not a JSON object" in page
    assert "metrics.jsonl: 1 unreadable line(s) skipped (line 3)" in page
    assert {"training.png", "ddk_1_bad.png"} <= set(_images(page))

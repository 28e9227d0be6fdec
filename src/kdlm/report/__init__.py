"""``kdlm report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page (and a markdown twin) about training runs.

What a run directory holds (written by ``kdlm distill`` and ``kdlm eval``) and what the page makes of it:

* ``config.yaml``  -> a table of the keys whose values differ between the runs, and every full config (collapsible);
  runs whose configs differ only in ``train.seed`` form a group: mean ± 95 % interval per group and a bar chart with
  error bars (the *Seeds* section, :mod:`kdlm.report.stats`);
* ``metrics.jsonl`` -> training curves (loss and its terms, learning rate, gradient norm, throughput; one line per
  run) and, when the keys are there, the method plots: DDK domain weights (``mixing.jsonl`` first, else the
  ``ddk/...`` keys), AKL head/tail weights, GKD on-policy fraction / reward / completion length, DPKD reward
  margin and accuracy (sequence form) or token margin and top-1 agreement (token form), RLKD rank term and CR@k/MOR@k;
* ``summary.json`` / ``eval_before.json`` / ``eval_after.json`` -> teacher-forced KL, cross-entropies and peak
  alignment before -> after, overall and per domain; ``eval_step<N>.json`` -> held-out KL during training;
* ``eval_<name>.json`` with ``generation`` (``kdlm eval``) -> ROUGE-L, exact match, distinct-1/2, self-BLEU and
  length per domain (mean ± std over seeds with sampled decoding); ``predictions_<name>.jsonl``, ``samples.jsonl``
  and the evaluation samples -> a few example generations.

Everything missing is skipped (a line in the page's notes says what was unreadable); a path with neither
``config.yaml`` nor ``metrics.jsonl`` is a :class:`ReportError`. The HTML embeds its plots as base64 PNG data URIs
and needs no network; the PNG files are also written next to it, for ``report.md``. All text from the runs is
escaped. Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch).

The package, by concern: :mod:`~kdlm.report.runs` reads run directories, :mod:`~kdlm.report.plots` draws,
:mod:`~kdlm.report.sections` turns runs into the page's sections, :mod:`~kdlm.report.page` renders them to HTML and
markdown; this module builds the page and is the ``kdlm report`` command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from kdlm.errors import KdlmError
from kdlm.formatting import format_change
from kdlm.report.page import Image, render_html, render_markdown
from kdlm.report.runs import EXPECTED, ReportError, RunData, _labels, load_run
from kdlm.report.sections import (
    _configs, _evaluation, _methods, _notes, _overview, _samples, _seeds, _training, fmt_number,
)

__all__ = ["ReportError", "RunData", "build_report", "default_out_dir", "fmt_number", "format_change", "load_run",
           "report_main"]


def default_out_dir(run_dirs: Sequence[Union[str, Path]], now: Optional[_dt.datetime] = None) -> Path:
    """``<run dir>/report`` for one run; ``reports/<YYYYmmdd-HHMMSS>`` (under the current folder) for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path("reports") / (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")


# An image line of a report.md this module wrote: ``![alt](name.png)``, the file a plain name beside it.
_FIGURE_LINK = re.compile(r"^!\[.*\]\(([^()/\\]+\.png)\)$", re.MULTILINE)


def _figures_of(markdown: Path) -> set[str]:
    """The PNG files an earlier build linked from ``markdown`` (none when it is missing or unreadable)."""
    try:
        return set(_FIGURE_LINK.findall(markdown.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError):
        return set()


def build_report(run_dirs: Sequence[Union[str, Path]], out_dir: Union[str, Path]) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and the plots' PNG files into ``out_dir``.

    Rebuilding into a folder that holds an earlier report removes the figures that report linked and this one does
    not (a DDK figure's name carries the run's index, so another set of runs renames it); no other file is touched.
    Returns the path of ``report.html``. Raises :class:`ReportError` (naming the path) for a path that is not a
    kdlm run directory, before anything is written.
    """
    if not run_dirs:
        raise ReportError(f"no run directory given; expected at least one {EXPECTED}")
    runs = [load_run(path) for path in run_dirs]
    for run, label in zip(runs, _labels([run.path for run in runs])):
        run.label = label
    images: list[Image] = []
    sections = [_overview(runs), _seeds(runs, images), _configs(runs), _training(runs, images), _evaluation(runs),
                _methods(runs, images), _samples(runs), _notes(runs)]
    present = [s for s in sections if s is not None]
    out = Path(out_dir)
    earlier = _figures_of(out / "report.md")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for image in images:
            (out / image.filename).write_bytes(image.png)
        generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        (out / "report.md").write_text(render_markdown(present, runs, generated), encoding="utf-8")
        page = out / "report.html"
        page.write_text(render_html(present, runs, generated), encoding="utf-8")
        for stale in sorted(earlier - {image.filename for image in images}):
            (out / stale).unlink(missing_ok=True)
    except OSError as error:
        raise ReportError(f"{out}: cannot write the report there ({error})") from error
    return page


def report_main(argv: Sequence[str]) -> int:
    """``kdlm report RUN_DIR [RUN_DIR ...] [--out DIR]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="kdlm report",
        description="Summarise one or more run directories in one self-contained HTML page (report.html), a "
                    "markdown twin (report.md) and PNG plots.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a directory written by `kdlm distill`")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: RUN_DIR/report for one run, reports/<YYYYmmdd-HHMMSS> for several)")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as stop:  # --help (0) or a usage error (2)
        return int(stop.code or 0)
    out = args.out or default_out_dir(args.run_dirs)
    try:
        page = build_report(args.run_dirs, out)
    except KdlmError as error:
        print(f"kdlm report: error: {error}", file=sys.stderr)
        return 1
    print(page)
    return 0

"""``kdlm report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page (and a markdown twin) about training runs.

What a run directory holds (written by ``kdlm distill`` and ``kdlm eval``) and what the page makes of it:

* ``config.yaml``  -> a table of the keys whose values differ between the runs, and every full config (collapsible);
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
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from kdlm import __version__, registry
from kdlm.errors import KdlmError

__all__ = ["ReportError", "RunData", "build_report", "default_out_dir", "fmt_number", "load_run", "report_main"]

EXPECTED = "a run directory written by `kdlm distill` (config.yaml, metrics.jsonl, summary.json, ...)"
TEXT_LIMIT = 300  # characters of a sample shown in a table cell
SAMPLES_SHOWN = 3  # samples per run and source


class ReportError(KdlmError):
    """A report cannot be built: a path is not a kdlm run directory, or the output folder cannot be written."""


# ------------------------------------------------------------------------------------------------ reading runs
@dataclass
class RunData:
    """Everything read from one run directory; absent files leave their field empty."""

    path: Path
    label: str = ""
    config: dict = field(default_factory=dict)
    config_text: str = ""
    metrics: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)  # "<name>" of eval_<name>.json -> its content
    mixing: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # samples.jsonl (on-policy methods)
    predictions: dict[str, list[dict]] = field(default_factory=dict)  # "<name>" of predictions_<name>.jsonl
    notes: list[str] = field(default_factory=list)

    def teacher_forced(self, tag: str) -> Optional[dict]:
        """The ``before`` / ``after`` evaluation (from summary.json, else eval_<tag>.json): its metric groups
        (``overall``, ``domain/<name>``) that are mappings, and ``samples`` when it is a list."""
        result = self.summary.get(tag)
        if not isinstance(result, dict):
            result = self.evals.get(tag)
        if not isinstance(result, dict):
            return None
        return {k: v for k, v in result.items() if isinstance(v, dict) or (k == "samples" and isinstance(v, list))}

    def metric_keys(self) -> set[str]:
        """Every key logged in metrics.jsonl."""
        return {key for record in self.metrics for key in record}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """Steps and values of ``key`` over metrics.jsonl (non-finite values become NaN: a gap in the line)."""
        steps, values = [], []
        for record in self.metrics:
            if key in record and _is_number(record[key]) and _is_number(record.get("step")):
                steps.append(float(record["step"]))
                value = float(record[key])
                values.append(value if math.isfinite(value) else math.nan)
        return steps, values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dict(value: Any) -> dict:
    """``value`` when it is a mapping, else ``{}`` (malformed or missing parts of a file read as empty)."""
    return value if isinstance(value, dict) else {}


def _read_json(path: Path, notes: list[str]) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        notes.append(f"{path.name}: unreadable, skipped ({error})")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name}: not a JSON object, skipped")
        return None
    return data


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        notes.append(f"{path.name}: unreadable, skipped ({error})")
        return []
    records, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        notes.append(f"{path.name}: {len(bad)} unreadable line(s) skipped (line {shown})")
    return records


def load_run(path: Union[str, Path]) -> RunData:
    """Read one run directory. Raises :class:`ReportError` naming ``path`` when it is not a kdlm run."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: no such directory; expected {EXPECTED}")
    if not (path / "config.yaml").is_file() and not (path / "metrics.jsonl").is_file():
        raise ReportError(
            f"{path}: not a kdlm run directory (neither config.yaml nor metrics.jsonl in it); expected {EXPECTED}"
        )
    run = RunData(path=path)
    config_file = path / "config.yaml"
    if config_file.is_file():
        try:
            run.config_text = config_file.read_text(encoding="utf-8")
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else {}
            if not isinstance(loaded, dict):
                run.notes.append("config.yaml: not a mapping, only shown as text")
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            run.notes.append(f"config.yaml: unreadable, skipped ({error})")
    else:
        run.notes.append("config.yaml: missing")
    run.metrics = _read_jsonl(path / "metrics.jsonl", run.notes)
    run.metrics.sort(key=lambda r: r["step"] if _is_number(r.get("step")) else math.inf)
    run.summary = _read_json(path / "summary.json", run.notes) or {}
    for file in sorted(path.glob("eval_*.json")):
        data = _read_json(file, run.notes)
        if data is not None:
            run.evals[file.stem[len("eval_"):]] = data
    run.mixing = _read_jsonl(path / "mixing.jsonl", run.notes)
    run.samples = _read_jsonl(path / "samples.jsonl", run.notes)
    for file in sorted(path.glob("predictions_*.jsonl")):
        run.predictions[file.stem[len("predictions_"):]] = _read_jsonl(file, run.notes)
    return run


def _labels(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing path parts that tell the runs apart (``fkl/run``, ``akl/run``)."""
    parts = [p.resolve().parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"#{i + 1} {'/'.join(p[-1:])}" for i, p in enumerate(parts)]  # the same directory given twice


# ------------------------------------------------------------------------------------------------ formatting
def fmt_number(value: Any) -> str:
    """How the report prints a value: 4 significant digits for floats, ints as they are, ``—`` for none."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def _change(before: Any, after: Any) -> str:
    if not (_is_number(before) and _is_number(after)) or before == 0 or not math.isfinite(before):
        return ""
    return f" ({(after - before) / abs(before) * 100:+.1f}%)"


def _before_after(before: Optional[dict], after: Optional[dict], key: str) -> str:
    b = before.get(key) if before else None
    a = after.get(key) if after else None
    if b is None and a is None:
        return "—"
    if before is None:
        return fmt_number(a)
    if after is None:
        return fmt_number(b)
    return f"{fmt_number(b)} → {fmt_number(a)}{_change(b, a)}"


def _duration(seconds: Any) -> str:
    if not _is_number(seconds) or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _clip(text: Any, limit: int = TEXT_LIMIT) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _config_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "null"
    return fmt_number(value) if isinstance(value, float) else str(value)


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------------ page model
# The page is a list of sections of blocks, rendered twice: to HTML (render_html) and to markdown (render_markdown).
@dataclass
class Paragraph:
    """A line of plain text."""

    text: str


@dataclass
class Table:
    """Cells are already formatted strings; escaping happens when rendering."""

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    numeric_from: int = 1  # columns from this index on are right-aligned


@dataclass
class Image:
    """A PNG: embedded as a data URI in the HTML, written to ``filename`` beside it for the markdown."""

    filename: str
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Details:
    """Collapsible preformatted text (a full config)."""

    summary: str
    text: str
    language: str = ""


Block = Union[Paragraph, Table, Image, Details]


@dataclass
class Section:
    """One ``<h2>`` of the page with its blocks; ``anchor`` is its id for the navigation links."""

    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ plots
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

# (label, steps, values, color, linestyle)
Series = tuple[str, list[float], list[float], str, str]


def _plot(panels: list[tuple[str, str, list[Series]]], *, ncols: int = 3, log_y: Sequence[str] = ()) -> Optional[bytes]:
    """One PNG with a panel per ``(title, ylabel, series)``; panels with no data are dropped. Panels named in
    ``log_y`` get a log y-axis when their values span at least a factor of 10."""
    panels = [p for p in panels if any(len(s[1]) for s in p[2])]
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.9 * ncols + 0.4, 3.0 * nrows + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for index, (title, ylabel, series) in enumerate(panels):
        ax = axes[index // ncols][index % ncols]
        for label, xs, ys, color, style in series:
            if xs:
                ax.plot(xs, ys, label=label, color=color, linestyle=style, linewidth=1.6,
                        marker="o" if len(xs) <= 25 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps
        finite = [v for s in series for v in s[2] if math.isfinite(v)]
        if title in log_y and finite and min(finite) > 0 and max(finite) >= 10 * min(finite):
            ax.set_yscale("log")  # only when the values span an order of magnitude
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        if len([s for s in series if s[1]]) > 1:
            ax.legend(fontsize=7, loc="best")
    for index in range(len(panels), nrows * ncols):
        axes[index // ncols][index % ncols].set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _per_run(runs: list[RunData], key: str, style: str = "-", suffix: str = "") -> list[Series]:
    out = []
    for i, run in enumerate(runs):
        xs, ys = run.series(key)
        if xs:
            out.append((run.label + suffix, xs, ys, COLORS[i % len(COLORS)], style))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


# ------------------------------------------------------------------------------------------------ sections
# The training loss, then every objective's logged terms (kdlm.registry.OBJECTIVES states them).
LOSS_TERMS = [("loss", "training loss (per unit)"), *registry.loss_terms().items()]


def _overview(runs: list[RunData]) -> Section:
    rows = []
    for run in runs:
        cfg = run.config
        name = _get(cfg, "objective.name")
        method = [str(name or "?")]
        spec = registry.OBJECTIVES.get(name or "kd")  # None: a config from before objective.name existed
        for key in spec.shown if spec is not None else ():
            if _get(cfg, f"objective.{key}"):
                method.append(str(_get(cfg, f"objective.{key}")))
        mixing = _get(cfg, "data.mixing.strategy")
        if mixing and mixing != "none":
            method.append(f"mixing {mixing}")
        steps = run.metrics[-1].get("step") if run.metrics else run.summary.get("total_steps")
        final_loss = run.metrics[-1].get("loss") if run.metrics else None
        before, after = run.teacher_forced("before"), run.teacher_forced("after")
        rows.append([
            run.label, str(run.path), " · ".join(method), str(_get(cfg, "teacher.name_or_path") or "—"),
            fmt_number(steps), fmt_number(final_loss),
            _before_after(before and _dict(before.get("overall")), after and _dict(after.get("overall")), "kl"),
            _duration(run.summary.get("wall_s")),
            f"{run.summary['peak_rss_gb']:.2f} GB" if _is_number(run.summary.get("peak_rss_gb")) else "—",
        ])
    table = Table(["run", "directory", "method", "teacher", "steps", "final loss", "held-out KL before → after",
                   "wall time", "peak memory"], rows, numeric_from=4)
    return Section("runs", "Runs", [table])


def _configs(runs: list[RunData]) -> Section:
    section = Section("config", "Configuration")
    with_config = [run for run in runs if run.config]
    if len(runs) > 1 and len(with_config) > 1:
        flat = [_flatten(run.config) for run in runs]
        keys = sorted({k for f in flat for k in f})
        shown = {k: [_config_value(f[k]) if k in f else "(absent)" for f in flat] for k in keys}
        rows = [[k] + values for k, values in shown.items() if len(set(values)) > 1]
        if rows:
            section.blocks.append(Table(["key"] + [run.label for run in runs], rows,
                                        caption=f"{len(rows)} of {len(keys)} config keys differ between the runs.",
                                        numeric_from=99))
        else:
            section.blocks.append(Paragraph(f"All {len(keys)} config keys are the same in every run."))
    elif len(runs) == 1:
        section.blocks.append(Paragraph("One run: its full resolved config is below."))
    for run in runs:
        if run.config_text:
            section.blocks.append(Details(f"config.yaml of {run.label}", run.config_text, "yaml"))
    return section


def _training(runs: list[RunData], images: list[Image]) -> Section:
    section = Section("training", "Training curves")
    keys = set().union(*(run.metric_keys() for run in runs)) if runs else set()
    panels = [(title, name, _per_run(runs, name)) for name, title in LOSS_TERMS if name in keys]
    png = _plot(panels, ncols=3)
    if png:
        images.append(Image("training.png", png, "training loss curves",
                            "Loss and its terms per logged step, one line per run."))
        section.blocks.append(images[-1])
    optim = [("learning rate", "lr", _per_run(runs, "lr")),
             ("gradient norm (before clipping)", "grad_norm", _per_run(runs, "grad_norm")),
             ("throughput", "tokens / s", _per_run(runs, "tokens_per_s"))]
    png = _plot(optim, ncols=3, log_y=("gradient norm (before clipping)",))
    if png:
        images.append(Image("optimisation.png", png, "learning rate, gradient norm and throughput"))
        section.blocks.append(images[-1])
    # Held-out KL during training: before (step 0), eval_step<N>.json, after (last step).
    series: list[Series] = []
    for i, run in enumerate(runs):
        points = []
        before, after = run.teacher_forced("before"), run.teacher_forced("after")
        if before and _is_number(_dict(before.get("overall")).get("kl")):
            points.append((0.0, before["overall"]["kl"]))
        for name, result in run.evals.items():
            match = re.fullmatch(r"step(\d+)", name)
            if match and _is_number(_dict(result.get("overall")).get("kl")):
                points.append((float(match.group(1)), result["overall"]["kl"]))
        last_step = run.metrics[-1].get("step") if run.metrics else run.summary.get("total_steps")
        if after and _is_number(_dict(after.get("overall")).get("kl")) and _is_number(last_step):
            points.append((float(last_step), after["overall"]["kl"]))
        points.sort()
        if len(points) >= 2:
            series.append((run.label, [p[0] for p in points], [p[1] for p in points], COLORS[i % len(COLORS)], "-"))
    png = _plot([("held-out KL(teacher ‖ student)", "nats / token", series)], ncols=1)
    if png:
        images.append(Image("heldout_kl.png", png, "held-out KL during training",
                            "Teacher-forced KL on the held-out set: before training, at each eval_every, after."))
        section.blocks.append(images[-1])
    if not section.blocks:
        section.blocks.append(Paragraph("No metrics.jsonl lines to plot."))
    return section


def _groups(results: list[Optional[dict]]) -> list[str]:
    domains = sorted({key for result in results if result for key in result if key.startswith("domain/")})
    return ["overall"] + domains


TF_METRICS = [("tokens", "tokens"), ("kl", "KL(teacher‖student)"), ("student_ce", "student CE"),
              ("teacher_ce", "teacher CE"), ("cr@5", "CR@5"), ("mor@5", "MOR@5")]
GEN_METRICS = [("rouge_l", "ROUGE-L"), ("exact_match", "exact match"), ("distinct_1", "distinct-1"),
               ("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU"), ("length", "length"), ("count", "n")]


def _evaluation(runs: list[RunData]) -> Section:
    section = Section("evaluation", "Evaluation")
    # Teacher-forced, before -> after.
    pairs = [(run, run.teacher_forced("before"), run.teacher_forced("after")) for run in runs]
    pairs = [p for p in pairs if p[1] or p[2]]
    if pairs:
        rows = []
        for group in _groups([r for _, b, a in pairs for r in (b, a)]):
            for run, before, after in pairs:
                b, a = (before or {}).get(group), (after or {}).get(group)
                if b is None and a is None:
                    continue
                label = group.removeprefix("domain/")
                cells = [_before_after(b if before else None, a if after else None, key) for key, _ in TF_METRICS]
                b, a = b if b is not None else {}, a if a is not None else {}
                if b and a:  # the token count and the teacher do not change: print them once
                    for index, (key, _) in enumerate(TF_METRICS):
                        if key in ("tokens", "teacher_ce") and key in a:
                            cells[index] = fmt_number(a[key])
                rows.append([label, run.label] + cells)
        section.blocks.append(Table(["domain", "run"] + [title for _, title in TF_METRICS], rows, numeric_from=2,
                                    caption="Teacher-forced on the held-out responses, per response token (nats), "
                                            "before → after training (relative change); the teacher's CE and the token "
                                            "count do not change and are shown once. CR@5/MOR@5: top-5 agreement with "
                                            "the teacher."))
    # kdlm eval: eval_<name>.json other than before/after/step<N>.
    standalone = [(run, name, result) for run in runs for name, result in run.evals.items()
                  if name not in ("before", "after") and not re.fullmatch(r"step\d+", name)]
    tf_rows = []
    for group in _groups([r for _, _, r in standalone]):
        for run, name, result in standalone:
            if isinstance(result.get(group), dict):
                tf_rows.append([group.removeprefix("domain/"), run.label, name]
                               + [fmt_number(result[group].get(key)) for key, _ in TF_METRICS])
    if tf_rows:
        section.blocks.append(Table(["domain", "run", "eval"] + [title for _, title in TF_METRICS], tf_rows, numeric_from=3,
                                    caption="`kdlm eval` (eval_<name>.json): teacher-forced metrics of the evaluated model."))
    gen_rows = []
    generated = [(run, name, _dict(result.get("generation"))) for run, name, result in standalone]
    generated = [(run, name, gen) for run, name, gen in generated if isinstance(gen.get("mean"), dict)]
    domains = sorted({d for _, _, g in generated for d in _dict(g["mean"].get("domains"))})

    def pick(tree: Any, group: str) -> dict:
        return _dict(_dict(tree).get("overall")) if group == "overall" else _dict(_dict(_dict(tree).get("domains")).get(group))

    for group in ["overall"] + domains:
        for run, name, gen in generated:
            mean, std = pick(gen["mean"], group), pick(gen.get("std"), group)
            if not mean:
                continue
            seeds = gen.get("seeds") if isinstance(gen.get("seeds"), list) else []
            decoding = str(gen.get("decoding", "?")) + (f", {len(seeds)} seeds" if seeds else "")
            cells = []
            for key, _ in GEN_METRICS:
                value = fmt_number(mean.get(key))
                spread = std.get(key)
                if len(seeds) > 1 and key != "count" and _is_number(spread):
                    value += f" ± {fmt_number(spread)}"
                cells.append(value)
            gen_rows.append([group, run.label, f"{name} ({decoding})"] + cells)
    if gen_rows:
        section.blocks.append(Table(["domain", "run", "eval"] + [title for _, title in GEN_METRICS], gen_rows, numeric_from=3,
                                    caption="Generation metrics from `kdlm eval` (0–100; mean ± std over seeds with "
                                            "sampled decoding): ROUGE-L and exact match against the references, "
                                            "distinct-n and self-BLEU of the generations, length in words."))
    if not section.blocks:
        section.blocks.append(Paragraph("No evaluation results (summary.json, eval_*.json) in these runs."))
    return section


def _samples(runs: list[RunData]) -> Optional[Section]:
    section = Section("samples", "Samples")
    for run in runs:
        before, after = run.teacher_forced("before") or {}, run.teacher_forced("after") or {}
        before_samples = [_dict(s) for s in before.get("samples", [])]
        after_samples = [_dict(s) for s in after.get("samples", [])]
        rows = []
        for i in range(min(SAMPLES_SHOWN, max(len(before_samples), len(after_samples)))):
            was = before_samples[i] if i < len(before_samples) else {}
            now = after_samples[i] if i < len(after_samples) else {}
            rows.append([_clip(now.get("prompt", was.get("prompt"))), _clip(now.get("reference", was.get("reference"))),
                         _clip(was.get("student", "—")), _clip(now.get("student", "—"))])
        if rows:
            section.blocks.append(Table(["prompt", "reference", "student before", "student after"], rows,
                                        caption=f"{run.label}: greedy generations at the before/after evaluation.",
                                        numeric_from=99))
        for name, predictions in run.predictions.items():
            rows = [[_clip(p.get("domain")), _clip(p.get("prompt")), _clip(p.get("reference")),
                     _clip(p.get("prediction"))] for p in predictions[:SAMPLES_SHOWN]]
            if rows:
                section.blocks.append(Table(["domain", "prompt", "reference", "prediction"], rows, numeric_from=99,
                                            caption=f"{run.label}: first predictions of `kdlm eval` (predictions_{name}.jsonl, "
                                                    f"{len(predictions)} lines)."))
        if run.samples:
            rows = [[fmt_number(s.get("step")), _clip(s.get("from")), _clip(s.get("prompt")), _clip(s.get("completion"))]
                    for s in run.samples[-SAMPLES_SHOWN:]]
            section.blocks.append(Table(["step", "from", "prompt", "completion"], rows, numeric_from=99,
                                        caption=f"{run.label}: last on-policy samples of training (samples.jsonl)."))
    return section if section.blocks else None


def _mixing_history(run: RunData) -> list[dict]:
    """DDK weight updates: mixing.jsonl (step = the step the weights were set for), else metrics.jsonl's ddk keys."""
    history = [r for r in run.mixing if any(str(k).startswith("ddk/weight/") for k in r)]
    if history:
        return history
    return [r for r in run.metrics if any(str(k).startswith("ddk/weight/") for k in r)]


def _methods(runs: list[RunData], images: list[Image]) -> Optional[Section]:
    section = Section("methods", "Method-specific")
    # DDK: one figure per run (each run has its own domains).
    for i, run in enumerate(runs):
        history = _mixing_history(run)
        if not history:
            continue
        domains = sorted({k.split("/", 2)[2] for r in history for k in r if k.startswith("ddk/weight/")})
        weight_series, ratio_series = [], []
        for j, name in enumerate(domains):
            for key, out in ((f"ddk/weight/{name}", weight_series), (f"ddk/ratio/{name}", ratio_series)):
                points = [(float(r["step"]), float(r[key])) for r in history
                          if _is_number(r.get(key)) and _is_number(r.get("step"))]
                if points:
                    out.append((name, [p[0] for p in points], [p[1] for p in points], COLORS[j % len(COLORS)], "-"))
        png = _plot([("domain sampling weight", "weight", weight_series),
                     ("student / teacher perplexity", "ratio", ratio_series)], ncols=2,
                    log_y=("student / teacher perplexity",))
        if png:
            images.append(Image(f"ddk_{i + 1}_{_slug(run.label)}.png", png, f"DDK domain weights of {run.label}",
                                f"DDK ({run.label}): domain weights and perplexity ratios at each update."))
            section.blocks.append(images[-1])
            last = history[-1]
            rows = [[name, fmt_number(history[0].get(f"ddk/weight/{name}")), fmt_number(last.get(f"ddk/weight/{name}")),
                     fmt_number(last.get(f"ddk/ratio/{name}"))] for name in domains]
            section.blocks.append(Table(["domain", "first weight", "last weight", "last ppl ratio"], rows,
                                        caption=f"{run.label}: {len(history)} weight update(s)."))
    keys = set().union(*(run.metric_keys() for run in runs)) if runs else set()
    # AKL.
    if {"akl_head_weight", "akl_tail_weight"} & keys:
        lines = _per_run(runs, "akl_head_weight", "-", " head") + _per_run(runs, "akl_tail_weight", "--", " tail")
        png = _plot([("AKL head / tail weight", "weight", lines)], ncols=1)
        if png:
            images.append(Image("akl.png", png, "AKL head and tail weights",
                                "AKL: weight of the head (forward KL) and tail (reverse KL) parts, mean per step."))
            section.blocks.append(images[-1])
    # GKD.
    if any(k.startswith("gkd/") for k in keys):
        fraction: list[Series] = []
        for i, run in enumerate(runs):
            xs, ys = run.series("gkd/on_policy")
            if xs:
                running = [sum(ys[: n + 1]) / (n + 1) for n in range(len(ys))]
                fraction.append((run.label, xs, running, COLORS[i % len(COLORS)], "-"))
        png = _plot([("GKD on-policy fraction (running)", "share of steps", fraction),
                     ("GKD reward (student samples)", "mean reward", _per_run(runs, "gkd/reward")),
                     ("GKD sampled completion length", "tokens", _per_run(runs, "gkd/mean_completion_length"))], ncols=3)
        if png:
            images.append(Image("gkd.png", png, "GKD on-policy fraction, reward and completion length",
                                "GKD: share of logged steps trained on the student's own samples so far, the reward "
                                "of those samples (with objective.reward_fn) and their mean length."))
            section.blocks.append(images[-1])
    # DPKD (sequence form: TRL's reward names; token form: margin and top-1 agreement).
    if {"rewards/margins", "rewards/accuracies", "dpkd_margin", "dpkd_top1_agreement"} & keys:
        png = _plot([("DPKD reward margin", "β·(r(y_t) − r(y_s))", _per_run(runs, "rewards/margins")),
                     ("DPKD preference accuracy", "share of pairs", _per_run(runs, "rewards/accuracies")),
                     ("DPKD token margin h_t", "mean h_t", _per_run(runs, "dpkd_margin")),
                     ("DPKD top-1 agreement", "share of tokens", _per_run(runs, "dpkd_top1_agreement"))], ncols=2)
        if png:
            images.append(Image("dpkd.png", png, "DPKD reward margin and accuracy",
                                "DPKD: preference margin and accuracy per step."))
            section.blocks.append(images[-1])
    # RLKD peak alignment.
    peak = sorted(k for k in keys if re.fullmatch(r"(cr|mor)@\d+", k))
    if peak:
        png = _plot([(f"RLKD {k.upper()}", "share", _per_run(runs, k)) for k in peak], ncols=2)
        if png:
            images.append(Image("rlkd.png", png, "RLKD peak alignment",
                                "RLKD: top-k agreement with the teacher during training."))
            section.blocks.append(images[-1])
    return section if section.blocks else None


def _notes(runs: list[RunData]) -> Optional[Section]:
    rows = [[run.label, note] for run in runs for note in run.notes]
    if not rows:
        return None
    table = Table(["run", "note"], rows, numeric_from=99, caption="What could not be read (skipped).")
    return Section("notes", "Notes", [table])


# ------------------------------------------------------------------------------------------------ rendering
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1240px;margin:0 auto;padding:24px 28px 60px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{margin:0 0 4px;font-size:26px} h2{margin-top:36px;border-bottom:2px solid #e3e6eb;padding-bottom:4px;font-size:20px}
.meta{color:#5b6475;font-size:13px;margin-bottom:12px} nav a{margin-right:14px;font-size:14px;color:#2451a6}
table{border-collapse:collapse;margin:10px 0 4px;font-size:13px;width:100%} caption{caption-side:bottom;text-align:left;
color:#5b6475;font-size:12px;padding-top:4px} th,td{border:1px solid #d9dde3;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#eef1f5;font-weight:600} tr:nth-child(even) td{background:#fafbfc} td.num{text-align:right;
font-variant-numeric:tabular-nums;white-space:nowrap} td{overflow-wrap:break-word}
.scroll{overflow-x:auto}
figure{margin:14px 0} figure img{max-width:100%;border:1px solid #e3e6eb} figcaption{color:#5b6475;font-size:12px}
details{margin:8px 0} summary{cursor:pointer;color:#2451a6}
pre{background:#f3f4f6;padding:10px;overflow:auto;font-size:12px;max-height:480px}
"""

# Sets data-images-ok on <body> once every image decoded (naturalWidth > 0); the render test reads it.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.every(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-ok", ok ? "true" : "false");
});
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_h(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{_h(h)}</th>" for h in block.headers)
        body = []
        for row in block.rows:
            cells = "".join(f'<td class="num">{_h(c)}</td>' if i >= block.numeric_from else f"<td>{_h(c)}</td>"
                            for i, c in enumerate(row))
            body.append(f"<tr>{cells}</tr>")
        caption = f"<caption>{_h(block.caption)}</caption>" if block.caption else ""
        rows = "".join(body)
        return f'<div class="scroll"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        caption = f"<figcaption>{_h(block.caption)}</figcaption>" if block.caption else ""
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{_h(block.alt)}" '
                f'data-file="{_h(block.filename)}">{caption}</figure>')
    return f"<details><summary>{_h(block.summary)}</summary><pre>{_h(block.text)}</pre></details>"


def render_html(sections: list[Section], runs: list[RunData], generated: str) -> str:
    """The whole page as one string: inline CSS, images as data URIs, no external resource."""
    nav = "".join(f'<a href="#{_h(s.anchor)}">{_h(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h('kdlm report: ' + ', '.join(run.label for run in runs))}</title>",
        f"<style>{CSS}</style></head>", '<body data-images-ok="pending"><main>',
        "<h1>kdlm report</h1>",
        f'<div class="meta">{_h(f"{len(runs)} run(s): " + ", ".join(run.label for run in runs))} · '
        f"{_h(f'generated {generated} by kdlm {__version__}')}</div>",
        f"<nav>{nav}</nav>",
    ]
    for section in sections:
        parts.append(f'<section id="{_h(section.anchor)}"><h2>{_h(section.title)}</h2>')
        parts.extend(_html_block(block) for block in section.blocks)
        parts.append("</section>")
    parts.append(f"</main><script>{SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ").replace("\r", " ")


def _md_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                 "|" + "|".join("---:" if i >= block.numeric_from else "---" for i in range(len(block.headers))) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        if block.caption:
            lines += ["", f"*{_md_cell(block.caption)}*"]
        return "\n".join(lines)
    if isinstance(block, Image):
        text = f"![{_md_cell(block.alt)}]({block.filename})"
        return text + (f"\n\n*{_md_cell(block.caption)}*" if block.caption else "")
    longest = max((len(m) for m in re.findall(r"`+", block.text)), default=0)
    fence = "`" * max(3, longest + 1)
    return (f"<details><summary>{html.escape(block.summary)}</summary>\n\n{fence}{block.language}\n"
            f"{block.text.rstrip()}\n{fence}\n\n</details>")


def render_markdown(sections: list[Section], runs: list[RunData], generated: str) -> str:
    """The markdown twin: the same sections and tables; images link the PNG files beside it."""
    parts = ["# kdlm report", "",
             f"{len(runs)} run(s): " + ", ".join(f"`{run.label}`" for run in runs)
             + f" · generated {generated} by kdlm {__version__}"]
    for section in sections:
        parts += ["", f"## {section.title}"]
        for block in section.blocks:
            parts += ["", _md_block(block)]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ entry points
def default_out_dir(run_dirs: Sequence[Union[str, Path]], now: Optional[_dt.datetime] = None) -> Path:
    """``<run dir>/report`` for one run; ``reports/<YYYYmmdd-HHMMSS>`` (under the current folder) for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path("reports") / (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")


def build_report(run_dirs: Sequence[Union[str, Path]], out_dir: Union[str, Path]) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and the plots' PNG files into ``out_dir``.

    Returns the path of ``report.html``. Raises :class:`ReportError` (naming the path) for a path that is not a
    kdlm run directory, before anything is written.
    """
    if not run_dirs:
        raise ReportError(f"no run directory given; expected at least one {EXPECTED}")
    runs = [load_run(path) for path in run_dirs]
    for run, label in zip(runs, _labels([run.path for run in runs])):
        run.label = label
    images: list[Image] = []
    sections = [_overview(runs), _configs(runs), _training(runs, images), _evaluation(runs),
                _methods(runs, images), _samples(runs), _notes(runs)]
    present = [s for s in sections if s is not None]
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for image in images:
            (out / image.filename).write_bytes(image.png)
        generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        (out / "report.md").write_text(render_markdown(present, runs, generated), encoding="utf-8")
        page = out / "report.html"
        page.write_text(render_html(present, runs, generated), encoding="utf-8")
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

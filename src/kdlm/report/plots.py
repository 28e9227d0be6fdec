"""The report's plots: matplotlib's Agg canvas directly (no pyplot, no global backend switch), PNG bytes out."""

from __future__ import annotations

import io
import math
import re
from typing import Optional, Sequence

from kdlm.report.runs import RunData

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
    return _png(fig, axes, len(panels))


def _png(fig, axes, used: int) -> bytes:
    """Hide the grid's unused panels (after the first ``used``) and render the figure to PNG bytes."""
    nrows, ncols = len(axes), len(axes[0])
    for index in range(used, nrows * ncols):
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


def _bars(panels: list[tuple[str, list[str], list[float], list[float]]]) -> Optional[bytes]:
    """One PNG with a bar chart per ``(title, labels, means, half_widths)``: one bar per group with an error bar of
    ± the half-width (NaN: no error bar, one run). Panels without a finite mean are dropped."""
    panels = [p for p in panels if any(math.isfinite(m) for m in p[2])]
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width = max(3.9, 0.5 * max(len(p[1]) for p in panels) + 1.5)
    fig = Figure(figsize=(width * ncols + 0.4, 3.4 * nrows + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for index, (title, labels, means, halves) in enumerate(panels):
        ax = axes[index // ncols][index % ncols]
        xs = list(range(len(labels)))
        errors = [h if math.isfinite(h) else 0.0 for h in halves]
        ax.bar(xs, means, yerr=errors, capsize=4, color=[COLORS[i % len(COLORS)] for i in xs], alpha=0.85)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _png(fig, axes, len(panels))

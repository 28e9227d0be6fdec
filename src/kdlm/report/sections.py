"""The report's sections: from the runs' files to tables, paragraphs and plots (one function per section)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

from kdlm import registry
from kdlm.config import flatten
from kdlm.formatting import format_change
from kdlm.report.page import Details, Image, Paragraph, Section, Table
from kdlm.report.plots import COLORS, Series, _bars, _per_run, _plot, _slug
from kdlm.report.runs import SAMPLES_SHOWN, RunData, _dict, _get, _is_number
from kdlm.report.stats import t_interval

TEXT_LIMIT = 300  # characters of a sample shown in a table cell


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
    """`` (change)`` after a before → after pair (:func:`kdlm.formatting.format_change`), or nothing when undefined."""
    if not (_is_number(before) and _is_number(after)):
        return ""
    change = format_change(before, after)
    return "" if change == "—" else f" ({change})"


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


def _config_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "null"
    return fmt_number(value) if isinstance(value, float) else str(value)


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
        flat = [flatten(run.config) for run in runs]
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


# Config keys that differ between seeds of one setting without making it another setting.
SEED_KEYS = ("train.seed", "train.output_dir")


def seed_groups(runs: list[RunData]) -> list[list[RunData]]:
    """The runs grouped by their config without :data:`SEED_KEYS` (the same setting, other training seeds), in
    the order of each group's first run. Runs without a config are a group each."""
    groups: dict[str, list[RunData]] = {}
    for index, run in enumerate(runs):
        if run.config:
            flat = {k: v for k, v in flatten(run.config).items() if k not in SEED_KEYS}
            key = json.dumps(flat, sort_keys=True, default=str)
        else:
            key = f"#{index}"
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def _final_metrics(run: RunData) -> dict[str, float]:
    """A run's end-of-training numbers that the seed table summarises: final loss, held-out KL after training
    (summary.json, else a ``kdlm eval`` result), and ROUGE-L / exact match of each ``kdlm eval`` generation result."""
    values: dict[str, float] = {}
    if run.metrics and _is_number(run.metrics[-1].get("loss")):
        values["final loss"] = float(run.metrics[-1]["loss"])
    after = run.teacher_forced("after")
    if after and _is_number(_dict(after.get("overall")).get("kl")):
        values["held-out KL"] = float(after["overall"]["kl"])
    for name, result in sorted(run.evals.items()):
        if name in ("before", "after") or re.fullmatch(r"step\d+", name):
            continue
        if "held-out KL" not in values and _is_number(_dict(result.get("overall")).get("kl")):
            values["held-out KL"] = float(result["overall"]["kl"])
        overall = _dict(_dict(_dict(result.get("generation")).get("mean")).get("overall"))
        for key, title in (("rouge_l", "ROUGE-L"), ("exact_match", "EM")):
            if _is_number(overall.get(key)):
                values[f"{title} ({name})"] = float(overall[key])
    return values


def _seeds(runs: list[RunData], images: list[Image]) -> Optional[Section]:
    """Runs that differ only in their training seed, as one row each: mean ± 95 % t-interval over the seeds
    (:func:`kdlm.report.stats.t_interval`), and bar charts with those intervals as error bars. Only when some
    setting has several seeds."""
    groups = seed_groups(runs)
    if all(len(group) < 2 for group in groups):
        return None
    flat = [{k: v for k, v in flatten(g[0].config).items() if k not in SEED_KEYS} for g in groups]
    differing = sorted(k for k in set().union(*flat) if len({_config_value(f.get(k)) for f in flat}) > 1)
    values = [[_final_metrics(run) for run in group] for group in groups]
    metrics = list(dict.fromkeys(m for group in values for run in group for m in run))
    header = ["group", "setting", "runs", "seeds"] + [f"{m} (mean ± 95 % CI)" for m in metrics]
    rows, bars = [], {m: ([], [], []) for m in metrics}
    for index, (group, measured) in enumerate(zip(groups, values)):
        setting = " · ".join(f"{k}={_config_value(flat[index].get(k))}" for k in differing) or "all runs"
        seeds = [str(_get(run.config, "train.seed")) for run in group]
        cells = []
        for metric in metrics:
            numbers = [m[metric] for m in measured if metric in m and math.isfinite(m[metric])]
            if not numbers:
                cells.append("—")
                continue
            interval = t_interval(numbers)
            half = (interval.high - interval.low) / 2
            cells.append(f"{fmt_number(interval.estimate)} ± {fmt_number(half)}" if len(numbers) > 1
                         else fmt_number(interval.estimate))
            bars[metric][0].append(f"G{index + 1}")
            bars[metric][1].append(interval.estimate)
            bars[metric][2].append(half)
        rows.append([f"G{index + 1}", _clip(setting), ", ".join(run.label for run in group), ", ".join(seeds)] + cells)
    section = Section("seeds", "Seeds")
    section.blocks.append(Table(header, rows, numeric_from=4, caption=(
        "Runs whose configs differ only in train.seed (and output folder) form a group; each cell is the mean over "
        "the group's runs ± the half-width of the 95 % Student-t interval (t(0.975, n − 1)·s/√n); one run: its value.")))
    png = _bars([(metric, *bars[metric]) for metric in metrics])
    if png:
        images.append(Image("seeds.png", png, "mean and 95 % CI per group of seeds",
                            "Mean per group (G1, G2, ... as in the table) with the 95 % t-interval as error bars."))
        section.blocks.append(images[-1])
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

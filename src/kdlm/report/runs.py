"""Reading run directories for the report: what each file holds, tolerant of missing or damaged ones."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from kdlm.errors import KdlmError

SAMPLES_SHOWN = 3  # samples per run and source
EXPECTED = "a run directory written by `kdlm distill` (config.yaml, metrics.jsonl, summary.json, ...)"


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


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node

"""Claiming ``train.output_dir`` for a run without ever replacing an earlier run's files.

A directory *holds a run* when it contains any entry that ``kdlm distill`` writes into its run directory
(:data:`RUN_ENTRIES`, :data:`RUN_PATTERNS`) that carries a result: ``metrics.jsonl``, ``summary.json``,
``comparison.md``, ``final/``, checkpoints (complete or torn), evaluation results ``eval_*.json``, the mixing
report and on-policy samples. A missing or empty directory, one with only other files, or one with only the
``config.yaml`` and ``train.log`` of a run that stopped before writing any result (a model that failed to load, a
typo fixed and retried) does not hold a run: a new run reuses it, replacing ``config.yaml`` and appending to
``train.log``, so the log of the failed start is kept.

A new run (no ``--resume``) into a directory that holds a run is refused before anything is written or any model
is loaded, unless ``train.overwrite`` is set: then the whole directory is renamed to a sibling
``<name>.old-<YYYYmmdd-HHMMSS>`` (nothing is deleted) and the run starts in a fresh one.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Optional

from kdlm.errors import RunDirError

RUN_ENTRIES = ("metrics.jsonl", "summary.json", "comparison.md", "final",
               "mixing.jsonl", "mixing.png", "samples.jsonl")
"""Result names ``kdlm distill`` writes directly in the run directory (``config.yaml`` and ``train.log``, written
before any model is loaded, are left out on purpose: see the module docstring)."""
RUN_PATTERNS = ("checkpoint-*", ".checkpoint-*", "eval_*.json")
"""Glob patterns of the checkpoints (complete and being written) and evaluation results."""


def run_entries(run_dir: Path) -> list[str]:
    """The entries of ``run_dir`` that mark it as holding a run, sorted; empty when it holds none."""
    if not run_dir.is_dir():
        return []
    found = {name for name in RUN_ENTRIES if (run_dir / name).exists()}
    for pattern in RUN_PATTERNS:
        found.update(path.name for path in run_dir.glob(pattern))
    return sorted(found)


def backup_path(run_dir: Path, now: Optional[_dt.datetime] = None) -> Path:
    """A sibling ``<name>.old-<YYYYmmdd-HHMMSS>`` of ``run_dir`` that does not exist yet (``-2``, ``-3`` ... if taken)."""
    run_dir = run_dir.resolve()
    base = run_dir.with_name(f"{run_dir.name}.old-{(now or _dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}")
    candidate, counter = base, 1
    while candidate.exists():
        counter += 1
        candidate = base.with_name(f"{base.name}-{counter}")
    return candidate


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Make ``run_dir`` usable for a run, or refuse: call on one process only, before anything is written there.

    With ``resume`` nothing is checked here (the caller needs a checkpoint). A directory holding a run is refused
    with :class:`RunDirError` naming it and the choices, or, with ``overwrite``, renamed aside; returns the backup
    path then (the caller logs it), else None.
    """
    if resume:
        return None
    entries = run_entries(run_dir)
    if not entries:
        return None
    if not overwrite:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
        raise RunDirError(
            f"train.output_dir {run_dir} already holds a run ({shown}); refusing to start a new run over it. "
            f"Choose one: --resume to continue it from its newest checkpoint; a new --train.output_dir DIR for a "
            f"separate run; or --train.overwrite true to move the old run aside to {run_dir}.old-<timestamp> "
            "(nothing is deleted) and start afresh."
        )
    backup = backup_path(run_dir)
    try:
        run_dir.resolve().rename(backup)
    except OSError as error:
        raise RunDirError(f"train.overwrite: cannot move {run_dir} aside to {backup}: {error}") from error
    return backup

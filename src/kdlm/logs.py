"""kdlm's log lines: one handler set on the ``kdlm`` logger, each line printed once."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(log_file: Optional[Path] = None, level: int = logging.INFO) -> logging.Logger:
    """Send the ``kdlm`` logger (and its children ``kdlm.*``) to stderr and, when given, to ``log_file``.

    Replaces the handlers an earlier call added (a second run in one process does not print twice) and stops
    propagation to the root logger: libraries install handlers there (rouge-score's absl logging does on first
    use), which would print every kdlm line a second time.
    """
    logger = logging.getLogger("kdlm")
    for handler in [h for h in logger.handlers if getattr(h, "_kdlm", False)]:
        logger.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(FORMAT)
        handler._kdlm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger

"""kdlm's one logging set-up: the ``kdlm`` logger's lines on stderr and, for a training run, in ``train.log``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(log_file: Optional[Path] = None, *, level: int = logging.INFO, keep_existing: bool = False) -> None:
    """Send the ``kdlm`` logger's records at ``level`` and above to stderr (and to ``log_file`` when given).

    Handlers added by an earlier call are replaced, so a second run in the same process does not log twice.
    With ``keep_existing``, a logger that already has handlers (e.g. configured by the embedding application) is
    left as it is.
    """
    logger = logging.getLogger("kdlm")
    if keep_existing and logger.handlers:
        return
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

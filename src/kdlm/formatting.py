"""Number formatting shared by the terminal's before/after table (kdlm.eval.heldout) and the report pages."""

from __future__ import annotations

import math


def format_change(before: float, after: float) -> str:
    """The change from ``before`` to ``after`` as tables print it: relative (``-25.0%``, ``(after - before) / |before|``)
    when that is meaningful; the absolute difference (``+0.0569 (abs.)``) when ``before`` is within 1e-6 of zero or
    the change exceeds ten times ``before`` (a top-5 agreement rate going 0.001 -> 0.058 is not "+5690%"); ``—`` when
    either value is not a finite number (e.g. a teacher CE that was not measured)."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (before, after)):
        return "—"
    difference = after - before
    if abs(before) < 1e-6 or abs(difference) > 10 * abs(before):
        return f"{difference:+.3g} (abs.)"
    return f"{difference / abs(before) * 100:+.1f}%"

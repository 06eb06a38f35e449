"""Pure helpers that turn the API's values into short, stable text for the screens.

Every function here is a pure function of its arguments (the current time is always passed in,
from the app's clock), so the screens are reproducible and the helpers are tested with tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

DASH = "—"

#: The states a job passes through, in order, then its three ends.
JOB_STATES = ("scheduled", "launching", "running", "collecting", "succeeded", "failed", "cancelled")
ACTIVE_JOB_STATES = frozenset({"scheduled", "launching", "running", "collecting"})
#: Jobs in these states can be cancelled, and in these retried (as mwm's API allows).
CANCELLABLE_STATES = ACTIVE_JOB_STATES
RETRYABLE_STATES = frozenset({"failed", "cancelled"})
DELIVERY_STATES = ("pending", "delivered", "failed", "skipped")
RETRYABLE_DELIVERY_STATES = frozenset({"failed"})


def parse_ts(value: str | None) -> float | None:
    """An ISO 8601 timestamp from the API (``2024-05-01T10:00:00.000Z``) as epoch seconds."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _span(seconds: float) -> str:
    """Whole seconds as the two most significant units: ``42s``, ``5m03s``, ``2h05m``, ``3d04h``."""
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def fmt_age(since: float | None, now: float) -> str:
    """How long ago ``since`` was (a clock ahead of the server's reads as ``0s``, never negative)."""
    if since is None:
        return DASH
    return _span(max(0.0, now - since))


def fmt_duration(seconds: float | None) -> str:
    """A run time; anything under a second is ``<1s``."""
    if seconds is None:
        return DASH
    if seconds < 1:
        return "<1s"
    return _span(seconds)


def job_run_seconds(job: Mapping[str, Any], now: float) -> float | None:
    """How long the job has run: to its end, or to ``now`` while it runs."""
    started = parse_ts(job.get("started_at"))
    if started is None:
        return None
    finished = parse_ts(job.get("finished_at"))
    return max(0.0, (finished if finished is not None else now) - started)


def fmt_countdown(deadline: float | None, now: float) -> str:
    """Time left to a deadline: ``04:59`` under an hour, ``2h05m`` beyond, ``due`` once passed."""
    if deadline is None:
        return DASH
    left = deadline - now
    if left <= 0:
        return "due"
    whole = math.ceil(left)
    if whole < 3600:
        return f"{whole // 60:02d}:{whole % 60:02d}"
    return _span(whole)


def fmt_bytes(size: float | None) -> str:
    """Bytes with a binary unit: ``512 B``, ``13.2 KiB``, ``74.2 GiB``."""
    if size is None:
        return DASH
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_count(value: int | None) -> str:
    """A count with thousands separators."""
    return DASH if value is None else f"{value:,}"


def uid_tail(uid: str | None, width: int = 10) -> str:
    """The end of a long UID, which is what tells studies apart: ``…1756541515864``."""
    if not uid:
        return DASH
    if len(uid) <= width + 1:
        return uid
    return "…" + uid[-width:]


def clip(text: str | None, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    if not text:
        return DASH
    line = " ".join(text.split())
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


def sum_states(counts: Mapping[str, int] | None, states: Iterable[str]) -> int:
    if not counts:
        return 0
    return sum(int(counts.get(s, 0)) for s in states)


def delivery_totals(by_sink: Mapping[str, Mapping[str, int]] | None) -> dict[str, int]:
    """Delivery counts by state over every sink (``stats.deliveries`` is by sink, then state)."""
    totals: dict[str, int] = {}
    for states in (by_sink or {}).values():
        for state, count in states.items():
            totals[state] = totals.get(state, 0) + int(count)
    return totals


def match_summary(match: Mapping[str, Any] | None) -> str:
    """An application's trigger rules in one line: ``called AE MWM · modality CT`` or ``everything``."""
    if not match:
        return "everything"
    labels = {
        "called_aet": "called AE",
        "calling_aet": "calling AE",
        "modality": "modality",
        "sop_class_uid": "SOP class",
        "series_description": "series ~",
        "body_part": "body part ~",
    }
    parts = []
    for key, label in labels.items():
        value = match.get(key)
        if not value:
            continue
        shown = ", ".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
        parts.append(f"{label} {shown}")
    return " · ".join(parts) if parts else "everything"


def fmt_seconds_setting(seconds: float | None) -> str:
    """A configured duration (a timeout) as the shortest exact text: ``300ms``, ``5s``, ``2m``, ``1h30m``."""
    if seconds is None:
        return DASH
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


def retry_text(retry_at: float | None, now: float) -> str:
    """``retrying in 4s`` (or ``retrying now``) for the unreachable banner."""
    if retry_at is None:
        return "retrying"
    left = math.ceil(retry_at - now - 1e-9)
    return f"retrying in {left}s" if left >= 1 else "retrying now"


def light_terminal(colorfgbg: str | None) -> bool:
    """Whether ``$COLORFGBG`` (set by many terminals, ``"15;0"``) says the background is light."""
    if not colorfgbg:
        return False
    background = colorfgbg.split(";")[-1]
    return background.isdigit() and int(background) in (7, 15)

"""Named points where mwm can be made to die on purpose, to prove that a crash loses nothing.

Off unless ``mwm serve`` is started with ``MWM_FAULTS`` set (read once by the command line):
``POINT[:N][,POINT[:N]...]`` kills the process with SIGKILL the N-th time POINT is reached
(N defaults to 1). The points are listed in ``POINTS``; reaching one costs a dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

POINTS = (
    "ingest.parsed",  # an upload or C-STORE received and parsed, nothing stored yet
    "ingest.stored",  # bytes stored under their key, the row not yet committed
    "ingest.recorded",  # the row committed, the sender not yet answered
    "bucket.closing",  # a bucket's deadline passed, before the close is committed
    "bucket.closed",  # the close and the new job committed, before scheduling
    "job.launching",  # the job marked launching, before the engine starts it
    "job.launched",  # the engine started it, before the job is marked running
    "job.watching",  # the application is running
    "job.collected",  # outputs stored, before the results are committed
    "delivery.sending",  # a batch is about to go to a sink
    "delivery.sent",  # the sink took it, before the outcome is committed
)

_plan: dict[str, int] = {}


def configure(spec: str | None) -> None:
    """Arm the points named in ``spec``; an unknown point is an error."""
    _plan.clear()
    if not spec:
        return
    for item in spec.split(","):
        name, _, count = item.strip().partition(":")
        if name not in POINTS:
            raise ValueError(f"MWM_FAULTS: unknown point {name!r} (points: {', '.join(POINTS)})")
        _plan[name] = int(count or 1)
    log.warning("fault injection armed: %s", spec)


def point(name: str) -> None:
    """Die here if this point is armed and its count is reached."""
    if not _plan or name not in _plan:
        return
    _plan[name] -= 1
    if _plan[name] <= 0:
        log.warning("fault injection: killing mwm at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)

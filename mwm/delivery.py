"""Routing results to sinks: one worker per sink, so a failing sink never holds up another."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from . import faults, plugins
from .config import Settings
from .db import Database
from .errors import ConfigError, Conflict, MwmError, NotFound, SinkError
from .metrics import Metrics
from .options import build
from .sinks import Delivery, DeliveryOutcome, Sink
from .storage import Storage
from .timing import backoff

log = logging.getLogger(__name__)


def create_sinks(settings: Settings, storage: Storage, base_dir: Path) -> dict[str, Sink]:
    """Build every configured sink, validating its options with its plugin (errors name the key)."""
    sinks: dict[str, Sink] = {}
    for i, spec in enumerate(settings.sinks):
        try:
            cls = plugins.load(plugins.SINKS, spec.kind)
        except MwmError as exc:
            raise ConfigError(f"sinks[{i}].kind: {exc.message}", exc.detail) from None
        options = build(cls.Options, spec.options, f"sinks[{i}]")
        sinks[spec.id] = cls(spec.id, options, storage=storage, base_dir=base_dir)
    return sinks


class DeliveryService:
    """Delivers pending results with retries and back-off, recording each delivery's state."""

    def __init__(self, *, settings: Settings, db: Database, sinks: dict[str, Sink], metrics: Metrics) -> None:
        self.settings = settings.delivery
        self.metrics = metrics
        self.db = db
        self.sinks = sinks
        self._wake = {sink_id: asyncio.Event() for sink_id in sinks}

    @property
    def pull_sinks(self) -> list[str]:
        return [s.id for s in self.sinks.values() if s.pulled]

    def wake(self, sink_ids: Sequence[str]) -> None:
        for sink_id in sink_ids:
            event = self._wake.get(sink_id)
            if event is not None:
                event.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for sink in self.sinks.values():
                if not sink.pulled:
                    tg.create_task(self._worker(sink), name=f"sink-{sink.id}")

    async def _worker(self, sink: Sink) -> None:
        wake = self._wake[sink.id]
        while True:
            wake.clear()
            try:
                rows = await self.db.due_deliveries(sink.id, time.time(), self.settings.batch_size)
                if rows:
                    await self._deliver(sink, [Delivery.from_row(r) for r in rows])
                    continue
                next_time = await self.db.next_delivery_time(sink.id)
            except MwmError as exc:
                log.error("sink %s: %s (%s)", sink.id, exc.message, exc.detail)
                next_time = time.time() + 1.0
            timeout = None if next_time is None else max(0.05, next_time - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)

    async def _deliver(self, sink: Sink, batch: list[Delivery]) -> None:
        try:
            faults.point("delivery.sending")
            outcomes = await sink.deliver(batch)
            faults.point("delivery.sent")
        except asyncio.CancelledError:
            raise
        except SinkError as exc:
            outcomes = [DeliveryOutcome(d.delivery_id, "failed", exc.message, exc.retryable) for d in batch]
        except Exception as exc:
            log.exception("sink %s raised", sink.id)
            outcomes = [DeliveryOutcome(d.delivery_id, "failed", f"{type(exc).__name__}: {exc}") for d in batch]
        by_id = {o.delivery_id: o for o in outcomes}
        now = time.time()  # one time for the batch, so its retries stay one batch
        for delivery in batch:
            outcome = by_id.get(delivery.delivery_id) or DeliveryOutcome(
                delivery.delivery_id, "failed", "the sink reported no outcome"
            )
            await self._record(sink, delivery, outcome, now)

    async def _record(self, sink: Sink, delivery: Delivery, outcome: DeliveryOutcome, now: float) -> None:
        self.metrics.delivery_attempts.labels(sink.id, outcome.state).inc()
        extra = {"job_id": delivery.job_id, "app_id": delivery.app_id, "correlation_id": delivery.correlation_id}
        if outcome.state in ("delivered", "skipped"):
            await self.db.record_delivery(delivery.delivery_id, outcome.state, now=now, error=outcome.error)
            if outcome.state == "skipped":
                log.info("result %s not sent to %s: %s", delivery.path, sink.id, outcome.error, extra=extra)
            return
        attempts = delivery.attempts + 1
        if outcome.retryable and attempts < self.settings.max_attempts:
            delay = backoff(attempts, self.settings.retry_backoff, self.settings.retry_backoff_max)
            await self.db.record_delivery(
                delivery.delivery_id, "pending", now=now, error=outcome.error, next_attempt_at=now + delay
            )
            log.warning(
                "delivery %s to %s failed (attempt %d), retry in %g s: %s",
                delivery.delivery_id,
                sink.id,
                attempts,
                delay,
                outcome.error,
                extra=extra,
            )
        else:
            await self.db.record_delivery(delivery.delivery_id, "failed", now=now, error=outcome.error)
            log.error(
                "delivery %s to %s failed for good after %d attempts: %s",
                delivery.delivery_id,
                sink.id,
                attempts,
                outcome.error,
                extra=extra,
            )

    async def retry(self, delivery_id: int) -> None:
        row = await self.db.get_delivery(delivery_id)
        if row is None:
            raise NotFound(f"no delivery {delivery_id}")
        if not await self.db.retry_delivery(delivery_id, time.time()):
            raise Conflict(f"delivery {delivery_id} is {row['state']}; only failed deliveries can be retried")
        self.wake([row["sink_id"]])

    async def open(self) -> None:
        for sink in self.sinks.values():
            await sink.open()
        orphaned = await self.db.note_orphaned_deliveries(sorted(self.sinks))
        for sink_id, count in sorted(orphaned.items()):
            log.warning(
                "%d pending deliveries to sink %r, which is no longer configured: they wait until it is again",
                count,
                sink_id,
            )

    async def close(self) -> None:
        for sink in self.sinks.values():
            with contextlib.suppress(Exception):
                await sink.close()

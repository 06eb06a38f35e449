"""Retention: delete instances and results once they are old enough and no longer needed.

Never deleted: an instance in an open bucket or in a job that has not finished (or finished too
recently), a result with a pending delivery (or, with ``only_delivered``, any delivery that is not
delivered or skipped).
"""

from __future__ import annotations

import asyncio
import logging
import time

from .config import RetentionSettings
from .db import Database
from .errors import MwmError
from .storage import Storage

log = logging.getLogger(__name__)
BATCH = 500


class Retention:
    def __init__(self, *, settings: RetentionSettings, db: Database, storage: Storage) -> None:
        self.settings = settings
        self.db = db
        self.storage = storage

    @property
    def enabled(self) -> bool:
        return self.settings.instances_after is not None or self.settings.results_after is not None

    async def run(self) -> None:
        while True:
            try:
                await self.purge(time.time())
            except MwmError as exc:
                log.error("retention pass failed: %s (%s)", exc.message, exc.detail)
            await asyncio.sleep(self.settings.interval)

    async def purge(self, now: float) -> tuple[int, int]:
        """One pass; returns how many instances and results were deleted."""
        instances = results = 0
        if self.settings.instances_after is not None:
            cutoff = now - self.settings.instances_after
            while rows := await self.db.purgeable_instances(cutoff, BATCH):
                await self.db.forget_instances([r["id"] for r in rows], now)
                for row in rows:  # rows first: a crash leaves an unreferenced file, never a dangling row
                    await self.storage.delete(row["storage_key"])
                instances += len(rows)
        if self.settings.results_after is not None:
            cutoff = now - self.settings.results_after
            while rows := await self.db.purgeable_results(cutoff, self.settings.only_delivered, BATCH):
                await self.db.mark_results_purged([r["id"] for r in rows], now)
                for row in rows:
                    await self.storage.delete(row["storage_key"])
                results += len(rows)
        if instances or results:
            log.info("retention: deleted %d instances and %d results", instances, results)
        return instances, results

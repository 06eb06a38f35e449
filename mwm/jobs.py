"""Buckets, deadlines, scheduling and running jobs through the engine registry.

The database holds the truth: every transition is a committed compare-and-set, so the loops
here are thin and a restart rebuilds them from stored deadlines and job states.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import faults
from . import results as results_module
from .apps import AppRegistry
from .config import Settings
from .db import ACTIVE_JOB_STATES, Database, JobSettings
from .engines import EngineRegistry, EngineStatus, InputInstance, JobContext
from .errors import Conflict, EngineError, MwmError, NotFound
from .metrics import Metrics
from .storage import Storage, key
from .timing import backoff, remaining

log = logging.getLogger(__name__)

WATCH_SLICE = 5.0  # seconds between checks of the run timeout while waiting on an engine


def job_log_key(job_id: int) -> str:
    return key("logs", f"job-{job_id}.log")


class DeadlineTimer:
    """One task sleeping until the earliest bucket deadline (a heap with lazy invalidation).

    Cheaper than a task per bucket at thousands of open buckets, and a deadline pushed back by
    a new arrival costs one heap push.
    """

    def __init__(self, on_due: Callable[[list[int]], None]) -> None:
        self._heap: list[tuple[float, int]] = []
        self._current: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._on_due = on_due

    def set(self, bucket_id: int, deadline: float) -> None:
        if self._current.get(bucket_id) == deadline:
            return
        self._current[bucket_id] = deadline
        heapq.heappush(self._heap, (deadline, bucket_id))
        if self._heap[0] == (deadline, bucket_id):
            self._wake.set()

    def covers(self, bucket_id: int, deadline: float) -> bool:
        """Whether the bucket is armed to come due no later than ``deadline`` (callable from any
        thread: one dictionary read). The caller may then leave the timer alone: when it fires,
        the bucket's later deadline is read from the database and armed then."""
        armed = self._current.get(bucket_id)
        return armed is not None and armed <= deadline

    def discard(self, bucket_id: int) -> None:
        self._current.pop(bucket_id, None)

    def __len__(self) -> int:
        return len(self._current)

    async def run(self) -> None:
        while True:
            now = time.time()
            due = []
            while self._heap and self._heap[0][0] <= now:
                deadline, bucket_id = heapq.heappop(self._heap)
                if self._current.get(bucket_id) == deadline:
                    del self._current[bucket_id]
                    due.append(bucket_id)
            if due:
                self._on_due(due)
            self._wake.clear()
            timeout = remaining(self._heap[0][0], now) if self._heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)


class JobService:
    """Closes buckets into jobs, launches them within limits, watches them, collects results."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        storage: Storage,
        apps: AppRegistry,
        engines: EngineRegistry,
        on_results: Callable[[Sequence[str]], None],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.db = db
        self.storage = storage
        self.apps = apps
        self.engines = engines
        self._on_results = on_results
        self.metrics = metrics
        self.timer = DeadlineTimer(self._deadline_due)
        self._wake_scheduler = asyncio.Event()
        self._runners: dict[int, asyncio.Task[None]] = {}
        self._cancel_events: dict[int, asyncio.Event] = {}
        self._active_apps: Counter[str] = Counter()
        self._tg: asyncio.TaskGroup | None = None

    # -- buckets -----------------------------------------------------------------------------

    def buckets_updated(self, buckets: Sequence[dict[str, Any]]) -> None:
        """Called by ingest after a commit that opened or extended buckets."""
        for bucket in buckets:
            self.timer.set(int(bucket["id"]), float(bucket["deadline"]))

    def _deadline_due(self, bucket_ids: list[int]) -> None:
        assert self._tg is not None
        self._tg.create_task(self._close_due(bucket_ids))

    def _job_settings(self, app_id: str) -> JobSettings:
        app = self.apps.get(app_id) if app_id in self.apps else None
        return JobSettings(
            engine=app.engine if app is not None else "local",
            max_attempts=self._max_attempts(app_id),
            whole_group=app is not None and app.late_arrivals == "whole",
        )

    async def _close_due(self, bucket_ids: list[int]) -> None:
        """Close the buckets whose deadline passed (one transaction for all that are due at once)."""
        faults.point("bucket.closing")
        try:
            closed, later = await self.db.close_due_buckets(
                bucket_ids, job_settings=self._job_settings, now=time.time()
            )
        except Exception as exc:  # noqa: BLE001 - the deadlines stay armed whatever went wrong
            log.error("cannot close %d buckets (%s); trying again in a second", len(bucket_ids), exc)
            await asyncio.sleep(1.0)
            for bucket_id in bucket_ids:
                self.timer.set(bucket_id, time.time())
            return
        faults.point("bucket.closed")
        for bucket_id, deadline in later:
            self.timer.set(bucket_id, deadline)
        for job in closed:
            log.info(
                "bucket %s closed (deadline): job %s scheduled",
                job["bucket_id"],
                job["id"],
                extra={"job_id": job["id"], "app_id": job["app_id"], "correlation_id": job["correlation_id"]},
            )
        if closed:
            self._wake_scheduler.set()

    async def close_bucket(self, bucket_id: int, reason: str) -> dict[str, Any]:
        """Close an open bucket now and schedule its job; returns the job."""
        bucket = await self.db.get_bucket(bucket_id)
        if bucket is None:
            raise NotFound(f"no bucket {bucket_id}")
        if bucket["state"] != "open":
            raise Conflict(f"bucket {bucket_id} is already closed")
        job = await self.db.close_bucket(bucket_id, reason, job_settings=self._job_settings, now=time.time())
        if job is None:
            raise Conflict(f"bucket {bucket_id} is already closed")
        job_id = int(job["id"])
        self.timer.discard(bucket_id)
        log.info(
            "bucket %s closed (%s): job %s scheduled",
            bucket_id,
            reason,
            job_id,
            extra={"app_id": bucket["app_id"], "job_id": job_id, "correlation_id": bucket["correlation_id"]},
        )
        self._wake_scheduler.set()
        return job

    def _max_attempts(self, app_id: str) -> int:
        if app_id in self.apps:
            app = self.apps.get(app_id)
            if app.max_attempts is not None:
                return app.max_attempts
        return self.settings.jobs.max_attempts

    # -- the loops -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Rebuild timers and runners from the database, then run until cancelled."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for bucket in await self.db.open_buckets():
                self.timer.set(int(bucket["id"]), float(bucket["deadline"]))
            for job in await self.db.jobs_in_states(ACTIVE_JOB_STATES):
                self._start_runner(job, resume=True)
            tg.create_task(self.timer.run(), name="bucket-deadlines")
            tg.create_task(self._schedule_loop(), name="job-scheduler")

    def _start_runner(self, job: dict[str, Any], *, resume: bool) -> None:
        assert self._tg is not None
        job_id = int(job["id"])
        self._active_apps[job["app_id"]] += 1
        self._cancel_events[job_id] = asyncio.Event()
        task = self._tg.create_task(self._run_job(job, resume=resume), name=f"job-{job_id}")
        self._runners[job_id] = task

    def _runner_done(self, job: dict[str, Any]) -> None:
        job_id = int(job["id"])
        self._runners.pop(job_id, None)
        self._cancel_events.pop(job_id, None)
        self._active_apps[job["app_id"]] -= 1
        self._wake_scheduler.set()

    async def _schedule_loop(self) -> None:
        while True:
            self._wake_scheduler.clear()
            await self._schedule_due()
            next_time = await self.db.next_job_time()
            timeout = None if next_time is None else max(0.05, next_time - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_scheduler.wait(), timeout)

    async def _schedule_due(self) -> None:
        """Claim every due job the limits allow, in one transaction, and start their runners."""
        limit = self.settings.jobs.max_parallel
        free = limit - len(self._runners)
        if free <= 0:
            return
        now = time.time()
        chosen: list[dict[str, Any]] = []
        planned: Counter[str] = Counter()
        for job in await self.db.due_jobs(now, limit=max(200, free)):
            if len(chosen) >= free:
                break
            app_id = job["app_id"]
            if int(job["id"]) in self._runners:
                continue
            if app_id not in self.apps:
                await self.db.transition_job(
                    job["id"],
                    ("scheduled",),
                    "failed",
                    now=now,
                    finished_at=now,
                    error=self.apps.unusable(app_id, "application {!r} no longer exists"),
                )
                continue
            if self._active_apps[app_id] + planned[app_id] >= self.apps.get(app_id).max_parallel:
                continue
            planned[app_id] += 1
            chosen.append(job)
        if not chosen:
            return
        claimed = set(await self.db.claim_jobs([int(j["id"]) for j in chosen], time.time()))
        for job in chosen:
            if int(job["id"]) in claimed:
                self._start_runner({**job, "state": "launching"}, resume=False)

    # -- one job -----------------------------------------------------------------------------

    async def _context(self, job: dict[str, Any], attempt: int) -> JobContext:
        app = self.apps.get(job["app_id"])
        instances = await self.db.bucket_instances(int(job["bucket_id"]))
        work_dir = (self.settings.work_dir / f"job-{job['id']}").absolute()
        await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
        return JobContext(
            job_id=int(job["id"]),
            attempt=attempt,
            app=app,
            options=self.apps.engine_options(app.id),
            inputs=tuple(
                InputInstance(i["storage_key"], i["sop_instance_uid"], i["series_instance_uid"]) for i in instances
            ),
            work_dir=work_dir,
            correlation_id=job["correlation_id"],
            run_timeout=float(app.run_timeout),
        )

    def _extra(self, job: dict[str, Any]) -> dict[str, Any]:
        return {"job_id": job["id"], "app_id": job["app_id"], "correlation_id": job["correlation_id"]}

    async def _run_job(self, job: dict[str, Any], *, resume: bool) -> None:
        """Drive one job to its next resting state; never raises except on cancellation."""
        try:
            await self._drive(job, resume=resume)
        except asyncio.CancelledError:
            raise
        except MwmError as exc:
            log.error("job %s: %s (%s)", job["id"], exc.message, exc.detail, extra=self._extra(job))
            await self._safe_fail(job, f"{exc.message}" + (f": {exc.detail}" if exc.detail else ""), True)
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job["id"], extra=self._extra(job))
            await self._safe_fail(job, f"internal error: {type(exc).__name__}: {exc}", True)
        finally:
            self._runner_done(job)

    async def _safe_fail(self, job: dict[str, Any], reason: str, retryable: bool) -> None:
        with contextlib.suppress(MwmError):
            current = await self.db.get_job(int(job["id"]))
            if current is not None and current["state"] in ACTIVE_JOB_STATES:
                await self._attempt_failed(current, reason, retryable=retryable)

    async def _drive(self, job: dict[str, Any], *, resume: bool) -> None:
        job_id = int(job["id"])
        engine = await self.engines.get(job["engine"])
        state = job["state"]
        attempt = int(job["attempt"])
        if state == "launching":
            if resume:
                # mwm stopped during a launch: whatever it may have started is stopped, then run again.
                ctx = await self._context(job, attempt)
                await engine.abandon(ctx)
            attempt += 1
            ctx = await self._context(job, attempt)
            try:
                faults.point("job.launching")
                ref = await engine.launch(ctx)
                faults.point("job.launched")
            except EngineError as exc:
                self.metrics.engine_errors.labels(job["engine"], "launch").inc()
                await self._attempt_failed(
                    {**job, "attempt": attempt},
                    f"launch failed: {exc.message}" + (f" ({exc.detail})" if exc.detail else ""),
                    retryable=exc.retryable,
                )
                return
            now = time.time()
            if not await self.db.transition_job(
                job_id,
                ("launching",),
                "running",
                now=now,
                engine_ref=ref,
                started_at=now,
                attempt=attempt,
                message=f"job {job_id} running (attempt {attempt})",
            ):
                await engine.cancel(ctx, ref)  # cancelled while launching
                await engine.cleanup(ctx, ref)
                return
            job = {**job, "state": "running", "engine_ref": ref, "started_at": now, "attempt": attempt}
            self.metrics.job_queue_delay.labels(job["app_id"]).observe(max(0.0, now - float(job["created_at"])))
            state = "running"
        else:
            ctx = await self._context(job, attempt)
        ref = job["engine_ref"]
        if state == "running":
            status = await self._watch(job, ctx, engine, ref)
            if status is None:
                return  # cancelled
            if status.state == "lost":
                await self.db.transition_job(
                    job_id,
                    ("running",),
                    "scheduled",
                    now=time.time(),
                    not_before=time.time(),
                    engine_ref=None,
                    message=f"job {job_id} lost by its engine ({status.message}); run again",
                )
                return
            if status.state == "failed":
                await self._store_log(job_id, ctx)
                await self._attempt_failed(job, status.message or "the application failed", retryable=True)
                await engine.cleanup(ctx, ref)
                return
            if not await self.db.transition_job(job_id, ("running",), "collecting", now=time.time()):
                return
        await self._collect(job, ctx, engine, ref)

    async def _watch(self, job: dict[str, Any], ctx: JobContext, engine: Any, ref: str) -> EngineStatus | None:
        job_id = int(job["id"])
        started = float(job["started_at"] or time.time())
        cancel_event = self._cancel_events[job_id]
        faults.point("job.watching")
        while True:
            left = started + ctx.run_timeout - time.time()
            if left <= 0:
                await engine.cancel(ctx, ref)
                await self._store_log(job_id, ctx)
                await engine.cleanup(ctx, ref)
                return EngineStatus("failed", message=f"timed out after {ctx.run_timeout:g} s")
            waiter = asyncio.ensure_future(engine.wait(ctx, ref, min(left, WATCH_SLICE)))
            cancelled = asyncio.ensure_future(cancel_event.wait())
            try:
                await asyncio.wait({waiter, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (waiter, cancelled):
                    if not fut.done():
                        fut.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await fut
            if cancel_event.is_set():
                await engine.cancel(ctx, ref)
                await self._store_log(job_id, ctx)
                await engine.cleanup(ctx, ref)
                return None
            if waiter.done() and not waiter.cancelled():
                status: EngineStatus = waiter.result()
                if status.finished:
                    return status

    async def _collect(self, job: dict[str, Any], ctx: JobContext, engine: Any, ref: str) -> None:
        job_id = int(job["id"])
        folder = await engine.collect(ctx, ref)
        found, metadata = await results_module.collect(self.storage, job_id, folder)
        faults.point("job.collected")
        log_key = await self._store_log(job_id, ctx)
        app = self.apps.get(job["app_id"]) if job["app_id"] in self.apps else None
        sinks = list(app.sinks) if app else []
        if await self.db.complete_job(job_id, found, sinks, result_data=metadata, log_key=log_key, now=time.time()):
            self._observe(job, "succeeded")
            log.info(
                "job %s succeeded: %d results for %s",
                job_id,
                len(found),
                ", ".join(sinks) or "no sink",
                extra=self._extra(job),
            )
            if found and sinks:
                self._on_results(sinks)
        await engine.cleanup(ctx, ref)
        if not self.settings.jobs.keep_work:
            await asyncio.to_thread(shutil.rmtree, ctx.work_dir, True)

    async def _store_log(self, job_id: int, ctx: JobContext) -> str | None:
        if not await asyncio.to_thread(ctx.log_path.is_file):
            return None
        log_key = job_log_key(job_id)
        try:
            await self.storage.put_file(log_key, ctx.log_path)
        except MwmError as exc:
            log.warning("job %s: cannot store its log: %s", job_id, exc.message)
            return None
        return log_key

    def _observe(self, job: dict[str, Any], outcome: str) -> None:
        if job.get("started_at"):
            self.metrics.job_duration.labels(job["app_id"], outcome).observe(time.time() - float(job["started_at"]))

    async def _attempt_failed(self, job: dict[str, Any], reason: str, *, retryable: bool) -> None:
        self._observe(job, "failed")
        job_id = int(job["id"])
        attempt = int(job["attempt"])
        now = time.time()
        reason = reason[:4000]
        if retryable and attempt < int(job["max_attempts"]):
            delay = backoff(attempt, self.settings.jobs.retry_backoff, self.settings.jobs.retry_backoff_max)
            await self.db.transition_job(
                job_id,
                ACTIVE_JOB_STATES,
                "scheduled",
                now=now,
                not_before=now + delay,
                error=reason,
                engine_ref=None,
                attempt=attempt,
                message=f"job {job_id} attempt {attempt} failed; retry in {delay:g} s: {reason.splitlines()[0]}",
            )
            log.warning(
                "job %s attempt %s failed, retry in %g s: %s",
                job_id,
                attempt,
                delay,
                reason.splitlines()[0],
                extra=self._extra(job),
            )
        else:
            await self.db.transition_job(
                job_id,
                ACTIVE_JOB_STATES,
                "failed",
                now=now,
                finished_at=now,
                error=reason,
                attempt=attempt,
                log_key=job_log_key(job_id),
                message=f"job {job_id} failed: {reason.splitlines()[0]}",
            )
            log.error("job %s failed: %s", job_id, reason.splitlines()[0], extra=self._extra(job))
        self._wake_scheduler.set()

    # -- requests from the API ---------------------------------------------------------------

    async def cancel(self, job_id: int) -> None:
        job = await self.db.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        now = time.time()
        if not await self.db.transition_job(
            job_id,
            ("scheduled", *ACTIVE_JOB_STATES),
            "cancelled",
            now=now,
            finished_at=now,
            error="cancelled by request",
        ):
            raise Conflict(f"job {job_id} is {job['state']} and cannot be cancelled")
        event = self._cancel_events.get(job_id)
        if event is not None:
            event.set()
        log.info("job %s cancelled", job_id, extra=self._extra(job))

    async def retry(self, job_id: int) -> None:
        job = await self.db.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if not await self.db.retry_job(job_id, time.time()):
            raise Conflict(f"job {job_id} is {job['state']}; only failed or cancelled jobs can be retried")
        self._wake_scheduler.set()

    def job_log_path(self, job_id: int) -> Path:
        return (self.settings.work_dir / f"job-{job_id}" / "job.log").absolute()

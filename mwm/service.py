"""Wires the components, owns every resource and background task, starts and stops them cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__, plugins, sweep
from .api import build_application
from .apps import AppRegistry, build_engine_options
from .config import Settings, read_tokens
from .datalock import FolderLock
from .db import Database
from .delivery import DeliveryService, create_sinks
from .engines import EngineRegistry
from .engines.local import log_tail
from .errors import ConfigError, MwmError, ShuttingDown, StorageFull
from .ingest import Ingestor
from .jobs import JobService, job_log_key
from .metrics import Metrics
from .options import build
from .retention import Retention
from .storage import Storage
from .storage.local import LocalStorage

log = logging.getLogger(__name__)
DISK_CHECK_INTERVAL = 1.0
IO_THREADS = 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def create_storage(settings: Settings) -> Storage:
    try:
        cls = plugins.load(plugins.STORAGE, settings.storage.kind)
    except MwmError as exc:
        raise ConfigError(f"storage.kind: {exc.message}", exc.detail) from None
    options = build(cls.Options, settings.storage.options, "storage")
    return cls(options, data_dir=settings.data_dir)  # type: ignore[no-any-return]


async def _start_every_thread(executor: ThreadPoolExecutor, count: int) -> None:
    """Start all of a pool's threads now. It starts them one at a time as work arrives otherwise,
    and ``Thread.start`` waits until the new thread runs: a burst of jobs after a quiet time would
    spend milliseconds of the event loop's time on that."""
    barrier = threading.Barrier(count)
    await asyncio.gather(*(asyncio.wrap_future(executor.submit(barrier.wait, 10.0)) for _ in range(count)))


class Service:
    """The running mwm: ``await start()`` returns once listening; ``await stop()`` shuts down in order.

    Shutdown order: stop accepting connections and finish in-flight requests, then stop the
    background loops, then the engines (local applications are stopped and run again after the
    next start), the sinks, storage and database.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_dir = Path.cwd()
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._ready: asyncio.Future[None] | None = None
        self._main: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failure: BaseException | None = None
        self.http_port: int | None = None
        self.dicom_port: int | None = None
        self.dicom: Any = None
        self.accepting = False
        self.metrics = Metrics()
        self.disk: dict[str, Any] = {}
        self._uploads = 0
        self._uploads_done = asyncio.Event()
        # Built in _run:
        self.db: Database
        self.storage: Storage
        self.apps: AppRegistry
        self.ingestor: Ingestor
        self.jobs: JobService
        self.delivery: DeliveryService
        self.engines: EngineRegistry

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open everything and bind the listeners; raise if start-up fails (nothing is left open)."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._main = asyncio.create_task(self._run(), name="mwm-service")
        done, _ = await asyncio.wait({self._ready, self._main}, return_when=asyncio.FIRST_COMPLETED)
        if self._main in done:
            self._main.result()  # raises the start-up error
            raise MwmError("mwm stopped during start-up")

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        self._stop.set()
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main

    async def wait(self) -> None:
        """Until the service stops (by request or because a background task failed)."""
        assert self._main is not None
        await self._main

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("background task %s failed: %r; stopping", task.get_name(), exc, exc_info=exc)
            self._failure = exc
            self._stop.set()

    async def _warn_of_application_problems(self) -> None:
        """An application its engine cannot run as things are now (a program not installed yet)
        is not refused, it may be fixed later; but it is said at once rather than at its first job."""
        for app in self.apps.all():
            engine = await self.engines.get(app.engine)
            problem = engine.problem(self.apps.engine_options(app.id))
            if problem is not None:
                log.warning("application %r: %s; its jobs will fail until it is there", app.id, problem)

    def _check_listen_policy(self, tokens: Mapping[str, str]) -> None:
        host, _ = split_address(self.settings.server.http)
        if not is_loopback(host) and not tokens:
            raise ConfigError(
                f"server.http: refusing to listen on {host}, which is not a loopback address, without "
                "tokens; configure server.tokens or server.tokens_file"
            )

    async def _run(self) -> None:
        settings = self.settings
        # Blocking work (file writes and flushes, parsing) runs in threads; flushes of different
        # files overlap on the device, so more of them at once costs little.
        executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="mwm-io")
        asyncio.get_running_loop().set_default_executor(executor)
        await _start_every_thread(executor, IO_THREADS)
        async with contextlib.AsyncExitStack() as stack:
            tokens = {t.token: t.role for t in read_tokens(settings.server)}
            self._check_listen_policy(tokens)

            # Before anything in the data folder is touched (crash leftovers are purged and
            # orphaned jobs stopped below: another server's would be taken for them).
            lock = FolderLock.for_data(settings.data_dir, settings.database_path)
            try:
                await asyncio.to_thread(lock.acquire)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise ConfigError(f"server.data_dir: cannot use {settings.data_dir}: {reason}") from exc
            stack.callback(lock.release)

            self.db = Database(
                settings.database_path,
                synchronous=settings.database.synchronous,
                busy_timeout=settings.database.busy_timeout,
            )
            await self.db.open()
            stack.push_async_callback(self.db.close)

            self.storage = create_storage(settings)
            await self.storage.open()
            stack.push_async_callback(self.storage.close)

            sinks = create_sinks(settings, self.storage, self.base_dir)
            self.apps = AppRegistry(self.db, settings, build_engine_options)
            await self.apps.load()

            self.delivery = DeliveryService(settings=settings, db=self.db, sinks=sinks, metrics=self.metrics)
            await self.delivery.open()
            stack.push_async_callback(self.delivery.close)

            self.engines = EngineRegistry(settings=settings, storage=self.storage)
            stack.push_async_callback(self.engines.close)
            for engine_name in sorted({app.engine for app in self.apps.all()} | set(settings.engines)):
                await self.engines.get(engine_name)  # engine settings are checked at start-up
            await self._warn_of_application_problems()

            self.jobs = JobService(
                settings=settings,
                db=self.db,
                storage=self.storage,
                apps=self.apps,
                engines=self.engines,
                on_results=self.delivery.wake,
                metrics=self.metrics,
            )
            self.ingestor = Ingestor(
                db=self.db,
                storage=self.storage,
                apps=self.apps,
                staging_dir=settings.staging_dir,
                max_instance_size=settings.server.max_instance_size,
                on_buckets=self.jobs.buckets_updated,
                deadline_covered=self.jobs.timer.covers,
                metrics=self.metrics,
                known_aets=self.served_ae_titles,
            )
            await asyncio.to_thread(self.ingestor.prepare)

            stack.push_async_callback(self._cancel_tasks)
            self._spawn(self.db.run_checkpoints(), "database-checkpoints")
            self._spawn(self.jobs.run(), "jobs")
            self._spawn(self.delivery.run(), "deliveries")
            if isinstance(self.storage, LocalStorage):
                self._spawn(sweep.run(self.storage.root, self.db, started_at=self.started_at), "orphan-sweep")
            await self._check_disk()
            self._spawn(self._watch_disk(), "disk-pressure")
            retention = Retention(settings=settings.retention, db=self.db, storage=self.storage)
            if retention.enabled:
                self._spawn(retention.run(), "retention")

            runner = web.AppRunner(
                build_application(self, tokens),
                access_log=logging.getLogger("aiohttp.access"),
                shutdown_timeout=float(settings.server.shutdown_timeout),
                handle_signals=False,
            )
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            stack.push_async_callback(self._drain, runner)
            stack.callback(self._stop_accepting)
            host, port = split_address(settings.server.http)
            site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=self._tls_context())
            try:
                await site.start()
            except OSError as exc:  # in use, or an address this machine does not have
                reason = exc.strerror or str(exc)
                raise ConfigError(f"server.http: cannot listen on {settings.server.http}: {reason}") from None
            self.http_port = self._bound_port(runner, port)
            if settings.server.dicom:
                from .scp import DicomServer  # pynetdicom is loaded only when the SCP is enabled

                self.dicom = DicomServer(
                    settings=settings, ingestor=self.ingestor, apps=self.apps, metrics=self.metrics
                )
                await self.dicom.start()
                stack.push_async_callback(self.dicom.stop)
                self.dicom_port = self.dicom.port
                log.info(
                    "DICOM SCP listening on %s:%s as %s",
                    split_address(settings.server.dicom)[0],
                    self.dicom_port,
                    settings.server.ae_title,
                )
            self.accepting = True
            log.info(
                "mwm %s listening on http://%s:%s (data in %s)",
                __version__,
                host,
                self.http_port,
                settings.data_dir.absolute(),
            )
            assert self._ready is not None
            self._ready.set_result(None)
            await self._stop.wait()
            log.info("stopping")
        if self._failure is not None:
            raise self._failure

    def _stop_accepting(self) -> None:
        self.accepting = False

    @contextlib.contextmanager
    def upload_in_flight(self) -> Iterator[None]:
        """Marks an upload that a graceful stop waits for."""
        self._uploads += 1
        try:
            yield
        finally:
            self._uploads -= 1
            if self._uploads == 0:
                self._uploads_done.set()

    async def _drain(self, runner: web.AppRunner) -> None:
        """Stop listening, then let uploads in flight finish (aiohttp's own shutdown would drop
        the rest of a request body still arriving)."""
        for site in list(runner.sites):
            await site.stop()
        if self._uploads:
            log.info("waiting for %d uploads in flight", self._uploads)
            self._uploads_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._uploads_done.wait(), float(self.settings.server.shutdown_timeout))

    @staticmethod
    def _bound_port(runner: web.AppRunner, requested: int) -> int:
        for server in runner.sites:
            sockets = getattr(server, "_server", None)
            if sockets is not None and sockets.sockets:
                return int(sockets.sockets[0].getsockname()[1])
        return requested

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- queries used by the API ------------------------------------------------------------

    def served_ae_titles(self) -> set[str]:
        """Every AE title mwm answers to: its own, the SCP's extra ones and those apps are called by."""
        titles = {self.settings.server.ae_title, *self.settings.dicom.ae_titles}
        titles.update(ae.ae_title for ae in self.settings.dicom.aes)
        for app in self.apps.all():
            titles.update(app.match.called_aet)
        return titles

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ShuttingDown("mwm is stopping and accepts no new instances")
        if self.ingestor.pressure is not None:
            raise StorageFull("disk pressure: new instances are refused", self.ingestor.pressure)

    def _tls_context(self) -> ssl.SSLContext | None:
        server = self.settings.server
        if server.tls_cert is None or server.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(server.tls_cert, server.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"server.tls_cert: cannot load the certificate and key: {exc}") from None
        return context

    async def _check_disk(self) -> None:
        """Set or clear the ingest refusal from the space left where data is written."""
        server = self.settings.server
        reasons = []
        places: list[tuple[str, int | None, int | None]] = []
        try:
            st = await asyncio.to_thread(os.statvfs, self.settings.data_dir)
            places.append(
                (f"data folder {self.settings.data_dir}", st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
            )
            usage = await self.storage.usage()
            places.append((f"{self.storage.kind} storage", usage.free_bytes, usage.total_bytes))
        except (OSError, MwmError) as exc:
            log.warning("cannot read the free space: %s", exc)
            return
        for place, free, total in places:
            if free is None or not total:
                continue
            used_percent = 100.0 * (total - free) / total
            if used_percent > server.disk_watermark:
                reasons.append(f"{place} is {used_percent:.1f}% full (limit {server.disk_watermark:g}%)")
            elif free < server.disk_reserve:
                reasons.append(f"{place} has {free} bytes free (reserve {int(server.disk_reserve)})")
        pressure = "; ".join(reasons) or None
        if pressure != self.ingestor.pressure:
            if pressure:
                log.error("refusing new instances: %s", pressure)
            else:
                log.warning("disk pressure cleared: accepting new instances again")
            self.ingestor.pressure = pressure
        self.disk = {
            "free_bytes": min((p[1] for p in places if p[1] is not None), default=None),
            "watermark_percent": server.disk_watermark,
            "reserve_bytes": int(server.disk_reserve),
            "pressure": pressure,
        }

    async def _watch_disk(self) -> None:
        while True:
            await asyncio.sleep(DISK_CHECK_INTERVAL)
            await self._check_disk()

    async def health(self) -> dict[str, Any]:
        report: dict[str, Any] = {"version": __version__, "uptime_seconds": round(time.time() - self.started_at, 1)}
        ok = True
        try:
            await self.db.ping()
            report["database"] = {"ok": True, "schema_version": self.db.schema_version}
        except MwmError as exc:
            ok = False
            report["database"] = {"ok": False, "error": exc.message}
        try:
            usage = await self.storage.usage()
            report["storage"] = {
                "ok": True,
                **self.storage.describe(),
                "free_bytes": usage.free_bytes,
                "total_bytes": usage.total_bytes,
            }
        except (MwmError, OSError) as exc:
            ok = False
            report["storage"] = {"ok": False, "error": str(exc)}
        pressure = self.ingestor.pressure
        report["accepting"] = self.accepting and pressure is None
        if pressure is not None:
            report["pressure"] = pressure
        # Under disk pressure mwm is alive and works (jobs, deliveries) but refuses new instances:
        # "degraded", still 200, so that a liveness check does not restart it for a full disk.
        report["status"] = "unavailable" if not (ok and self.accepting) else "degraded" if pressure else "ok"
        return report

    async def job_log(self, job_id: int, tail: int | None = None) -> str:
        """The job's log: the live file while it runs, the stored copy after."""
        live = self.jobs.job_log_path(job_id)
        if await asyncio.to_thread(live.is_file):
            if tail:
                return await asyncio.to_thread(log_tail, live, tail)
            return (await asyncio.to_thread(live.read_bytes)).decode("utf-8", "replace")
        try:
            text = (await self.storage.get_bytes(job_log_key(job_id))).decode("utf-8", "replace")
        except MwmError:
            return ""
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    async def stats(self) -> dict[str, Any]:
        now = time.time()
        midnight = time.mktime((*time.localtime()[:3], 0, 0, 0, 0, 0, -1))
        data = await self.db.stats(midnight)
        data["ingest_per_minute"] = await self.db.ingest_rate(now, 15)
        data["apps"] = await self.db.app_activity(now - 86400)
        data["dicom_associations"] = self.dicom.associations if self.dicom is not None else None
        data["accepting"] = self.accepting
        data["disk"] = self.disk
        usage = await self.storage.usage()
        data["storage"] = {
            "free_bytes": usage.free_bytes,
            "total_bytes": usage.total_bytes,
            "used_bytes": usage.used_bytes,
        }
        data["timers"] = len(self.jobs.timer)
        return data

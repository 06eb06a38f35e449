"""The database: schema, migrations and every query (aiosqlite, WAL). Only this module writes SQL.

One connection writes, inside explicit transactions serialised by a lock; a second connection
reads, so monitoring never sees a transaction half-done. Every state change of a bucket, job or
delivery is a compare-and-set (``... WHERE state IN (...)``), so concurrent actors (a runner, a
cancel from the API, a restart) cannot overwrite each other's decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from .errors import DatabaseError
from .timing import bucket_deadline

T = TypeVar("T")
log = logging.getLogger(__name__)

ACTIVE_JOB_STATES = ("launching", "running", "collecting")
FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
JOB_STATES = ("scheduled", *ACTIVE_JOB_STATES, *FINAL_JOB_STATES)
DELIVERY_STATES = ("pending", "delivered", "failed", "skipped")
CHECKPOINT_INTERVAL = 1.0  # seconds between checkpoints of the write-ahead log, when anything was committed
CHECKPOINT_RESTART_FRAMES = 20_000  # ~80 MB of log: start it over from the beginning

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL UNIQUE,
        sop_class_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        patient_id TEXT NOT NULL DEFAULT '',
        modality TEXT NOT NULL DEFAULT '',
        series_description TEXT NOT NULL DEFAULT '',
        body_part TEXT NOT NULL DEFAULT '',
        study_date TEXT NOT NULL DEFAULT '',
        accession_number TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL,
        calling_aet TEXT NOT NULL DEFAULT '',
        called_aet TEXT NOT NULL DEFAULT '',
        peer_address TEXT NOT NULL DEFAULT '',
        correlation_id TEXT NOT NULL,
        storage_key TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE INDEX instances_study ON instances (study_instance_uid);
    CREATE INDEX instances_received ON instances (received_at);

    CREATE TABLE apps (
        id TEXT PRIMARY KEY,
        origin TEXT NOT NULL,
        spec TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );

    CREATE TABLE buckets (
        id INTEGER PRIMARY KEY,
        app_id TEXT NOT NULL,
        grouping TEXT NOT NULL,
        group_uid TEXT NOT NULL,
        state TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL DEFAULT '',
        patient_id TEXT NOT NULL DEFAULT '',
        correlation_id TEXT NOT NULL,
        instance_count INTEGER NOT NULL DEFAULT 0,
        opened_at REAL NOT NULL,
        last_arrival_at REAL NOT NULL,
        deadline REAL NOT NULL,
        max_deadline REAL NOT NULL,
        closed_at REAL,
        close_reason TEXT
    );
    CREATE UNIQUE INDEX buckets_one_open ON buckets (app_id, group_uid) WHERE state = 'open';
    CREATE INDEX buckets_state ON buckets (state, deadline);

    CREATE TABLE bucket_instances (
        bucket_id INTEGER NOT NULL REFERENCES buckets (id),
        instance_id INTEGER NOT NULL REFERENCES instances (id),
        PRIMARY KEY (bucket_id, instance_id)
    ) WITHOUT ROWID;
    CREATE INDEX bucket_instances_instance ON bucket_instances (instance_id, bucket_id);

    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        bucket_id INTEGER NOT NULL UNIQUE REFERENCES buckets (id),
        app_id TEXT NOT NULL,
        engine TEXT NOT NULL,
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        engine_ref TEXT,
        correlation_id TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL DEFAULT '',
        patient_id TEXT NOT NULL DEFAULT '',
        instance_count INTEGER NOT NULL,
        not_before REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        launched_at REAL,
        started_at REAL,
        finished_at REAL,
        error TEXT,
        log_key TEXT,
        result_data TEXT,
        result_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_state ON jobs (state, not_before);
    CREATE INDEX jobs_app ON jobs (app_id, state);

    CREATE TABLE results (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        path TEXT NOT NULL,
        storage_key TEXT NOT NULL,
        size INTEGER NOT NULL,
        media_type TEXT NOT NULL,
        sop_instance_uid TEXT,
        sop_class_uid TEXT,
        study_instance_uid TEXT,
        series_instance_uid TEXT,
        transfer_syntax_uid TEXT,
        created_at REAL NOT NULL,
        UNIQUE (job_id, path)
    );

    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        result_id INTEGER NOT NULL REFERENCES results (id),
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        sink_id TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        delivered_at REAL,
        UNIQUE (result_id, sink_id)
    );
    CREATE INDEX deliveries_due ON deliveries (sink_id, state, next_attempt_at);

    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        app_id TEXT,
        bucket_id INTEGER,
        job_id INTEGER,
        correlation_id TEXT,
        message TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX events_job ON events (job_id);
    """,
    # 2: retention marks results whose bytes were deleted
    """
    ALTER TABLE results ADD COLUMN purged_at REAL;
    CREATE INDEX results_created ON results (created_at);
    """,
]


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    return None if row is None else dict(row)


@dataclass(frozen=True)
class NewInstance:
    """An instance to record, with the buckets discovery chose for it."""

    headers: Mapping[str, str]
    source: str
    calling_aet: str
    called_aet: str
    peer_address: str
    correlation_id: str
    storage_key: str
    size: int
    sha256: str
    targets: Sequence[BucketTarget] = ()


@dataclass(frozen=True)
class BucketTarget:
    """One application an instance goes to, and how its bucket is timed."""

    app_id: str
    grouping: str
    group_uid: str
    timeout: float
    max_age: float
    reprocess: bool


@dataclass
class RecordOutcome:
    instance_id: int
    duplicate: bool
    buckets: list[dict[str, Any]] = field(default_factory=list)  # id, app_id, deadline
    skipped: list[str] = field(default_factory=list)  # app ids that already processed it
    #: A duplicate whose bytes differ from the instance kept (a corrected re-send, say): the
    #: SHA-256 of the one kept.
    kept_sha256: str | None = None


#: Why a pending delivery waits when its sink is no longer configured.
ORPHANED_NOTE = "waiting until it is again"


@dataclass(frozen=True)
class JobSettings:
    """What closing a bucket needs to know of its application."""

    engine: str
    max_attempts: int
    #: Hand the job every instance of the bucket's group received so far (``late_arrivals = "whole"``).
    whole_group: bool = False


@dataclass(frozen=True)
class NewResult:
    path: str
    storage_key: str
    size: int
    media_type: str
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    transfer_syntax_uid: str | None = None


class Database:
    """Owns the connections; every query of mwm is a method here."""

    def __init__(self, path: Path, *, synchronous: str = "full", busy_timeout: float = 10.0) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._changed = asyncio.Event()
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_executor: ThreadPoolExecutor | None = None
        self._commits = 0  # write transactions since the last checkpoint
        self._change_waiters = 0  # callers in wait_for_change
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys = ON")
        # Checkpoints run on their own connection and thread (run_checkpoints), not inside whichever
        # commit happens to cross the threshold: that commit would wait for the copy and its flush.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    def _connect_checkpointer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout, check_same_thread=False)
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        return conn

    async def _connect_reader(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return conn

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mwm-db-writer")
            loop = self._loop = asyncio.get_running_loop()
            self._writer = await loop.run_in_executor(self._executor, self._connect_writer)
            await loop.run_in_executor(self._executor, self._migrate)
            self._reader = await self._connect_reader()
            self._checkpoint_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mwm-db-checkpoint")
            self._checkpointer = await loop.run_in_executor(self._checkpoint_executor, self._connect_checkpointer)
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise DatabaseError(f"cannot open the database {self.path}", str(exc)) from exc

    async def close(self) -> None:
        if self._checkpoint_executor is not None:
            checkpointer = self._checkpointer
            if checkpointer is not None:
                await asyncio.get_running_loop().run_in_executor(self._checkpoint_executor, checkpointer.close)
            self._checkpoint_executor.shutdown(wait=True)
            self._checkpointer = self._checkpoint_executor = None
        if self._reader is not None:
            await self._reader.close()
        if self._executor is not None:
            writer = self._writer
            if writer is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, writer.close)
            self._executor.shutdown(wait=True)
        self._reader = self._writer = self._executor = None

    # -- checkpoints -----------------------------------------------------------------------

    def _checkpoint(self, mode: str) -> tuple[int, int, int]:
        assert self._checkpointer is not None
        row = self._checkpointer.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    async def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Copy committed pages from the write-ahead log into the database file, on the checkpoint
        thread (writers go on meanwhile); (busy, frames in the log, frames copied)."""
        if self._checkpoint_executor is None:
            raise DatabaseError("the database is closed")
        self._commits = 0
        try:
            return await asyncio.get_running_loop().run_in_executor(self._checkpoint_executor, self._checkpoint, mode)
        except sqlite3.Error as exc:
            raise DatabaseError("checkpoint failed", str(exc)) from exc

    async def run_checkpoints(self, interval: float = CHECKPOINT_INTERVAL) -> None:
        """Checkpoint every ``interval`` seconds while there are new commits; a log that keeps
        growing past ``CHECKPOINT_RESTART_FRAMES`` (readers kept it from being reused) is restarted."""
        while True:
            await asyncio.sleep(interval)
            if self._commits == 0:
                continue
            try:
                _, frames, _ = await self.checkpoint("PASSIVE")
                if frames > CHECKPOINT_RESTART_FRAMES:
                    await self.checkpoint("RESTART")
            except DatabaseError as exc:
                log.warning("database checkpoint: %s (%s)", exc.message, exc.detail)

    def _migrate(self) -> None:
        assert self._writer is not None
        conn = self._writer
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise DatabaseError(
                f"the database {self.path} has schema version {version}, newer than this mwm "
                f"({len(MIGRATIONS)}); upgrade mwm"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            statements = [s for s in script.split(";") if s.strip()]
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return len(MIGRATIONS)

    # -- primitives ------------------------------------------------------------------------

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one transaction on the writer thread; committed, or rolled back on error."""
        conn = self._writer
        if conn is None:
            raise DatabaseError("the database is closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise DatabaseError("the database is unavailable", str(exc)) from exc
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise DatabaseError("the database could not complete a write", str(exc)) from exc
            raise
        return result

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A whole write transaction in one hop to the writer thread (not one hop per statement)."""
        if self._executor is None:
            raise DatabaseError("the database is closed")
        result = await asyncio.get_running_loop().run_in_executor(self._executor, self._transaction, fn)
        self.notify_change()
        return result

    def notify_change(self) -> None:
        """On the event loop, after a commit: count it and wake everyone in ``wait_for_change``."""
        self._commits += 1
        self._wake_change_waiters()

    def _committed_on_writer(self) -> None:
        """On the writer thread, after a commit: count it, and wake ``wait_for_change`` callers,
        if there are any, through the event loop (left alone otherwise: ingest commits without it)."""
        self._commits += 1
        if self._change_waiters and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self._loop.call_soon_threadsafe(self._wake_change_waiters)

    def _wake_change_waiters(self) -> None:
        # Each waiter holds the event it started with; later waiters get a fresh one.
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, timeout: float) -> bool:
        """Wait until a transaction commits; False when ``timeout`` passed first."""
        self._change_waiters += 1
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._change_waiters -= 1
        return True

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if self._reader is None:
            raise DatabaseError("the database is closed")
        try:
            async with self._reader.execute(sql, params) as cur:
                return [dict(r) for r in await cur.fetchall()]
        except sqlite3.Error as exc:
            raise DatabaseError("the database is unavailable", str(exc)) from exc

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    async def ping(self) -> None:
        await self.fetch_one("SELECT 1 AS ok")

    @staticmethod
    def _event(
        conn: sqlite3.Connection,
        kind: str,
        message: str,
        *,
        app_id: str | None = None,
        bucket_id: int | None = None,
        job_id: int | None = None,
        correlation_id: str | None = None,
        data: Mapping[str, Any] | None = None,
        ts: float | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO events (ts, kind, app_id, bucket_id, job_id, correlation_id, message, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ts or time.time(),
                kind,
                app_id,
                bucket_id,
                job_id,
                correlation_id,
                message,
                json.dumps(data) if data else None,
            ),
        )

    def _job_event(self, conn: sqlite3.Connection, job_id: int, kind: str, message: str, ts: float) -> None:
        """An event about a job, carrying its application and correlation id."""
        row = conn.execute("SELECT app_id, correlation_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert row is not None
        self._event(
            conn, kind, message, app_id=row["app_id"], job_id=job_id, correlation_id=row["correlation_id"], ts=ts
        )

    # -- instances and buckets -------------------------------------------------------------

    def run_on_writer(self, fn: Callable[[], None]) -> None:
        """Queue a blocking function on the writer thread (for callers that batch writes themselves,
        such as ingest's group commit); raises ``RuntimeError`` once the database is closing."""
        if self._executor is None:
            raise RuntimeError("the database is closed")
        self._executor.submit(fn)

    def record_instances_blocking(
        self, items: Sequence[NewInstance], now: float, before: Callable[[], None] | None = None
    ) -> list[RecordOutcome]:
        """Record instances and add them to their buckets, all in one transaction. On the writer
        thread only (``run_on_writer``).

        ``before`` runs just before the transaction (ingest flushes the stored files there); if it
        raises, nothing is recorded and the exception propagates.
        """
        if before is not None:
            before()

        def tx(conn: sqlite3.Connection) -> list[RecordOutcome]:
            return [self._record_instance(conn, item, now) for item in items]

        outcomes = self._transaction(tx)
        self._committed_on_writer()
        return outcomes

    def _record_instance(self, conn: sqlite3.Connection, item: NewInstance, now: float) -> RecordOutcome:
        h = item.headers
        cur = conn.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,"
            " transfer_syntax_uid, patient_id, modality, series_description, body_part, study_date,"
            " accession_number, source, calling_aet, called_aet, peer_address, correlation_id, storage_key,"
            " size, sha256, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (sop_instance_uid) DO NOTHING",
            (
                h["sop_instance_uid"],
                h["sop_class_uid"],
                h["study_instance_uid"],
                h["series_instance_uid"],
                h["transfer_syntax_uid"],
                h.get("patient_id", ""),
                h.get("modality", ""),
                h.get("series_description", ""),
                h.get("body_part", ""),
                h.get("study_date", ""),
                h.get("accession_number", ""),
                item.source,
                item.calling_aet,
                item.called_aet,
                item.peer_address,
                item.correlation_id,
                item.storage_key,
                item.size,
                item.sha256,
                now,
            ),
        )
        duplicate = cur.rowcount == 0
        kept_sha256 = None
        if duplicate:
            row = conn.execute(
                "SELECT id, sha256 FROM instances WHERE sop_instance_uid = ?", (h["sop_instance_uid"],)
            ).fetchone()
            assert row is not None
            instance_id = int(row[0])
            if item.sha256 and row[1] and row[1] != item.sha256:
                kept_sha256 = str(row[1])
        else:
            assert cur.lastrowid is not None
            instance_id = cur.lastrowid
        outcome = RecordOutcome(instance_id=instance_id, duplicate=duplicate, kept_sha256=kept_sha256)
        for target in item.targets:
            bucket = self._add_to_bucket(conn, instance_id, item, target, now, duplicate)
            if bucket is None:
                outcome.skipped.append(target.app_id)
            else:
                outcome.buckets.append(bucket)
        return outcome

    def _add_to_bucket(
        self,
        conn: sqlite3.Connection,
        instance_id: int,
        item: NewInstance,
        target: BucketTarget,
        now: float,
        duplicate: bool,
    ) -> dict[str, Any] | None:
        if duplicate:
            # The same SOP Instance UID twice is one instance: nothing to add to an open bucket,
            # and a processed one comes back only for applications configured to reprocess.
            states = {
                r[0]
                for r in conn.execute(
                    "SELECT b.state FROM bucket_instances bi JOIN buckets b ON b.id = bi.bucket_id"
                    " WHERE bi.instance_id = ? AND b.app_id = ?",
                    (instance_id, target.app_id),
                ).fetchall()
            }
            if "open" in states or (states and not target.reprocess):
                return None
        row = conn.execute(
            "SELECT id, opened_at, max_deadline, instance_count FROM buckets"
            " WHERE app_id = ? AND group_uid = ? AND state = 'open'",
            (target.app_id, target.group_uid),
        ).fetchone()
        if row is None:
            max_deadline = now + target.max_age
            deadline = bucket_deadline(now, target.timeout, now, target.max_age)
            cur = conn.execute(
                "INSERT INTO buckets (app_id, grouping, group_uid, state, study_instance_uid, patient_id,"
                " correlation_id, instance_count, opened_at, last_arrival_at, deadline, max_deadline)"
                " VALUES (?, ?, ?, 'open', ?, ?, ?, 1, ?, ?, ?, ?)",
                (
                    target.app_id,
                    target.grouping,
                    target.group_uid,
                    item.headers["study_instance_uid"],
                    item.headers.get("patient_id", ""),
                    item.correlation_id,
                    now,
                    now,
                    deadline,
                    max_deadline,
                ),
            )
            assert cur.lastrowid is not None
            bucket_id = cur.lastrowid
            self._event(
                conn,
                "bucket.opened",
                f"bucket {bucket_id} opened for {target.app_id}",
                app_id=target.app_id,
                bucket_id=bucket_id,
                correlation_id=item.correlation_id,
                ts=now,
            )
        else:
            bucket_id = int(row["id"])
            deadline = bucket_deadline(now, target.timeout, float(row["opened_at"]), target.max_age)
            conn.execute(
                "UPDATE buckets SET instance_count = instance_count + 1, last_arrival_at = ?, deadline = ?"
                " WHERE id = ?",
                (now, deadline, bucket_id),
            )
        conn.execute(
            "INSERT OR IGNORE INTO bucket_instances (bucket_id, instance_id) VALUES (?, ?)",
            (bucket_id, instance_id),
        )
        return {"id": bucket_id, "app_id": target.app_id, "deadline": deadline}

    async def open_buckets(self) -> list[dict[str, Any]]:
        return await self.fetch_all("SELECT * FROM buckets WHERE state = 'open' ORDER BY deadline")

    async def get_bucket(self, bucket_id: int) -> dict[str, Any] | None:
        return await self.fetch_one("SELECT * FROM buckets WHERE id = ?", (bucket_id,))

    async def list_buckets(self, state: str | None, app_id: str | None, limit: int) -> list[dict[str, Any]]:
        where, params = _filters(state=state, app_id=app_id)
        return await self.fetch_all(f"SELECT * FROM buckets {where} ORDER BY id DESC LIMIT ?", (*params, limit))

    def _close_bucket(
        self,
        conn: sqlite3.Connection,
        bucket_id: int,
        reason: str,
        job_settings: Callable[[str], JobSettings],
        now: float,
        due_only: bool,
    ) -> tuple[int | None, float | None]:
        """Close one bucket and insert its job: (job id, None), or (None, its deadline if still open)."""
        bucket = conn.execute("SELECT * FROM buckets WHERE id = ?", (bucket_id,)).fetchone()
        if bucket is None or bucket["state"] != "open":
            return None, None
        if due_only and bucket["deadline"] > now:
            return None, float(bucket["deadline"])  # pushed back by a later arrival
        conn.execute(
            "UPDATE buckets SET state = 'closed', closed_at = ?, close_reason = ? WHERE id = ?",
            (now, reason, bucket_id),
        )
        settings = job_settings(bucket["app_id"])
        if settings.whole_group:
            # Late arrivals join what the group's earlier buckets held: the job gets the whole group.
            conn.execute(
                "INSERT OR IGNORE INTO bucket_instances (bucket_id, instance_id)"
                " SELECT ?, bi.instance_id FROM bucket_instances bi JOIN buckets b ON b.id = bi.bucket_id"
                " WHERE b.app_id = ? AND b.group_uid = ? AND b.id < ?",
                (bucket_id, bucket["app_id"], bucket["group_uid"], bucket_id),
            )
            conn.execute(
                "UPDATE buckets SET instance_count = (SELECT COUNT(*) FROM bucket_instances WHERE bucket_id = ?)"
                " WHERE id = ?",
                (bucket_id, bucket_id),
            )
            bucket = conn.execute("SELECT * FROM buckets WHERE id = ?", (bucket_id,)).fetchone()
        cur = conn.execute(
            "INSERT INTO jobs (bucket_id, app_id, engine, state, max_attempts, correlation_id,"
            " study_instance_uid, patient_id, instance_count, not_before, created_at, updated_at)"
            " VALUES (?, ?, ?, 'scheduled', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                bucket_id,
                bucket["app_id"],
                settings.engine,
                settings.max_attempts,
                bucket["correlation_id"],
                bucket["study_instance_uid"],
                bucket["patient_id"],
                bucket["instance_count"],
                now,
                now,
                now,
            ),
        )
        job_id = cur.lastrowid
        assert job_id is not None
        self._event(
            conn,
            "job.scheduled",
            f"bucket {bucket_id} closed ({reason}) with {bucket['instance_count']} instances: job {job_id}",
            app_id=bucket["app_id"],
            bucket_id=bucket_id,
            job_id=job_id,
            correlation_id=bucket["correlation_id"],
            ts=now,
        )
        return job_id, None

    async def close_bucket(
        self, bucket_id: int, reason: str, *, job_settings: Callable[[str], JobSettings], now: float
    ) -> dict[str, Any] | None:
        """Close an open bucket and schedule its job; the job's row, or ``None`` when it was not open."""

        def tx(conn: sqlite3.Connection) -> dict[str, Any] | None:
            job_id, _ = self._close_bucket(conn, bucket_id, reason, job_settings, now, False)
            if job_id is None:
                return None
            return dict(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

        return await self._write(tx)

    async def close_due_buckets(
        self, bucket_ids: Sequence[int], *, job_settings: Callable[[str], JobSettings], now: float
    ) -> tuple[list[dict[str, Any]], list[tuple[int, float]]]:
        """Close every bucket whose deadline has passed, in one transaction.

        Returns the jobs created (id, bucket_id, app_id, correlation_id) and the (bucket, deadline)
        pairs pushed back meanwhile by later arrivals.
        """

        def tx(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], list[tuple[int, float]]]:
            closed: list[dict[str, Any]] = []
            later: list[tuple[int, float]] = []
            for bucket_id in bucket_ids:
                job_id, deadline = self._close_bucket(conn, bucket_id, "deadline", job_settings, now, True)
                if job_id is not None:
                    row = conn.execute(
                        "SELECT id, bucket_id, app_id, correlation_id FROM jobs WHERE id = ?", (job_id,)
                    ).fetchone()
                    closed.append(dict(row))
                elif deadline is not None:
                    later.append((bucket_id, deadline))
            return closed, later

        return await self._write(tx)

    async def bucket_instances(self, bucket_id: int) -> list[dict[str, Any]]:
        return await self.fetch_all(
            "SELECT i.* FROM bucket_instances bi JOIN instances i ON i.id = bi.instance_id"
            " WHERE bi.bucket_id = ? ORDER BY i.series_instance_uid, i.id",
            (bucket_id,),
        )

    async def list_instances(
        self, study_instance_uid: str | None, limit: int, after_id: int = 0
    ) -> list[dict[str, Any]]:
        if study_instance_uid:
            return await self.fetch_all(
                "SELECT * FROM instances WHERE study_instance_uid = ? AND id > ? ORDER BY id LIMIT ?",
                (study_instance_uid, after_id, limit),
            )
        return await self.fetch_all("SELECT * FROM instances WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))

    async def get_instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        return await self.fetch_one("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))

    # -- applications ------------------------------------------------------------------------

    async def list_apps(self) -> list[dict[str, Any]]:
        rows = await self.fetch_all("SELECT * FROM apps ORDER BY id")
        for row in rows:
            row["spec"] = json.loads(row["spec"])
        return rows

    async def get_app(self, app_id: str) -> dict[str, Any] | None:
        row = await self.fetch_one("SELECT * FROM apps WHERE id = ?", (app_id,))
        if row is not None:
            row["spec"] = json.loads(row["spec"])
        return row

    async def put_app(self, app_id: str, origin: str, spec: Mapping[str, Any], now: float) -> None:
        def tx(conn: sqlite3.Connection) -> Any:
            conn.execute(
                "INSERT INTO apps (id, origin, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET origin = excluded.origin, spec = excluded.spec,"
                " updated_at = excluded.updated_at",
                (app_id, origin, json.dumps(spec), now, now),
            )
            self._event(conn, "app.saved", f"application {app_id} saved ({origin})", app_id=app_id, ts=now)

        return await self._write(tx)

    async def delete_app(self, app_id: str, now: float) -> bool:
        def tx(conn: sqlite3.Connection) -> Any:
            cur = conn.execute("DELETE FROM apps WHERE id = ?", (app_id,))
            if cur.rowcount:
                self._event(conn, "app.deleted", f"application {app_id} deleted", app_id=app_id, ts=now)
            return cur.rowcount > 0

        return await self._write(tx)

    async def sync_config_apps(self, specs: Mapping[str, Mapping[str, Any]], now: float) -> None:
        """Make the stored configuration-file apps equal to those in the file."""

        def tx(conn: sqlite3.Connection) -> Any:
            conn.execute(
                f"DELETE FROM apps WHERE origin = 'config' AND id NOT IN ({','.join('?' * len(specs))})",
                tuple(specs),
            )
            for app_id, spec in specs.items():
                conn.execute(
                    "INSERT INTO apps (id, origin, spec, created_at, updated_at) VALUES (?, 'config', ?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET origin = 'config', spec = excluded.spec,"
                    " updated_at = excluded.updated_at",
                    (app_id, json.dumps(spec), now, now),
                )

        return await self._write(tx)

    # -- jobs ----------------------------------------------------------------------------------

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        return await self.fetch_one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    async def list_jobs(self, state: str | None, app_id: str | None, limit: int) -> list[dict[str, Any]]:
        where, params = _filters(state=state, app_id=app_id)
        return await self.fetch_all(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit))

    async def jobs_in_states(self, states: Iterable[str]) -> list[dict[str, Any]]:
        states = tuple(states)
        return await self.fetch_all(
            f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))}) ORDER BY id", states
        )

    async def due_jobs(self, now: float, limit: int) -> list[dict[str, Any]]:
        return await self.fetch_all(
            "SELECT * FROM jobs WHERE state = 'scheduled' AND not_before <= ? ORDER BY not_before, id LIMIT ?",
            (now, limit),
        )

    async def next_job_time(self) -> float | None:
        row = await self.fetch_one("SELECT MIN(not_before) AS t FROM jobs WHERE state = 'scheduled'")
        return None if row is None or row["t"] is None else float(row["t"])

    async def transition_job(
        self,
        job_id: int,
        from_states: Sequence[str],
        to_state: str,
        *,
        now: float,
        message: str | None = None,
        **fields: Any,
    ) -> bool:
        """Move a job from one of ``from_states`` to ``to_state`` and set ``fields``; False if it was not."""
        assignments = ", ".join(f"{name} = ?" for name in fields)
        sql = (
            f"UPDATE jobs SET state = ?, updated_at = ?{', ' + assignments if assignments else ''}"
            f" WHERE id = ? AND state IN ({','.join('?' * len(from_states))})"
        )

        def tx(conn: sqlite3.Connection) -> Any:
            cur = conn.execute(sql, (to_state, now, *fields.values(), job_id, *from_states))
            if cur.rowcount == 0:
                return False
            self._job_event(conn, job_id, f"job.{to_state}", message or f"job {job_id} {to_state}", now)
            return True

        return await self._write(tx)

    async def claim_jobs(self, job_ids: Sequence[int], now: float) -> list[int]:
        """Move scheduled jobs to launching in one transaction; the ids that were still scheduled."""

        def tx(conn: sqlite3.Connection) -> list[int]:
            claimed = []
            for job_id in job_ids:
                row = conn.execute(
                    "UPDATE jobs SET state = 'launching', updated_at = ?, launched_at = ?"
                    " WHERE id = ? AND state = 'scheduled' RETURNING app_id, correlation_id",
                    (now, now, job_id),
                ).fetchone()
                if row is None:
                    continue
                claimed.append(job_id)
                self._event(
                    conn,
                    "job.launching",
                    f"job {job_id} launching",
                    app_id=row["app_id"],
                    job_id=job_id,
                    correlation_id=row["correlation_id"],
                    ts=now,
                )
            return claimed

        return await self._write(tx)

    async def complete_job(
        self,
        job_id: int,
        results: Sequence[NewResult],
        sink_ids: Sequence[str],
        *,
        result_data: Mapping[str, Any] | None,
        log_key: str | None,
        now: float,
    ) -> bool:
        """Record a job's results and their deliveries and mark it succeeded, atomically."""

        def tx(conn: sqlite3.Connection) -> Any:
            cur = conn.execute(
                "UPDATE jobs SET state = 'succeeded', updated_at = ?, finished_at = ?, result_data = ?,"
                " log_key = ?, result_count = ?, error = NULL WHERE id = ? AND state = 'collecting'",
                (now, now, json.dumps(result_data) if result_data is not None else None, log_key, len(results), job_id),
            )
            if cur.rowcount == 0:
                return False
            for result in results:
                cur = conn.execute(
                    "INSERT INTO results (job_id, path, storage_key, size, media_type, sop_instance_uid,"
                    " sop_class_uid, study_instance_uid, series_instance_uid, transfer_syntax_uid, created_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (job_id, path) DO UPDATE SET"
                    " storage_key = excluded.storage_key RETURNING id",
                    (
                        job_id,
                        result.path,
                        result.storage_key,
                        result.size,
                        result.media_type,
                        result.sop_instance_uid,
                        result.sop_class_uid,
                        result.study_instance_uid,
                        result.series_instance_uid,
                        result.transfer_syntax_uid,
                        now,
                    ),
                )
                row = cur.fetchone()
                assert row is not None
                result_id = int(row[0])
                for sink_id in sink_ids:
                    conn.execute(
                        "INSERT OR IGNORE INTO deliveries (result_id, job_id, sink_id, state, next_attempt_at,"
                        " created_at, updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)",
                        (result_id, job_id, sink_id, now, now, now),
                    )
            self._job_event(conn, job_id, "job.succeeded", f"job {job_id} succeeded with {len(results)} results", now)
            return True

        return await self._write(tx)

    async def retry_job(self, job_id: int, now: float) -> bool:
        """Schedule a failed or cancelled job again, with a fresh attempt count."""
        return await self.transition_job(
            job_id,
            ("failed", "cancelled"),
            "scheduled",
            now=now,
            message=f"job {job_id} retried by request",
            attempt=0,
            not_before=now,
            error=None,
            finished_at=None,
            engine_ref=None,
        )

    async def count_jobs_by_state(self) -> dict[str, int]:
        rows = await self.fetch_all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    # -- results and deliveries ----------------------------------------------------------------

    async def job_results(self, job_id: int) -> list[dict[str, Any]]:
        return await self.fetch_all("SELECT * FROM results WHERE job_id = ? ORDER BY id", (job_id,))

    async def get_result(self, result_id: int) -> dict[str, Any] | None:
        return await self.fetch_one(
            "SELECT r.*, j.app_id, j.correlation_id FROM results r JOIN jobs j ON j.id = r.job_id WHERE r.id = ?",
            (result_id,),
        )

    async def list_results(self, job_id: int | None, limit: int) -> list[dict[str, Any]]:
        if job_id is not None:
            return await self.fetch_all(
                "SELECT * FROM results WHERE job_id = ? ORDER BY id DESC LIMIT ?", (job_id, limit)
            )
        return await self.fetch_all("SELECT * FROM results ORDER BY id DESC LIMIT ?", (limit,))

    async def job_deliveries(self, job_id: int) -> list[dict[str, Any]]:
        return await self.fetch_all("SELECT * FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,))

    async def list_deliveries(self, state: str | None, sink_id: str | None, limit: int) -> list[dict[str, Any]]:
        where, params = _filters(state=state, sink_id=sink_id)
        return await self.fetch_all(f"SELECT * FROM deliveries {where} ORDER BY id DESC LIMIT ?", (*params, limit))

    async def due_deliveries(self, sink_id: str, now: float, limit: int) -> list[dict[str, Any]]:
        """Pending deliveries of a sink whose time has come, with their result, oldest first."""
        return await self.fetch_all(
            "SELECT d.id AS delivery_id, d.attempts, d.job_id, r.*, j.app_id, j.correlation_id,"
            " j.study_instance_uid AS job_study_instance_uid"
            " FROM deliveries d JOIN results r ON r.id = d.result_id JOIN jobs j ON j.id = d.job_id"
            " WHERE d.sink_id = ? AND d.state = 'pending' AND d.next_attempt_at <= ?"
            " ORDER BY d.next_attempt_at, d.id LIMIT ?",
            (sink_id, now, limit),
        )

    async def next_delivery_time(self, sink_id: str) -> float | None:
        row = await self.fetch_one(
            "SELECT MIN(next_attempt_at) AS t FROM deliveries WHERE sink_id = ? AND state = 'pending'",
            (sink_id,),
        )
        return None if row is None or row["t"] is None else float(row["t"])

    async def pending_for_sink(self, sink_id: str, limit: int, after_id: int = 0) -> list[dict[str, Any]]:
        """Results held for a pull sink (not yet acknowledged)."""
        return await self.fetch_all(
            "SELECT d.id AS delivery_id, d.created_at AS queued_at, r.*, j.app_id, j.correlation_id"
            " FROM deliveries d JOIN results r ON r.id = d.result_id JOIN jobs j ON j.id = d.job_id"
            " WHERE d.sink_id = ? AND d.state = 'pending' AND d.id > ? ORDER BY d.id LIMIT ?",
            (sink_id, after_id, limit),
        )

    async def record_delivery(
        self,
        delivery_id: int,
        state: str,
        *,
        now: float,
        error: str | None = None,
        next_attempt_at: float | None = None,
        count_attempt: bool = True,
    ) -> bool:
        """Record the outcome of one delivery attempt (only for a pending delivery)."""

        def tx(conn: sqlite3.Connection) -> Any:
            cur = conn.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + ?, last_error = ?, updated_at = ?,"
                " next_attempt_at = COALESCE(?, next_attempt_at),"
                " delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END"
                " WHERE id = ? AND state = 'pending'",
                (state, 1 if count_attempt else 0, error, now, next_attempt_at, state, now, delivery_id),
            )
            if cur.rowcount and state != "pending":
                row = conn.execute(
                    "SELECT d.sink_id, d.job_id, j.app_id, j.correlation_id FROM deliveries d"
                    " JOIN jobs j ON j.id = d.job_id WHERE d.id = ?",
                    (delivery_id,),
                ).fetchone()
                assert row is not None
                self._event(
                    conn,
                    f"delivery.{state}",
                    f"delivery {delivery_id} to {row['sink_id']} {state}" + (f": {error}" if error else ""),
                    app_id=row["app_id"],
                    job_id=row["job_id"],
                    correlation_id=row["correlation_id"],
                    ts=now,
                )
            return cur.rowcount > 0

        return await self._write(tx)

    async def ack_result(self, result_id: int, sink_ids: Sequence[str], now: float) -> int:
        """Mark a pulled result delivered for the given pull sinks; returns how many deliveries."""

        def tx(conn: sqlite3.Connection) -> Any:
            cur = conn.execute(
                "UPDATE deliveries SET state = 'delivered', delivered_at = ?, updated_at = ?,"
                " attempts = attempts + 1 WHERE result_id = ? AND state = 'pending'"
                f" AND sink_id IN ({','.join('?' * len(sink_ids))})",
                (now, now, result_id, *sink_ids),
            )
            if cur.rowcount:
                self._event(conn, "delivery.delivered", f"result {result_id} acknowledged by its consumer", ts=now)
            return cur.rowcount

        return await self._write(tx)

    async def retry_delivery(self, delivery_id: int, now: float) -> bool:
        def tx(conn: sqlite3.Connection) -> Any:
            cur = conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ?"
                " WHERE id = ? AND state = 'failed'",
                (now, now, delivery_id),
            )
            return cur.rowcount > 0

        return await self._write(tx)

    async def get_delivery(self, delivery_id: int) -> dict[str, Any] | None:
        return await self.fetch_one("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))

    async def note_orphaned_deliveries(self, configured: Sequence[str]) -> dict[str, int]:
        """Pending deliveries to sinks no longer configured: they wait (delivered if the sink comes
        back), and their last error says why. How many per such sink."""

        def tx(conn: sqlite3.Connection) -> dict[str, int]:
            marks = ",".join("?" * len(configured))
            where = f"state = 'pending' AND sink_id NOT IN ({marks})" if configured else "state = 'pending'"
            query = f"SELECT sink_id, COUNT(*) FROM deliveries WHERE {where} GROUP BY sink_id"
            counts = {str(r[0]): int(r[1]) for r in conn.execute(query, configured)}
            for sink_id in counts:
                conn.execute(
                    "UPDATE deliveries SET last_error = ? WHERE state = 'pending' AND sink_id = ?",
                    (f"sink {sink_id!r} is not configured: {ORPHANED_NOTE}", sink_id),
                )
            for sink_id in configured:  # back again: the note no longer holds
                conn.execute(
                    "UPDATE deliveries SET last_error = NULL"
                    " WHERE state = 'pending' AND sink_id = ? AND last_error = ?",
                    (sink_id, f"sink {sink_id!r} is not configured: {ORPHANED_NOTE}"),
                )
            return counts

        return await self._write(tx)

    async def count_deliveries(self) -> dict[str, dict[str, int]]:
        rows = await self.fetch_all("SELECT sink_id, state, COUNT(*) AS n FROM deliveries GROUP BY sink_id, state")
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["sink_id"], {})[r["state"]] = r["n"]
        return out

    # -- events ----------------------------------------------------------------------------------

    async def add_event(self, kind: str, message: str, **kwargs: Any) -> None:
        def tx(conn: sqlite3.Connection) -> Any:
            self._event(conn, kind, message, **kwargs)

        return await self._write(tx)

    # -- retention -------------------------------------------------------------------------------

    async def purgeable_instances(self, cutoff: float, limit: int) -> list[dict[str, Any]]:
        """Instances received before ``cutoff`` that no open bucket or unfinished job needs."""
        return await self.fetch_all(
            "SELECT i.id, i.storage_key FROM instances i WHERE i.received_at < ? AND NOT EXISTS ("
            " SELECT 1 FROM bucket_instances bi JOIN buckets b ON b.id = bi.bucket_id"
            " LEFT JOIN jobs j ON j.bucket_id = b.id"
            " WHERE bi.instance_id = i.id AND (b.state = 'open' OR j.id IS NULL"
            " OR j.state NOT IN ('succeeded', 'failed', 'cancelled') OR j.finished_at >= ?))"
            " ORDER BY i.id LIMIT ?",
            (cutoff, cutoff, limit),
        )

    async def forget_instances(self, instance_ids: Sequence[int], now: float) -> None:
        marks = ",".join("?" * len(instance_ids))

        def tx(conn: sqlite3.Connection) -> Any:
            conn.execute(f"DELETE FROM bucket_instances WHERE instance_id IN ({marks})", tuple(instance_ids))
            conn.execute(f"DELETE FROM instances WHERE id IN ({marks})", tuple(instance_ids))
            self._event(conn, "retention.instances", f"{len(instance_ids)} instances deleted", ts=now)

        return await self._write(tx)

    async def purgeable_results(self, cutoff: float, only_delivered: bool, limit: int) -> list[dict[str, Any]]:
        """Results produced before ``cutoff`` with no delivery still to make."""
        unfinished = "('pending', 'failed')" if only_delivered else "('pending')"
        return await self.fetch_all(
            "SELECT r.id, r.storage_key FROM results r WHERE r.purged_at IS NULL AND r.created_at < ?"
            f" AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.result_id = r.id AND d.state IN {unfinished})"
            " ORDER BY r.id LIMIT ?",
            (cutoff, limit),
        )

    async def mark_results_purged(self, result_ids: Sequence[int], now: float) -> None:
        marks = ",".join("?" * len(result_ids))

        def tx(conn: sqlite3.Connection) -> Any:
            conn.execute(f"UPDATE results SET purged_at = ? WHERE id IN ({marks})", (now, *result_ids))
            self._event(conn, "retention.results", f"{len(result_ids)} results deleted", ts=now)

        return await self._write(tx)

    async def last_event_id(self) -> int:
        row = await self.fetch_one("SELECT COALESCE(MAX(id), 0) AS id FROM events")
        return int(row["id"]) if row else 0

    async def events(self, after_id: int = 0, job_id: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
        if job_id is not None:
            rows = await self.fetch_all(
                "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?", (job_id, after_id, limit)
            )
        else:
            rows = await self.fetch_all("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
        for row in rows:
            row["data"] = json.loads(row["data"]) if row["data"] else None
        return rows

    async def ingest_rate(self, now: float, minutes: int) -> list[int]:
        """Instances received in each of the last ``minutes`` minutes, oldest first."""
        start = (int(now) // 60 - minutes + 1) * 60
        rows = await self.fetch_all(
            "SELECT CAST((received_at - ?) / 60 AS INTEGER) AS slot, COUNT(*) AS n FROM instances"
            " WHERE received_at >= ? GROUP BY slot",
            (start, start),
        )
        counts = [0] * minutes
        for row in rows:
            if 0 <= row["slot"] < minutes:
                counts[row["slot"]] = row["n"]
        return counts

    async def app_activity(self, since: float) -> dict[str, dict[str, Any]]:
        """Per application since ``since``: jobs by state, instances routed, last failure."""
        out: dict[str, dict[str, Any]] = {}
        for row in await self.fetch_all(
            "SELECT app_id, state, COUNT(*) AS n, SUM(instance_count) AS instances FROM jobs"
            " WHERE created_at >= ? GROUP BY app_id, state",
            (since,),
        ):
            entry = out.setdefault(row["app_id"], {"jobs": {}, "instances": 0, "last_error": None})
            entry["jobs"][row["state"]] = row["n"]
            entry["instances"] += row["instances"] or 0
        for row in await self.fetch_all(
            "SELECT app_id, error, MAX(updated_at) AS at FROM jobs WHERE state = 'failed' AND updated_at >= ?"
            " GROUP BY app_id",
            (since,),
        ):
            out.setdefault(row["app_id"], {"jobs": {}, "instances": 0, "last_error": None})["last_error"] = row["error"]
        return out

    async def stats(self, since: float) -> dict[str, Any]:
        row = await self.fetch_one(
            "SELECT COUNT(*) AS instances, COUNT(DISTINCT study_instance_uid) AS studies,"
            " COALESCE(SUM(size), 0) AS bytes FROM instances WHERE received_at >= ?",
            (since,),
        )
        open_row = await self.fetch_one("SELECT COUNT(*) AS n FROM buckets WHERE state = 'open'")
        return {
            "since": since,
            "instances": row["instances"] if row else 0,
            "studies": row["studies"] if row else 0,
            "bytes": row["bytes"] if row else 0,
            "open_buckets": open_row["n"] if open_row else 0,
            "jobs": await self.count_jobs_by_state(),
            "deliveries": await self.count_deliveries(),
        }


def _filters(**conditions: Any) -> tuple[str, tuple[Any, ...]]:
    parts = [f"{name} = ?" for name, value in conditions.items() if value is not None]
    params = tuple(value for value in conditions.values() if value is not None)
    return ("WHERE " + " AND ".join(parts) if parts else ""), params

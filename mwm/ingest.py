"""The one ingest path behind both ways in (HTTP upload and C-STORE).

parse headers → store bytes durably → record the instance and its buckets in one transaction
(group-committed with concurrent arrivals) → only then report ``stored``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import faults
from .apps import AppRegistry
from .batching import Batcher
from .db import Database, NewInstance, RecordOutcome
from .discovery import discover
from .errors import InvalidDicom, MwmError, NotFound, PayloadTooLarge, ShuttingDown, StorageError, StorageFull
from .headers import InstanceHeaders, read_headers
from .metrics import Metrics
from .storage import Storage, key

log = logging.getLogger(__name__)

SPILL_THRESHOLD = 8 << 20  # parts larger than this go to disk while they arrive


@dataclass(frozen=True)
class Origin:
    """Where an instance came from; recorded with it."""

    source: str  # "http" or "dicom"
    calling_aet: str = ""
    called_aet: str = ""
    peer_address: str = ""
    correlation_id: str = ""
    apps: tuple[str, ...] = ()  # explicit application ids: bypass discovery


@dataclass
class Outcome:
    """What happened to one instance, as reported to the sender."""

    status: str  # stored | duplicate | rejected | failed
    sop_instance_uid: str | None = None
    reason: str | None = None
    detail: str | None = None
    http_status: int = 200
    dicom_status: int = 0x0000
    buckets: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "sop_instance_uid": self.sop_instance_uid}
        if self.reason:
            out["reason"] = self.reason
        if self.detail:
            out["detail"] = self.detail
        if self.buckets:
            out["buckets"] = self.buckets
        return out

    @property
    def accepted(self) -> bool:
        return self.status in ("stored", "duplicate")


def instance_key(headers: InstanceHeaders) -> str:
    """Storage key of an instance, from UIDs already validated against the UID grammar.

    A short random part makes every arrival's key its own: a second copy of the same SOP Instance
    UID can never overwrite the bytes of the first, whatever the timing, so no lookup is needed
    before storing (the database's unique SOP Instance UID decides which copy is kept).
    """
    name = f"{headers.sop_instance_uid}.{secrets.token_hex(4)}.dcm"
    return key("instances", headers.study_instance_uid, headers.series_instance_uid, name)


@dataclass
class Received:
    """A complete instance in the staging folder, hashed, with its headers (or why it is invalid)."""

    path: Path
    size: int
    sha256: str
    headers: InstanceHeaders | None
    error: InvalidDicom | None = None
    storage_key: str | None = None  # set when the file was already moved into storage


def _parse(source: Path | bytes) -> tuple[InstanceHeaders | None, InvalidDicom | None]:
    try:
        return read_headers(source), None
    except InvalidDicom as exc:
        return None, exc


def inspect_file(path: Path, place: Callable[[InstanceHeaders, Path], str | None] | None = None) -> Received:
    """Hash and parse a staged file (for instances that arrived as files, e.g. over DICOM); with
    ``place``, a valid one is moved into storage in the same trip to the thread."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    headers, error = _parse(path)
    key = place(headers, path) if headers is not None and place is not None else None
    return Received(path, size, digest.hexdigest(), headers, error, key)


class Spool:
    """Receives one instance's bytes: in memory while small, spilled to a staging file when large.

    ``finish`` leaves a complete file in the staging folder and, in the same trip to a worker
    thread, hashes it and parses its headers (from memory when it was not spilled).
    """

    def __init__(
        self, staging_dir: Path, max_size: int, place: Callable[[InstanceHeaders, Path], str | None] | None = None
    ) -> None:
        self.path = staging_dir / f"{uuid.uuid4().hex}.dcm"
        self._place = place
        self.max_size = max_size
        self.size = 0
        self._buffer = bytearray()
        self._file: Any = None
        self._digest = hashlib.sha256()

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_size:
            raise PayloadTooLarge(f"instance larger than the limit of {self.max_size} bytes")
        self._buffer += chunk
        if len(self._buffer) >= SPILL_THRESHOLD:
            await self._flush()

    def _write_out(self, data: bytes) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in finish/discard
        self._file.write(data)
        self._digest.update(data)

    async def _flush(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        await asyncio.to_thread(self._write_out, data)

    async def finish(self) -> Received:
        spilled = self._file is not None
        data, self._buffer = bytes(self._buffer), bytearray()

        def close() -> Received:
            self._write_out(data)
            self._file.close()
            headers, error = _parse(self.path if spilled else data)
            # A valid instance goes straight into storage in the same trip to the thread.
            key = self._place(headers, self.path) if headers is not None and self._place else None
            return Received(self.path, self.size, self._digest.hexdigest(), headers, error, key)

        return await asyncio.to_thread(close)

    async def discard(self) -> None:
        def remove() -> None:
            if self._file is not None:
                self._file.close()
            self.path.unlink(missing_ok=True)

        await asyncio.to_thread(remove)


class Ingestor:
    """Turns received bytes into recorded instances, whichever way they came in."""

    def __init__(
        self,
        *,
        db: Database,
        storage: Storage,
        apps: AppRegistry,
        staging_dir: Path,
        max_instance_size: int,
        on_buckets: Callable[[Sequence[dict[str, Any]]], None],
        metrics: Metrics,
        known_aets: Callable[[], set[str]],
    ) -> None:
        self.db = db
        self.storage = storage
        self.apps = apps
        self.staging_dir = staging_dir
        self.max_instance_size = max_instance_size
        # Group commit: the stored files' names are made durable together, then their rows are
        # committed together, one batch at a time.
        self.committer: Batcher[NewInstance, RecordOutcome] = Batcher(self._record)
        self._on_buckets = on_buckets
        self._metrics = metrics
        self._known_aets = known_aets
        self._in_flight: dict[str, asyncio.Lock] = {}
        self.accepting = True
        #: Why new instances are refused (disk pressure), or None.
        self.pressure: str | None = None

    async def _record(self, items: list[NewInstance]) -> list[RecordOutcome]:
        await self.storage.sync([item.storage_key for item in items])
        return await self.db.record_instances(items, time.time())

    def prepare(self) -> None:
        """Create the staging folder and remove what a crash left in it (never acknowledged)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.staging_dir.iterdir():
            if leftover.is_file():
                leftover.unlink()

    def spool(self) -> Spool:
        return Spool(self.staging_dir, self.max_instance_size, self._place)

    def _place(self, headers: InstanceHeaders, path: Path) -> str | None:
        """Move a parsed instance into storage under its own key, on a worker thread, if the kind can."""
        storage_key = instance_key(headers)
        try:
            return storage_key if self.storage.place_blocking(storage_key, path) else None
        except MwmError:
            return None  # put_staged will try again and report the error

    def check_apps(self, app_ids: Sequence[str]) -> None:
        for app_id in app_ids:
            if app_id not in self.apps:
                raise NotFound(f"no application {app_id!r}", "the app parameter names an unknown application")

    async def ingest_file(self, staged: Path | Received, origin: Origin) -> Outcome:
        """Ingest a complete file from the staging folder; the file is consumed either way."""
        outcome = await self._ingest_counted(staged, origin)
        called = origin.called_aet if origin.called_aet in self._known_aets() else "other"
        self._metrics.instances_received.labels(origin.source, called, outcome.status).inc()
        if outcome.status in ("rejected", "failed"):
            self._metrics.rejections.labels(origin.source, outcome.reason or outcome.status).inc()
        return outcome

    async def _ingest_counted(self, staged: Path | Received, origin: Origin) -> Outcome:
        try:
            return await self._ingest(staged, origin)
        except MwmError as exc:
            status = "rejected" if isinstance(exc, (InvalidDicom, PayloadTooLarge, NotFound)) else "failed"
            if status == "failed":
                log.warning(
                    "instance not stored: %s (%s)",
                    exc.message,
                    exc.detail,
                    extra={"correlation_id": origin.correlation_id},
                )
            return Outcome(
                status=status,
                reason=exc.message,
                detail=exc.detail,
                http_status=exc.http_status,
                dicom_status=exc.dicom_status,
            )
        finally:
            path = staged.path if isinstance(staged, Received) else staged
            await asyncio.to_thread(path.unlink, True)

    async def _ingest(self, staged: Path | Received, origin: Origin) -> Outcome:
        if not self.accepting:
            raise ShuttingDown("mwm is stopping and accepts no new instances")
        if self.pressure is not None:
            raise StorageFull("disk pressure: new instances are refused", self.pressure)
        if isinstance(staged, Received):
            received = staged
        else:
            try:
                received = await asyncio.to_thread(inspect_file, staged, self._place)
            except OSError as exc:
                raise StorageError("cannot read the received instance", str(exc)) from exc
        if received.error is not None:
            raise received.error
        assert received.headers is not None
        faults.point("ingest.parsed")
        uid = received.headers.sop_instance_uid
        lock = self._in_flight.setdefault(uid, asyncio.Lock())
        try:
            async with lock:
                return await self._store_and_record(received, origin)
        finally:
            if not lock.locked() and self._in_flight.get(uid) is lock:
                del self._in_flight[uid]

    async def _store_and_record(self, received: Received, origin: Origin) -> Outcome:
        headers = received.headers
        assert headers is not None
        size, sha256 = received.size, received.sha256
        storage_key = received.storage_key
        if storage_key is None:
            storage_key = instance_key(headers)
            await self.storage.put_staged(storage_key, received.path)
        faults.point("ingest.stored")
        header_map = headers.as_dict()
        targets = discover(
            self.apps.all(),
            header_map,
            calling_aet=origin.calling_aet,
            called_aet=origin.called_aet,
            explicit=origin.apps,
        )
        correlation_id = origin.correlation_id or uuid.uuid4().hex
        record = await self.committer.submit(
            NewInstance(
                headers=header_map,
                source=origin.source,
                calling_aet=origin.calling_aet,
                called_aet=origin.called_aet,
                peer_address=origin.peer_address,
                correlation_id=correlation_id,
                storage_key=storage_key,
                size=size,
                sha256=sha256,
                targets=targets,
            )
        )
        faults.point("ingest.recorded")
        if record.duplicate:
            await self.storage.delete(storage_key)  # the first copy is the instance; this one goes
        if record.buckets:
            self._on_buckets(record.buckets)
            for bucket in record.buckets:
                self._metrics.instances_routed.labels(bucket["app_id"]).inc()
        if not record.duplicate:
            self._metrics.received_bytes.labels(origin.source).inc(size)
        return Outcome(
            status="duplicate" if record.duplicate else "stored",
            sop_instance_uid=headers.sop_instance_uid,
            buckets=[{"id": b["id"], "app_id": b["app_id"]} for b in record.buckets],
        )

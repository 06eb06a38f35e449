"""The one ingest path behind both ways in (HTTP upload and C-STORE).

parse headers → store bytes durably → record the instance and its buckets in one transaction
(group-committed with concurrent arrivals) → only then report ``stored``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import mmap
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import faults
from .apps import AppRegistry
from .batching import GroupCommit
from .db import Database, NewInstance, RecordOutcome
from .discovery import discover
from .errors import InvalidDicom, MwmError, NotFound, PayloadTooLarge, ShuttingDown, StorageError, StorageFull
from .headers import InstanceHeaders, read_headers, read_headers_in_pieces
from .metrics import Metrics
from .naming import UniqueNames
from .storage import Storage, key

log = logging.getLogger(__name__)

SPILL_THRESHOLD = 8 << 20  # parts larger than this go to disk while they arrive
LOOP_WRITE_LIMIT = 2 << 20  # parts up to this size are parsed and written on the event loop


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


_KEY_NAMES = UniqueNames()


def instance_key(headers: InstanceHeaders) -> str:
    """Storage key of an instance, from UIDs already validated against the UID grammar.

    A part unique to this arrival (``UniqueNames``: a random prefix drawn at start-up, a counter) makes every
    arrival's key its own: a second copy of the same SOP Instance UID can never overwrite the bytes
    of the first, whatever the timing, so no lookup is needed before storing (the database's
    unique SOP Instance UID decides which copy is kept).
    """
    name = f"{headers.sop_instance_uid}.{_KEY_NAMES.next()}.dcm"
    return key("instances", headers.study_instance_uid, headers.series_instance_uid, name)


def instance_uid_of(file_name: str) -> str:
    """The SOP Instance UID in the name of a file ``instance_key`` made (``<uid>.<unique>.dcm``)."""
    return file_name.removesuffix(".dcm").rsplit(".", 1)[0]


@dataclass
class Received:
    """A complete instance, hashed, with its headers, or why it cannot be stored.

    ``storage_key`` is set when the bytes are already in storage (placed from the receiving
    thread); otherwise they wait in the staging file ``path`` for ``Storage.put_staged``.
    """

    path: Path | None
    size: int
    sha256: str | None  # None: computed from ``data`` in the group commit, off the event loop
    headers: InstanceHeaders | None
    error: MwmError | None = None
    data: list[Bytes] | None = None  # the received pieces, kept for hashing in the group commit
    storage_key: str | None = None
    #: Handed to the group commit: from then on its stored bytes are never removed on a failure
    #: (the commit may have happened even if its answer was lost).
    submitted: bool = False


Bytes = bytes | bytearray | memoryview


def _sha256(pieces: Sequence[Bytes]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


class Spool:
    """Receives one instance's bytes: in memory while small, spilled to a staging file when large.

    ``finish`` hands the instance to ``Ingestor.receive_bytes`` (or ``receive_file`` when it was
    spilled) in one trip to a worker thread: hash, parse, and store under its own key.
    """

    def __init__(self, ingestor: Ingestor, max_size: int) -> None:
        self._ingestor = ingestor
        self.max_size = max_size
        self.size = 0
        self._chunks: list[Bytes] = []
        self._file: Any = None
        self.path: Path | None = None
        self._digest = hashlib.sha256()

    async def write(self, chunk: Bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_size:
            raise PayloadTooLarge(f"instance larger than the limit of {self.max_size} bytes")
        self._chunks.append(chunk)
        if self.size > SPILL_THRESHOLD:
            chunks, self._chunks = self._chunks, []
            await asyncio.to_thread(self._spill, chunks)

    def _spill(self, chunks: list[Bytes]) -> None:
        if self._file is None:
            self.path = self._ingestor.staging_name()
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in finish/discard
        for chunk in chunks:
            self._file.write(chunk)
            self._digest.update(chunk)

    async def finish(self) -> Received:
        chunks, self._chunks = self._chunks, []
        if self._file is None:
            if self.size <= LOOP_WRITE_LIMIT and self._ingestor.storage.places_files:
                # Small enough to parse and write on the event loop: a page-cache write of this
                # size takes less than a trip to a worker thread and back.
                return self._ingestor.receive_bytes(chunks, self.size, hash_later=True)
            return await asyncio.to_thread(self._ingestor.receive_bytes, chunks, self.size)

        def close() -> Received:
            self._spill(chunks)
            self._file.close()
            assert self.path is not None
            return self._ingestor.receive_file(self.path, self._digest.hexdigest())

        return await asyncio.to_thread(close)

    async def discard(self) -> None:
        if self._file is None:
            return

        def remove() -> None:
            self._file.close()
            if self.path is not None:
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
        deadline_covered: Callable[[int, float], bool],
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
        self.committer: GroupCommit[tuple[NewInstance, list[Bytes] | None], RecordOutcome] = GroupCommit(
            self._record, db.run_on_writer
        )
        self._on_buckets = on_buckets
        self._deadline_covered = deadline_covered
        self._metrics = metrics
        self._known_aets = known_aets
        self._in_flight: dict[str, asyncio.Lock] = {}
        self._staging_names = UniqueNames()
        self.accepting = True
        #: Why new instances are refused (disk pressure), or None.
        self.pressure: str | None = None

    def _record(self, batch: list[tuple[NewInstance, list[Bytes] | None]]) -> list[RecordOutcome]:
        """One group commit, on the database's writer thread: hash what was received on the event
        loop, make the stored files durable, then record them all in one transaction."""
        items = [item if data is None else dataclasses.replace(item, sha256=_sha256(data)) for item, data in batch]
        keys = [item.storage_key for item in items]
        return self.db.record_instances_blocking(items, time.time(), before=lambda: self.storage.sync_blocking(keys))

    def prepare(self) -> None:
        """Create the staging folder and remove what a crash left in it (never acknowledged)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.staging_dir.iterdir():
            if leftover.is_file():
                leftover.unlink()

    def staging_name(self) -> Path:
        """A new file name in the staging folder (emptied at every start, so a counter is unique)."""
        return self.staging_dir / f"{self._staging_names.next()}.dcm"

    def spool(self) -> Spool:
        return Spool(self, self.max_instance_size)

    def _refusal(self) -> MwmError | None:
        if not self.accepting:
            return ShuttingDown("mwm is stopping and accepts no new instances")
        if self.pressure is not None:
            return StorageFull("disk pressure: new instances are refused", self.pressure)
        return None

    # -- on the receiving (worker) thread: hash, parse, place ---------------------------------------

    def receive_bytes(self, pieces: Sequence[Bytes], size: int, hash_later: bool = False) -> Received:
        """An instance received into memory, in pieces (as they came off the network): parsed
        and, when valid, stored under its own key by the storage kind if it can do so on this
        thread (else written to staging), without joining the pieces. Hashed here, or with
        ``hash_later`` in the group commit (the pieces are kept for it). Blocking."""
        sha256 = None if hash_later else _sha256(pieces)
        try:
            headers = read_headers_in_pieces(pieces, size)
        except InvalidDicom as exc:
            return Received(None, size, sha256, None, exc)
        kept = list(pieces) if hash_later else None
        placed = self._place(Received(None, size, sha256, headers, data=kept), headers, pieces)
        if placed is not None:
            return placed
        try:
            path = self.staging_name()
            with open(path, "wb") as staged:
                for piece in pieces:
                    staged.write(piece)
            if sha256 is None:
                sha256 = _sha256(pieces)
        except OSError as exc:
            return Received(None, size, sha256, headers, StorageError("cannot stage the received instance", str(exc)))
        return Received(path, size, sha256, headers)

    def receive_file(self, path: Path, sha256: str | None = None) -> Received:
        """An instance received into the staging file ``path`` (hashed already when ``sha256`` is
        given): parsed and, when valid, moved into storage if the kind can do so on this thread.
        The file is either moved, or still at ``path`` for the caller to remove. Blocking."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    source: Any = b""
                    mapped = None
                else:
                    mapped = source = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                try:
                    if sha256 is None:
                        sha256 = hashlib.sha256(source).hexdigest()
                    headers = read_headers(source)
                except InvalidDicom as exc:
                    return Received(path, size, sha256 or "", None, exc)
                finally:
                    if mapped is not None:
                        mapped.close()
        except OSError as exc:
            return Received(path, 0, "", None, StorageError("cannot read the received instance", str(exc)))
        received = Received(path, size, sha256, headers)
        return self._place(received, headers, path) or received

    def _place(self, received: Received, headers: InstanceHeaders, source: Path | Sequence[Bytes]) -> Received | None:
        """``received`` refused, or stored under its own key from ``source`` (its bytes, or its
        staging file, which is moved); None when the storage kind cannot place it from this thread."""
        refusal = self._refusal()
        if refusal is not None:
            return dataclasses.replace(received, error=refusal, data=None)
        storage_key = instance_key(headers)
        try:
            if self.storage.place_blocking(storage_key, source):
                return dataclasses.replace(received, path=None, storage_key=storage_key)
        except MwmError as exc:
            return dataclasses.replace(received, error=exc, data=None)
        return None

    def check_apps(self, app_ids: Sequence[str]) -> None:
        for app_id in app_ids:
            if app_id not in self.apps:
                raise NotFound(
                    self.apps.unusable(app_id, "no application {!r}"), "the app parameter names no usable application"
                )

    async def ingest_file(self, staged: Path | Received, origin: Origin) -> Outcome:
        """Ingest a received instance (or a complete file in the staging folder); its staging file,
        if any, is consumed either way."""
        outcome = await self._ingest_counted(staged, origin)
        self._count(outcome, origin)
        return outcome

    def _count(self, outcome: Outcome, origin: Origin) -> None:
        called = origin.called_aet if origin.called_aet in self._known_aets() else "other"
        self._metrics.instances_received.labels(origin.source, called, outcome.status).inc()
        if outcome.status in ("rejected", "failed"):
            self._metrics.rejections.labels(origin.source, outcome.reason or outcome.status).inc()

    @staticmethod
    def _failure(exc: MwmError, origin: Origin) -> Outcome:
        status = "rejected" if isinstance(exc, (InvalidDicom, PayloadTooLarge, NotFound)) else "failed"
        if status == "failed":
            log.warning(
                "instance not stored: %s (%s)", exc.message, exc.detail, extra={"correlation_id": origin.correlation_id}
            )
        return Outcome(
            status=status,
            reason=exc.message,
            detail=exc.detail,
            http_status=exc.http_status,
            dicom_status=exc.dicom_status,
        )

    async def _ingest_counted(self, staged: Path | Received, origin: Origin) -> Outcome:
        received = staged if isinstance(staged, Received) else None
        recorded = False
        try:
            if received is None:
                assert isinstance(staged, Path)
                received = await asyncio.to_thread(self.receive_file, staged)
            outcome = await self._ingest(received, origin)
            recorded = True
            return outcome
        except MwmError as exc:
            return self._failure(exc, origin)
        finally:
            await self._clean_up(staged, received, recorded)

    async def _clean_up(self, staged: Path | Received, received: Received | None, recorded: bool) -> None:
        """Remove a staging file left over, and bytes placed in storage for an instance not recorded."""
        leftover = received.path if received is not None else staged if isinstance(staged, Path) else None
        placed = received.storage_key if received is not None and not recorded and not received.submitted else None
        if leftover is None and placed is None:
            return
        if leftover is not None:
            await asyncio.to_thread(leftover.unlink, True)
        if placed is not None:
            try:
                await self.storage.delete(placed)
            except MwmError as exc:  # nothing refers to it: the sweep after the next start removes it
                log.warning("could not remove %s after a failed ingest: %s", placed, exc.message)

    async def _ingest(self, received: Received, origin: Origin) -> Outcome:
        refusal = self._refusal()
        if refusal is not None:
            raise refusal
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
        if received.storage_key is None:
            assert received.path is not None
            storage_key = instance_key(headers)
            await self.storage.put_staged(storage_key, received.path)
            received.path = None  # consumed
            received.storage_key = storage_key
        item = self._new_instance(received, origin)
        received.submitted = True
        record = await self.committer.submit(item)
        faults.point("ingest.recorded")
        if record.duplicate:
            await self.storage.delete(item[0].storage_key)  # the first copy is the instance; this one goes
        if record.buckets:
            self._on_buckets(record.buckets)
        return self._stored(received, origin, record)

    def _new_instance(self, received: Received, origin: Origin) -> tuple[NewInstance, list[Bytes] | None]:
        """What the group commit records for a stored instance (and its pieces when still to hash)."""
        headers = received.headers
        assert headers is not None and received.storage_key is not None
        faults.point("ingest.stored")
        header_map = headers.as_dict()
        targets = discover(
            self.apps.all(),
            header_map,
            calling_aet=origin.calling_aet,
            called_aet=origin.called_aet,
            explicit=origin.apps,
        )
        instance = NewInstance(
            headers=header_map,
            source=origin.source,
            calling_aet=origin.calling_aet,
            called_aet=origin.called_aet,
            peer_address=origin.peer_address,
            correlation_id=origin.correlation_id or uuid.uuid4().hex,
            storage_key=received.storage_key,
            size=received.size,
            sha256=received.sha256 or "",
            targets=targets,
        )
        return instance, None if received.sha256 else received.data

    def _stored(self, received: Received, origin: Origin, record: RecordOutcome) -> Outcome:
        for bucket in record.buckets:
            self._metrics.instances_routed.labels(bucket["app_id"]).inc()
        if not record.duplicate:
            self._metrics.received_bytes.labels(origin.source).inc(received.size)
        assert received.headers is not None
        reason = None
        if record.kept_sha256 is not None:
            # A corrected re-send under the same SOP Instance UID: the first copy stays the
            # instance (it may have been processed and delivered already); say so, loudly.
            reason = "already stored with other content: the first copy is kept"
            self._metrics.changed_duplicates.labels(origin.source).inc()
            log.warning(
                "instance %s received again from %s with other content; the first copy (SHA-256 %s...) is kept",
                received.headers.sop_instance_uid,
                origin.calling_aet or origin.peer_address or origin.source,
                record.kept_sha256[:16],
                extra={"correlation_id": origin.correlation_id},
            )
        return Outcome(
            status="duplicate" if record.duplicate else "stored",
            sop_instance_uid=received.headers.sop_instance_uid,
            reason=reason,
            buckets=[{"id": b["id"], "app_id": b["app_id"]} for b in record.buckets],
        )

    # -- from another thread ----------------------------------------------------------------------

    def ingest_blocking(self, received: Received, origin: Origin, loop: asyncio.AbstractEventLoop) -> Outcome:
        """``ingest_file`` for a receiving thread (the DICOM server's association threads): an
        instance already placed in storage is recorded through the group commit directly from this
        thread, without a trip through the event loop; anything else goes through the loop."""
        if received.error is None and received.storage_key is None:
            return asyncio.run_coroutine_threadsafe(self.ingest_file(received, origin), loop).result()
        recorded = False
        try:
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            if received.error is not None:
                raise received.error
            faults.point("ingest.parsed")
            item = self._new_instance(received, origin)
            received.submitted = True
            record = self.committer.submit_blocking(item)
            faults.point("ingest.recorded")
            recorded = True
            if record.duplicate:
                self._remove_placed(item[0].storage_key)
            # The loop hears only of buckets whose deadline timer would not fire in time anyway
            # (a timer that fires early finds the later deadline in the database and re-arms).
            uncovered = [b for b in record.buckets if not self._deadline_covered(int(b["id"]), float(b["deadline"]))]
            if uncovered:
                with contextlib.suppress(RuntimeError):  # the loop is closing: its timers are rebuilt at start
                    loop.call_soon_threadsafe(self._on_buckets, uncovered)
            outcome = self._stored(received, origin, record)
        except MwmError as exc:
            outcome = self._failure(exc, origin)
        finally:
            self.discard_blocking(received, placed_too=not recorded and not received.submitted)
        self._count(outcome, origin)
        return outcome

    def discard_blocking(self, received: Received, *, placed_too: bool = True) -> None:
        """Remove a received instance's staging file and (``placed_too``) the bytes placed in
        storage for it on this machine. Blocking."""
        if received.path is not None:
            received.path.unlink(missing_ok=True)
        if placed_too and received.storage_key is not None:
            self._remove_placed(received.storage_key)

    def _remove_placed(self, storage_key: str) -> None:
        path = self.storage.local_path(storage_key)
        if path is not None:
            path.unlink(missing_ok=True)

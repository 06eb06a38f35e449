"""``mwm send``: upload DICOM files and folders to a running mwm, with progress and a summary."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .client import Client, ClientError

#: What a DICOM Part-10 file has after its 128-byte preamble.
PART10_MAGIC = b"DICM"
PREAMBLE = 128

SKIPPED_DICOMDIR = "a DICOMDIR, the index of a DICOM folder (not an instance)"
SKIPPED_NOT_PART10 = "not a DICOM Part-10 file: no DICM prefix"

#: Answers that every other request would get too: sending the rest would only repeat them.
FATAL_STATUSES = frozenset({401, 403, 404, 507})


@dataclass(frozen=True)
class Problem:
    """A file that was not stored: ``status`` is ``rejected`` or ``failed`` (errors) or ``skipped``."""

    path: str
    status: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "status": self.status, "reason": self.reason}


@dataclass
class SendSummary:
    files: int = 0  # found on the command line
    sent: int = 0  # uploaded (the others were skipped, or not sent after ``error``)
    sent_bytes: int = 0
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    failed: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)  # rejected and failed files, per reason
    skip_reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first file with it
    problems: list[Problem] = field(default_factory=list)
    #: Stored instances (not duplicates) per application whose bucket they went to; ``unrouted``
    #: counts those no application took (stored only, nothing will process them).
    routed: Counter[str] = field(default_factory=Counter)
    unrouted: int = 0
    #: The failure that stopped the upload (mwm unreachable, token refused, unknown application).
    error: ClientError | None = None

    @property
    def ok(self) -> bool:
        """Nothing rejected or failed and nothing stopped the upload (skipped files are fine)."""
        return self.rejected == 0 and self.failed == 0 and self.error is None

    def sorted_problems(self) -> list[Problem]:
        return sorted(self.problems, key=lambda p: (p.path, p.status))


def find_files(paths: Iterable[Path]) -> list[Path]:
    """Regular files named on the command line and, recursively, inside folders (sorted, hidden skipped)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(Path(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def batches(files: Sequence[Path], size: int, max_bytes: int = 64 << 20) -> list[list[Path]]:
    out: list[list[Path]] = []
    current: list[Path] = []
    current_bytes = 0
    for path in files:
        try:
            length = path.stat().st_size
        except OSError:
            length = 0  # reading it says why
        if current and (len(current) >= size or current_bytes + length > max_bytes):
            out.append(current)
            current, current_bytes = [], 0
        current.append(path)
        current_bytes += length
    if current:
        out.append(current)
    return out


def load(path: Path) -> bytes | Problem:
    """A file's bytes, or why it is not sent: a DICOMDIR or a file without the Part-10 prefix is
    skipped (only its first 132 bytes are read), one that cannot be read fails."""
    if path.name.upper() == "DICOMDIR":
        return Problem(str(path), "skipped", SKIPPED_DICOMDIR)
    try:
        with path.open("rb") as file:
            head = file.read(PREAMBLE + len(PART10_MAGIC))
            if head[PREAMBLE:] != PART10_MAGIC:
                return Problem(str(path), "skipped", SKIPPED_NOT_PART10)
            file.seek(0)  # read whole into one buffer: joining the head to the rest would copy it
            return file.read()
    except OSError as exc:
        return Problem(str(path), "failed", f"cannot read the file: {exc.strerror or exc}")


def read_all(paths: Sequence[Path]) -> list[bytes | Problem]:
    return [load(p) for p in paths]


def is_fatal(error: ClientError) -> bool:
    """Whether a failed upload request means that every other one would fail the same way."""
    return error.unreachable or error.status in FATAL_STATUSES


async def check_apps(client: Client, apps: Sequence[str]) -> None:
    """Raise :class:`ClientError` unless every application named with ``--app`` exists."""
    for app in dict.fromkeys(apps):
        await client.get(f"/v1/apps/{quote(app, safe='')}")


async def send(
    client: Client,
    files: Sequence[Path],
    *,
    apps: Sequence[str] = (),
    called_aet: str | None = None,
    calling_aet: str | None = None,
    correlation_id: str | None = None,
    concurrency: int = 4,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> SendSummary:
    """Upload ``files`` in multipart batches over ``concurrency`` connections.

    Never raises for a file: each one's outcome is counted in the summary. A failure that every
    request would meet (mwm unreachable, the token refused, an unknown application) stops the
    upload instead: it is the summary's ``error``, and the files not yet sent are not counted.
    """
    summary = SendSummary(files=len(files))
    headers = {}
    if called_aet:
        headers["X-Called-AET"] = called_aet
    if calling_aet:
        headers["X-Calling-AET"] = calling_aet
    if correlation_id:
        headers["X-Correlation-ID"] = correlation_id
    params = [("app", a) for a in apps]
    try:
        await check_apps(client, apps)
    except ClientError as exc:
        summary.error = exc
        return summary
    queue: asyncio.Queue[list[Path]] = asyncio.Queue()
    for batch in batches(files, batch_size):
        queue.put_nowait(batch)

    def record(path: Path | str, status: str, reason: str | None) -> None:
        if status == "stored":
            summary.stored += 1
            return
        if status == "duplicate":
            summary.duplicate += 1
            return
        text = reason or status
        if status == "skipped":
            summary.skipped += 1
            summary.skip_reasons[text] += 1
        elif status == "rejected":
            summary.rejected += 1
            summary.reasons[text] += 1
        else:
            status = "failed"
            summary.failed += 1
            summary.reasons[text] += 1
        summary.examples.setdefault(text, str(path))
        summary.problems.append(Problem(str(path), status, text))

    def route(buckets: list[dict[str, object]]) -> None:
        apps = {str(bucket.get("app_id")) for bucket in buckets}
        summary.routed.update(apps)
        if not apps:
            summary.unrouted += 1

    def next_batch() -> asyncio.Task[tuple[list[Path], list[bytes | Problem]]] | None:
        """Start reading the next batch's files (on a worker thread), or None when none is left."""
        if queue.empty() or summary.error is not None:
            return None
        batch = queue.get_nowait()

        async def read() -> tuple[list[Path], list[bytes | Problem]]:
            return batch, await asyncio.to_thread(read_all, batch)

        return asyncio.ensure_future(read())

    async def upload(batch: list[Path], loaded: list[bytes | Problem]) -> None:
        paths: list[Path] = []
        parts: list[bytes] = []
        for path, item in zip(batch, loaded, strict=True):
            if isinstance(item, Problem):
                record(item.path, item.status, item.reason)
            else:
                paths.append(path)
                parts.append(item)
        size = sum(len(p) for p in parts)
        if parts:
            try:
                status, answer = await client.upload(parts, params=params, headers=headers)
                if status == 507 and not answer.get("stored") and not answer.get("duplicate"):
                    # Out of space: mwm refuses every instance until it has room again.
                    message = answer.get("message") or "mwm's storage is full"
                    raise ClientError(message, answer.get("detail"), status=status)
            except ClientError as exc:
                if is_fatal(exc):
                    if summary.error is None:
                        summary.error = exc
                    return
                for path in paths:
                    record(path, "failed", exc.message)
            else:
                outcomes = answer.get("instances", [])
                if len(outcomes) != len(paths):
                    message = answer.get("message") or f"the service answered for {len(outcomes)} of {len(paths)}"
                    for path in paths:
                        record(path, "failed", message)
                else:
                    for path, outcome in zip(paths, outcomes, strict=True):
                        record(path, outcome.get("status", "failed"), outcome.get("reason"))
                        if outcome.get("status") == "stored" or outcome.get("buckets"):
                            route(outcome.get("buckets") or [])  # a duplicate may go to reprocess
            summary.sent += len(parts)
            summary.sent_bytes += size
        if on_progress is not None:
            on_progress(len(batch), size)

    async def worker() -> None:
        # Each connection reads its next batch while the current one is on the wire and being
        # stored, so it sends again as soon as the answer arrives.
        reading = next_batch()
        while reading is not None:
            batch, loaded = await reading
            reading = next_batch()
            try:
                await upload(batch, loaded)
            except BaseException:
                if reading is not None:
                    reading.cancel()
                raise
            if summary.error is not None and reading is not None:
                reading.cancel()
                reading = None

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return summary

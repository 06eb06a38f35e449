"""``mwm send``: upload DICOM files and folders to a running mwm, with progress and a summary."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .client import Client, ClientError


@dataclass
class SendSummary:
    files: int = 0
    sent_bytes: int = 0
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first file with it

    @property
    def ok(self) -> bool:
        return self.rejected == 0 and self.failed == 0


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
        length = path.stat().st_size
        if current and (len(current) >= size or current_bytes + length > max_bytes):
            out.append(current)
            current, current_bytes = [], 0
        current.append(path)
        current_bytes += length
    if current:
        out.append(current)
    return out


def read_all(paths: Sequence[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


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
    """Upload ``files`` in multipart batches over ``concurrency`` connections; never raises per file."""
    summary = SendSummary(files=len(files))
    headers = {}
    if called_aet:
        headers["X-Called-AET"] = called_aet
    if calling_aet:
        headers["X-Calling-AET"] = calling_aet
    if correlation_id:
        headers["X-Correlation-ID"] = correlation_id
    params = [("app", a) for a in apps]
    queue: asyncio.Queue[list[Path]] = asyncio.Queue()
    for batch in batches(files, batch_size):
        queue.put_nowait(batch)

    def record(path: Path, status: str, reason: str | None) -> None:
        if status == "stored":
            summary.stored += 1
        elif status == "duplicate":
            summary.duplicate += 1
        else:
            if status == "rejected":
                summary.rejected += 1
            else:
                summary.failed += 1
            text = reason or status
            summary.reasons[text] += 1
            summary.examples.setdefault(text, str(path))

    def next_batch() -> asyncio.Task[tuple[list[Path], list[bytes]]] | None:
        """Start reading the next batch's files (on a worker thread), or None when none is left."""
        if queue.empty():
            return None
        batch = queue.get_nowait()

        async def read() -> tuple[list[Path], list[bytes]]:
            return batch, await asyncio.to_thread(read_all, batch)

        return asyncio.ensure_future(read())

    async def upload(batch: list[Path], parts: list[bytes]) -> None:
        try:
            _status, answer = await client.upload(parts, params=params, headers=headers)
            outcomes = answer.get("instances", [])
            if len(outcomes) != len(batch):
                message = answer.get("message") or f"the service answered for {len(outcomes)} of {len(batch)}"
                for path in batch:
                    record(path, "failed", message)
            else:
                for path, outcome in zip(batch, outcomes, strict=True):
                    record(path, outcome.get("status", "failed"), outcome.get("reason"))
        except ClientError as exc:
            for path in batch:
                record(path, "failed", exc.message)
        summary.sent_bytes += sum(len(p) for p in parts)
        if on_progress is not None:
            on_progress(len(batch), sum(len(p) for p in parts))

    async def worker() -> None:
        # Each connection reads its next batch while the current one is on the wire and being
        # stored, so it sends again as soon as the answer arrives.
        reading = next_batch()
        while reading is not None:
            batch, parts = await reading
            reading = next_batch()
            try:
                await upload(batch, parts)
            except BaseException:
                if reading is not None:
                    reading.cancel()
                raise

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return summary

"""Instance files that no row refers to, found and removed after a start.

A crash between placing an instance's file and committing its row (or between a duplicate's
commit and the removal of its copy) leaves a file nothing refers to: it was never acknowledged,
so it is not an instance, only wasted space. After each start, once, the files placed since the
previous sweep are checked against the database and those without a row are removed.

Only files placed before this start are looked at: the data folder's lock guarantees no other
server placed them, and this server's own uncommitted files are younger than its start. A series
folder whose modification time is older than the previous sweep gained no file since and is
skipped, so a sweep reads little more than the folders of a large archive. The time up to which
files were checked is kept in ``.swept`` in the storage's root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .db import Database
from .ingest import instance_uid_of

log = logging.getLogger(__name__)

MARK = ".swept"
#: Files and folders a little older than the previous sweep are looked at again (clock steps,
#: file systems that round times).
MARGIN = 120.0
BATCH = 500


@dataclass(frozen=True)
class Candidate:
    key: str
    sop_instance_uid: str
    path: Path


def candidates(root: Path, since: float, before: float) -> Iterator[Candidate]:
    """Instance files under ``root`` modified in [``since``, ``before``) (blocking)."""
    instances = root / "instances"
    if not instances.is_dir():
        return
    for study in _folders(instances):
        for series in _folders(Path(study.path)):
            if series.stat(follow_symlinks=False).st_mtime < since:
                continue  # no file was added to it since
            with os.scandir(series.path) as entries:
                for entry in entries:
                    if not entry.name.endswith(".dcm") or not entry.is_file(follow_symlinks=False):
                        continue
                    if since <= entry.stat(follow_symlinks=False).st_mtime < before:
                        key = f"instances/{study.name}/{series.name}/{entry.name}"
                        yield Candidate(key, instance_uid_of(entry.name), Path(entry.path))


def _folders(path: Path) -> list[os.DirEntry[str]]:
    with os.scandir(path) as entries:
        return [e for e in entries if e.is_dir(follow_symlinks=False)]


def _read_mark(root: Path) -> float:
    try:
        return float((root / MARK).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return 0.0  # never swept: everything is looked at once


def _write_mark(root: Path, until: float) -> None:
    temp = root / f"{MARK}.part"
    temp.write_text(f"{until:.3f}\n", encoding="ascii")
    os.replace(temp, root / MARK)


async def sweep(root: Path, db: Database, *, started_at: float) -> int:
    """Remove the instance files without a row placed before ``started_at``; how many."""
    since = max(0.0, await asyncio.to_thread(_read_mark, root) - MARGIN)
    found = await asyncio.to_thread(lambda: list(candidates(root, since, started_at)))
    removed = 0
    for start in range(0, len(found), BATCH):
        batch = found[start : start + BATCH]
        marks = ",".join("?" * len(batch))
        rows = await db.fetch_all(
            f"SELECT storage_key FROM instances WHERE sop_instance_uid IN ({marks})",
            [c.sop_instance_uid for c in batch],
        )
        known = {row["storage_key"] for row in rows}
        orphans = [c for c in batch if c.key not in known]
        for orphan in orphans:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(orphan.path.unlink)
            removed += 1
            log.info("removed %s: no instance refers to it (left by an interrupted ingest)", orphan.key)
    await asyncio.to_thread(_write_mark, root, started_at)
    if removed:
        log.warning("removed %d instance file(s) left by an interrupted ingest", removed)
    return removed


async def run(root: Path, db: Database, *, started_at: float) -> None:
    """``sweep`` as a background task: a failure is logged, never fatal to the service."""
    try:
        await sweep(root, db, started_at=started_at)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - housekeeping must not stop mwm
        log.warning("the sweep for files left by interrupted ingests failed: %r", exc)

"""Files a crash left without a row are removed after the next start; nothing else is touched."""

from __future__ import annotations

import os
import time
from pathlib import Path

from support import base_config, eventually, upload_files

from mwm.sweep import MARGIN, MARK

STUDY, SERIES = "1.2.3", "1.2.3.4"


def orphan(storage: Path, name: str, mtime: float | None = None) -> Path:
    folder = storage / "instances" / STUDY / SERIES
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.0badc0de-1.dcm"
    path.write_bytes(b"\0" * 132)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
        os.utime(folder, (mtime, mtime))
    return path


async def test_files_without_a_row_are_removed_after_a_start(tmp_path, make_service, client_for, small_study):
    config = base_config(tmp_path)
    first = await make_service(config)
    await upload_files(await client_for(first), small_study.paths[:3])
    await first.stop()
    storage = tmp_path / "data" / "storage"
    recorded = sorted(p for p in (storage / "instances").rglob("*.dcm"))
    left = orphan(storage, "1.2.3.4.5")  # placed, then the crash came before its commit
    later = orphan(storage, "1.2.3.4.6", mtime=time.time() + 3600)  # placed after the next start

    second = await make_service(config)
    await eventually(lambda: _gone(left), what="the file without a row to be removed")
    assert sorted(p for p in (storage / "instances").rglob("*.dcm") if p != later) == recorded
    assert later.exists()  # younger than the start: possibly an instance being committed now
    await eventually(lambda: _newer(storage / MARK, second.started_at - 0.01), what="the sweep's mark")
    assert len((await (await client_for(second)).get("/v1/instances"))["instances"]) == 3


async def test_only_files_placed_since_the_previous_sweep_are_looked_at(tmp_path, make_service):
    config = base_config(tmp_path)
    first = await make_service(config)
    storage = tmp_path / "data" / "storage"
    await eventually(lambda: _exists(storage / MARK), what="the first sweep")
    await first.stop()
    swept = float((storage / MARK).read_text())
    old = orphan(storage, "1.2.3.4.7", mtime=swept - MARGIN - 60)  # in a folder untouched since
    await make_service(config)
    await eventually(lambda: _newer(storage / MARK, swept), what="the second sweep")
    assert old.exists()  # not read again: a sweep reads only what changed since the previous one


async def _gone(path: Path) -> bool:
    return not path.exists()


async def _exists(path: Path) -> bool:
    return path.exists()


async def _newer(mark: Path, than: float) -> bool:
    return mark.exists() and float(mark.read_text()) > than

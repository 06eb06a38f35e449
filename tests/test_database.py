"""The database's write-ahead log is checkpointed on its own connection, never inside a commit."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from mwm.db import Database, NewInstance

T = TypeVar("T")


async def _fill(db: Database, rows: int) -> None:
    for i in range(rows):
        await db._write(
            lambda conn, i=i: conn.execute(
                "INSERT INTO events (ts, kind, message) VALUES (?, 'test', ?)", (float(i), "x" * 2000)
            )
        )


async def test_commits_never_checkpoint_and_the_checkpointer_does(tmp_path) -> None:
    db = Database(tmp_path / "mwm.sqlite3")
    await db.open()
    try:
        assert db._writer is not None
        assert db._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        await _fill(db, 1500)  # well past SQLite's default threshold of 1,000 pages
        wal = tmp_path / "mwm.sqlite3-wal"
        assert wal.stat().st_size > 1000 * 4096  # nothing was copied back during the commits
        busy, frames, copied = await db.checkpoint()
        assert busy == 0 and frames > 1000 and copied == frames
        # The loop checkpoints by itself once there are new commits.
        task = asyncio.ensure_future(db.run_checkpoints(interval=0.05))
        await _fill(db, 50)
        await asyncio.sleep(0.3)
        task.cancel()
        checker = sqlite3.connect(tmp_path / "mwm.sqlite3")
        try:
            assert checker.execute("SELECT count(*) FROM events WHERE kind = 'test'").fetchone()[0] == 1550
        finally:
            checker.close()
        assert db._commits == 0
    finally:
        await db.close()
    assert not (tmp_path / "mwm.sqlite3-wal").exists() or (tmp_path / "mwm.sqlite3-wal").stat().st_size == 0


async def test_a_commit_on_the_writer_thread_wakes_change_waiters_and_only_then_the_loop(tmp_path) -> None:
    db = Database(tmp_path / "mwm.sqlite3")
    await db.open()
    loop = asyncio.get_running_loop()
    try:
        hops: list[object] = []
        real_call = loop.call_soon_threadsafe

        def counted(callback, *args):  # type: ignore[no-untyped-def]
            hops.append(callback)
            return real_call(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        try:
            done = loop.create_future()
            db.run_on_writer(lambda: real_call(done.set_result, db.record_instances_blocking([], 0.0)))
            await asyncio.wait_for(done, 5)
            assert hops == []  # nobody waits for changes: the commit left the loop alone
            waiter = asyncio.ensure_future(db.wait_for_change(5.0))
            await asyncio.sleep(0.05)
            db.run_on_writer(lambda: db.record_instances_blocking([], 0.0))
            assert await asyncio.wait_for(waiter, 5) is True
            assert len(hops) == 1
        finally:
            del loop.call_soon_threadsafe
    finally:
        await db.close()


def _instance(uid: str) -> NewInstance:
    headers = {
        "sop_instance_uid": uid,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
    }
    return NewInstance(headers, "http", "", "", "127.0.0.1", "c", f"instances/{uid}.dcm", 10, "0" * 64)


async def _on_writer(db: Database, fn: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    db.run_on_writer(run)
    return await asyncio.wait_for(done, 10)


def _count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
    finally:
        conn.close()


async def test_a_failed_flush_records_nothing(tmp_path) -> None:
    path = tmp_path / "mwm.sqlite3"
    db = Database(path)
    await db.open()
    try:
        (outcome,) = await _on_writer(db, lambda: db.record_instances_blocking([_instance("1.1")], 0.0, lambda: None))
        assert not outcome.duplicate and _count(path) == 1

        def broken() -> None:
            raise OSError(5, "Input/output error")

        with pytest.raises(OSError, match="Input/output"):
            await _on_writer(db, lambda: db.record_instances_blocking([_instance("1.2")], 0.0, broken))
        assert _count(path) == 1
    finally:
        await db.close()

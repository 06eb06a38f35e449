"""The database's write-ahead log is checkpointed on its own connection, never inside a commit."""

from __future__ import annotations

import asyncio
import sqlite3

from mwm.db import Database


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

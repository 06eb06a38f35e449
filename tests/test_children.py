"""Child processes watched through pidfds (or a pool thread where pidfds are missing)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from mwm.engines import children


@pytest.fixture(params=["pidfd", "thread"])
def watching(request, monkeypatch) -> str:
    if request.param == "pidfd" and not children.PIDFDS:
        pytest.skip("no pidfds on this system")
    if request.param == "thread":
        monkeypatch.setattr(children, "PIDFDS", False)
    return request.param


async def test_exit_codes_and_output_reach_the_caller(tmp_path: Path, watching: str) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as out:
        child = await children.start(
            [sys.executable, "-c", "import os, sys; print(os.getpgrp() == os.getpid(), os.environ['X']); sys.exit(3)"],
            stdout=out,
            cwd=tmp_path,
            env={"X": "given"},
        )
    assert child.returncode is None or child.returncode == 3
    assert await asyncio.wait_for(child.wait(), 30) == 3
    assert child.returncode == 3
    assert log.read_text().split() == ["True", "given"]  # its own process group; only the given environment
    child.close()


async def test_a_killed_child_reports_the_signal(tmp_path: Path, watching: str) -> None:
    with open(tmp_path / "log", "wb") as out:
        child = await children.start(["sleep", "30"], stdout=out, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    await asyncio.sleep(0.05)
    assert child.returncode is None
    os.kill(child.pid, signal.SIGTERM)
    assert await asyncio.wait_for(child.wait(), 10) == -signal.SIGTERM
    # waiting again answers at once
    assert await asyncio.wait_for(child.wait(), 1) == -signal.SIGTERM


async def test_a_missing_program_fails_at_start(tmp_path: Path) -> None:
    with open(tmp_path / "log", "wb") as out, pytest.raises(FileNotFoundError):
        await children.start(["/no/such/program"], stdout=out, cwd=tmp_path, env={})


async def test_a_start_given_up_midway_leaves_nothing_running(tmp_path: Path, monkeypatch) -> None:
    started: list[int] = []
    real_popen = children.subprocess.Popen

    def slow_popen(*args, **kwargs):
        import time

        time.sleep(0.3)
        popen = real_popen(*args, **kwargs)
        started.append(popen.pid)
        return popen

    monkeypatch.setattr(children.subprocess, "Popen", slow_popen)
    with open(tmp_path / "log", "wb") as out:
        task = asyncio.ensure_future(
            children.start(["sleep", "30"], stdout=out, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
        )
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for _ in range(100):  # the Popen finishes in its thread, then its process is killed and reaped
        if started:
            try:
                os.kill(started[0], 0)
            except ProcessLookupError:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the process started for a cancelled launch is still there: {started}")

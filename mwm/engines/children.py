"""Child processes whose exit the event loop learns through a pidfd, without a thread per child.

Python 3.11's asyncio subprocesses start a thread per child to block in ``waitpid`` (its default
child watcher), and ``Thread.start`` waits for that thread to run: with many short applications
launched at once that is a millisecond or more of the event loop's time per launch. A pidfd
(Linux 5.3+) becomes readable when its process exits, so the loop itself can wait for it. Where
pidfds are missing, one of the default executor's threads waits instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, cast


def _pidfds_work() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


PIDFDS = _pidfds_work()


class Child:
    """A started process: ``pid``, ``returncode`` (None while it runs; negative: killed by that
    signal) and ``await wait()``."""

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self._loop = loop
        self.pid = popen.pid
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = None
        if PIDFDS:
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except OSError:  # already gone and reaped elsewhere: fall back below
                self._pidfd = None
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._reap)
        else:
            waiting = loop.run_in_executor(None, popen.wait)
            waiting.add_done_callback(lambda done: self._finish(popen.returncode))

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._exited.done() else None

    def _reap(self) -> None:
        assert self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._finish(self._popen.wait())  # exited: returns at once

    def _finish(self, returncode: int | None) -> None:
        if not self._exited.done():
            self._exited.set_result(returncode if returncode is not None else 255)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def close(self) -> None:
        """Stop watching (the event loop is going away); the process itself is not touched."""
        if self._pidfd is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def start(
    argv: Sequence[str],
    *,
    stdout: IO[bytes],
    cwd: Path,
    env: Mapping[str, str],
) -> Child:
    """Start ``argv`` in a session (and process group) of its own, stdin from /dev/null, stdout and
    stderr into ``stdout``. On a worker thread: ``Popen`` returns only once the child has replaced
    itself with the program (a millisecond or more), which the event loop need not wait for."""
    loop = asyncio.get_running_loop()
    call = cast(
        "Callable[[], subprocess.Popen[bytes]]",  # a string: not evaluated (tests replace Popen)
        functools.partial(
            subprocess.Popen,
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
        ),
    )
    starting = loop.run_in_executor(None, call)
    try:
        popen = await asyncio.shield(starting)
    except asyncio.CancelledError:
        # Popen goes on in its thread, using the caller's files: let it finish, then end what it
        # started, so nothing runs that nobody watches.
        try:
            popen = await starting
        except Exception:  # noqa: BLE001 - it failed to start: nothing to end
            raise asyncio.CancelledError from None
        _stop(popen)
        raise
    return Child(popen, loop)


def _stop(popen: subprocess.Popen[bytes]) -> None:
    """Kill a just-started child's process group and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=5)

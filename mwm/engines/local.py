"""The local engine: runs an application as a child process, the way the MONAI Deploy App SDK expects.

The job's instances are linked into ``input/``, the application writes ``output/``; paths are
passed as ``-i IN -o OUT [-m MODELS]`` and in the ``HOLOSCAN_*`` and older ``MONAI_*``
environment variables. The process runs in its own session, so cancel, timeout and shutdown
kill its whole process group, children included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from ..errors import ConfigError, EngineError
from . import Engine, EngineStatus, JobContext, children

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
TERMINATE_GRACE = 5.0
OUTPUT_CHECK_INTERVAL = 1.0


def folder_size(folder: Path) -> int:
    """Bytes in the regular files under ``folder`` (links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _check_command(value: tuple[str, ...], where: str) -> None:
    if not value or not value[0]:
        raise ConfigError(f"{where}: the command must name a program")


@dataclass(frozen=True)
class LocalOptions:
    """Per-application options of the local engine."""

    command: tuple[str, ...] = field(metadata={"check": _check_command})
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    model_path: Path | None = None
    cwd: Path | None = None
    #: Pass ``-i IN -o OUT [-m MODELS]`` on the command line (the environment is always set).
    arguments: bool = True


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file (blocking; small reads only)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def missing_program(options: LocalOptions, base_dir: Path) -> str | None:
    """Why the application's program cannot be started as things are now, or None: a name not
    on the PATH its jobs get (mwm's interpreter's folder first), or a path that is no file."""
    program = options.command[0]
    cwd = base_dir / options.cwd if options.cwd else base_dir
    if os.sep in program:
        path = cwd / program
        if not path.is_file():
            return f"{program} does not exist (from {cwd})"
        if not os.access(path, os.X_OK):
            return f"{program} is not executable"
        return None
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    if shutil.which(program, path=options.env.get("PATH", search)) is None:
        return f"{program!r} is not on the PATH"
    return None


_MARKERS = re.compile(r"^\s*[\^~]+\s*$")  # Python's pointers under the failing expression


def failure_message(what: str, tail: str) -> str:
    """``what`` happened, the line that says why, then the log's last lines (without Python's
    ``^^^^`` pointer lines). The line that says why is a Python traceback's last line (the
    exception) when the tail holds one, else the last line written."""
    lines = [line for line in tail.splitlines() if not _MARKERS.match(line)]
    written = [line for line in lines if line.strip()]
    if not written:
        return what
    headline = written[-1].strip()
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        exceptions = [line for line in written if not line.startswith((" ", "\t", "Traceback"))]
        headline = (exceptions or written)[-1].strip()
    return f"{what}: {headline}\n" + "\n".join(lines).strip()


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process, to tell it from a later one with the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class LocalEngine(Engine):
    """Runs each job as a process group on this machine."""

    name = "local"
    Options = LocalOptions
    poll_interval = 1.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_dir = Path.cwd()
        self._processes: dict[str, children.Child] = {}

    def problem(self, options: LocalOptions) -> str | None:
        return missing_program(options, self.base_dir)

    def _environment(self, ctx: JobContext, options: LocalOptions) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MWM_")}
        # "python" in a command means the interpreter mwm runs in (its virtual environment).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        paths = {
            "HOLOSCAN_INPUT_PATH": ctx.input_dir,
            "HOLOSCAN_OUTPUT_PATH": ctx.output_dir,
            "HOLOSCAN_WORKDIR": ctx.work_dir,
            "MONAI_INPUTPATH": ctx.input_dir,
            "MONAI_OUTPUTPATH": ctx.output_dir,
        }
        if options.model_path is not None:
            model = (self.base_dir / options.model_path).absolute()
            paths["HOLOSCAN_MODEL_PATH"] = model
            paths["MONAI_MODELPATH"] = model
        env.update({k: str(v) for k, v in paths.items()})
        env["MWM_JOB_ID"] = str(ctx.job_id)
        env["MWM_CORRELATION_ID"] = ctx.correlation_id
        env.update(options.env)
        return env

    def _argv(self, ctx: JobContext, options: LocalOptions) -> list[str]:
        argv = list(options.command)
        if options.arguments:
            argv += ["-i", str(ctx.input_dir), "-o", str(ctx.output_dir)]
            if options.model_path is not None:
                argv += ["-m", str((self.base_dir / options.model_path).absolute())]
        return argv

    async def _prepare(self, ctx: JobContext, header: bytes) -> BinaryIO:
        """Fresh input and output folders, the inputs hard-linked, and the log opened with ``header``
        written, in one trip to a thread; inputs that are not on this machine are then fetched."""
        local = [(self.storage.local_path(item.storage_key), item) for item in ctx.inputs]

        def reset_and_link() -> tuple[list[Any], BinaryIO]:
            for folder in (ctx.input_dir, ctx.output_dir):
                if folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir(parents=True)
            remote = []
            for path, item in local:
                dest = ctx.input_dir / f"{item.sop_instance_uid}.dcm"
                if path is None:
                    remote.append(item)
                    continue
                try:
                    os.link(path, dest)
                except OSError:
                    shutil.copyfile(path, dest)
            log_file = open(ctx.log_path, "ab")  # noqa: SIM115 - the caller closes it
            try:
                log_file.write(header)
                log_file.flush()
            except OSError:
                log_file.close()
                raise
            return remote, log_file

        try:
            remote, log_file = await asyncio.to_thread(reset_and_link)
        except OSError as exc:
            raise EngineError(f"cannot prepare the input folder: {exc}") from exc
        try:
            for item in remote:
                await self.storage.fetch(item.storage_key, ctx.input_dir / f"{item.sop_instance_uid}.dcm")
        except BaseException:
            log_file.close()
            raise
        return log_file

    async def launch(self, ctx: JobContext) -> str:
        options: LocalOptions = ctx.options
        argv = self._argv(ctx, options)
        cwd = (self.base_dir / options.cwd) if options.cwd else self.base_dir
        header = f"--- attempt {ctx.attempt} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {argv!r}\n"
        log_file = await self._prepare(ctx, header.encode())
        try:
            process = await children.start(argv, stdout=log_file, cwd=cwd, env=self._environment(ctx, options))
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise EngineError(f"cannot start {argv[0]!r}: {exc.strerror or exc}", retryable=False) from exc
        except OSError as exc:
            raise EngineError(f"cannot start {argv[0]!r}: {exc}") from exc
        finally:
            log_file.close()
        ref = json.dumps({"pid": process.pid, "pgid": process.pid, "start": _process_start_time(process.pid)})
        self._processes[ref] = process
        log.info(
            "job %s started as process %s",
            ctx.job_id,
            process.pid,
            extra={"job_id": ctx.job_id, "app_id": ctx.app.id, "correlation_id": ctx.correlation_id},
        )
        return ref

    def _status(self, ctx: JobContext, returncode: int) -> EngineStatus:
        if returncode == 0:
            return EngineStatus("succeeded", exit_code=0)
        if returncode < 0:
            try:
                what = f"killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                what = f"killed by signal {-returncode}"
        else:
            what = f"exited with code {returncode}"
        tail = log_tail(ctx.log_path)
        return EngineStatus("failed", message=failure_message(what, tail), exit_code=returncode)

    async def poll(self, ctx: JobContext, ref: str) -> EngineStatus:
        process = self._processes.get(ref)
        if process is not None:
            if process.returncode is None:
                return EngineStatus("running")
            return self._status(ctx, process.returncode)
        # Not our child: launched by an earlier mwm. Its exit code is gone with it, so stop any
        # survivor and report the job lost, to be run again.
        await self._stop_orphan(ref)
        return EngineStatus("lost", message="the process was started by an earlier mwm run")

    async def wait(self, ctx: JobContext, ref: str, timeout: float) -> EngineStatus:
        process = self._processes.get(ref)
        if process is None:
            return await self.poll(ctx, ref)
        limit = int(self.settings.jobs.max_output_size)
        deadline = time.monotonic() + timeout
        while process.returncode is None:
            left = deadline - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), max(0.0, min(left, OUTPUT_CHECK_INTERVAL)))
                break
            written = await asyncio.to_thread(folder_size, ctx.output_dir)
            if written > limit:
                await self._terminate_group(process.pid, process)
                return EngineStatus(
                    "failed", message=f"stopped: the application wrote {written} bytes, more than the limit of {limit}"
                )
            if left <= OUTPUT_CHECK_INTERVAL:
                break
        status = await self.poll(ctx, ref)
        if status.state == "succeeded":
            written = await asyncio.to_thread(folder_size, ctx.output_dir)
            if written > limit:
                return EngineStatus(
                    "failed", message=f"the application wrote {written} bytes, more than the limit of {limit}"
                )
        return status

    async def _stop_orphan(self, ref: str) -> None:
        try:
            info = json.loads(ref)
            pid, pgid, start = int(info["pid"]), int(info["pgid"]), info.get("start")
        except (ValueError, KeyError, TypeError):
            return
        if _process_start_time(pid) is not None and _process_start_time(pid) != start:
            return  # the pid now belongs to another process
        if _group_alive(pgid):
            log.warning("stopping orphaned process group %s", pgid)
            await self._terminate_group(pgid, None)

    async def _terminate_group(self, pgid: int, process: children.Child | None) -> None:
        if not _kill_group(pgid, signal.SIGTERM):
            return
        deadline = time.monotonic() + TERMINATE_GRACE
        while time.monotonic() < deadline:
            if process is not None and process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(process.wait()), 0.1)
            else:
                await asyncio.sleep(0.1)
            if not _group_alive(pgid):
                return
        _kill_group(pgid, signal.SIGKILL)

    async def cancel(self, ctx: JobContext, ref: str) -> None:
        process = self._processes.get(ref)
        if process is None:
            await self._stop_orphan(ref)
            return
        await self._terminate_group(process.pid, process)
        # Reap the leader so no zombie remains.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), TERMINATE_GRACE)

    async def abandon(self, ctx: JobContext) -> None:
        marker = f"HOLOSCAN_WORKDIR={ctx.work_dir}".encode()

        def find() -> list[int]:
            groups = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    environ = (entry / "environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if marker in environ:
                    with contextlib.suppress(OSError):
                        groups.append(os.getpgid(int(entry.name)))
            return sorted(set(groups))

        for pgid in await asyncio.to_thread(find):
            log.warning("stopping process group %s left by an interrupted launch of job %s", pgid, ctx.job_id)
            await self._terminate_group(pgid, None)

    async def collect(self, ctx: JobContext, ref: str) -> Path:
        return ctx.output_dir

    async def cleanup(self, ctx: JobContext, ref: str) -> None:
        process = self._processes.pop(ref, None)
        if process is not None:
            process.close()

    async def close(self) -> None:
        """Stop every application still running: they are run again after the restart."""
        running = [p for p in self._processes.values() if p.returncode is None]
        await asyncio.gather(*(self._terminate_group(p.pid, p) for p in running), return_exceptions=True)
        for process in running:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await asyncio.wait_for(process.wait(), TERMINATE_GRACE)
        for process in self._processes.values():
            process.close()
        self._processes.clear()

"""What both benchmarks share: ports, server subprocesses, small HTTP calls, statistics, tables."""

from __future__ import annotations

import contextlib
import importlib
import json
import linecache
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class BenchmarkError(RuntimeError):
    """The benchmark could not measure what it should (a server died, an upload failed...)."""


def synthetic() -> ModuleType:
    """``samples/synthetic.py``, the generator of synthetic DICOM studies."""
    samples = str(ROOT / "samples")
    if samples not in sys.path:
        sys.path.insert(0, samples)
    return importlib.import_module("synthetic")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_json(url: str, timeout: float = 30.0) -> Any:
    """GET ``url`` and decode its JSON answer."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def http_text(url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text: str = response.read().decode("utf-8", "replace")
        return text


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class ServerProcess:
    """A server run as a subprocess, its output in a log file, stopped with SIGTERM."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        url: str,
        log_path: Path,
        env: Mapping[str, str],
        wrapped: bool = False,
    ) -> None:
        """``wrapped``: ``argv`` runs the server under a wrapper (a profiler); signals go to its child."""
        self.name = name
        self.wrapped = wrapped
        self.argv = list(argv)
        self.url = url
        self.log_path = log_path
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, ready_timeout: float = 60.0) -> ServerProcess:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.process.poll() is not None:
                raise BenchmarkError(f"{self.name} exited with code {self.process.returncode}; see {self.log_path}")
            try:
                http_json(f"{self.url}/health", timeout=2.0)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise BenchmarkError(
                        f"{self.name} not ready after {ready_timeout:g} s; see {self.log_path}"
                    ) from None
                time.sleep(0.05)

    @property
    def server_pid(self) -> int:
        """The server's own pid (the wrapper's child when wrapped)."""
        if self.wrapped:
            found = children(self.pid)
            if found:
                return found[0]
        return self.pid

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait; SIGKILL if it hangs. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server_pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def children(pid: int) -> list[int]:
    """The direct children of a process (Linux)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def mwm_environment() -> dict[str, str]:
    """The caller's environment without ``MWM_*`` settings, so only the benchmark's configuration applies."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MWM_")}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


IDLE_CALL = re.compile(r"\.(get|poll|select|acquire|wait)\(")
ENTRY = re.compile(r"\(mwm/(__main__|cli)\.py:")  # on every stack: not a hot spot
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")


def py_spy_record(py_spy: str, out: Path) -> list[str]:
    """The py-spy command prefix that records the command after it into ``out`` (collapsed stacks)."""
    return [py_spy, "record", "--format", "raw", "--rate", "200", "--full-filenames", "-o", str(out), "--"]


def _short(path: str) -> str:
    for marker in (f"{ROOT}/", "site-packages/", f"python{sys.version_info.major}.{sys.version_info.minor}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _frame(text: str) -> tuple[str, bool]:
    """A frame as ``function (short/file.py:line)``, and whether it is a thread waiting for work."""
    match = FRAME.match(text)
    if match is None:
        return text, False
    file, line = match["file"], int(match["line"])
    idle = "site-packages/mwm" not in file and not file.startswith(f"{ROOT}/mwm")
    idle = idle and bool(IDLE_CALL.search(linecache.getline(file, line)))
    return f"{match['function']} ({_short(file)}:{line})", idle


def hot_spots(profiles: Sequence[Path], top: int = 15) -> None:
    """Aggregate py-spy collapsed stacks: busy frames with the most own samples, and mwm's heaviest frames.

    Samples whose innermost frame is a thread waiting for work (a queue's get, the selector's poll,
    a lock's acquire outside mwm) are counted as idle and left out.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    busy = idle = 0
    for path in profiles:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            stack, _, number = line.rpartition(" ")
            if not stack or not number.isdigit():
                continue
            samples = int(number)
            frames = [_frame(f) for f in stack.split(";")]
            if frames[-1][1]:
                idle += samples
                continue
            busy += samples
            own[frames[-1][0]] += samples
            for name in {name for name, _ in frames if "mwm/" in name and not ENTRY.search(name)}:
                inclusive[name] += samples
    if not busy:
        print("\nno profile samples recorded")
        return
    print_table(
        f"hot spots: own samples, % of {busy} busy samples (all threads of mwm serve; {idle} idle left out)",
        ["frame", "%"],
        [(f, f"{100 * n / busy:.1f}") for f, n in own.most_common(top)],
    )
    print_table(
        "hot spots: mwm frames, samples with the frame on the stack, % of busy samples",
        ["frame", "%"],
        [(f, f"{100 * n / busy:.1f}") for f, n in inclusive.most_common(top)],
    )

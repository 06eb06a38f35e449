#!/usr/bin/env python3
"""DICOM receive throughput: mwm's SCP next to dcmtk's storescp and Orthanc, on the same data.

The same synthetic CT instances (512 x 512, about 0.5 MB each) are sent with dcmtk's
``storescu`` over one association, then split in four and sent over four parallel associations,
to each receiver started fresh in an empty folder:

- ``mwm``: a real ``mwm serve`` subprocess with its durability on (every instance fsynced and
  its row committed with ``synchronous = full`` before the C-STORE is answered);
- ``storescp``: dcmtk's reference SCP writing each instance to a folder (no fsync);
- ``orthanc``: Orthanc with its default ``SyncStorageArea`` (fsync of every file) and SQLite index.

Each receiver runs ``--repeat`` times per association count (3 by default), taking its turn
first in rotation, as the host's speed drifts between minutes. It prints every run, then one
table of medians (instances/s and MB/s of each receiver and association count) and the ratios
mwm/Orthanc and mwm/storescp of the medians. Every receiver listens on 127.0.0.1 on a port chosen by
the kernel; dcmtk and Orthanc run with ``TCP_NODELAY=1``, without which Debian's builds leave
Nagle's algorithm on.

Usage::

    .venv/bin/python benchmarks/dicom_receive.py [--count 500] [--parallel 4] [--repeat 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
START_TIMEOUT = 30.0
SEND_TIMEOUT = 600.0


class BenchmarkError(RuntimeError):
    """A receiver did not start, or did not receive what was sent."""


@dataclass(frozen=True)
class Result:
    receiver: str
    associations: int
    instances: int
    megabytes: float
    seconds: float

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_until(check: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{what} exited with status {process.returncode} during start-up")
        if check():
            return
        time.sleep(0.05)
    raise BenchmarkError(f"{what} did not start within {START_TIMEOUT:g} s")


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def http_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def http_ok(url: str) -> bool:
    try:
        http_json(url)
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return True


@contextlib.contextmanager
def running(
    argv: Sequence[str], *, log: Path, env: dict[str, str], cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- receivers ---------------------------------------------------------------------------------


class Receiver:
    """One receiver, started fresh for each measurement."""

    name: str
    ae_title: str

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = 0

    def start(self, folder: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        raise NotImplementedError

    def received(self, folder: Path) -> int:
        raise NotImplementedError


class Mwm(Receiver):
    name = "mwm"
    ae_title = "MWM"

    def start(self, folder: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        self.port = free_port()
        self.http = free_port()
        config = folder / "mwm.toml"
        config.write_text(
            "\n".join(
                (
                    "[server]",
                    f'http = "127.0.0.1:{self.http}"',
                    f'dicom = "127.0.0.1:{self.port}"',
                    f"data_dir = {json.dumps(str(folder / 'data'))}",
                    'log_level = "warning"',
                    "[storage]",
                    "fsync = true",
                    "[database]",
                    'synchronous = "full"',
                    "[dicom]",
                    "max_associations = 16",
                    "",
                )
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MWM_")}
        argv = [sys.executable, "-m", "mwm", "serve", "--config", str(config)]
        return self._started(argv, folder, env)

    @contextlib.contextmanager
    def _started(self, argv: list[str], folder: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
        with running(argv, log=folder / "mwm.log", env=env, cwd=ROOT) as process:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{self.http}/health") and port_open(self.port), "mwm", process)
            yield process

    def received(self, folder: Path) -> int:
        stats = http_json(f"http://127.0.0.1:{self.http}/v1/stats")
        assert isinstance(stats, dict)
        return int(stats["instances"])


class StoreScp(Receiver):
    name = "storescp"
    ae_title = "STORESCP"

    def start(self, folder: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        self.port = free_port()
        (folder / "out").mkdir()
        argv = [STORESCP, "--aetitle", self.ae_title, "--output-directory", str(folder / "out"), str(self.port)]
        return self._started(argv, folder)

    @contextlib.contextmanager
    def _started(self, argv: list[str], folder: Path) -> Iterator[subprocess.Popen[bytes]]:
        with running(argv, log=folder / "storescp.log", env=dcmtk_env()) as process:
            wait_until(lambda: port_open(self.port), "storescp", process)
            yield process

    def received(self, folder: Path) -> int:
        return sum(1 for path in (folder / "out").iterdir() if path.is_file())


def dicomweb_plugin() -> str | None:
    for folder in DICOMWEB_PLUGIN_DIRS:
        path = Path(folder) / "libOrthancDicomWeb.so"
        if path.exists():
            return str(path)
    return None


class Orthanc(Receiver):
    name = "orthanc"
    ae_title = "ORTHANC"

    def start(self, folder: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        self.port = free_port()
        self.http = free_port()
        storage = folder / "storage"
        storage.mkdir()
        config = {
            "Name": "benchmark",
            "HttpPort": self.http,
            "DicomPort": self.port,
            "DicomAet": self.ae_title,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {},
            "Plugins": [],
        }
        path = folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return self._started([ORTHANC, str(path)], folder)

    @contextlib.contextmanager
    def _started(self, argv: list[str], folder: Path) -> Iterator[subprocess.Popen[bytes]]:
        with running(argv, log=folder / "orthanc.log", env=dcmtk_env()) as process:
            wait_until(
                lambda: http_ok(f"http://127.0.0.1:{self.http}/system") and port_open(self.port), "Orthanc", process
            )
            yield process

    def received(self, folder: Path) -> int:
        stats = http_json(f"http://127.0.0.1:{self.http}/statistics")
        assert isinstance(stats, dict)
        return int(stats["CountInstances"])


# -- the measurement ---------------------------------------------------------------------------


def generate(folder: Path, count: int, rows: int, cols: int) -> list[Path]:
    """``count`` synthetic CT instances in one series (reused when already there)."""
    marker = folder / f"done-{count}-{rows}x{cols}"
    if marker.exists():
        return sorted(folder.glob("1/*.dcm"))
    sys.path.insert(0, str(ROOT / "samples"))
    import synthetic  # type: ignore[import-not-found]  # samples/ is not a package

    shutil.rmtree(folder, ignore_errors=True)
    study = synthetic.generate_study(folder, series_count=1, instances_per_series=count, rows=rows, cols=cols, seed=1)
    marker.write_text("")
    return list(study.paths)


def send(receiver: Receiver, files: Sequence[Path], associations: int, folder: Path) -> float:
    """Send ``files`` split over ``associations`` parallel storescu processes; the wall time."""
    chunks = [list(files[i::associations]) for i in range(associations)]
    argv = [STORESCU, "--aetitle", "BENCH", "--call", receiver.ae_title, "127.0.0.1", str(receiver.port)]
    started = time.perf_counter()
    processes = []
    for i, chunk in enumerate(chunks):
        log = open(folder / f"storescu-{i}.log", "wb")  # noqa: SIM115 - closed below
        processes.append(
            (subprocess.Popen([*argv, *map(str, chunk)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env()), log)
        )
    failures = []
    for process, log in processes:
        try:
            status = process.wait(timeout=SEND_TIMEOUT)
        finally:
            log.close()
        if status != 0:
            failures.append(f"{Path(log.name).name}: exit status {status}")
    elapsed = time.perf_counter() - started
    if failures:
        raise BenchmarkError(f"storescu to {receiver.name} failed: {'; '.join(failures)} (logs in {folder})")
    return elapsed


def measure(receiver: Receiver, files: Sequence[Path], associations: int, work: Path) -> Result:
    folder = work / f"{receiver.name}-{associations}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with receiver.start(folder):
        seconds = send(receiver, files, associations, folder)
        count = receiver.received(folder)
    if count != len(files):
        raise BenchmarkError(f"{receiver.name} holds {count} instances after receiving {len(files)} (see {folder})")
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    return Result(receiver.name, associations, len(files), megabytes, seconds)


def disk_floor(folder: Path, files: Sequence[Path], threads: int) -> float:
    """Instances/s the disk allows when each must be durable before the next is acknowledged.

    Write, fsync, rename into place, fsync the folder: what a durable receiver does at least,
    ``threads`` at a time (one per association). No receiver can beat this with its durability on.
    """
    target = folder / f"floor-{threads}"
    shutil.rmtree(target, ignore_errors=True)
    (target / "tmp").mkdir(parents=True)
    (target / "final").mkdir()
    payload = files[0].read_bytes()

    def one(index: int) -> None:
        temp = target / "tmp" / uuid.uuid4().hex
        with open(temp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target / "final" / f"{index}.dcm")
        fd = os.open(target / "final", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(files))))
    elapsed = time.perf_counter() - started
    shutil.rmtree(target, ignore_errors=True)
    return len(files) / elapsed


def medians(results: Sequence[Result]) -> list[Result]:
    """One result per receiver and association count: the run of median duration."""
    grouped: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        grouped.setdefault((r.receiver, r.associations), []).append(r)
    return [sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2] for runs in grouped.values()]


def print_results(results: Sequence[Result], repeat: int) -> None:
    header = f"{'receiver':<10} {'assoc':>5} {'instances':>9} {'seconds':>8} {'inst/s':>8} {'MB/s':>8}"
    print()
    print(f"median of {repeat} run(s)" if repeat > 1 else "one run")
    print(header)
    print("-" * len(header))
    results = medians(results)
    for r in results:
        print(
            f"{r.receiver:<10} {r.associations:>5} {r.instances:>9} {r.seconds:>8.2f} "
            f"{r.per_second:>8.1f} {r.mb_per_second:>8.1f}"
        )
    by_key = {(r.receiver, r.associations): r for r in results}
    print()
    for associations in sorted({r.associations for r in results}):
        mwm = by_key.get(("mwm", associations))
        if mwm is None:
            continue
        for other, target in (("orthanc", 1.5), ("storescp", 0.5)):
            base = by_key.get((other, associations))
            if base is not None:
                ratio = mwm.per_second / base.per_second
                verdict = "meets" if ratio >= target else "below"
                print(f"{associations} association(s): mwm/{other} = {ratio:.2f} ({verdict} the target of {target})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="instances to send (default 500)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--parallel", type=int, default=4, help="associations of the parallel run (default 4)")
    parser.add_argument("--receivers", default="mwm,storescp,orthanc", help="comma-separated (default: all three)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each receiver, each taking its turn first (default 3)"
    )
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    if min(args.count, args.parallel, args.repeat) < 1:
        parser.error("--count, --parallel and --repeat must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = {"mwm": Mwm, "storescp": StoreScp, "orthanc": Orthanc}
    names = [name.strip() for name in args.receivers.split(",") if name.strip()]
    unknown = [name for name in names if name not in kinds]
    if unknown:
        print(f"unknown receiver(s): {', '.join(unknown)} (known: {', '.join(kinds)})", file=sys.stderr)
        return 2
    missing = [b for b in (STORESCU, STORESCP, ORTHANC) if not Path(b).exists()]
    if missing:
        print(f"missing programs: {', '.join(missing)} (install dcmtk and orthanc)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mwm-dicom-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        files = generate(work / "data", args.count, args.rows, args.cols)
        size = sum(path.stat().st_size for path in files)
        print(
            f"{len(files)} instances, {size / 1e6:.0f} MB ({size / len(files) / 1e6:.2f} MB each), "
            f"generated in {time.perf_counter() - started:.1f} s"
        )
        results = []
        for associations in sorted({1, args.parallel}):
            for run in range(args.repeat):
                # The host's state drifts between minutes: each receiver takes its turn first.
                order = names[run % len(names) :] + names[: run % len(names)]
                for name in order:
                    result = measure(kinds[name](work), files, associations, work)
                    print(
                        f"  run {run + 1} {name:<9} x{associations}: {result.seconds:6.2f} s, "
                        f"{result.per_second:6.1f} instances/s"
                    )
                    results.append(result)
        print_results(results, args.repeat)
        floors = {n: disk_floor(work, files, n) for n in sorted({1, args.parallel})}
        print()
        print(
            "disk floor (write + fsync + rename + folder fsync per instance): "
            + ", ".join(f"{rate:.0f} instances/s with {n} at a time" for n, rate in floors.items())
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)

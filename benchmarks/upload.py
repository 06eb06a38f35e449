"""mwm versus the ceiling: upload throughput of ``mwm serve`` against a minimal server doing only the I/O.

Generates ``--count`` synthetic CT instances of ``--size`` x ``--size`` pixels once, then, ``--repeat``
times and alternating which goes first, uploads them all with the real ``mwm send`` CLI to

* a real ``mwm serve`` subprocess on the embedded defaults with durability on (``[storage] fsync = true``,
  ``[database] synchronous = "full"``) and one application matching CT, so buckets are opened;
* ``benchmarks/ceiling_server.py``, an aiohttp server that writes each received part to a file (no fsync,
  no parsing) and answers with the same JSON shape.

Each run gets a fresh data folder and both servers are started fresh, so every run measures the same thing.
Prints every run, the medians and the ratio mwm/ceiling (target: at least 0.8). Exits 1 when mwm did not
store every instance; exits 0 otherwise (``--strict``: also exits 1 when the target is missed).

Run: ``.venv/bin/python benchmarks/upload.py [--count 500 --size 512 --repeat 3 --concurrency 4 --batch 8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    PYTHON,
    ROOT,
    BenchmarkError,
    ServerProcess,
    free_port,
    hot_spots,
    http_json,
    median,
    mwm_environment,
    print_table,
    py_spy_record,
    synthetic,
    toml_string,
)

TARGET_RATIO = 0.8
SERIES_SIZE = 100  # instances per generated series
SEED = 20240501
MB = 1e6


@dataclass(frozen=True)
class Run:
    side: str  # "mwm", "ceiling" or "flushed" (the ceiling with --fsync)
    index: int
    seconds: float
    files: int
    bytes: int

    @property
    def per_second(self) -> float:
        return self.files / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.bytes / MB / self.seconds


# -- data ------------------------------------------------------------------------------------------


def generate(folder: Path, count: int, size: int) -> tuple[int, int]:
    """``count`` CT instances of ``size`` x ``size`` in one study (series of 100); reused when complete."""
    marker = folder / f".complete-{count}-{size}"
    if not marker.exists():
        if folder.exists():
            shutil.rmtree(folder)
        gen = synthetic()
        started = time.perf_counter()
        full, rest = divmod(count, SERIES_SIZE)
        study_uid = gen.study_uid_for(SEED)
        patient_id = "BENCH-UPLOAD"
        if full:
            gen.generate_study(
                folder / "a",
                series_count=full,
                instances_per_series=SERIES_SIZE,
                rows=size,
                cols=size,
                seed=SEED,
                study_uid=study_uid,
                patient_id=patient_id,
            )
        if rest:
            gen.generate_study(
                folder / "b",
                series_count=1,
                instances_per_series=rest,
                rows=size,
                cols=size,
                seed=SEED + 1,
                study_uid=study_uid,
                patient_id=patient_id,
            )
        marker.touch()
        print(f"generated {count} instances in {time.perf_counter() - started:.1f} s", flush=True)
    files = [p for p in folder.rglob("*.dcm")]
    if len(files) != count:
        raise BenchmarkError(f"{folder}: expected {count} files, found {len(files)}")
    return len(files), sum(p.stat().st_size for p in files)


# -- servers ---------------------------------------------------------------------------------------


def mwm_config(path: Path, *, port: int, data_dir: Path) -> Path:
    path.write_text(
        f"""\
[server]
http = "127.0.0.1:{port}"
data_dir = {toml_string(str(data_dir))}

[storage]
fsync = true

[database]
synchronous = "full"

[[apps]]
id = "bench-ct"
command = ["/bin/true"]
timeout = "1h"
max_age = "1h"

[apps.match]
modality = ["CT"]
""",
        encoding="utf-8",
    )
    return path


def send(data: Path, url: str, *, concurrency: int, batch: int) -> dict[str, Any]:
    """Upload ``data`` with ``mwm send --json`` and return its summary."""
    argv = [PYTHON, "-m", "mwm", "send", str(data), "--url", url, "--quiet", "--json"]
    argv += ["--concurrency", str(concurrency), "--batch", str(batch)]
    done = subprocess.run(argv, cwd=ROOT, env=mwm_environment(), capture_output=True, text=True, timeout=3600)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise BenchmarkError(f"mwm send printed nothing (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.exists() else 0


def run_mwm(
    index: int, data: Path, work: Path, args: argparse.Namespace, expected: int, profile_to: Path | None
) -> Run:
    port = free_port()
    data_dir = work / f"mwm-{index}"
    config = mwm_config(work / f"mwm-{index}.toml", port=port, data_dir=data_dir)
    url = f"http://127.0.0.1:{port}"
    argv = [PYTHON, "-m", "mwm", "serve", "--config", str(config)]
    if profile_to is not None:
        argv = [*py_spy_record(args.py_spy, profile_to), *argv]
    log_path = work / f"mwm-{index}.log"
    server = ServerProcess(
        "mwm serve", argv, url=url, log_path=log_path, env=mwm_environment(), wrapped=bool(profile_to)
    )
    server.start()
    try:
        summary = send(data, url, concurrency=args.concurrency, batch=args.batch)
        listed = len(http_json(f"{url}/v1/instances?limit=10000")["instances"]) if expected <= 10_000 else expected
    finally:
        code = server.stop()
    stored_files = count_files(data_dir / "storage" / "instances")
    problems = []
    if summary["stored"] != expected or summary["failed"] or summary["rejected"] or summary["duplicates"]:
        problems.append(f"mwm send summary: {summary}")
    if listed != expected:
        problems.append(f"GET /v1/instances lists {listed} instances, expected {expected}")
    if stored_files != expected:
        problems.append(f"{stored_files} files in storage, expected {expected}")
    if code not in (0, None):
        problems.append(f"mwm serve exited with code {code}")
    if problems:
        raise BenchmarkError(f"mwm run {index} did not store every instance: " + "; ".join(problems))
    return Run("mwm", index, float(summary["seconds"]), expected, int(summary["bytes"]))


def run_ceiling(
    index: int, data: Path, work: Path, args: argparse.Namespace, expected: int, *, flush: bool = False
) -> Run:
    side = "flushed" if flush else "ceiling"
    port = free_port()
    folder = work / f"{side}-{index}"
    url = f"http://127.0.0.1:{port}"
    argv = [PYTHON, str(ROOT / "benchmarks" / "ceiling_server.py"), "--port", str(port), "--dir", str(folder)]
    if flush:
        argv.append("--fsync")
    with ServerProcess(f"{side} server", argv, url=url, log_path=work / f"{side}-{index}.log", env=os.environ):
        summary = send(data, url, concurrency=args.concurrency, batch=args.batch)
    written = count_files(folder)
    if summary["stored"] != expected or written != expected:
        raise BenchmarkError(f"{side} run {index}: {written} files written, summary {summary}")
    return Run(side, index, float(summary["seconds"]), expected, int(summary["bytes"]))


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="instances to upload (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each image (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="mwm send --concurrency (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="mwm send --batch (default: %(default)s)")
    parser.add_argument("--data", type=Path, help="keep the generated instances in this folder and reuse them")
    parser.add_argument("--tmp-dir", type=Path, help="where the servers' data folders go (default: the system's)")
    parser.add_argument("--profile", action="store_true", help="record mwm serve with py-spy and print hot spots")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy program (default: from PATH)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the ratio misses the target")
    args = parser.parse_args(argv)
    if min(args.count, args.size, args.repeat, args.concurrency, args.batch) < 1:
        parser.error("--count, --size, --repeat, --concurrency and --batch must be positive")
    if args.profile and not args.py_spy:
        print("py-spy not found (pip install py-spy, or --py-spy PATH): running without the profile", file=sys.stderr)
        args.profile = False
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mwm-bench-upload-", dir=args.tmp_dir))
    profiles: list[Path] = []
    failed = True
    try:
        data = args.data.absolute() if args.data else work / "instances"
        files, size = generate(data, args.count, args.size)
        print(
            f"{files} instances, {size / MB:.1f} MB ({size / files / MB:.2f} MB each); "
            f"mwm send --concurrency {args.concurrency} --batch {args.batch}; {args.repeat} runs per side; "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}; work folder {work}",
            flush=True,
        )
        runs: list[Run] = []
        sides = ("mwm", "ceiling", "flushed")
        for index in range(1, args.repeat + 1):
            order = sides[index % 3 :] + sides[: index % 3]  # each side takes its turn first
            for side in order:
                os.sync()  # start every run with no dirty pages left by the previous one
                if side == "mwm":
                    profile_to = work / f"profile-{index}.txt" if args.profile else None
                    run = run_mwm(index, data, work, args, files, profile_to)
                    if profile_to is not None:
                        profiles.append(profile_to)
                else:
                    run = run_ceiling(index, data, work, args, files, flush=side == "flushed")
                runs.append(run)
                print(f"  run {index} {side:8} {run.seconds:7.3f} s  {run.per_second:7.1f} inst/s", flush=True)
                shutil.rmtree(work / f"{side}-{index}", ignore_errors=True)

        print_table(
            "runs",
            ["side", "run", "seconds", "instances/s", "MB/s"],
            [
                (r.side, r.index, f"{r.seconds:.3f}", f"{r.per_second:.1f}", f"{r.mb_per_second:.1f}")
                for r in sorted(runs, key=lambda r: (sides.index(r.side), r.index))
            ],
        )
        medians = {}
        for side in sides:
            mine = [r for r in runs if r.side == side]
            medians[side] = (median([r.per_second for r in mine]), median([r.mb_per_second for r in mine]))
        ratio = medians["mwm"][0] / medians["ceiling"][0]
        verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
        print_table(
            f"median of {args.repeat} runs ({files} x {size / files / MB:.2f} MB, concurrency {args.concurrency}, "
            f"batch {args.batch})",
            ["side", "instances/s", "MB/s"],
            [
                ("mwm (fsync, synchronous=full)", f"{medians['mwm'][0]:.1f}", f"{medians['mwm'][1]:.1f}"),
                ("ceiling (plain write)", f"{medians['ceiling'][0]:.1f}", f"{medians['ceiling'][1]:.1f}"),
                (f"ratio mwm/ceiling (target >= {TARGET_RATIO})", f"{ratio:.2f}", verdict),
                ("for information: write + fsync", f"{medians['flushed'][0]:.1f}", f"{medians['flushed'][1]:.1f}"),
                ("ratio mwm/(write + fsync)", f"{medians['mwm'][0] / medians['flushed'][0]:.2f}", ""),
            ],
        )
        if args.profile:
            hot_spots(profiles)
            print(f"\npy-spy raw profiles (collapsed stacks, e.g. for speedscope): {', '.join(map(str, profiles))}")
        failed = False
        return 1 if args.strict and verdict == "FAIL" else 0
    except BenchmarkError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work / "instances", ignore_errors=True)
        if failed:
            print(f"logs kept in {work}", file=sys.stderr)
        elif not profiles:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

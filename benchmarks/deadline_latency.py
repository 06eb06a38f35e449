"""Deadline latency: from a bucket's deadline to the start of its application's process, with many open buckets.

Starts a real ``mwm serve`` (embedded defaults, durability on) with one application, grouped by study,
whose command is ``/bin/date +%s.%N``: the process writes its own start time (wall clock, nanoseconds)
into the job's log, with no interpreter start-up in between. Uploads ``--buckets`` studies of one tiny
instance each, spread evenly over ``--spread`` seconds, so that ``--buckets`` buckets are open at once
and their deadlines (``--timeout`` after each study's arrival) fall over ``--spread`` seconds after the
last upload. Once every job has finished, computes for each job

    latency = process start time (from GET /v1/jobs/{id}/log) - bucket deadline (GET /v1/buckets)

and prints count, p50, p90, p99 and max in milliseconds (target: p99 < 50 ms), with a breakdown into
deadline -> bucket closed -> job launched -> process started. Both times come from the same clock:
mwm's ``time.time()`` and ``date +%s.%N`` both read CLOCK_REALTIME (UTC epoch seconds).

Exits 1 when a job is missing or did not succeed; exits 0 otherwise (``--strict``: also exits 1 when
the target is missed).

Run: ``.venv/bin/python benchmarks/deadline_latency.py [--buckets 1000 --spread 10 --timeout 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import (
    PYTHON,
    BenchmarkError,
    ServerProcess,
    free_port,
    hot_spots,
    http_json,
    mwm_environment,
    percentile,
    print_table,
    py_spy_record,
    synthetic,
    toml_string,
)

from mwm.client import Client, ClientError

TARGET_P99_MS = 50.0
APP_ID = "deadline-stamp"
SEED_BASE = 700_000
STAMP = re.compile(r"^(\d{9,})\.(\d{9})$")
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass(frozen=True)
class Sample:
    job_id: int
    deadline: float
    closed: float
    launched: float
    recorded_start: float  # mwm's started_at, taken just after the process was spawned
    process_start: float  # the process's own clock reading
    finished: float

    @property
    def latency(self) -> float:
        return self.process_start - self.deadline


def epoch(iso_text: str | None) -> float:
    if not iso_text:
        raise BenchmarkError("a timestamp is missing in the API's answer")
    return datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()


def process_start(log_text: str) -> float | None:
    """The last ``SECONDS.NANOSECONDS`` line ``date +%s.%N`` wrote into the job's log."""
    for line in reversed(log_text.splitlines()):
        match = STAMP.match(line.strip())
        if match:
            return int(match.group(1)) + int(match.group(2)) / 1e9
    return None


# -- data ------------------------------------------------------------------------------------------


def generate(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` studies of one ``size`` x ``size`` CT instance, distinct UIDs by seed; reused when complete."""
    marker = folder / f".complete-{count}-{size}"
    if not marker.exists():
        if folder.exists():
            shutil.rmtree(folder)
        gen = synthetic()
        started = time.perf_counter()
        for k in range(count):
            gen.generate_study(
                folder / f"study_{k:05d}",
                series_count=1,
                instances_per_series=1,
                rows=size,
                cols=size,
                seed=SEED_BASE + k,
            )
        marker.touch()
        print(f"generated {count} studies in {time.perf_counter() - started:.1f} s", flush=True)
    paths = sorted(folder.glob("study_*/1/0001.dcm"))
    if len(paths) != count:
        raise BenchmarkError(f"{folder}: expected {count} studies, found {len(paths)}")
    return paths


# -- the run ---------------------------------------------------------------------------------------


def mwm_config(path: Path, *, port: int, data_dir: Path, args: argparse.Namespace) -> Path:
    path.write_text(
        f"""\
[server]
http = "127.0.0.1:{port}"
data_dir = {toml_string(str(data_dir))}

[storage]
fsync = true

[database]
synchronous = "full"

[jobs]
max_parallel = {args.max_parallel}

[[apps]]
id = "{APP_ID}"
command = ["/bin/date", "+%s.%N"]
arguments = false
grouping = "study"
timeout = "{args.timeout}s"
max_age = "1h"
max_parallel = {args.max_parallel}

[apps.match]
modality = ["CT"]
""",
        encoding="utf-8",
    )
    return path


async def upload(url: str, paths: Sequence[Path], spread: float, concurrency: int) -> float:
    """Send one study every ``spread / len(paths)`` seconds; returns when the last one is stored."""
    slots = asyncio.Semaphore(concurrency)
    interval = spread / len(paths)
    failures: list[str] = []

    async def one(client: Client, index: int, path: Path, start: float) -> None:
        delay = start + index * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        async with slots:
            data = await asyncio.to_thread(path.read_bytes)
            try:
                _status, answer = await client.upload([data], params=[], headers={})
            except ClientError as exc:
                failures.append(f"{path}: {exc.message}")
                return
            if answer.get("stored") != 1:
                failures.append(f"{path}: {answer}")

    async with Client(url) as client:
        start = time.monotonic()
        await asyncio.gather(*(one(client, i, p, start) for i, p in enumerate(paths)))
    if failures:
        raise BenchmarkError(f"{len(failures)} uploads failed, e.g. {failures[0]}")
    return time.time()


def wait_for_jobs(url: str, count: int, until: float) -> list[dict[str, Any]]:
    """Poll (gently) until ``count`` jobs exist and all have finished."""
    jobs: list[dict[str, Any]] = []
    while time.time() < until:
        jobs = http_json(f"{url}/v1/jobs?app={APP_ID}&limit=10000")["jobs"]
        if len(jobs) >= count and all(j["state"] in TERMINAL for j in jobs):
            return jobs
        time.sleep(1.0)
    states: dict[str, int] = {}
    for job in jobs:
        states[job["state"]] = states.get(job["state"], 0) + 1
    raise BenchmarkError(f"jobs not finished in time: {len(jobs)} of {count} exist, states {states}")


async def fetch_logs(url: str, job_ids: Sequence[int]) -> dict[int, str]:
    slots = asyncio.Semaphore(16)

    async def one(client: Client, job_id: int) -> tuple[int, str]:
        async with slots:
            body: bytes = await client.request("GET", f"/v1/jobs/{job_id}/log", expect_json=False)
            return job_id, body.decode("utf-8", "replace")

    async with Client(url) as client:
        return dict(await asyncio.gather(*(one(client, j) for j in job_ids)))


def measure(args: argparse.Namespace, paths: Sequence[Path], work: Path) -> tuple[list[Sample], dict[str, float]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = mwm_config(work / "mwm.toml", port=port, data_dir=work / "data", args=args)
    argv = [PYTHON, "-m", "mwm", "serve", "--config", str(config)]
    if args.profile:
        argv = [*py_spy_record(args.py_spy, work / "profile.txt"), *argv]
    server = ServerProcess(
        "mwm serve", argv, url=url, log_path=work / "mwm.log", env=mwm_environment(), wrapped=args.profile
    )
    with server:
        print(f"uploading {len(paths)} studies over {args.spread:g} s (mwm pid {server.pid})", flush=True)
        started = time.time()
        uploaded = asyncio.run(upload(url, paths, args.spread, args.concurrency))
        print(f"uploads done in {uploaded - started:.1f} s; deadlines due from about {args.timeout - args.spread:g} s")
        # Stay away from the API while deadlines pass: the measurement should see mwm alone.
        time.sleep(max(0.0, uploaded + args.timeout + 0.5 - time.time()))
        jobs = wait_for_jobs(url, len(paths), until=uploaded + args.timeout + args.wait)
        buckets = {b["id"]: b for b in http_json(f"{url}/v1/buckets?state=closed&app={APP_ID}&limit=10000")["buckets"]}
        logs = asyncio.run(fetch_logs(url, [int(j["id"]) for j in jobs]))
    problems: list[str] = []
    samples: list[Sample] = []
    for job in jobs:
        bucket = buckets.get(job["bucket_id"])
        stamp = process_start(logs.get(int(job["id"]), ""))
        if job["state"] != "succeeded" or bucket is None or stamp is None or int(job["attempt"]) != 1:
            problems.append(f"job {job['id']}: {job['state']}, attempt {job['attempt']}, bucket {job['bucket_id']}")
            continue
        if bucket["close_reason"] != "deadline":
            problems.append(f"bucket {bucket['id']} closed by {bucket['close_reason']!r}")
            continue
        samples.append(
            Sample(
                job_id=int(job["id"]),
                deadline=epoch(bucket["deadline"]),
                closed=epoch(bucket["closed_at"]),
                launched=epoch(job["launched_at"]),
                recorded_start=epoch(job["started_at"]),
                process_start=stamp,
                finished=epoch(job["finished_at"]),
            )
        )
    if len(jobs) != len(paths) or problems:
        raise BenchmarkError(f"{len(jobs)} jobs for {len(paths)} studies; {len(problems)} problems: {problems[:5]}")
    openings = [epoch(b["opened_at"]) for b in buckets.values()]
    deadlines = [s.deadline for s in samples]
    context = {
        "open_at_first_deadline": float(sum(1 for t in openings if t < min(deadlines))),
        "deadline_spread": max(deadlines) - min(deadlines),
    }
    return samples, context


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buckets", type=int, default=1000, help="studies, hence buckets and jobs (default: 1000)")
    parser.add_argument("--spread", type=float, default=10.0, help="seconds the uploads are spread over (default: 10)")
    parser.add_argument("--timeout", type=float, default=20.0, help="the application's bucket timeout in seconds")
    parser.add_argument("--max-parallel", type=int, default=64, help="[jobs] and the app's max_parallel (64)")
    parser.add_argument("--concurrency", type=int, default=16, help="parallel uploads at most (default: 16)")
    parser.add_argument("--size", type=int, default=16, help="rows and columns of each instance (default: 16)")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds after the last deadline to give up")
    parser.add_argument("--data", type=Path, help="keep the generated studies in this folder and reuse them")
    parser.add_argument("--tmp-dir", type=Path, help="where mwm's data folder goes (default: the system's)")
    parser.add_argument("--profile", action="store_true", help="record mwm serve with py-spy and print hot spots")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy program (default: from PATH)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when p99 misses the target")
    args = parser.parse_args(argv)
    if min(args.buckets, args.max_parallel, args.concurrency, args.size) < 1 or args.spread < 0:
        parser.error("--buckets, --max-parallel, --concurrency and --size must be positive")
    if args.timeout <= args.spread + 1:
        parser.error("--timeout must exceed --spread by more than a second: every deadline should fall after uploads")
    if args.profile and not args.py_spy:
        print("py-spy not found (pip install py-spy, or --py-spy PATH): running without the profile", file=sys.stderr)
        args.profile = False
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mwm-bench-deadline-", dir=args.tmp_dir))
    failed = True
    try:
        data = args.data.absolute() if args.data else work / "studies"
        paths = generate(data, args.buckets, args.size)
        print(
            f"{args.buckets} buckets, timeout {args.timeout:g} s, uploads over {args.spread:g} s, max_parallel "
            f"{args.max_parallel}; {os.cpu_count()} CPUs, Python {platform.python_version()}; work folder {work}",
            flush=True,
        )
        samples, context = measure(args, paths, work)
        stages = [
            ("deadline -> process start", [s.latency for s in samples]),
            ("  deadline -> bucket closed", [s.closed - s.deadline for s in samples]),
            ("  bucket closed -> job launching", [s.launched - s.closed for s in samples]),
            ("  job launching -> process start", [s.process_start - s.launched for s in samples]),
            ("(mwm started_at - process start)", [s.recorded_start - s.process_start for s in samples]),
            ("(job launching -> job finished)", [s.finished - s.launched for s in samples]),
        ]
        print_table(
            f"deadline latency, ms ({len(samples)} jobs, {int(context['open_at_first_deadline'])} buckets open at the "
            f"first deadline, deadlines spread over {context['deadline_spread']:.1f} s)",
            ["interval", "count", "min", "p50", "p90", "p99", "max"],
            [
                (name, len(values), *(f"{1000 * percentile(values, q):.1f}" for q in (0, 50, 90, 99, 100)))
                for name, values in stages
            ],
        )
        p99 = 1000 * percentile([s.latency for s in samples], 99)
        verdict = "PASS" if p99 < TARGET_P99_MS else "FAIL"
        print(f"\np99 deadline -> process start: {p99:.1f} ms (target < {TARGET_P99_MS:g} ms): {verdict}")
        print("(API timestamps have millisecond resolution, truncated: the first three stages can be off by 1 ms)")
        if args.profile:
            hot_spots([work / "profile.txt"])
            print(f"\npy-spy raw profile (collapsed stacks, e.g. for speedscope): {work / 'profile.txt'}")
        failed = False
        return 1 if args.strict and verdict == "FAIL" else 0
    except BenchmarkError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if failed:
            print(f"logs kept in {work}", file=sys.stderr)
        elif args.profile:
            shutil.rmtree(work / "data", ignore_errors=True)
            shutil.rmtree(work / "studies", ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

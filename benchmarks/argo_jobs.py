"""Argo jobs: many concurrent jobs through the Argo engine, against the strict fake Argo Server and an S3 server.

Starts an S3 server (``moto_server``), the fake Argo Server of the tests (every request checked
against the Argo API description; workflows really read their inputs from S3 and write their
outputs there) and a real ``mwm serve`` on S3 storage whose one application runs on the Argo
engine. Uploads ``--jobs`` small studies (one bucket, so one job, each; a study whose two instances
arrive further apart than the bucket timeout makes two), all waiting together on the cluster, and
once every job has finished prints

- the Argo Server requests per job, by kind (submit, get, list, log, terminate, delete): the
  watcher lists the unfinished workflows once per ``poll_interval`` for all jobs together, so
  lists per job fall as jobs are added;
- the time from a bucket's close to its workflow's submission (p50, p99, max), split into the
  scheduler's part (closed -> launching) and the engine's (staging the inputs with server-side
  copies, then the create request). The S3 server is shared by everything (ingest, staging, the
  fake pods, collection), so under load its throughput shows in the engine's part.

Exits 1 when a job did not succeed or the fake saw a request outside the API description.

Run: ``.venv/bin/python benchmarks/argo_jobs.py [--jobs 200 --run-seconds 3 --poll-interval 2s]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import (
    PYTHON,
    ROOT,
    BenchmarkError,
    ServerProcess,
    free_port,
    mwm_environment,
    percentile,
    print_table,
    synthetic,
    toml_string,
)

from mwm.client import Client

# The tests' fake Argo Server and S3 server, found through tests/ on the path.
sys.path.insert(0, str(ROOT / "tests"))
from argo.fake_argo import FakeArgo
from s3.servers import MotoServer, start_moto

TOKEN = "benchmark-token-0123456789"
NAMESPACE = "mwm-bench"
KINDS = ("submit", "get", "list", "log", "terminate", "delete")
S3_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|DELETE|HEAD) /[^"]* HTTP/1\.1')  # werkzeug's log


def config_text(data_dir: Path, port: int, moto: MotoServer, bucket: str, fake: FakeArgo, args: Any) -> str:
    return f"""
[server]
http = "127.0.0.1:{port}"
data_dir = {toml_string(str(data_dir))}
log_level = "warning"

[jobs]
max_parallel = {args.jobs}

[storage]
kind = "s3"
endpoint_url = {toml_string(moto.url)}
bucket = {toml_string(bucket)}
region = "us-east-1"
prefix = "bench"
addressing_style = "path"
access_key_id = {toml_string(moto.access_key_id)}
secret_access_key = {toml_string(moto.secret_access_key)}

[engines.argo]
url = {toml_string(fake.url)}
token = {toml_string(TOKEN)}
namespace = "{NAMESPACE}"
poll_interval = {toml_string(args.poll_interval)}

[engines.argo.artifact_repository]
s3_endpoint = {toml_string(moto.endpoint)}
s3_insecure = true
s3_access_key_secret = {{ name = "s3", key = "accessKey" }}
s3_secret_key_secret = {{ name = "s3", key = "secretKey" }}

[[apps]]
id = "bench"
engine = "argo"
image = "registry.example.org/bench:1"
timeout = {toml_string(args.bucket_timeout)}
max_parallel = {args.jobs}
max_attempts = 1
env = {{ FAKE_RUN_SECONDS = "{args.run_seconds}" }}
"""


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def run(args: argparse.Namespace, work: Path) -> int:
    moto = await asyncio.to_thread(start_moto, work / "moto")
    fake: FakeArgo | None = None
    server: ServerProcess | None = None
    try:
        bucket = await asyncio.to_thread(moto.new_bucket)
        fake = FakeArgo(
            s3_url=moto.url,
            secrets={"s3": {"accessKey": moto.access_key_id, "secretKey": moto.secret_access_key}},
            tokens={TOKEN},
            run_seconds=float(args.run_seconds),
        )
        await fake.start()
        port = free_port()
        config = work / "mwm.toml"
        config.write_text(config_text(work / "data", port, moto, bucket, fake, args))
        server = ServerProcess(
            "mwm serve",
            [PYTHON, "-m", "mwm", "serve", "--config", str(config)],
            url=f"http://127.0.0.1:{port}",
            log_path=work / "mwm.log",
            env=mwm_environment(),
        )
        await asyncio.to_thread(server.start)
        studies = [
            synthetic().generate_study(
                work / f"study-{i}", series_count=1, instances_per_series=2, rows=16, cols=16, seed=900_000 + i
            )
            for i in range(args.jobs)
        ]
        started = time.monotonic()
        async with Client(server.url) as client:
            semaphore = asyncio.Semaphore(16)

            async def send(study: Any) -> None:
                async with semaphore:
                    status, _ = await client.upload([p.read_bytes() for p in study.paths], params=[], headers={})
                    if status != 200:
                        raise BenchmarkError(f"upload answered {status}")

            await asyncio.gather(*(send(s) for s in studies))
            uploaded = time.monotonic() - started
            jobs: list[dict[str, Any]] = []
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                jobs = (await client.get("/v1/jobs", limit=10_000))["jobs"]
                still_open = (await client.get("/v1/buckets", state="open"))["buckets"]
                if jobs and not still_open and all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs):
                    break
                await asyncio.sleep(0.25)
            elapsed = time.monotonic() - started
            closed = (await client.get("/v1/buckets", state="closed", limit=10_000))["buckets"]
            buckets = {b["id"]: b for b in closed}
        failed = [j for j in jobs if j["state"] != "succeeded"]
        submitted: dict[str, float] = {}
        for seen in fake.requests:
            if seen.kind == "submit" and seen.status == 200:
                labels = seen.body["workflow"]["metadata"]["labels"]
                submitted.setdefault(labels["mwm.job-id"], seen.at)
        # Per job: bucket closed -> job launching (the scheduler), launching -> create request received
        # (staging the inputs with server-side copies, then the create).
        stages: dict[str, list[float]] = {
            "closed -> submitted": [],
            "closed -> launching": [],
            "launching -> submitted": [],
        }
        for job in jobs:
            bucket = buckets.get(job["bucket_id"])
            at = submitted.get(str(job["id"]))
            if bucket is None or at is None or not job["launched_at"]:
                continue
            closed_at, launched_at = epoch(bucket["closed_at"]), epoch(job["launched_at"])
            stages["closed -> submitted"].append((at - closed_at) * 1000)
            stages["closed -> launching"].append((launched_at - closed_at) * 1000)
            stages["launching -> submitted"].append((at - launched_at) * 1000)
        # Workflow finished on the cluster -> mwm's get of it (the watcher noticed it left the list).
        noticed = []
        for seen in fake.requests:
            if seen.kind == "get" and seen.status == 200:
                name = seen.path.rsplit("/", 1)[-1]
                done = fake.finished_at.get((NAMESPACE, name))
                if done is not None and seen.at >= done:
                    noticed.append((seen.at - done) * 1000)
        counts: Counter[str] = Counter({k: v for k, v in fake.counts.items() if k in KINDS})
        n = max(1, len(jobs))
        print(
            f"{len(jobs)} jobs ({len(failed)} not succeeded) for {args.jobs} studies; uploads {uploaded:.1f} s, "
            f"all finished {elapsed:.1f} s after the first upload; workflows run {args.run_seconds} s, "
            f"poll_interval {args.poll_interval}"
        )
        print_table(
            "Argo Server requests",
            ["kind", "total", "per job"],
            [(k, counts[k], f"{counts[k] / n:.2f}") for k in KINDS]
            + [("all", sum(counts.values()), f"{sum(counts.values()) / n:.2f}")],
        )
        print_table(
            "bucket closed -> workflow submitted (ms)",
            ["stage", "jobs", "p50", "p99", "max"],
            [
                (name, len(v), f"{percentile(v, 50):.0f}", f"{percentile(v, 99):.0f}", f"{max(v):.0f}")
                for name, v in stages.items()
                if v
            ],
        )
        if noticed:
            print_table(
                f"workflow finished -> mwm asks for it (ms; poll_interval {args.poll_interval})",
                ["jobs", "p50", "p99", "max"],
                [
                    (
                        len(noticed),
                        f"{percentile(noticed, 50):.0f}",
                        f"{percentile(noticed, 99):.0f}",
                        f"{max(noticed):.0f}",
                    )
                ],
            )
        s3_requests = Counter(m.group(1) for m in S3_REQUEST.finditer(moto.log_path.read_text(errors="replace")))
        print(
            f"\nS3 server: {sum(s3_requests.values())} requests ({dict(s3_requests)}) from ingest, staging, the fake "
            f"pods, collection and clean-up; {sum(s3_requests.values()) / max(elapsed, 0.001):.0f} per second"
        )
        if fake.violations:
            print("\nrequests outside the Argo API description:\n" + "\n".join(fake.violations[:20]))
        for job in failed[:5]:
            print(f"job {job['id']} {job['state']}: {json.dumps(job['error'])[:300]}")
        return 1 if failed or fake.violations or not stages["closed -> submitted"] else 0
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        if fake is not None:
            await fake.close()
        await asyncio.to_thread(moto.stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--run-seconds", default="3", help="how long each workflow runs on the fake cluster")
    parser.add_argument("--poll-interval", default="2s", help="engines.argo.poll_interval")
    parser.add_argument("--bucket-timeout", default="5s", help="the application's bucket timeout")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all jobs")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, data)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mwm-argo-bench-"))
    try:
        return asyncio.run(run(args, work))
    finally:
        if args.keep:
            print(f"\nwork folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

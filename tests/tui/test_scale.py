"""The console stays responsive with 1,000 open buckets and 100 jobs: updates are applied in place."""

from __future__ import annotations

import copy
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from support import base_config, upload_files, url_of, wait_jobs
from textual.geometry import Region
from tui_support import tiny_study, until

from mwm.client import Client, ClientError
from mwm.tui.app import MwmApp
from mwm.tui.jobs import JobsPane
from mwm.tui.overview import OverviewPane
from mwm.tui.widgets import KeyedTable

BUCKETS = 1000
JOBS = 100
BATCH = 100
#: Generous: an update that takes this long would already be felt as a stutter.
BOUND = 0.2


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.9 * (len(ordered) - 1))]


@pytest.fixture(scope="module")
def tiny_studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("tiny")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(partial(tiny_study, out), range(BUCKETS), chunksize=50))


async def close_bucket(client: Client, bucket_id: str) -> None:
    """``POST /v1/buckets/{id}/close``. mwm may answer 500 although the bucket was closed (it reads
    the new job back before that write is visible); what counts here is that the bucket closed."""
    try:
        await client.post(f"/v1/buckets/{bucket_id}/close")
    except ClientError as exc:
        if exc.status != 500 or (await client.get(f"/v1/buckets/{bucket_id}"))["state"] != "closed":
            raise


def timed(action: Any) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def paint(table: KeyedTable) -> None:
    """Render the table's visible lines, as the next screen update will."""
    table.render_lines(Region(0, 0, table.size.width, table.size.height))


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    return (
        f"{name}: n={len(ms)} median {statistics.median(ms):.1f} ms, "
        f"p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms"
    )


async def test_updates_with_1000_open_buckets_and_100_jobs(
    tmp_path: Path, make_service: Any, client_for: Any, tiny_studies: list[Path]
) -> None:
    config = base_config(
        tmp_path,
        apps=[
            {"id": "hold", "command": ["true"], "arguments": False, "timeout": "1h", "max_age": "2h"},
            {"id": "quick", "command": ["true"], "arguments": False, "timeout": "100ms", "max_parallel": 4},
        ],
    )
    service = await make_service(config)
    client = await client_for(service)
    started = time.perf_counter()
    for first in range(0, BUCKETS, BATCH):
        apps = ["hold", "quick"] if first < JOBS else ["hold"]
        _, answer = await upload_files(client, tiny_studies[first : first + BATCH], apps=apps)
        assert answer["stored"] == BATCH, answer
    await wait_jobs(client, JOBS, ["succeeded"], timeout=60)
    print(f"\n{BUCKETS} studies sent and {JOBS} jobs run in {time.perf_counter() - started:.1f} s")

    app = MwmApp(url_of(service), feed_options={"debounce": 0.05})
    async with app.run_test(size=(120, 40)) as pilot:
        overview = app.query_one(OverviewPane)
        jobs = app.query_one(JobsPane)
        buckets_table = overview.query_one("#bucket-table", KeyedTable)
        jobs_table = jobs.query_one("#job-table", KeyedTable)
        await until(
            pilot,
            lambda: buckets_table.row_count == BUCKETS and jobs_table.row_count == JOBS,
            timeout=30,
            what="every bucket and job on screen",
        )
        first_load = max(seconds for topics, seconds in app.apply_times if "buckets" in topics)

        # Real updates: close buckets through the API; each change arrives by the event stream.
        app.apply_times.clear()
        closed = [str(b["id"]) for b in (app.store.buckets or [])[:5]]
        for key in closed:
            await close_bucket(client, key)
            await until(pilot, lambda key=key: buckets_table.cells_of(key) is None, what=f"bucket {key} gone")
        await until(pilot, lambda: jobs_table.row_count == JOBS + len(closed), what="the new jobs")
        live = [seconds for topics, seconds in app.apply_times if topics & {"buckets", "jobs"}]

        # The same work, measured directly: one bucket or one job changed in full lists, then
        # the visible part of the table painted again (what the next frame costs).
        store = app.store
        assert store.buckets is not None and store.jobs is not None
        bucket_updates, job_updates, painted = [], [], []
        for i in range(20):
            buckets = copy.deepcopy(store.buckets)
            buckets[i]["instance_count"] += 1
            store.buckets = buckets
            bucket_updates.append(timed(lambda: overview.show(store, {"buckets"})))
            painted.append(bucket_updates[-1] + timed(lambda: paint(buckets_table)))
            listed = copy.deepcopy(store.jobs)
            listed[i]["state"] = "failed" if listed[i]["state"] == "succeeded" else "succeeded"
            store.jobs = listed
            job_updates.append(timed(lambda: jobs.show(store, {"jobs"})))
            painted.append(job_updates[-1] + timed(lambda: paint(jobs_table)))
            await pilot.pause(0.02)
        ticks = [timed(overview.tick) for _ in range(20)]
        await pilot.press("2")
        ticks_jobs = [timed(jobs.tick) for _ in range(20)]
        sort = timed(lambda: jobs_table.sort_by("age"))

    report = [
        f"first load of {BUCKETS} buckets and {JOBS} jobs: {first_load * 1000:.0f} ms",
        summary("live updates (event stream → tables)", live),
        summary(f"one bucket changed among {BUCKETS}", bucket_updates),
        summary(f"one job changed among {len(store.jobs)}", job_updates),
        summary("either, and the table painted", painted),
        summary("countdown tick, overview", ticks),
        summary("age tick, jobs", ticks_jobs),
        f"sort {len(store.jobs)} jobs by age: {sort * 1000:.1f} ms",
    ]
    print("\n".join(report))
    assert live, "no update was measured"
    # The console shares the process (and the GIL) with the mwm under test, whose threads and
    # garbage collection pause it at times: judge each measure by its 90th percentile, not by
    # its single worst moment (the maxima are printed in the report).
    for values in (live, bucket_updates, job_updates, ticks + ticks_jobs, painted):
        assert p90(values) < BOUND, report

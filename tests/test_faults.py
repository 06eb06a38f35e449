"""Faults from outside: disk pressure, storage errors, applications that misbehave, retention."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
from support import WRITE_R, base_config, eventually, post_raw, python_app, upload_files, wait_jobs

from mwm.client import ClientError
from mwm.errors import StorageError
from mwm.storage import StorageUsage


async def test_disk_pressure_refuses_uploads_but_jobs_and_deliveries_go_on(
    tmp_path, make_service, client_for, small_study, monkeypatch
):
    config = base_config(
        tmp_path,
        # A watermark the host's own disk stays under; the test fakes the storage's usage.
        server={"disk_watermark": 99.5, "disk_reserve": "1MB"},
        apps=[python_app("ct", WRITE_R, timeout="1s", sinks=["out"])],
        sinks=[{"id": "out", "kind": "folder", "path": str(tmp_path / "out")}],
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths[:3])  # a bucket opens before the disk fills

    async def nearly_full() -> StorageUsage:
        return StorageUsage(used_bytes=996, free_bytes=4, total_bytes=1000)

    monkeypatch.setattr(service.storage, "usage", nearly_full)
    await service._check_disk()
    with pytest.raises(ClientError) as caught:
        await upload_files(client, small_study.paths[3:])
    assert caught.value.status == 507
    assert "disk pressure" in caught.value.message and "99.6% full (limit 99.5%)" in (caught.value.detail or "")
    assert (await client.get("/v1/stats"))["disk"]["pressure"]
    # Monitoring sees it: alive (200) but degraded, and not accepting, with the reason.
    async with client.session.get(client.url + "/health") as response:
        health = await response.json()
        assert response.status == 200
    assert (health["status"], health["accepting"]) == ("degraded", False)
    assert "99.6% full (limit 99.5%)" in health["pressure"]
    metrics = await (await client.session.get(client.url + "/metrics")).text()
    assert "\nmwm_up 0.0\n" in metrics and "\nmwm_disk_pressure 1.0\n" in metrics
    # The open bucket still becomes a job, which runs and delivers.
    (job,) = await wait_jobs(client, 1)
    assert job["instance_count"] == 3
    await eventually(
        lambda: asyncio.sleep(0, (tmp_path / "out").exists() and list((tmp_path / "out").rglob("r.txt"))),
        what="the delivery",
    )

    async def roomy() -> StorageUsage:
        return StorageUsage(used_bytes=50, free_bytes=50 << 30, total_bytes=100 << 30)

    monkeypatch.setattr(service.storage, "usage", roomy)
    await eventually(lambda: asyncio.sleep(0, service.ingestor.pressure is None), what="pressure to clear by itself")
    health = await client.get("/health")
    assert (health["status"], health["accepting"]) == ("ok", True) and "pressure" not in health
    metrics = await (await client.session.get(client.url + "/metrics")).text()
    assert "\nmwm_up 1.0\n" in metrics and "\nmwm_disk_pressure 0.0\n" in metrics
    status, answer = await upload_files(client, small_study.paths[3:])
    assert status == 200 and answer["stored"] == len(small_study.paths) - 3


async def test_a_storage_write_error_refuses_the_instance_and_records_nothing(
    tmp_path, make_service, client_for, small_study, monkeypatch
):
    service = await make_service(base_config(tmp_path, apps=[{"id": "ct", "command": ["true"], "timeout": "1h"}]))
    client = await client_for(service)
    original = service.storage.put_staged
    failing = True

    async def flaky(key, source):
        if failing:
            raise StorageError("storage write failed", "EIO: input/output error")
        return await original(key, source)

    monkeypatch.setattr(service.storage, "put_staged", flaky)
    original_place = service.storage.place_blocking
    monkeypatch.setattr(
        service.storage, "place_blocking", lambda key, source: False if failing else original_place(key, source)
    )
    status, answer = await post_raw(client, small_study.paths[0].read_bytes())
    assert status == 507 and answer["failed"] == 1 and answer["instances"][0]["reason"] == "storage write failed"
    assert (await client.get("/v1/instances"))["instances"] == []
    assert (await client.get("/v1/buckets"))["buckets"] == []
    failing = False  # the fault clears: the same instance is accepted
    status, answer = await post_raw(client, small_study.paths[0].read_bytes())
    assert status == 200 and answer["stored"] == 1


async def test_an_application_writing_too_much_is_stopped(tmp_path, make_service, client_for, small_study):
    script = (
        "import os, time\n"
        "with open(os.environ['HOLOSCAN_OUTPUT_PATH'] + '/big.bin', 'wb') as f:\n"
        "    while True:\n"
        "        f.write(b'x' * (1 << 20)); f.flush(); time.sleep(0.01)\n"
    )
    config = base_config(
        tmp_path,
        jobs={"max_output_size": "8MiB"},
        apps=[
            {
                "id": "hog",
                "command": [sys.executable, "-c", script],
                "arguments": False,
                "timeout": "100ms",
                "max_attempts": 1,
            }
        ],
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, ("failed",), timeout=30)
    assert "more than the limit of 8388608" in job["error"]


async def test_one_crashing_application_does_not_stop_the_others(tmp_path, make_service, client_for):
    import synthetic

    config = base_config(
        tmp_path,
        apps=[
            {
                "id": "crash",
                "command": [sys.executable, "-c", "import os; os.abort()"],
                "arguments": False,
                "timeout": "100ms",
                "max_attempts": 1,
                "match": {"series_description": "5mm"},
            },
            {"id": "fine", "command": ["true"], "timeout": "100ms", "match": {"series_description": "1.25mm"}},
        ],
    )
    service = await make_service(config)
    client = await client_for(service)
    study = synthetic.generate_study(tmp_path / "s", series_count=2, instances_per_series=2, rows=16, cols=16, seed=9)
    await upload_files(client, study.paths)
    jobs = await wait_jobs(client, 2, ("succeeded", "failed"))
    states = {j["app_id"]: j for j in jobs}
    assert states["fine"]["state"] == "succeeded"
    assert states["crash"]["state"] == "failed" and "killed by signal SIGABRT" in states["crash"]["error"]


async def test_retention_deletes_only_what_is_no_longer_needed(tmp_path, make_service, client_for, small_study):
    import synthetic

    config = base_config(
        tmp_path,
        retention={"instances_after": "1h", "results_after": "1h"},
        apps=[
            python_app("ct", WRITE_R, timeout="100ms", sinks=["pull"], match={"series_description": "5mm"}),
            {"id": "slow", "command": ["true"], "timeout": "1h", "match": {"series_description": "1.25mm"}},
        ],
        sinks=[{"id": "pull", "kind": "pull"}],
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)  # series 1 -> job; series 2 -> a bucket that stays open
    other = synthetic.generate_study(
        tmp_path / "o",
        series_count=1,
        instances_per_series=2,
        rows=16,
        cols=16,
        seed=77,
        series_descriptions=["LOCALIZER"],
    )
    await upload_files(client, other.paths)  # wanted by no application
    (_job,) = await wait_jobs(client, 1)
    retention = service_retention(service)
    later = time.time() + 7200
    # The job's result waits for the pull consumer: it is kept; open-bucket instances are kept.
    deleted_instances, deleted_results = await retention.purge(later)
    assert deleted_results == 0
    assert deleted_instances == 6 + 2  # the finished job's 6 and the 2 nobody wanted
    remaining = (await client.get("/v1/instances"))["instances"]
    assert len(remaining) == 6 and all("1.25mm" in r["series_description"] for r in remaining)
    (result,) = (await client.get("/v1/sinks/pull/results"))["results"]
    await client.post(result["ack"])
    assert await retention.purge(later) == (0, 1)
    async with client.session.get(client.url + f"/v1/results/{result['id']}") as response:
        assert response.status == 410
    # A deleted instance sent again is a new instance, not a duplicate.
    first = next(p for p in small_study.paths if "/1/" in str(p))
    _status, answer = await post_raw(client, first.read_bytes())
    assert answer["stored"] == 1


def service_retention(service):
    from mwm.retention import Retention

    return Retention(settings=service.settings.retention, db=service.db, storage=service.storage)


async def test_a_locked_database_refuses_then_recovers(tmp_path, make_service, client_for, small_study):
    import sqlite3

    config = base_config(
        tmp_path, database={"busy_timeout": "300ms"}, apps=[{"id": "ct", "command": ["true"], "timeout": "1h"}]
    )
    service = await make_service(config)
    client = await client_for(service)
    other = sqlite3.connect(service.settings.database_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the database
    try:
        status, answer = await post_raw(client, small_study.paths[0].read_bytes())
        assert status == 503 and answer["failed"] == 1
        assert answer["instances"][0]["reason"].startswith("the database")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await client.get("/v1/instances"))["instances"] == []
    # Slow but not stuck: a lock held for less than the busy timeout only delays the answer.
    other = sqlite3.connect(service.settings.database_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    asyncio.get_running_loop().call_later(0.1, lambda: (other.execute("ROLLBACK"), other.close()))
    status, answer = await post_raw(client, small_study.paths[0].read_bytes())
    assert status == 200 and answer["stored"] == 1
    assert len((await client.get("/v1/instances"))["instances"]) == 1


async def test_bytes_placed_for_an_instance_then_refused_are_removed(tmp_path, make_service, small_study) -> None:
    """Disk pressure found after an instance was written into storage but before its commit: the
    instance is refused and its bytes do not stay behind under a key nothing refers to."""
    from mwm.ingest import Origin

    service = await make_service(base_config(tmp_path))
    ingestor = service.ingestor
    data = small_study.paths[0].read_bytes()
    received = ingestor.receive_bytes([data[:1000], data[1000:]], len(data), hash_later=True)
    assert received.error is None and received.storage_key is not None
    placed = service.storage.local_path(received.storage_key)
    assert placed is not None and placed.read_bytes() == data
    ingestor.pressure = "1 MiB free, below the reserve"
    outcome = await ingestor.ingest_file(received, Origin(source="http"))
    assert outcome.status == "failed" and outcome.http_status == 507 and outcome.dicom_status == 0xA700
    assert not placed.exists()
    ingestor.pressure = None
    again = ingestor.receive_bytes([data], len(data))
    assert (await ingestor.ingest_file(again, Origin(source="http"))).status == "stored"

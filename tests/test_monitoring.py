"""Monitoring: the live event stream, Prometheus metrics, structured logs, and import boundaries."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

from support import base_config, upload_files, wait_jobs

from mwm.logs import JsonFormatter


async def read_events(response, count: int, timeout: float = 20.0) -> list[dict]:
    events: list[dict] = []

    async def read() -> None:
        while len(events) < count:
            line = (await response.content.readline()).decode()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))

    await asyncio.wait_for(read(), timeout)
    return events


async def test_event_stream_follows_a_study_from_bucket_to_delivery(tmp_path, make_service, client_for, small_study):
    config = base_config(
        tmp_path,
        apps=[
            {
                "id": "quick",
                "command": [
                    sys.executable,
                    "-c",
                    "import os; open(os.environ['HOLOSCAN_OUTPUT_PATH'] + '/r.txt', 'w').write('x')",
                ],
                "arguments": False,
                "timeout": "200ms",
                "sinks": ["out"],
            }
        ],
        sinks=[{"id": "out", "kind": "folder", "path": str(tmp_path / "out")}],
    )
    service = await make_service(config)
    client = await client_for(service)
    async with client.session.get(client.url + "/v1/events/stream") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        await upload_files(client, small_study.paths, headers={"X-Correlation-ID": "watch-me"})
        events = await read_events(response, 6)
    kinds = [e["kind"] for e in events]
    assert kinds == [
        "bucket.opened",
        "job.scheduled",
        "job.launching",
        "job.running",
        "job.collecting",
        "job.succeeded",
    ]
    assert {e["correlation_id"] for e in events} == {"watch-me"}
    assert all(e["app_id"] == "quick" for e in events)
    # A reconnecting client resumes after the last event it saw.
    async with client.session.get(
        client.url + "/v1/events/stream", headers={"Last-Event-ID": str(events[2]["id"])}
    ) as response:
        resumed = await read_events(response, 3)
    assert [e["id"] for e in resumed] == [e["id"] for e in events[3:6]]


async def test_metrics_count_what_happened(tmp_path, make_service, client_for, small_study):
    config = base_config(
        tmp_path, apps=[{"id": "ct", "command": ["true"], "timeout": "100ms", "match": {"called_aet": ["MWM"]}}]
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    await upload_files(client, small_study.paths[:2])
    async with client.session.post(
        client.url + "/v1/instances",
        data=b"junk" * 100,
        headers={"Content-Type": "application/dicom", "X-Called-AET": "WHO-KNOWS"},
    ):
        pass
    await wait_jobs(client, 1)
    async with client.session.get(client.url + "/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    n = len(small_study.paths)
    assert samples['mwm_instances_received_total{called_aet="MWM",outcome="stored",source="http"}'] == n
    assert samples['mwm_instances_received_total{called_aet="MWM",outcome="duplicate",source="http"}'] == 2
    assert samples['mwm_instances_received_total{called_aet="other",outcome="rejected",source="http"}'] == 1
    assert samples['mwm_rejections_total{reason="not a DICOM Part-10 file",source="http"}'] == 1
    assert samples['mwm_instances_routed_total{app="ct"}'] == n
    assert samples['mwm_received_bytes_total{source="http"}'] == sum(p.stat().st_size for p in small_study.paths)
    assert samples['mwm_jobs{state="succeeded"}'] == 1
    assert samples['mwm_job_duration_seconds_count{app="ct",outcome="succeeded"}'] == 1
    assert samples["mwm_storage_free_bytes"] > 0
    assert samples["mwm_up"] == 1


def test_json_log_lines_carry_the_study_and_job() -> None:
    record = logging.LogRecord("mwm.jobs", logging.INFO, __file__, 1, "job %s succeeded", (7,), None)
    record.job_id, record.app_id, record.correlation_id = 7, "ct", "study-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "job 7 succeeded"
    assert (line["job_id"], line["app_id"], line["correlation_id"]) == (7, "ct", "study-1")
    assert line["level"] == "info" and line["ts"].endswith("Z")


async def test_serve_writes_json_logs_with_context(tmp_path, small_study) -> None:
    """mwm serve --log-format json: every line is JSON; lines about a job name its job and study."""
    from test_cli import free_port, run

    port = free_port()
    config = tmp_path / "mwm.toml"
    config.write_text(
        f'[server]\nhttp = "127.0.0.1:{port}"\ndata_dir = "{tmp_path / "data"}"\n'
        'disk_reserve = "16MB"\ndisk_watermark = 99.9\n'
        '[[apps]]\nid = "ct"\ncommand = ["true"]\ntimeout = "100ms"\n'
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mwm",
        "serve",
        "--config",
        str(config),
        "--log-format",
        "json",
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    env = {"MWM_URL": f"http://127.0.0.1:{port}"}
    try:
        for _ in range(200):
            if (await run("jobs", env=env))[0] == 0:
                break
            await asyncio.sleep(0.05)
        code, _, err = await run("send", str(small_study.paths[0]), "--correlation-id", "c-42", env=env)
        assert code == 0, err
        for _ in range(200):
            code, out, _ = await run("jobs", "--json", env=env)
            if json.loads(out)["jobs"] and json.loads(out)["jobs"][0]["state"] == "succeeded":
                break
            await asyncio.sleep(0.05)
    finally:
        server.terminate()
        _, err_bytes = await asyncio.wait_for(server.communicate(), 30)
    lines = [json.loads(line) for line in err_bytes.decode().splitlines() if line.strip()]
    about_job = [line for line in lines if "job_id" in line]
    assert about_job, lines
    assert all(line["correlation_id"] == "c-42" and line["app_id"] == "ct" for line in about_job)


def test_the_core_imports_without_textual() -> None:
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'textual' or name.startswith('textual.'):\n"
        "            raise ImportError('textual is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mwm.service, mwm.cli, mwm.api, mwm.jobs, mwm.ingest, mwm.engines.local, mwm.sinks.folder\n"
        "assert not any(m == 'textual' or m.startswith('textual.') for m in sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

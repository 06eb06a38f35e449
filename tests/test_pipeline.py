"""End-to-end: upload over real sockets, buckets, the sample application, folder and pull sinks."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
import synthetic
from support import SAMPLE_APP, WRITE_R, base_config, eventually, python_app, upload_files, wait_job_state, wait_jobs

from mwm.client import ClientError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def sample_config(tmp_path: Path, **app: Any) -> dict[str, Any]:
    return base_config(
        tmp_path,
        apps=[
            {
                "id": "ct",
                "command": SAMPLE_APP,
                "match": {"called_aet": ["MWM"], "modality": ["CT"]},
                "timeout": "1s",
                "sinks": ["out", "gateway"],
                **app,
            }
        ],
        sinks=[{"id": "out", "kind": "folder", "path": str(tmp_path / "out")}, {"id": "gateway", "kind": "pull"}],
    )


async def test_two_interleaved_studies_make_two_jobs_and_reach_both_sinks(tmp_path, make_service, client_for):
    big = synthetic.generate_study(
        tmp_path / "big", series_count=2, instances_per_series=30, rows=64, cols=64, seed=101
    )
    small = synthetic.generate_study(
        tmp_path / "small", series_count=1, instances_per_series=10, rows=64, cols=64, seed=202
    )
    service = await make_service(sample_config(tmp_path))
    client = await client_for(service)
    files = big.paths + small.paths
    random.Random(7).shuffle(files)  # interleaved instances of both studies
    chunks = [files[i::4] for i in range(4)]
    answers = await asyncio.gather(*(upload_files(client, chunk) for chunk in chunks))
    assert all(status == 200 for status, _ in answers)
    assert sum(a["stored"] for _, a in answers) == 70

    buckets = (await client.get("/v1/buckets"))["buckets"]
    assert sorted(b["instance_count"] for b in buckets) == [10, 60]

    jobs = await wait_jobs(client, 2)
    by_study = {j["study_instance_uid"]: j for j in jobs}
    assert set(by_study) == {big.study_uid, small.study_uid}
    assert by_study[big.study_uid]["instance_count"] == 60
    assert by_study[small.study_uid]["instance_count"] == 10

    async def folder_delivered() -> bool:
        rows = (await client.get("/v1/deliveries", sink="out", state="delivered"))["deliveries"]
        return len(rows) == 4

    await eventually(folder_delivered, what="the folder sink to receive 4 results")
    for study in (big, small):
        job = await client.get(f"/v1/jobs/{by_study[study.study_uid]['id']}")
        assert {s["series_instance_uid"] for s in job["series"]} == {s.series_uid for s in study.series}
        assert job["result_data"]["study_instance_uid"] == study.study_uid
        paths = {r["path"] for r in job["results"]}
        assert paths == {"body_seg.dcm", "metadata.json"}
        # Folder sink: the files are where the layout says, and the SEG references the study.
        seg = pydicom.dcmread(tmp_path / "out" / study.study_uid / "ct" / "body_seg.dcm")
        assert seg.SOPClassUID == SEG_SOP_CLASS
        assert seg.StudyInstanceUID == study.study_uid
        assert (tmp_path / "out" / study.study_uid / "ct" / "metadata.json").is_file()

    # Pull sink: 4 results wait for the consumer; download one byte-identical to the folder copy, ack it.
    pending = (await client.get("/v1/sinks/gateway/results"))["results"]
    assert len(pending) == 4
    seg_entry = next(r for r in pending if r["path"] == "body_seg.dcm")
    data = await client.request("GET", seg_entry["download"], expect_json=False)
    on_disk = (tmp_path / "out" / seg_entry["study_instance_uid"] / "ct" / "body_seg.dcm").read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256(on_disk).digest()
    ack = await client.post(seg_entry["ack"])
    assert ack["acknowledged"] == 1
    assert len((await client.get("/v1/sinks/gateway/results"))["results"]) == 3
    delivered = (await client.get("/v1/deliveries", sink="gateway", state="delivered"))["deliveries"]
    assert [d["result_id"] for d in delivered] == [seg_entry["id"]]


async def test_stored_bytes_are_exactly_what_was_sent(tmp_path, make_service, client_for, small_study):
    service = await make_service(base_config(tmp_path))
    client = await client_for(service)
    status, answer = await upload_files(client, small_study.paths)
    assert status == 200 and answer["stored"] == len(small_study.paths)
    for path in small_study.paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        record = await client.get(f"/v1/instances/{uid}")
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        stored = service.storage.local_path(record["storage_key"])
        assert stored is not None and stored.read_bytes() == path.read_bytes()


async def test_resent_study_inside_the_timeout_adds_nothing(tmp_path, make_service, client_for, small_study):
    service = await make_service(sample_config(tmp_path, timeout="30s"))
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    before = (await client.get("/v1/buckets"))["buckets"]
    status, answer = await upload_files(client, small_study.paths)
    assert status == 200
    assert answer["stored"] == 0 and answer["duplicate"] == len(small_study.paths)
    after = (await client.get("/v1/buckets"))["buckets"]
    assert [(b["id"], b["instance_count"], b["deadline"]) for b in after] == [
        (b["id"], b["instance_count"], b["deadline"]) for b in before
    ]
    assert len((await client.get("/v1/instances"))["instances"]) == len(small_study.paths)


async def test_resent_study_after_its_job_makes_a_new_job_only_when_reprocessing(
    tmp_path, make_service, client_for, small_study
):
    for reprocess, expected_jobs in ((False, 1), (True, 2)):
        config = sample_config(tmp_path / str(reprocess), timeout="200ms", reprocess=reprocess)
        service = await make_service(config)
        client = await client_for(service)
        await upload_files(client, small_study.paths)
        await wait_jobs(client, 1)
        _, answer = await upload_files(client, small_study.paths)
        assert answer["duplicate"] == len(small_study.paths)
        if reprocess:
            jobs = await wait_jobs(client, expected_jobs)
            assert jobs[1]["instance_count"] == len(small_study.paths)
        else:
            await asyncio.sleep(0.6)  # longer than the bucket timeout: no bucket may have opened
            assert (await client.get("/v1/buckets"))["buckets"] == []
            assert len((await client.get("/v1/jobs"))["jobs"]) == 1


async def test_discovery_rules_and_explicit_apps(tmp_path, make_service, client_for, small_study):
    config = base_config(
        tmp_path,
        apps=[
            {"id": "ct-only", "command": ["true"], "match": {"modality": ["CT"]}, "timeout": "30s"},
            {"id": "mr-only", "command": ["true"], "match": {"modality": ["MR"]}, "timeout": "30s"},
            {"id": "by-aet", "command": ["true"], "match": {"called_aet": ["AI-CT"]}, "timeout": "30s"},
            {"id": "by-origin", "command": ["true"], "match": {"calling_aet": ["CT-SCANNER"]}, "timeout": "30s"},
            {
                "id": "thin",
                "command": ["true"],
                "timeout": "30s",
                "match": {"series_description": "1\\.25mm$", "body_part": "^CHEST$"},
            },
            {
                "id": "series",
                "command": ["true"],
                "grouping": "series",
                "timeout": "30s",
                "match": {"sop_class_uid": ["1.2.840.10008.5.1.4.1.1.2"]},
            },
            {"id": "off", "command": ["true"], "enabled": False, "timeout": "30s"},
        ],
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths, headers={"X-Called-AET": "AI-CT", "X-Calling-AET": "CT-SCANNER"})
    buckets = (await client.get("/v1/buckets"))["buckets"]
    counts: dict[str, list[int]] = {}
    for b in buckets:
        counts.setdefault(b["app_id"], []).append(b["instance_count"])
    assert counts == {"ct-only": [12], "by-aet": [12], "by-origin": [12], "thin": [6], "series": [6, 6]}

    # Explicit application ids bypass the rules (MR app, CT data).
    other = synthetic.generate_study(tmp_path / "o", series_count=1, instances_per_series=2, rows=16, cols=16, seed=5)
    status, answer = await upload_files(client, other.paths, apps=["mr-only"])
    assert status == 200
    assert {b["app_id"] for i in answer["instances"] for b in i["buckets"]} == {"mr-only"}


async def test_late_arrivals_join_the_whole_study_when_the_application_asks(
    tmp_path, make_service, client_for, small_study
):
    """Half a study, its job, then the other half: an application with late_arrivals = "whole"
    gets the whole study in its second job; one with the default gets only the late half."""
    count_inputs = (
        "import json, os\n"
        "n = len(os.listdir(os.environ['HOLOSCAN_INPUT_PATH']))\n"
        "json.dump({'inputs': n}, open(os.environ['HOLOSCAN_OUTPUT_PATH'] + '/metadata.json', 'w'))\n"
    )
    apps = [
        python_app("whole", count_inputs, timeout="200ms", late_arrivals="whole"),
        python_app("alone", count_inputs, timeout="200ms"),
    ]
    service = await make_service(base_config(tmp_path, apps=apps))
    client = await client_for(service)
    half = len(small_study.paths) // 2
    await upload_files(client, small_study.paths[:half])
    await wait_jobs(client, 2)
    await upload_files(client, small_study.paths[half:])
    jobs = await wait_jobs(client, 4)
    late = {j["app_id"]: j for j in jobs[2:]}
    assert (late["whole"]["instance_count"], late["whole"]["result_data"]) == (12, {"inputs": 12})
    assert (late["alone"]["instance_count"], late["alone"]["result_data"]) == (6, {"inputs": 6})
    listed = {a["id"]: a["late_arrivals"] for a in (await client.get("/v1/apps"))["apps"]}
    assert listed == {"whole": "whole", "alone": "alone"}


async def test_deliveries_to_a_sink_taken_out_of_the_configuration_wait_and_say_why(
    tmp_path, make_service, client_for, small_study, caplog
):
    script = WRITE_R
    with_sink = base_config(
        tmp_path,
        apps=[python_app("ct", script, timeout="100ms", sinks=["gateway"])],
        sinks=[{"id": "gateway", "kind": "pull"}],
    )
    service = await make_service(with_sink)
    client = await client_for(service)
    await upload_files(client, small_study.paths[:2])
    await wait_jobs(client, 1)
    await service.stop()

    without = base_config(tmp_path, apps=[python_app("ct", script, timeout="100ms")])
    service = await make_service(without)
    client = await client_for(service)
    (delivery,) = (await client.get("/v1/deliveries"))["deliveries"]
    assert delivery["state"] == "pending"
    assert delivery["last_error"] == "sink 'gateway' is not configured: waiting until it is again"
    assert any("1 pending deliveries to sink 'gateway'" in r.getMessage() for r in caplog.records)
    await service.stop()

    service = await make_service(with_sink)  # the sink is back: the delivery waits on it as before
    client = await client_for(service)
    (delivery,) = (await client.get("/v1/deliveries"))["deliveries"]
    assert (delivery["state"], delivery["last_error"]) == ("pending", None)
    assert len((await client.get("/v1/sinks/gateway/results"))["results"]) == 1


async def test_an_application_whose_program_is_not_there_is_said_at_start(tmp_path, make_service, caplog):
    apps = [
        {"id": "typo", "command": ["no-such-program-for-mwm"], "timeout": "1h"},
        {"id": "moved", "command": ["./apps/gone.sh"], "timeout": "1h"},
        {"id": "fine", "command": ["python", "-c", "pass"], "timeout": "1h"},
    ]
    await make_service(base_config(tmp_path, apps=apps))
    warnings = sorted(
        r.getMessage() for r in caplog.records if r.name == "mwm.service" and "application" in r.getMessage()
    )
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("application 'moved': ./apps/gone.sh does not exist (from ")
    assert warnings[1] == (
        "application 'typo': 'no-such-program-for-mwm' is not on the PATH; its jobs will fail until it is there"
    )


async def test_a_crashing_application_is_failed_with_its_exception_first(
    tmp_path, make_service, client_for, small_study
):
    """A Python traceback in the log: the reason starts with the exception, and Python's ``^^^``
    pointer lines are left out of it."""
    script = "import json\ndef load():\n    return json.loads('{broken')\nload()\n"
    config = base_config(tmp_path, apps=[python_app("crash", script, timeout="100ms", max_attempts=1)])
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths[:1])
    (job,) = await wait_jobs(client, 1, ("failed",))
    first, *rest = job["error"].splitlines()
    assert first.startswith("exited with code 1: json.decoder.JSONDecodeError: Expecting property name")
    assert "Traceback (most recent call last):" in rest
    assert not [line for line in rest if set(line.strip()) <= {"^", "~"} and line.strip()]


async def test_a_failing_application_is_retried_then_failed_with_its_log(
    tmp_path, make_service, client_for, small_study
):
    script = "import sys; print('loading model'); print('out of memory', file=sys.stderr); sys.exit(3)"
    config = base_config(
        tmp_path,
        apps=[python_app("bad", script, timeout="100ms", max_attempts=3)],
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, ("failed",))
    assert job["attempt"] == 3
    assert "exited with code 3" in job["error"] and "out of memory" in job["error"]
    log = await client.request("GET", f"/v1/jobs/{job['id']}/log", expect_json=False)
    assert log.decode().count("\nloading model\n") == 3
    events = (await client.get("/v1/events", job=job["id"]))["events"]
    assert [e["kind"] for e in events].count("job.scheduled") == 3  # first run and two retries

    # Retry by API: a fresh attempt count.
    retried = await client.post(f"/v1/jobs/{job['id']}/retry")
    assert retried["state"] == "scheduled" and retried["attempt"] == 0
    await wait_job_state(client, job["id"], ("failed",))


async def test_cancel_kills_the_whole_process_group(tmp_path, make_service, client_for, small_study):
    marker = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(marker)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(600)\n"
    )
    config = base_config(
        tmp_path,
        apps=[python_app("slow", script, timeout="100ms")],
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, ("running",))
    await eventually(lambda: asyncio.sleep(0, marker.exists() and marker.read_text().strip()), what="pids")
    pids = [int(p) for p in marker.read_text().split()]
    cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled["state"] == "cancelled"

    def gone() -> bool:
        return all(
            not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2] for pid in pids
        )

    await eventually(lambda: asyncio.sleep(0, gone()), timeout=15, what="application processes to end")
    status, body = 0, {}
    try:
        await client.post(f"/v1/jobs/{job['id']}/cancel")
    except Exception as exc:  # noqa: BLE001
        status, body = exc.status, {"message": exc.message}  # type: ignore[attr-defined]
    assert status == 409 and "cannot be cancelled" in body["message"]


async def test_run_timeout_fails_the_job(tmp_path, make_service, client_for, small_study):
    config = base_config(
        tmp_path,
        apps=[
            {
                "id": "hang",
                "command": ["sleep", "600"],
                "arguments": False,
                "timeout": "100ms",
                "run_timeout": "1s",
                "max_attempts": 1,
            }
        ],
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, ("failed",), timeout=30)
    assert job["error"].startswith("timed out after 1 s")


async def test_an_application_that_writes_nothing_succeeds_with_no_results(
    tmp_path, make_service, client_for, small_study
):
    config = base_config(tmp_path, apps=[{"id": "quiet", "command": ["true"], "timeout": "100ms"}])
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1)
    assert job["result_count"] == 0
    assert (await client.get(f"/v1/jobs/{job['id']}"))["results"] == []


async def test_application_sees_the_monai_deploy_contract(tmp_path, make_service, client_for, small_study):
    script = (
        "import json, os, sys\n"
        "out = os.environ['HOLOSCAN_OUTPUT_PATH']\n"
        "info = {k: os.environ.get(k) for k in ('HOLOSCAN_INPUT_PATH', 'HOLOSCAN_OUTPUT_PATH', "
        "'HOLOSCAN_MODEL_PATH', 'HOLOSCAN_WORKDIR', 'MONAI_INPUTPATH', 'MONAI_OUTPUTPATH', 'MONAI_MODELPATH')}\n"
        "info['argv'] = sys.argv[1:]\n"
        "info['inputs'] = sorted(os.listdir(os.environ['HOLOSCAN_INPUT_PATH']))\n"
        "info['nlink'] = min(os.stat(os.path.join(os.environ['HOLOSCAN_INPUT_PATH'], f)).st_nlink "
        "for f in info['inputs'])\n"
        "json.dump(info, open(os.path.join(out, 'metadata.json'), 'w'))\n"
    )
    models = tmp_path / "models"
    models.mkdir()
    config = base_config(
        tmp_path,
        apps=[
            {"id": "probe", "command": [sys.executable, "-c", script], "model_path": str(models), "timeout": "100ms"}
        ],
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1)
    info = (await client.get(f"/v1/jobs/{job['id']}"))["result_data"]
    assert info["HOLOSCAN_INPUT_PATH"] == info["MONAI_INPUTPATH"]
    assert info["HOLOSCAN_OUTPUT_PATH"] == info["MONAI_OUTPUTPATH"]
    assert info["HOLOSCAN_MODEL_PATH"] == info["MONAI_MODELPATH"] == str(models)
    assert info["argv"] == ["-i", info["HOLOSCAN_INPUT_PATH"], "-o", info["HOLOSCAN_OUTPUT_PATH"], "-m", str(models)]
    assert len(info["inputs"]) == len(small_study.paths)
    assert info["nlink"] >= 2  # hard links to the stored instances, not copies


async def test_per_app_parallel_limit(tmp_path, make_service, client_for):
    script = "import time; time.sleep(0.5)"
    config = base_config(
        tmp_path,
        apps=[python_app("one-at-a-time", script, timeout="100ms", max_parallel=1)],
    )
    service = await make_service(config)
    client = await client_for(service)
    for seed in (1, 2, 3):
        study = synthetic.generate_study(
            tmp_path / f"s{seed}", series_count=1, instances_per_series=1, rows=16, cols=16, seed=seed
        )
        await upload_files(client, study.paths)
    jobs = await wait_jobs(client, 3, timeout=30)
    spans = sorted((j["started_at"], j["finished_at"]) for j in jobs)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"jobs overlapped: {spans}"


async def test_close_bucket_now(tmp_path, make_service, client_for, small_study):
    service = await make_service(sample_config(tmp_path, timeout="1h"))
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (bucket,) = (await client.get("/v1/buckets"))["buckets"]
    assert bucket["remaining_seconds"] > 3000
    answer = await client.post(f"/v1/buckets/{bucket['id']}/close")
    assert answer["job"]["state"] in ("scheduled", "launching", "running")
    await wait_jobs(client, 1)
    assert (await client.get("/v1/buckets"))["buckets"] == []


async def test_open_buckets_and_jobs_survive_a_restart(tmp_path, make_service, client_for, small_study):
    config = sample_config(tmp_path, timeout="2s")
    first = await make_service(config)
    client = await client_for(first)
    await upload_files(client, small_study.paths)
    (bucket,) = (await client.get("/v1/buckets"))["buckets"]
    await first.stop()

    second = await make_service(config)
    client = await client_for(second)
    (again,) = (await client.get("/v1/buckets"))["buckets"]
    assert again["id"] == bucket["id"] and again["deadline"] == bucket["deadline"]
    (job,) = await wait_jobs(client, 1)
    assert job["bucket_id"] == bucket["id"]
    results = (await client.get("/v1/sinks/gateway/results"))["results"]
    assert {r["path"] for r in results} == {"body_seg.dcm", "metadata.json"}


async def test_a_failing_sink_does_not_hold_up_another(tmp_path, make_service, client_for, small_study):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the sink expects a folder")
    config = base_config(
        tmp_path,
        apps=[{"id": "ct", "command": SAMPLE_APP, "timeout": "100ms", "sinks": ["broken", "good"]}],
        sinks=[
            {"id": "broken", "kind": "folder", "path": str(blocked)},
            {"id": "good", "kind": "folder", "path": str(tmp_path / "good")},
        ],
        delivery={"max_attempts": 3, "retry_backoff": "50ms"},
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    await wait_jobs(client, 1)

    async def settled() -> list[dict[str, Any]] | None:
        rows = (await client.get("/v1/deliveries", limit=100))["deliveries"]
        return rows if rows and all(d["state"] != "pending" for d in rows) else None

    rows = await settled_rows(settled)
    states = {(d["sink_id"], d["state"]) for d in rows}
    assert states == {("good", "delivered"), ("broken", "failed")}
    broken = [d for d in rows if d["sink_id"] == "broken"]
    assert all(d["attempts"] == 3 and "cannot write" in d["last_error"] for d in broken)
    # Fix the destination and retry by API.
    blocked.unlink()
    for d in broken:
        assert (await client.post(f"/v1/deliveries/{d['id']}/retry"))["state"] == "pending"
    rows = await settled_rows(settled)
    assert {d["state"] for d in rows} == {"delivered"}


async def settled_rows(check: Any) -> list[dict[str, Any]]:
    return await eventually(check, timeout=30, what="deliveries to settle")


async def test_app_management_api(tmp_path, make_service, client_for, small_study):
    service = await make_service(sample_config(tmp_path))
    client = await client_for(service)
    created = await client.post(
        "/v1/apps", {"id": "api-app", "command": ["true"], "timeout": "100ms", "match": {"modality": ["CT"]}}
    )
    assert created["origin"] == "api" and created["command"] == ["true"]
    updated = await client.put("/v1/apps/api-app", {"command": ["true"], "timeout": "5s"})
    assert updated["timeout"] == 5.0 and updated["match"]["modality"] == []
    listed = {a["id"]: a for a in (await client.get("/v1/apps"))["apps"]}
    assert set(listed) == {"ct", "api-app"} and listed["ct"]["origin"] == "config"
    for method, path, body, status in (
        ("POST", "/v1/apps", {"id": "api-app", "command": ["true"]}, 409),
        ("PUT", "/v1/apps/ct", {"command": ["true"]}, 409),
        ("DELETE", "/v1/apps/ct", None, 409),
        ("POST", "/v1/apps", {"id": "x", "command": ["true"], "engine": "nope"}, 500),
        ("POST", "/v1/apps", {"id": "x", "command": ["true"], "timeout": "soon"}, 400),
        ("POST", "/v1/apps", {"id": "x", "command": ["true"], "colour": "red"}, 400),
        ("POST", "/v1/apps", {"id": "../x", "command": ["true"]}, 400),
        ("POST", "/v1/apps", {"id": "x", "command": ["true"], "sinks": ["nowhere"]}, 400),
        ("GET", "/v1/apps/none", None, 404),
    ):
        async with client.session.request(method, client.url + path, json=body) as response:
            data = await response.json()
            assert (response.status, data["error"]) != (200, None)
            expected = 400 if status == 500 else status  # an unknown engine is a bad request too
            assert response.status == expected, (method, path, body, data)
    async with client.session.post(client.url + "/v1/apps", json={"id": "x", "command": ["true"], "colour": 1}) as r:
        message = (await r.json())["message"]
    # An unknown key is named with every key an application's table may have, not the engine's only.
    assert message.startswith("application.colour: unknown key (known keys: ")
    assert all(f" {key}," in message for key in ("command", "grouping", "match", "sinks", "timeout"))
    # The API app is persisted and survives a restart.
    await service.stop()
    again = await make_service(sample_config(tmp_path))
    client2 = await client_for(again)
    assert (await client2.get("/v1/apps/api-app"))["timeout"] == 5.0
    await client2.delete("/v1/apps/api-app")
    assert {a["id"] for a in (await client2.get("/v1/apps"))["apps"]} == {"ct"}
    json.dumps(created)  # the API's JSON is plain JSON


async def test_an_api_application_the_configuration_can_no_longer_run_does_not_stop_the_server(
    tmp_path, make_service, client_for, small_study
):
    """Its sink was removed from the configuration file: mwm starts anyway; the application says
    why, receives nothing (explicitly named, it is refused with the reason) until it is updated."""
    with_sink = base_config(tmp_path, sinks=[{"id": "out", "kind": "folder", "path": str(tmp_path / "out")}])
    service = await make_service(with_sink)
    client = await client_for(service)
    spec = {"id": "api-app", "command": ["true"], "timeout": "100ms", "match": {"modality": ["CT"]}, "sinks": ["out"]}
    await client.post("/v1/apps", spec)
    await service.stop()

    service = await make_service(base_config(tmp_path))  # the sink "out" is gone
    client = await client_for(service)
    shown = await client.get("/v1/apps/api-app")
    assert shown["enabled"] is False and "no sink with id 'out'" in shown["problem"]
    assert [a["id"] for a in (await client.get("/v1/apps"))["apps"]] == ["api-app"]
    await upload_files(client, small_study.paths[:2])
    await asyncio.sleep(0.3)
    assert (await client.get("/v1/buckets"))["buckets"] == []  # discovery leaves it out
    with pytest.raises(ClientError) as refused:
        await upload_files(client, small_study.paths[:1], apps=["api-app"])
    assert refused.value.status == 404 and "cannot run: " in refused.value.message
    assert "no sink with id 'out'" in refused.value.message

    updated = await client.put("/v1/apps/api-app", {**spec, "sinks": []})
    assert updated["enabled"] is True and "problem" not in updated
    await upload_files(client, small_study.paths[2:4])
    (job,) = await wait_jobs(client, 1)
    assert job["app_id"] == "api-app"


async def test_a_job_running_when_mwm_stops_runs_again_after_the_restart(
    tmp_path, make_service, client_for, small_study
):
    runs = tmp_path / "runs"
    script = (
        "import os, pathlib, sys, time\n"
        f"runs = pathlib.Path({str(runs)!r}); runs.mkdir(exist_ok=True)\n"
        "n = len(list(runs.iterdir())); (runs / str(n)).write_text(str(os.getpid()))\n"
        "time.sleep(600 if n == 0 else 0)\n"
        "(pathlib.Path(os.environ['HOLOSCAN_OUTPUT_PATH']) / 'done.txt').write_text('done')\n"
    )
    config = base_config(
        tmp_path,
        apps=[python_app("long", script, timeout="100ms", sinks=["pull"])],
        sinks=[{"id": "pull", "kind": "pull"}],
    )
    first = await make_service(config)
    client = await client_for(first)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, ("running",))
    await eventually(lambda: asyncio.sleep(0, (runs / "0").exists()), what="the first run to start")
    first_pid = int((runs / "0").read_text())
    await first.stop()
    assert not Path(f"/proc/{first_pid}").exists()  # stopped with mwm, not left behind

    second = await make_service(config)
    client = await client_for(second)
    (again,) = await wait_jobs(client, 1)
    assert again["id"] == job["id"] and again["result_count"] == 1
    assert sorted(p.name for p in runs.iterdir()) == ["0", "1"]
    results = (await client.get("/v1/sinks/pull/results"))["results"]
    assert [r["path"] for r in results] == ["done.txt"]

"""The Argo engine end to end: mwm on S3 storage, a strict fake Argo Server, a folder sink."""

from __future__ import annotations

import asyncio
import json
import ssl

import synthetic
from s3.servers import make_certificate
from support import eventually, upload_files, wait_jobs

from .conftest import NAMESPACE, SECRET, TOKEN, argo_config
from .fake_argo import FakeArgo, wait_for_phase


async def test_a_study_runs_as_a_workflow_and_its_results_reach_the_sink(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    bucket = moto_http.new_bucket()
    service = await make_service(argo_config(tmp_path, moto_http, fake_argo, bucket=bucket, sink=True))
    client = await client_for(service)
    status, answer = await upload_files(client, small_study.paths)
    assert status == 200 and answer["stored"] == len(small_study.paths)
    (job,) = await wait_jobs(client, 1, timeout=30)
    assert job["engine"] == "argo"
    detail = await client.get(f"/v1/jobs/{job['id']}")
    assert {r["path"] for r in detail["results"]} == {"result.txt", "metadata.json", "reports/summary.txt"}
    out = tmp_path / "out" / f"job-{job['id']}"

    async def delivered() -> bool:
        rows = (await client.get("/v1/deliveries", sink="out", state="delivered"))["deliveries"]
        return len(rows) == 3

    await eventually(delivered, what="the folder sink")
    assert (out / "result.txt").read_text() == f"{len(small_study.paths)} instances\n"
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["instances"] == len(small_study.paths)
    assert detail["result_data"]["instances"] == len(small_study.paths)

    (created,) = fake_argo.created
    workflow = created["workflow"]
    assert created["namespace"] == NAMESPACE
    labels = workflow["metadata"]["labels"]
    assert labels["mwm.job-id"] == str(job["id"]) and labels["mwm.app-id"] == "seg"
    assert labels["mwm.correlation-id"] == job["correlation_id"][:63]
    assert workflow["spec"]["activeDeadlineSeconds"] == 3600
    template = workflow["spec"]["templates"][0]
    (inp,) = template["inputs"]["artifacts"]
    (outp,) = template["outputs"]["artifacts"]
    assert inp["path"] == "/var/holoscan/input" and outp["path"] == "/var/holoscan/output"
    assert inp["s3"]["key"] == f"mwm/jobs/{job['id']}/1/input" and inp["s3"]["bucket"] == bucket
    assert outp["s3"]["key"] == f"mwm/jobs/{job['id']}/1/output" and outp["archive"] == {"none": {}}
    env = {e["name"]: e["value"] for e in template["container"]["env"]}
    assert env["HOLOSCAN_INPUT_PATH"] == env["MONAI_INPUTPATH"] == "/var/holoscan/input"
    assert env["HOLOSCAN_OUTPUT_PATH"] == env["MONAI_OUTPUTPATH"] == "/var/holoscan/output"
    assert template["container"]["resources"] == {"requests": {"cpu": "500m"}, "limits": {"memory": "2Gi"}}
    # Cleaned up: the workflow is deleted, the staged objects are gone; the results stay.
    await eventually(lambda: _async(not fake_argo.workflows), what="the workflow's deletion")
    keys = moto_http.keys(bucket, "mwm/")
    assert not [k for k in keys if k.startswith("mwm/jobs/")]
    assert [k for k in keys if k.startswith(f"mwm/results/{job['id']}/")]


async def _async(value):
    return value


async def running_workflow(client, fake, *, timeout=20.0):
    """The single job once its workflow runs on the fake: (job, workflow name)."""
    (job,) = await wait_jobs(client, 1, ("running",), timeout=timeout)
    name = f"mwm-{job['id']}-{job['attempt']}"
    await wait_for_phase(fake, NAMESPACE, name, ("Running",))
    return job, name


async def test_a_refused_token_fails_the_job_at_once_without_a_retry_storm(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    config = argo_config(tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket(), engine={"token": "wrong-token"})
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, ("failed",), timeout=20)
    # Not retried (a wrong token cannot fix itself): one request, and no more after.
    assert "the Argo Server refused the token" in job["error"] and "401" in job["error"]
    assert fake_argo.counts == {"submit": 1}
    await asyncio.sleep(0.5)
    assert fake_argo.counts == {"submit": 1}
    assert fake_argo.workflows == {}


async def test_the_argo_server_down_during_launch_and_back(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    config = argo_config(tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket(), engine={"request_attempts": 30})
    service = await make_service(config)
    client = await client_for(service)
    await fake_argo.stop()
    await upload_files(client, small_study.paths)
    await wait_jobs(client, 1, ("launching",), timeout=10)
    await asyncio.sleep(1.0)
    await fake_argo.start()
    (job,) = await wait_jobs(client, 1, timeout=30)
    assert job["attempt"] == 1
    assert len(fake_argo.created) == 1


async def test_the_argo_server_down_while_polling_and_back(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    config = argo_config(
        tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket(), app={"env": {"FAKE_RUN_SECONDS": "1"}}
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    job, name = await running_workflow(client, fake_argo)
    await fake_argo.stop()
    await wait_for_phase(fake_argo, NAMESPACE, name, ("Succeeded",))  # the cluster went on meanwhile
    await asyncio.sleep(0.5)
    assert (await client.get(f"/v1/jobs/{job['id']}"))["state"] == "running"
    await fake_argo.start()
    (job,) = await wait_jobs(client, 1, timeout=30)
    assert job["attempt"] == 1 and job["result_count"] == 3


async def test_a_failed_workflow_gives_its_reason_to_the_job(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    app = {"max_attempts": 1, "env": {"FAKE_OUTCOME": "fail", "FAKE_MESSAGE": "Error (exit code 3): no CT series"}}
    config = argo_config(tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket(), app=app)
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, ("failed",), timeout=20)
    assert job["error"].startswith(f"workflow mwm-{job['id']}-1 failed: Error (exit code 3): no CT series")
    log_text = await client.request("GET", f"/v1/jobs/{job['id']}/log", expect_json=False)
    assert b"read 12 objects" in log_text and b"no CT series" in log_text
    await eventually(lambda: _async(not fake_argo.workflows), what="the failed workflow's deletion")


async def test_cancel_terminates_the_workflow(tmp_path, make_service, client_for, small_study, moto_http, fake_argo):
    config = argo_config(
        tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket(), app={"env": {"FAKE_OUTCOME": "hang"}}
    )
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    job, name = await running_workflow(client, fake_argo)
    await client.post(f"/v1/jobs/{job['id']}/cancel")
    await eventually(lambda: _async(fake_argo.count("terminate") == 1), what="the terminate call")
    (terminate,) = [r for r in fake_argo.requests if r.kind == "terminate"]
    assert terminate.path == f"/api/v1/workflows/{NAMESPACE}/{name}/terminate"
    assert terminate.body == {"namespace": NAMESPACE, "name": name}
    (job,) = await wait_jobs(client, 1, ("cancelled",))
    await eventually(lambda: _async(not fake_argo.workflows), what="the workflow's deletion")


async def test_the_run_timeout_terminates_the_workflow(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    fake_argo.pending_seconds = 0.5  # the cluster's own deadline (activeDeadlineSeconds) comes later
    app = {"run_timeout": "2s", "max_attempts": 1, "env": {"FAKE_OUTCOME": "hang"}}
    config = argo_config(tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket(), app=app)
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, ("failed",), timeout=20)
    assert job["error"] == "timed out after 2 s"
    assert fake_argo.count("terminate") == 1
    assert fake_argo.created[0]["workflow"]["spec"]["activeDeadlineSeconds"] == 2


async def test_a_lost_create_answer_adopts_the_workflow(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    fake_argo.lose_create_answers = 1
    config = argo_config(tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket())
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, timeout=30)
    assert job["attempt"] == 1 and job["result_count"] == 3
    submits = [r.status for r in fake_argo.requests if r.kind == "submit"]
    assert submits == [504, 409]  # the answer was lost, the retry met the workflow: adopted, not twinned
    assert len(fake_argo.created) == 1


async def test_a_workflow_deleted_behind_mwms_back_fails_the_job(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    app = {"max_attempts": 1, "env": {"FAKE_OUTCOME": "hang"}}
    config = argo_config(tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket(), app=app)
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    job, name = await running_workflow(client, fake_argo)
    fake_argo.delete(NAMESPACE, name)
    (job,) = await wait_jobs(client, 1, ("failed",), timeout=20)
    assert f"workflow {name} no longer exists on the Argo Server" in job["error"]


async def test_a_restarted_mwm_finds_its_running_workflow_again(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    config = argo_config(
        tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket(), app={"env": {"FAKE_RUN_SECONDS": "1"}}
    )
    first = await make_service(config)
    client = await client_for(first)
    await upload_files(client, small_study.paths)
    await running_workflow(client, fake_argo)
    await first.stop()
    second = await make_service(config)
    client = await client_for(second)
    (job,) = await wait_jobs(client, 1, timeout=30)
    assert job["attempt"] == 1 and job["result_count"] == 3
    assert len(fake_argo.created) == 1


async def test_a_rotated_token_file_is_read_again(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    token_file = tmp_path / "token"
    token_file.write_text(f"Bearer {TOKEN}\n")
    engine = {"token": None, "token_file": str(token_file)}
    config = argo_config(tmp_path, moto_http, fake_argo, bucket=moto_http.new_bucket(), engine=engine)
    del config["engines"]["argo"]["token"]
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths[:6])
    await wait_jobs(client, 1, timeout=30)
    fake_argo.tokens = {"rotated-token-abcdefghijkl"}
    token_file.write_text("rotated-token-abcdefghijkl")
    second = synthetic.generate_study(tmp_path / "second", series_count=1, instances_per_series=3, rows=16, cols=16)
    await upload_files(client, second.paths)
    jobs = await wait_jobs(client, 2, timeout=30)
    assert [j["state"] for j in jobs] == ["succeeded", "succeeded"]


async def test_a_workflow_template_is_referenced_instead_of_an_image(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    repository = {
        "endpoint": moto_http.endpoint,
        "insecure": True,
        "accessKeySecret": {"name": SECRET, "key": "accessKey"},
        "secretKeySecret": {"name": SECRET, "key": "secretKey"},
    }
    bucket = moto_http.new_bucket()
    fake_argo.default_repository = {**repository, "bucket": bucket}
    fake_argo.add_template(
        NAMESPACE,
        "seg-template",
        {
            "entrypoint": "segment",
            "templates": [
                {
                    "name": "segment",
                    "inputs": {"artifacts": [{"name": "input", "path": "/in"}]},
                    "outputs": {
                        "artifacts": [
                            {"name": "output", "path": "/out", "s3": {"key": "{{workflow.parameters.mwm-output-key}}"}}
                        ]
                    },
                    "container": {
                        "image": "registry.example.org/seg:2",
                        "env": [{"name": "HOLOSCAN_INPUT_PATH", "value": "/in"}],
                    },
                }
            ],
        },
    )
    app = {"image": None, "workflow_template": "seg-template", "cpu_request": None, "memory_limit": None}
    config = argo_config(tmp_path, moto_http, fake_argo, bucket=bucket, app=app)
    for key in ("image", "cpu_request", "memory_limit"):
        del config["apps"][0][key]
    del config["engines"]["argo"]["artifact_repository"]  # key-only artifacts: the default repository
    service = await make_service(config)
    client = await client_for(service)
    await upload_files(client, small_study.paths)
    (job,) = await wait_jobs(client, 1, timeout=30)
    assert job["result_data"]["instances"] == len(small_study.paths)
    spec = fake_argo.created[0]["workflow"]["spec"]
    assert spec["workflowTemplateRef"] == {"name": "seg-template"}
    assert spec["arguments"]["artifacts"] == [{"name": "input", "s3": {"key": f"mwm/jobs/{job['id']}/1/input"}}]
    assert {"name": "mwm-output-key", "value": f"mwm/jobs/{job['id']}/1/output"} in spec["arguments"]["parameters"]


async def test_polling_does_not_grow_with_the_number_of_waiting_jobs(
    tmp_path, make_service, client_for, moto_http, fake_argo
):
    config = argo_config(
        tmp_path,
        moto_http,
        fake_argo,
        bucket=moto_http.new_bucket(),
        app={"max_parallel": 8, "env": {"FAKE_RUN_SECONDS": "1.5"}},
        jobs={"max_parallel": 8},
    )
    service = await make_service(config)
    client = await client_for(service)
    studies = [
        synthetic.generate_study(tmp_path / f"s{i}", series_count=1, instances_per_series=2, rows=16, cols=16, seed=i)
        for i in range(8)
    ]
    await asyncio.gather(*(upload_files(client, s.paths) for s in studies))
    jobs = await wait_jobs(client, 8, timeout=40)
    assert all(j["result_count"] == 3 for j in jobs)
    counts = fake_argo.counts
    assert counts["submit"] == 8 and counts["log"] == 8 and counts["delete"] == 8
    assert counts["get"] <= 8 + 2  # about one per job, when it leaves the list of unfinished workflows
    # Lists: one per interval for all the jobs together (1.5 s of running at 100 ms), not one per job.
    assert counts["list"] < 40, counts


async def test_an_argo_server_over_https_with_a_private_ca(
    tmp_path, make_service, client_for, small_study, moto_http, fake_argo
):
    cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    secure = FakeArgo(s3_url=moto_http.url, secrets=fake_argo.secrets, tokens={TOKEN}, tls=context)
    await secure.start()
    try:
        app = {"max_attempts": 1}
        untrusted = argo_config(tmp_path / "a", moto_http, secure, bucket=moto_http.new_bucket(), app=app)
        client = await client_for(await make_service(untrusted))
        await upload_files(client, small_study.paths)
        (job,) = await wait_jobs(client, 1, ("failed",), timeout=20)
        assert "the Argo Server's certificate was not accepted" in job["error"]
        assert secure.created == []

        trusted = argo_config(
            tmp_path / "b", moto_http, secure, bucket=moto_http.new_bucket(), engine={"ca_bundle": str(cert)}
        )
        client = await client_for(await make_service(trusted))
        await upload_files(client, small_study.paths)
        (job,) = await wait_jobs(client, 1, ("succeeded", "failed"), timeout=60)
        assert job["state"] == "succeeded", job
        assert job["result_count"] == 3 and len(secure.created) == 1
    finally:
        await secure.close()
    assert secure.violations == []

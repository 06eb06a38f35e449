"""S3 storage: start-up checks, checksum modes, multipart uploads, credentials, a whole pipeline run."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys

import pytest
from support import base_config, eventually, upload_files, wait_jobs

from mwm.errors import StorageError
from mwm.options import build

pytest.importorskip("aiobotocore", reason="the S3 storage needs aiobotocore (pip install -e '.[test,s3]')")

from mwm.storage.s3 import S3Options, S3Storage  # after the check above

MiB = 2**20


def s3_config(tmp_path, server, bucket, **storage):
    config = base_config(tmp_path)
    table = server.storage_options(bucket, **storage)
    config["storage"] = table
    return config


async def test_wrong_credentials_stop_the_start_with_a_clear_message(tmp_path, make_service, moto_http):
    bucket = moto_http.new_bucket()
    config = s3_config(tmp_path, moto_http, bucket, secret_access_key="not-the-secret")
    with pytest.raises(StorageError, match="wrong credentials"):
        await make_service(config)
    config = s3_config(tmp_path, moto_http, bucket, access_key_id="AKIAUNKNOWNKEY000000")
    with pytest.raises(StorageError, match="wrong credentials"):
        await make_service(config)


async def test_a_missing_bucket_stops_the_start_with_a_clear_message(tmp_path, make_service, moto_http):
    config = s3_config(tmp_path, moto_http, "no-such-bucket-here")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        await make_service(config)


async def test_an_unreachable_endpoint_stops_the_start_with_a_clear_message(tmp_path, make_service, moto_http):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = s3_config(tmp_path, moto_http, "any-bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
    with pytest.raises(StorageError, match=f"cannot reach endpoint http://127.0.0.1:{port}"):
        await make_service(config)


async def test_https_needs_the_ca_bundle_of_a_self_signed_server(tmp_path, open_s3, moto_https):
    table = moto_https.storage_options(moto_https.new_bucket(), max_attempts=1)
    table.pop("kind")
    table.pop("ca_bundle")
    storage = S3Storage(build(S3Options, table, "storage"), data_dir=tmp_path)
    with pytest.raises(StorageError, match="TLS verification failed"):
        await storage.open()
    insecure = await open_s3(moto_https, verify_tls=False)  # possible, for tests only
    await insecure.put_bytes("a/b", b"x")


@pytest.mark.parametrize("mode", ["when_required", "when_supported"])
async def test_checksum_modes_over_https(open_s3, moto_https, tmp_path, mode):
    storage = await open_s3(
        moto_https,
        request_checksum_calculation=mode,
        response_checksum_validation=mode,
        multipart_threshold="5MiB",
        multipart_part_size="5MiB",
    )
    sent: list[dict[str, str]] = []

    def record(request, **kwargs):
        sent.append({k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()})

    storage.client.meta.events.register("before-send.s3.PutObject", record)
    storage.client.meta.events.register("before-send.s3.UploadPart", record)
    await storage.put_bytes("c/small", b"payload" * 1000)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MiB))
    await storage.put_file("c/big", big)
    assert await storage.get_bytes("c/small") == b"payload" * 1000
    assert hashlib.sha256(await storage.get_bytes("c/big")).digest() == hashlib.sha256(big.read_bytes()).digest()
    assert len(sent) == 4  # one PutObject, three UploadPart
    chunked = [h for h in sent if h.get("content-encoding") == "aws-chunked" or "x-amz-trailer" in h]
    if mode == "when_required":
        # What older Ceph RGW refuses over HTTPS is never sent.
        assert sent and not chunked
        assert not any(k.startswith("x-amz-checksum-") for h in sent for k in h)
    else:
        assert chunked


async def test_large_files_go_up_in_parts_and_move_consumes_the_source(open_s3, moto_http, tmp_path):
    storage = await open_s3(moto_http, multipart_threshold="5MiB", multipart_part_size="5MiB")
    source = tmp_path / "large.bin"
    data = os.urandom(12 * MiB + 123)
    source.write_bytes(data)
    await storage.put_file("big/one.bin", source, move=True)
    assert not source.exists()
    head = await storage.client.head_object(Bucket=storage.bucket, Key=storage.object_key("big/one.bin"))
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert await storage.size("big/one.bin") == len(data)
    fetched = tmp_path / "fetched" / "one.bin"
    await storage.fetch("big/one.bin", fetched)
    assert fetched.read_bytes() == data
    assert [p.name for p in fetched.parent.iterdir()] == ["one.bin"]  # no temporary left


async def test_a_failed_multipart_upload_is_aborted(open_s3, moto_http, tmp_path, monkeypatch):
    storage = await open_s3(moto_http, multipart_threshold="5MiB", multipart_part_size="5MiB")
    source = tmp_path / "large.bin"
    source.write_bytes(os.urandom(11 * MiB))
    real = storage.client.upload_part
    calls = 0

    async def flaky(**kwargs):
        nonlocal calls
        calls += 1
        if kwargs["PartNumber"] == 2:
            raise StorageError("S3 write failed", "injected")
        return await real(**kwargs)

    monkeypatch.setattr(storage.client, "upload_part", flaky)
    with pytest.raises(StorageError, match="S3 write failed"):
        await storage.put_file("big/broken.bin", source, move=True)
    assert source.exists()  # not consumed by a failed store
    assert not await storage.exists("big/broken.bin")
    uploads = await storage.client.list_multipart_uploads(Bucket=storage.bucket)
    assert uploads.get("Uploads", []) == []


async def test_copy_delete_prefix_and_list(open_s3, moto_http, tmp_path):
    storage = await open_s3(moto_http, prefix="site/a")
    for i in range(3):
        await storage.put_bytes(f"instances/s/{i}.dcm", bytes([i]) * 10)
    await storage.copy("instances/s/1.dcm", "jobs/7/1/input/1.dcm")
    assert await storage.get_bytes("jobs/7/1/input/1.dcm") == bytes([1]) * 10
    assert await storage.list("jobs/7") == ["jobs/7/1/input/1.dcm"]
    assert await storage.list("jobs/7/1/input/1.dcm") == ["jobs/7/1/input/1.dcm"]
    assert "site/a/jobs/7/1/input/1.dcm" in moto_http.keys(storage.bucket)
    with pytest.raises(StorageError, match="object not found"):
        await storage.copy("instances/s/9.dcm", "jobs/7/1/input/9.dcm")
    assert await storage.delete_prefix("jobs/7") == 1
    assert await storage.list("jobs") == []
    assert len(await storage.list("instances")) == 3
    assert (await storage.usage()).free_bytes is None
    assert storage.local_path("instances/s/1.dcm") is None


async def test_credentials_file_and_the_aws_environment(open_s3, moto_http, tmp_path, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[other]\naws_access_key_id = {moto_http.access_key_id}\n"
        f"aws_secret_access_key = {moto_http.secret_access_key}\n"
    )
    storage = await open_s3(
        moto_http, access_key_id=None, secret_access_key=None, credentials_file=str(credentials), profile="other"
    )
    await storage.put_bytes("k/v", b"1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_http.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_http.secret_access_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    from_environment = await open_s3(moto_http, storage.bucket, access_key_id=None, secret_access_key=None)
    assert await from_environment.get_bytes("k/v") == b"1"


APP = """
import json, os, pathlib
inp = pathlib.Path(os.environ["HOLOSCAN_INPUT_PATH"])
out = pathlib.Path(os.environ["HOLOSCAN_OUTPUT_PATH"])
files = sorted(inp.iterdir())
(out / "count.txt").write_text(str(len(files)))
(out / "metadata.json").write_text(json.dumps({"instances": len(files)}))
"""


async def test_a_whole_pipeline_on_s3_storage(tmp_path, make_service, client_for, small_study, moto_http):
    app = tmp_path / "count_app.py"
    app.write_text(APP)
    bucket = moto_http.new_bucket()
    config = base_config(
        tmp_path,
        apps=[
            {
                "id": "count",
                "command": [sys.executable, str(app)],
                "arguments": False,
                "timeout": "200ms",
                "sinks": ["out"],
            }
        ],
        sinks=[{"id": "out", "kind": "folder", "path": str(tmp_path / "out")}],
    )
    config["storage"] = moto_http.storage_options(bucket, prefix="pipeline")
    service = await make_service(config)
    client = await client_for(service)
    status, answer = await upload_files(client, small_study.paths)
    assert status == 200 and answer["stored"] == len(small_study.paths)
    (job,) = await wait_jobs(client, 1, timeout=30)
    target = tmp_path / "out" / small_study.study_uid / "count"

    async def delivered():
        return (target / "count.txt").is_file() and (target / "metadata.json").is_file()

    await eventually(delivered, what="the folder sink")
    assert (target / "count.txt").read_text() == str(len(small_study.paths))
    assert job["result_data"] == {"instances": len(small_study.paths)}
    keys = moto_http.keys(bucket, "pipeline/")
    assert sum(k.startswith("pipeline/instances/") for k in keys) == len(small_study.paths)
    assert f"pipeline/results/{job['id']}/count.txt" in keys
    assert f"pipeline/logs/job-{job['id']}.log" in keys
    assert service.storage.local_path(keys[0]) is None
    health = await client.get("/health")
    assert health["storage"]["kind"] == "s3" and health["storage"]["bucket"] == bucket
    await asyncio.sleep(0)
    assert json.loads((target / "metadata.json").read_text())["instances"] == len(small_study.paths)

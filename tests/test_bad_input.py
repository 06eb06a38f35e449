"""Bad input gets a clear error, stores nothing under a bad name, and the service keeps serving."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from support import base_config, post_raw, upload_files

from mwm.client import ClientError


def rewrite(path: Path, **changes: object) -> bytes:
    """The file at ``path`` with attributes changed (``None`` deletes), written without validation."""
    ds = pydicom.dcmread(path)
    buffer = io.BytesIO()
    settings = pydicom_config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
                if keyword == "SOPInstanceUID":
                    ds.file_meta.MediaStorageSOPInstanceUID = value
        ds.save_as(buffer, enforce_file_format=True)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
    return buffer.getvalue()


def stored_files(root: Path) -> list[str]:
    """Files in the storage, leaving out its own (hidden) ones: its temporary folder, the sweep's mark."""
    relative = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    return sorted(str(r) for r in relative if not any(part.startswith(".") for part in r.parts))


@pytest.fixture
async def service_and_client(tmp_path, make_service, client_for):
    config = base_config(
        tmp_path, server={"max_upload_size": "3MB"}, apps=[{"id": "ct", "command": ["true"], "timeout": "1h"}]
    )
    service = await make_service(config)
    return service, await client_for(service)


def cases(small_study) -> list[tuple[str, bytes, str]]:
    good = small_study.paths[0]
    data = good.read_bytes()
    return [
        ("non-DICOM body", b"hello, this is certainly not DICOM" * 10, "not a DICOM Part-10 file"),
        ("empty body", b"", "not a DICOM Part-10 file"),
        ("truncated in the pixel data", data[: len(data) - 1000], "truncated file"),
        ("truncated in the header", data[:400], "truncated file"),
        ("no SOP Instance UID", rewrite(good, SOPInstanceUID=None), "missing SOP Instance UID"),
        ("no Study Instance UID", rewrite(good, StudyInstanceUID=None), "missing Study Instance UID"),
        ("path traversal UID", rewrite(good, SOPInstanceUID="../../etc"), "invalid SOP Instance UID"),
        ("path traversal series", rewrite(good, SeriesInstanceUID="1.2/../../x"), "invalid Series Instance UID"),
        ("UID of 70 characters", rewrite(good, SOPInstanceUID="1." + "2" * 68), "invalid SOP Instance UID"),
        ("UID with leading zero", rewrite(good, SOPInstanceUID="1.02.3"), "invalid SOP Instance UID"),
    ]


async def test_each_bad_instance_is_rejected_with_a_reason(service_and_client, small_study):
    service, client = service_and_client
    root = service.storage.root
    before = stored_files(root)
    for name, body, reason in cases(small_study):
        status, answer = await post_raw(client, body)
        assert status == 400, name
        assert answer["rejected"] == 1 and answer["instances"][0]["reason"] == reason, (name, answer)
        assert answer["message"] == reason
    assert stored_files(root) == before
    assert (await client.get("/v1/instances"))["instances"] == []
    assert os.listdir(service.settings.staging_dir) == []
    # The service keeps serving.
    status, answer = await upload_files(client, small_study.paths)
    assert status == 200 and answer["stored"] == len(small_study.paths)


async def test_a_multipart_upload_reports_each_instance(service_and_client, small_study):
    _, client = service_and_client
    good = small_study.paths[1].read_bytes()
    bad = b"\0" * 300
    status, answer = await client.upload([good, bad, good], params=[], headers={})
    assert status == 202
    statuses = [i["status"] for i in answer["instances"]]
    assert statuses[1] == "rejected"  # answers are in the order of the parts
    assert sorted(statuses[::2]) == ["duplicate", "stored"]  # parts are ingested concurrently
    assert (answer["stored"], answer["rejected"], answer["duplicate"]) == (1, 1, 1)


async def test_a_changed_instance_under_a_stored_uid_is_kept_out_and_said(service_and_client, small_study, caplog):
    """A corrected re-send under the same SOP Instance UID: the first copy stays the instance (it
    may be processed and delivered already), and the sender, the log and the metrics are told."""
    _service, client = service_and_client
    path = small_study.paths[2]
    first = path.read_bytes()
    corrected = rewrite(path, PatientName="Corrected^Name")
    assert (await post_raw(client, first))[0] == 200
    status, answer = await post_raw(client, first)  # the same bytes again: a plain duplicate
    assert status == 200 and answer["instances"][0]["status"] == "duplicate"
    assert "reason" not in answer["instances"][0]
    status, answer = await post_raw(client, corrected)
    (outcome,) = answer["instances"]
    assert status == 200 and outcome["status"] == "duplicate"
    assert outcome["reason"] == "already stored with other content: the first copy is kept"
    (row,) = (await client.get("/v1/instances"))["instances"]
    assert row["sha256"] == hashlib.sha256(first).hexdigest()
    assert any("received again" in r.getMessage() and "other content" in r.getMessage() for r in caplog.records)
    metrics = await (await client.session.get(client.url + "/metrics")).text()
    assert 'mwm_changed_duplicates_total{source="http"} 1.0' in metrics


async def test_oversized_upload_is_refused_with_413(service_and_client, small_study):
    service, client = service_and_client
    parts = [p.read_bytes() for p in small_study.paths] * 60  # well over 3 MB
    with pytest.raises(ClientError) as caught:
        await client.upload(parts, params=[], headers={})
    assert caught.value.status == 413 and "larger than the limit" in caught.value.message

    # Streamed without a Content-Length: refused while reading.
    async def body():
        for part in parts:
            yield part

    async with client.session.post(
        client.url + "/v1/instances", data=body(), headers={"Content-Type": "application/dicom"}
    ) as response:
        assert response.status == 413
    assert os.listdir(service.settings.staging_dir) == []
    assert (await client.get("/health"))["status"] == "ok"


@pytest.mark.parametrize("error", [-10, +10])
async def test_a_part_whose_content_length_is_wrong_is_refused(service_and_client, small_study, error):
    """A part is read by its declared length; where the delimiter does not follow, the body is
    malformed: 400, and not a byte of it stored."""
    service, client = service_and_client
    data = small_study.paths[0].read_bytes()
    body = b"--B\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n%s\r\n--B--\r\n" % (
        len(data) + error,
        data,
    )
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}
    async with client.session.post(client.url + "/v1/instances", data=body, headers=headers) as response:
        answer = await response.json()
        assert response.status == 400, answer
    assert answer["message"] == "malformed multipart body" and "Content-Length" in answer["detail"]
    assert (await client.get("/v1/instances"))["instances"] == []
    assert stored_files(service.storage.root) == [] and os.listdir(service.settings.staging_dir) == []


async def test_unknown_app_id_is_404_and_nothing_is_stored(service_and_client, small_study):
    _service, client = service_and_client
    with pytest.raises(ClientError) as caught:
        await upload_files(client, small_study.paths[:1], apps=["no-such-app"])
    assert caught.value.status == 404 and "no-such-app" in caught.value.message
    assert (await client.get("/v1/instances"))["instances"] == []


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "status"),
    [
        ("POST", "/v1/apps", b"{not json", "application/json", 400),
        ("POST", "/v1/apps", b"[1, 2]", "application/json", 400),
        ("PUT", "/v1/apps/ct", b"\xff\xfe", "application/json", 400),
        ("POST", "/v1/instances", b"x", "text/plain", 415),
        ("POST", "/v1/instances", b"--x--", "multipart/related; boundary=x", 400),
        ("GET", "/v1/jobs?limit=lots", None, None, 400),
        ("GET", "/v1/jobs?state=sleeping", None, None, 400),
        ("GET", "/v1/jobs/abc", None, None, 404),
        ("GET", "/v1/jobs/999", None, None, 404),
        ("GET", "/v1/nothing-here", None, None, 404),
        ("DELETE", "/v1/jobs", None, None, 405),
    ],
)
async def test_malformed_requests_get_json_errors(service_and_client, method, path, body, content_type, status):
    _, client = service_and_client
    headers = {"Content-Type": content_type} if content_type else {}
    async with client.session.request(method, client.url + path, data=body, headers=headers) as response:
        assert response.status == status
        answer = await response.json()
        assert answer["error"] and answer["message"]
        assert "Traceback" not in (answer.get("detail") or "")
    assert (await client.get("/health"))["status"] == "ok"


async def test_correlation_header_is_checked(service_and_client, small_study):
    _, client = service_and_client
    with pytest.raises(ClientError) as caught:
        await client.request(
            "POST",
            "/v1/instances",
            data=small_study.paths[0].read_bytes(),
            headers={"Content-Type": "application/dicom", "X-Correlation-ID": "x" * 500},
        )
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('multipart/related; type="application/dicom"; boundary=abc', ("multipart/related", "application/dicom")),
        ('Multipart/Related;boundary="a;b\\"c";TYPE=application/DICOM', ("multipart/related", "application/DICOM")),
        ("application/dicom", ("application/dicom", None)),
        ("multipart/related; boundary=x", ("multipart/related", None)),
        ("", ("", None)),
        ("multipart/related; type", ("multipart/related", None)),
    ],
)
def test_upload_content_types_are_read_like_rfc_9110(header: str, expected: tuple[str, str | None]) -> None:
    from mwm.api import media_type

    kind, parameters = media_type(header)
    assert (kind, parameters.get("type")) == expected
    if "a;b" in header:
        assert parameters["boundary"] == 'a;b"c'

"""The ``dicom`` and ``dicomweb`` sinks against real receivers: dcmtk's storescp, Orthanc, mwm."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from aiohttp import web
from peers import CT_IMAGE_STORAGE, Encoded, Orthanc, dataset_bytes, dicom_sink, free_port, results, storescu
from support import base_config, eventually

from mwm.errors import ConfigError
from mwm.options import build
from mwm.sinks import DeliveryOutcome
from mwm.sinks.dicom import store_outcome
from mwm.sinks.dicomweb import DicomWebOptions, DicomWebSink
from mwm.storage.local import LocalStorage

COPY_APP = [
    sys.executable,
    "-c",
    "import shutil, sys; shutil.copytree(sys.argv[2], sys.argv[4], dirs_exist_ok=True)",
]


def states(outcomes: Sequence[DeliveryOutcome]) -> list[str]:
    return [o.state for o in outcomes]


# -- C-STORE -----------------------------------------------------------------------------------


async def test_dicom_sink_to_storescp_sends_the_stored_bytes(tmp_path, storage, storescp, small_study, encoded):
    paths = [*small_study.paths[:3], encoded["jpeg-ls"].path, encoded["rle"].path]
    batch = await results(storage, paths)
    sink = await dicom_sink(storage, tmp_path, ae_title=storescp.ae_title, host="127.0.0.1", port=storescp.port)
    try:
        outcomes = await sink.deliver(batch)
    finally:
        await sink.close()
    assert states(outcomes) == ["delivered"] * 5 + ["skipped"]
    assert outcomes[-1].error == "not a DICOM instance"
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in storescp.files()}
    assert len(received) == 5
    for path, delivery in zip(paths, batch, strict=False):
        assert dataset_bytes(received[delivery.sop_instance_uid]) == dataset_bytes(path)


async def test_dicom_sink_to_orthanc(tmp_path, storage, orthanc: Orthanc, small_study, encoded):
    item: Encoded = encoded["j2k-lossless"]
    batch = await results(storage, [small_study.paths[5], item.path], extra_text=False)
    sink = await dicom_sink(storage, tmp_path, ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port)
    try:
        assert states(await sink.deliver(batch)) == ["delivered", "delivered"]
        assert states(await sink.deliver(batch)) == ["delivered", "delivered"]  # again: harmless
    finally:
        await sink.close()
    for delivery in batch:
        found = await orthanc.find_instance(str(delivery.sop_instance_uid))
        assert found is not None, delivery.sop_instance_uid
    found = await orthanc.find_instance(item.sop_instance_uid)
    assert found is not None
    syntax = await orthanc.request("GET", f"/instances/{found['ID']}/metadata/TransferSyntax")
    assert syntax == item.transfer_syntax_uid


async def test_dicom_sink_maps_refusals(tmp_path, storage, make_service, small_study):
    """mwm as the destination, refusing CT on one AE title: 0x0122 fails for good."""
    peer = await make_service(
        base_config(
            tmp_path / "peer",
            server={"dicom": "127.0.0.1:0"},
            dicom={"aes": [{"ae_title": "NOCT", "deny_sop_classes": [CT_IMAGE_STORAGE]}]},
        )
    )
    batch = await results(storage, small_study.paths[:2], extra_text=False)
    sink = await dicom_sink(storage, tmp_path, ae_title="NOCT", host="127.0.0.1", port=peer.dicom_port)
    try:
        outcomes = await sink.deliver(batch)
    finally:
        await sink.close()
    assert [(o.state, o.retryable) for o in outcomes] == [("failed", False)] * 2
    assert "0x0122" in str(outcomes[0].error)


async def test_dicom_sink_to_a_closed_port_fails_quickly_and_retryably(tmp_path, storage, small_study):
    batch = await results(storage, small_study.paths[:2])
    sink = await dicom_sink(storage, tmp_path, ae_title="GONE", host="127.0.0.1", port=free_port(), timeout="3s")
    started = time.monotonic()
    try:
        outcomes = await sink.deliver(batch)
    finally:
        await sink.close()
    assert time.monotonic() - started < 3
    assert [(o.state, o.retryable) for o in outcomes] == [("failed", True), ("failed", True), ("skipped", True)]
    assert "refused" in str(outcomes[0].error).lower()


async def test_dicom_sink_permanently_rejected_association_is_retried(tmp_path, storage, make_service, small_study):
    """A-ASSOCIATE-RJ "rejected-permanent" most often means the destination does not know mwm yet:
    retried, so that the results go through by themselves once it does; the message says why."""
    peer = await make_service(base_config(tmp_path / "peer", server={"dicom": "127.0.0.1:0"}))
    batch = await results(storage, small_study.paths[:1], extra_text=False)
    sink = await dicom_sink(storage, tmp_path, ae_title="UNKNOWN", host="127.0.0.1", port=peer.dicom_port)
    try:
        (outcome,) = await sink.deliver(batch)
    finally:
        await sink.close()
    assert (outcome.state, outcome.retryable) == ("failed", True)
    assert outcome.error == (
        f"UNKNOWN@127.0.0.1:{peer.dicom_port}: association rejected (permanent, service user): "
        "called ae title not recognised"
    )


@pytest.mark.parametrize(
    ("status", "state", "retryable"),
    [
        (0x0000, "delivered", True),
        (0xB000, "delivered", True),
        (0xB007, "delivered", True),
        (0xB006, "delivered", True),
        (0xA700, "failed", True),
        (0xA7FF, "failed", True),
        (0x0110, "failed", True),
        (0x0122, "failed", False),
        (0xA900, "failed", False),
        (0xC000, "failed", False),
        (0xC210, "failed", False),
    ],
)
def test_store_outcome(status, state, retryable):
    outcome = store_outcome(1, status)
    assert (outcome.state, outcome.retryable) == (state, retryable)
    if 0xB000 <= status <= 0xBFFF:
        assert f"0x{status:04X}" in str(outcome.error)


# -- STOW-RS -----------------------------------------------------------------------------------


async def dicomweb_sink(storage: LocalStorage, tmp_path: Path, **options: Any) -> DicomWebSink:
    sink = DicomWebSink("web", build(DicomWebOptions, options, "sinks[0]"), storage=storage, base_dir=tmp_path)
    await sink.open()
    return sink


async def test_dicomweb_sink_to_orthanc(tmp_path, storage, orthanc: Orthanc, small_study, encoded):
    paths = [small_study.paths[7], small_study.paths[8], encoded["jpeg-baseline"].path]
    batch = await results(storage, paths)
    sink = await dicomweb_sink(storage, tmp_path, url=orthanc.dicomweb, batch_size=2)
    try:
        outcomes = await sink.deliver(batch)
    finally:
        await sink.close()
    assert states(outcomes) == ["delivered", "delivered", "delivered", "skipped"], outcomes
    for delivery in batch[:3]:
        assert await orthanc.find_instance(str(delivery.sop_instance_uid)) is not None


@pytest.fixture
async def stow_server() -> AsyncIterator[dict[str, Any]]:
    """A STOW-RS endpoint answering what the test sets in ``state["answer"]``; records requests."""
    state: dict[str, Any] = {"answer": (200, {}), "requests": []}

    async def studies(request: web.Request) -> web.Response:
        body = await request.read()
        state["requests"].append({"headers": dict(request.headers), "size": len(body)})
        status, payload = state["answer"]
        return web.Response(status=status, text=json.dumps(payload), content_type="application/dicom+json")

    app = web.Application()
    app.router.add_post("/dicom-web/studies", studies)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state["url"] = f"http://127.0.0.1:{port}/dicom-web"
    yield state
    await runner.cleanup()


def _sop(uid: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"00081155": {"vr": "UI", "Value": [uid]}, **(extra or {})}


async def test_dicomweb_sink_reads_per_instance_outcomes(tmp_path, storage, stow_server, small_study):
    batch = await results(storage, small_study.paths[:4], extra_text=False)
    uids = [str(d.sop_instance_uid) for d in batch]
    stow_server["answer"] = (
        202,
        {
            "00081199": {
                "vr": "SQ",
                "Value": [_sop(uids[0]), _sop(uids[1], {"00081196": {"vr": "US", "Value": [0xB000]}})],
            },
            "00081198": {
                "vr": "SQ",
                "Value": [
                    _sop(uids[2], {"00081197": {"vr": "US", "Value": [0xA700]}}),
                    _sop(uids[3], {"00081197": {"vr": "US", "Value": [0xC000]}}),
                ],
            },
        },
    )
    sink = await dicomweb_sink(storage, tmp_path, url=stow_server["url"], token="s3cret-token-value")
    try:
        outcomes = await sink.deliver(batch)
    finally:
        await sink.close()
    assert [(o.state, o.retryable) for o in outcomes] == [
        ("delivered", True),
        ("delivered", True),
        ("failed", True),
        ("failed", False),
    ]
    assert "0xB000" in str(outcomes[1].error)
    (request,) = stow_server["requests"]
    assert request["headers"]["Authorization"] == "Bearer s3cret-token-value"
    assert request["headers"]["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert request["size"] == int(request["headers"]["Content-Length"])


@pytest.mark.parametrize(
    ("status", "retryable", "text"), [(401, False, "credentials"), (403, False, "credentials"), (503, True, "503")]
)
async def test_dicomweb_sink_http_failures(tmp_path, storage, stow_server, small_study, status, retryable, text):
    batch = await results(storage, small_study.paths[:2], extra_text=False)
    stow_server["answer"] = (status, {})
    sink = await dicomweb_sink(storage, tmp_path, url=stow_server["url"], username="u", password="p")
    try:
        outcomes = await sink.deliver(batch)
    finally:
        await sink.close()
    assert [(o.state, o.retryable) for o in outcomes] == [("failed", retryable)] * 2
    assert text in str(outcomes[0].error)
    assert stow_server["requests"][0]["headers"]["Authorization"].startswith("Basic ")


async def test_dicomweb_sink_token_file_is_read_at_each_request_and_must_exist_at_start(
    tmp_path, storage, stow_server, small_study
):
    token_file = tmp_path / "token"
    with pytest.raises(ConfigError, match=f"sink 'web': cannot read token_file {token_file}: No such file"):
        await dicomweb_sink(storage, tmp_path, url=stow_server["url"], token_file=str(token_file))
    token_file.write_text("first-token-value\n")
    sink = await dicomweb_sink(storage, tmp_path, url=stow_server["url"], token_file=str(token_file))
    try:
        stow_server["answer"] = (200, {})
        await sink.deliver(await results(storage, small_study.paths[:1], extra_text=False))
        token_file.write_text("rotated-token-value\n")  # a rotated token is used from the next request
        await sink.deliver(await results(storage, small_study.paths[1:2], extra_text=False))
    finally:
        await sink.close()
    assert [r["headers"]["Authorization"] for r in stow_server["requests"]] == [
        "Bearer first-token-value",
        "Bearer rotated-token-value",
    ]


async def test_dicomweb_sink_unreachable_is_retryable(tmp_path, storage, small_study):
    batch = await results(storage, small_study.paths[:1], extra_text=False)
    sink = await dicomweb_sink(storage, tmp_path, url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout="2s")
    try:
        (outcome,) = await sink.deliver(batch)
    finally:
        await sink.close()
    assert (outcome.state, outcome.retryable) == ("failed", True)


# -- in the service ----------------------------------------------------------------------------


async def test_a_destination_that_is_down_does_not_hold_up_the_folder_sink(
    tmp_path, make_service, client_for, small_study
):
    config = base_config(
        tmp_path,
        server={"dicom": "127.0.0.1:0"},
        apps=[
            {
                "id": "copy",
                "command": COPY_APP,
                "match": {"called_aet": ["MWM"]},
                "timeout": "200ms",
                "sinks": ["pacs", "out"],
            }
        ],
        sinks=[
            {
                "id": "pacs",
                "kind": "dicom",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": free_port(),
                "timeout": "2s",
            },
            {"id": "out", "kind": "folder", "path": str(tmp_path / "out")},
        ],
    )
    service = await make_service(config)
    client = await client_for(service)
    result = await storescu(service.dicom_port, small_study.paths[:3])
    assert result.returncode == 0, result.output

    async def delivered_to_folder() -> list[dict[str, Any]] | None:
        rows = (await client.get("/v1/deliveries", sink="out"))["deliveries"]
        return rows if len(rows) == 3 and all(r["state"] == "delivered" for r in rows) else None

    await eventually(delivered_to_folder, timeout=30, what="the folder sink's deliveries")

    async def retrying() -> list[dict[str, Any]] | None:
        rows = (await client.get("/v1/deliveries", sink="pacs"))["deliveries"]
        ok = len(rows) == 3 and all(r["state"] == "pending" and r["attempts"] >= 1 for r in rows)
        return rows if ok else None

    rows = await eventually(retrying, timeout=30, what="failed, retryable C-STORE deliveries")
    assert all("refused" in r["last_error"].lower() for r in rows), rows
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3

"""The DICOM SCP against real senders: dcmtk's echoscu/storescu, and pynetdicom for exact statuses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import synthetic
from peers import CT_IMAGE_STORAGE, Encoded, dataset_bytes, echoscu, storescu
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from support import base_config, eventually, python_app

from mwm.errors import StorageFull
from mwm.scp import encode_file_meta, encode_store_response
from mwm.service import Service


def scp_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    dicom = sections.pop("dicom", {})
    return base_config(tmp_path, server={"dicom": "127.0.0.1:0"}, dicom=dicom, **sections)


async def instances(client: Any) -> list[dict[str, Any]]:
    return list((await client.get("/v1/instances", limit=1000))["instances"])


def c_store(port: int, paths: Sequence[Path], *, called: str = "MWM", calling: str = "PYNETDICOM") -> list[int]:
    """Send with pynetdicom, one association; the status of each C-STORE (-1: no response)."""
    ae = AE(ae_title=calling)
    seen: set[tuple[str, str]] = set()
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        seen.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    contexts = [build_context(sop, [ts]) for sop, ts in sorted(seen)]
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title=called)
    assert assoc.is_established, "association refused"
    try:
        statuses = []
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            statuses.append(int(status.Status) if "Status" in status else -1)
        return statuses
    finally:
        assoc.release()


def scp_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mwm.scp" and r.levelno == logging.WARNING]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_path(service: Service, row: dict[str, Any]) -> Path:
    path = service.storage.local_path(row["storage_key"])
    assert path is not None and path.is_file()
    return path


# -- verification and storage ------------------------------------------------------------------


async def test_echoscu_is_answered(tmp_path, make_service):
    service = await make_service(scp_config(tmp_path))
    result = await echoscu(service.dicom_port)
    assert result.returncode == 0, result.output


async def test_storescu_study_is_stored_as_sent_with_its_origin(tmp_path, make_service, client_for, small_study):
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)
    result = await storescu(service.dicom_port, small_study.paths, calling="MODALITY1")
    assert result.returncode == 0, result.output
    rows = await instances(client)
    assert len(rows) == len(small_study.paths)
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in small_study.paths}
    for row in rows:
        assert (row["source"], row["calling_aet"], row["called_aet"]) == ("dicom", "MODALITY1", "MWM")
        assert row["peer_address"] == "127.0.0.1"
        stored = stored_path(service, row)
        assert dataset_bytes(stored) == dataset_bytes(sent[row["sop_instance_uid"]])
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == row["transfer_syntax_uid"]
        assert meta.SourceApplicationEntityTitle == "MODALITY1"
    assert list(service.ingestor.staging_dir.iterdir()) == []


TRANSFER_SYNTAXES = [
    "explicit",
    "implicit",
    "deflated",
    "jpeg-baseline",
    "jpeg-lossless",
    "jpeg-ls",
    "j2k-lossless",
    "j2k",
    "rle",
]


@pytest.mark.parametrize("name", TRANSFER_SYNTAXES)
async def test_storescu_data_set_is_stored_as_sent(name, tmp_path, make_service, client_for, encoded, storescp):
    """storescu re-encodes what it reads, so what it sent is what dcmtk's bit-preserving storescp kept."""
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)
    item: Encoded = encoded[name]
    result = await storescu(service.dicom_port, [item.path], *item.propose, "-R")
    assert result.returncode == 0, result.output
    (row,) = await instances(client)
    assert (row["sop_instance_uid"], row["transfer_syntax_uid"]) == (item.sop_instance_uid, item.transfer_syntax_uid)
    reference = await storescu(storescp.port, [item.path], *item.propose, "-R", called=storescp.ae_title)
    assert reference.returncode == 0, reference.output
    (sent,) = storescp.files()
    assert sha256(dataset_bytes(stored_path(service, row))) == sha256(dataset_bytes(sent))


def raw_send(port: int, path: Path) -> int:
    """C-STORE the data set exactly as it is in the file (pynetdicom streams it, unparsed)."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title="RAW")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MWM")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


@pytest.mark.parametrize("name", TRANSFER_SYNTAXES)
async def test_raw_data_set_is_stored_byte_for_byte(name, tmp_path, make_service, client_for, encoded):
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)
    item: Encoded = encoded[name]
    assert await asyncio.to_thread(raw_send, service.dicom_port, item.path) == 0
    (row,) = await instances(client)
    assert row["transfer_syntax_uid"] == item.transfer_syntax_uid
    assert sha256(dataset_bytes(stored_path(service, row))) == sha256(dataset_bytes(item.path))


async def test_sender_preferred_transfer_syntax_is_kept(tmp_path, make_service, client_for, encoded):
    """storescu proposes "JPEG-LS, else uncompressed" in one context: mwm takes the JPEG-LS."""
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)
    item: Encoded = encoded["jpeg-ls"]
    result = await storescu(service.dicom_port, [item.path], "-xt", "+C", "-R")
    assert result.returncode == 0, result.output
    (row,) = await instances(client)
    assert row["transfer_syntax_uid"] == item.transfer_syntax_uid


async def test_eight_concurrent_associations(tmp_path, make_service, client_for):
    study = synthetic.generate_study(
        tmp_path / "study", series_count=2, instances_per_series=16, rows=64, cols=64, seed=3
    )
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)
    chunks = [study.paths[i::8] for i in range(8)]
    results = await asyncio.gather(
        *(storescu(service.dicom_port, chunk, calling=f"SENDER{i}") for i, chunk in enumerate(chunks))
    )
    assert all(r.returncode == 0 for r in results), [r.output for r in results if r.returncode]
    rows = await instances(client)
    assert len(rows) == len(study.paths)
    assert {row["calling_aet"] for row in rows} == {f"SENDER{i}" for i in range(8)}
    await eventually(lambda: _zero(service.dicom.associations), timeout=5, what="associations closed")


async def _zero(value: int) -> bool:
    return value == 0


async def test_a_peer_with_tiny_pdus_gets_its_answers_in_fragments(tmp_path, make_service, client_for, small_study):
    """A peer whose maximum PDU length cannot hold a C-STORE response in one PDU still gets it
    (fragmented by pynetdicom) and mwm still stores what it sent."""
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)

    def send() -> list[int]:
        ae = AE(ae_title="TINY")
        ae.maximum_pdu_size = 64
        dataset = pydicom.dcmread(small_study.paths[0])
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", service.dicom_port, ae_title="MWM")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(dataset)
            return [int(status.Status) if "Status" in status else -1]
        finally:
            assoc.release()

    assert await asyncio.to_thread(send) == [0x0000]
    (row,) = await instances(client)
    assert row["sop_instance_uid"] == pydicom.dcmread(small_study.paths[0], stop_before_pixels=True).SOPInstanceUID


async def test_finished_associations_are_freed_without_full_collections(tmp_path, make_service):
    """pynetdicom's accept loop would run a full garbage collection every few seconds to free
    finished associations; mwm's does not, and they are freed all the same."""
    import gc

    from mwm import scp

    service = await make_service(scp_config(tmp_path))

    def echo_many(count: int) -> None:
        ae = AE(ae_title="ECHOER")
        ae.add_requested_context(Verification)
        for _ in range(count):
            assoc = ae.associate("127.0.0.1", service.dicom_port, ae_title="MWM")
            assert assoc.is_established
            assoc.send_c_echo()
            assoc.release()

    await asyncio.to_thread(echo_many, 300)
    await eventually(lambda: _zero(service.dicom.associations), timeout=10, what="associations closed")
    alive = sum(1 for o in gc.get_objects() if type(o) is scp._PromptAssociation)
    assert alive < 150, f"{alive} of 300 finished associations are still in memory"


async def test_arrivals_over_associations_push_the_deadline_back(tmp_path, make_service, client_for, small_study):
    """C-STOREs extend their bucket's deadline without waking the event loop's timer; the timer
    fires at the first deadline, finds the later one in the database and waits for it."""
    app = python_app("count", "pass", match={"called_aet": ["MWM"]}, grouping="study", timeout="2s")
    service = await make_service(scp_config(tmp_path, apps=[app]))
    client = await client_for(service)
    first = time.monotonic()
    for path in small_study.paths[:3]:
        assert await asyncio.to_thread(c_store, service.dicom_port, [path]) == [0x0000]
        await asyncio.sleep(1.2)
    assert time.monotonic() - first > 2.0  # the first arrival's deadline has passed
    (bucket,) = (await client.get("/v1/buckets"))["buckets"]
    assert bucket["instance_count"] == 3 and bucket["state"] == "open"
    assert (await client.get("/v1/jobs"))["jobs"] == []

    async def job() -> list[dict[str, Any]]:
        return list((await client.get("/v1/jobs"))["jobs"])

    (created,) = await eventually(job, timeout=10, what="the job")
    assert created["bucket_id"] == bucket["id"]


# -- refusals ----------------------------------------------------------------------------------


async def test_unknown_called_ae_title_is_rejected(tmp_path, make_service, client_for, small_study):
    service = await make_service(scp_config(tmp_path, dicom={"ae_titles": ["ROUTER"]}))
    client = await client_for(service)
    echo = await echoscu(service.dicom_port, called="NOBODY")
    assert echo.returncode != 0
    assert "called ae title not recognized" in echo.output.lower(), echo.output
    store = await storescu(service.dicom_port, small_study.paths[:1], called="NOBODY")
    assert store.returncode != 0
    assert await instances(client) == []
    assert (await echoscu(service.dicom_port, called="ROUTER")).returncode == 0


async def test_api_added_application_adds_its_ae_title(tmp_path, make_service, client_for):
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)
    assert (await echoscu(service.dicom_port, called="SEGMENTER")).returncode != 0
    await client.post("/v1/apps", {"id": "seg", "command": ["true"], "match": {"called_aet": ["SEGMENTER"]}})
    assert (await echoscu(service.dicom_port, called="SEGMENTER")).returncode == 0


async def test_unknown_calling_ae_title_is_rejected(tmp_path, make_service, client_for, small_study, caplog):
    sources = [{"ae_title": "KNOWN", "host": "127.0.0.1"}, {"ae_title": "ELSEWHERE", "host": "192.0.2.1"}]
    service = await make_service(scp_config(tmp_path, dicom={"sources": sources}))
    client = await client_for(service)
    for calling in ("STRANGER", "ELSEWHERE"):  # unknown; known but from another address
        result = await echoscu(service.dicom_port, calling=calling)
        assert result.returncode != 0
        assert "calling ae title not recognized" in result.output.lower(), result.output
    assert scp_warnings(caplog) == [
        "DICOM association from STRANGER@127.0.0.1 refused: unknown calling AE title 'STRANGER'",
        "DICOM association from ELSEWHERE@127.0.0.1 refused: calling AE title 'ELSEWHERE' from 127.0.0.1, "
        "expected 192.0.2.1",
    ]
    store = await storescu(service.dicom_port, small_study.paths[:1], calling="STRANGER")
    assert store.returncode != 0
    assert await instances(client) == []
    assert (await echoscu(service.dicom_port, calling="KNOWN")).returncode == 0
    assert 'mwm_dicom_associations_rejected_total{reason="calling_aet"} 3.0' in await metrics_text(client)


@contextlib.asynccontextmanager
async def holding_the_only_association(port: int) -> AsyncIterator[None]:
    """An association to mwm held open (by pynetdicom) for as long as the block runs."""
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = await asyncio.to_thread(ae.associate, "127.0.0.1", port, ae_title="MWM")
    try:
        assert held.is_established
        yield
    finally:
        await asyncio.to_thread(held.release)


async def test_too_many_associations_are_refused_transiently(tmp_path, make_service, caplog):
    service = await make_service(scp_config(tmp_path, dicom={"max_associations": 1}))
    async with holding_the_only_association(service.dicom_port):
        result = await echoscu(service.dicom_port)
        assert result.returncode != 0
        assert "local limit exceeded" in result.output.lower(), result.output
        assert scp_warnings(caplog) == [
            "DICOM association from ECHOSCU@127.0.0.1 refused: too many associations (1 open, at most 1)"
        ]
    await eventually(lambda: _zero(service.dicom.associations), timeout=5, what="association closed")
    assert (await echoscu(service.dicom_port)).returncode == 0
    assert service.metrics.dicom_associations_rejected.labels("limit")._value.get() == 1


async def test_a_rejection_pynetdicom_makes_itself_is_logged_once(tmp_path, make_service, caplog, monkeypatch):
    """pynetdicom counts associations again a moment after mwm has: what it rejects then is logged too."""
    from mwm import scp

    monkeypatch.setattr(scp, "_open_associations", lambda assoc: 1)  # as if the other one had not started yet
    service = await make_service(scp_config(tmp_path, dicom={"max_associations": 1}))
    async with holding_the_only_association(service.dicom_port):
        result = await echoscu(service.dicom_port)
        assert result.returncode != 0
        assert "local limit exceeded" in result.output.lower(), result.output
        assert scp_warnings(caplog) == ["DICOM association from ECHOSCU@127.0.0.1 refused: local limit exceeded"]


async def test_disk_pressure_refuses_new_associations_transiently(tmp_path, make_service):
    service = await make_service(scp_config(tmp_path))
    service.ingestor.pressure = "data folder is 97.0% full (limit 95%)"
    result = await echoscu(service.dicom_port)
    assert result.returncode != 0
    assert "temporary congestion" in result.output.lower(), result.output
    service.ingestor.pressure = None
    assert (await echoscu(service.dicom_port)).returncode == 0


async def test_denied_sop_class_gets_a_failure_status_and_is_not_stored(
    tmp_path, make_service, client_for, small_study, caplog
):
    aes = [
        {"ae_title": "MWM", "deny_sop_classes": [CT_IMAGE_STORAGE]},
        {"ae_title": "ONLYMR", "allow_sop_classes": ["1.2.840.10008.5.1.4.1.1.4"]},
    ]
    service = await make_service(scp_config(tmp_path, dicom={"aes": aes, "ae_titles": ["ONLYMR"]}))
    client = await client_for(service)
    for called in ("MWM", "ONLYMR"):
        statuses = await asyncio.to_thread(c_store, service.dicom_port, small_study.paths[:2], called=called)
        assert statuses == [0x0122, 0x0122]
    assert scp_warnings(caplog) == [
        f"C-STORE from PYNETDICOM@127.0.0.1 to {called} refused (0x0122): SOP class {CT_IMAGE_STORAGE} "
        "is not accepted there"
        for called in ("MWM", "MWM", "ONLYMR", "ONLYMR")
    ]
    assert await instances(client) == []
    assert list(service.ingestor.staging_dir.iterdir()) == []
    assert 'mwm_rejections_total{reason="SOP class not accepted",source="dicom"} 4.0' in await metrics_text(client)
    result = await storescu(service.dicom_port, small_study.paths[:1], "-v")
    assert result.returncode != 0
    assert "Refused: SOPClassNotSupported" in result.output, result.output


async def test_each_association_is_logged_when_accepted_and_when_closed(tmp_path, make_service, small_study, caplog):
    caplog.set_level(logging.INFO, logger="mwm.scp")
    aes = [{"ae_title": "MWM", "deny_sop_classes": ["1.2.840.10008.5.1.4.1.1.4"]}]  # MR: none here
    service = await make_service(scp_config(tmp_path, dicom={"aes": aes}))
    result = await storescu(service.dicom_port, small_study.paths[:3], calling="CT1")
    assert result.returncode == 0, result.output

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "mwm.scp" and r.levelno == logging.INFO]

    await eventually(lambda: asyncio.sleep(0, any("closed after" in line for line in lines())), what="the close")
    accepted, closed = [line for line in lines() if line.startswith("DICOM association from CT1@")]
    assert accepted == "DICOM association from CT1@127.0.0.1 to MWM accepted"
    assert re.fullmatch(
        r"DICOM association from CT1@127\.0\.0\.1 to MWM closed after \d+\.\d s: 3 instance\(s\) stored, 0 refused",
        closed,
    ), closed


async def test_an_aes_entry_for_an_ae_title_served_nowhere_else_is_warned_of(tmp_path, make_service, caplog):
    aes = [{"ae_title": "MWM", "deny_sop_classes": [CT_IMAGE_STORAGE]}, {"ae_title": "MWM_CT", "allow_sop_classes": []}]
    await make_service(scp_config(tmp_path, dicom={"aes": aes}))
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dicom.aes")]
    assert warnings == [
        "dicom.aes[1]: 'MWM_CT' is served only because of this entry (it is not server.ae_title, in"
        " dicom.ae_titles or an application's called_aet): a typo? Served: MWM"
    ]


async def test_full_disk_answers_out_of_resources_and_records_nothing(
    tmp_path, make_service, client_for, small_study, monkeypatch
):
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)

    async def full(*args: Any, **kwargs: Any) -> None:
        raise StorageFull("storage is full", "No space left on device")

    monkeypatch.setattr(service.storage, "put_file", full)

    def full_now(*args: Any, **kwargs: Any) -> bool:
        raise StorageFull("storage is full", "No space left on device")

    # The ways ingest moves received files into place: on a worker thread, or as a coroutine.
    monkeypatch.setattr(service.storage, "place_blocking", full_now)
    monkeypatch.setattr(service.storage, "put_staged", full)
    statuses = await asyncio.to_thread(c_store, service.dicom_port, small_study.paths[:3])
    assert statuses == [0xA700] * 3
    assert await instances(client) == []
    assert list(service.ingestor.staging_dir.iterdir()) == []
    monkeypatch.undo()
    statuses = await asyncio.to_thread(c_store, service.dicom_port, small_study.paths[:3])
    assert statuses == [0x0000] * 3


async def test_unparseable_data_set_is_refused_with_cannot_understand(tmp_path, make_service, client_for, caplog):
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)
    ds = Dataset()  # no Study/Series UIDs: not an instance mwm can file
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientID = "X"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"

    def send() -> int:
        ae = AE(ae_title="BROKEN")
        ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", service.dicom_port, ae_title="MWM")
        try:
            return int(assoc.send_c_store(ds).Status)
        finally:
            assoc.release()

    status = await asyncio.to_thread(send)
    assert 0xC000 <= status <= 0xCFFF
    assert await instances(client) == []
    (logged,) = scp_warnings(caplog)
    assert logged.startswith(f"C-STORE from BROKEN@127.0.0.1 to MWM refused (0x{status:04X}): "), logged


# -- a sender that goes away -------------------------------------------------------------------


def _send_then_drop(port: int, complete: Sequence[Path], partial: Path) -> list[int]:
    """C-STORE ``complete`` normally, then send part of ``partial`` and reset the connection."""
    ae = AE(ae_title="FLAKY")
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="MWM", max_pdu=4096)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in complete]
    context = assoc.accepted_contexts[0]
    request = C_STORE()
    request.MessageID = 99
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    ds = pydicom.dcmread(partial)
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    import io

    request.DataSet = io.BytesIO(dataset_bytes(partial))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(context.context_id, 4096):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    raw: socket.socket = assoc.dul.socket.socket
    for data in pdus[: len(pdus) // 2]:  # the command and half of the data set
        raw.sendall(data)
    # Reset (not close) the connection, as a crashed sender or a pulled cable would.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    assoc.kill()
    return statuses


async def test_dropped_connection_keeps_acknowledged_instances_and_nothing_else(tmp_path, make_service, client_for):
    study = synthetic.generate_study(
        tmp_path / "study", series_count=1, instances_per_series=4, rows=128, cols=128, seed=5
    )
    service = await make_service(scp_config(tmp_path))
    client = await client_for(service)
    statuses = await asyncio.to_thread(_send_then_drop, service.dicom_port, study.paths[:3], study.paths[3])
    assert statuses == [0, 0, 0]
    await eventually(lambda: _zero(service.dicom.associations), timeout=5, what="association gone")
    rows = await instances(client)
    assert len(rows) == 3
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in study.paths}
    for row in rows:
        sent = by_uid[row["sop_instance_uid"]]
        assert sha256(dataset_bytes(stored_path(service, row))) == sha256(dataset_bytes(sent))
    assert pydicom.dcmread(study.paths[3], stop_before_pixels=True).SOPInstanceUID not in {
        r["sop_instance_uid"] for r in rows
    }

    async def staging_empty() -> bool:
        return not list(service.ingestor.staging_dir.iterdir())

    await eventually(staging_empty, timeout=5, what="no half-received file left in staging")
    assert (await echoscu(service.dicom_port)).returncode == 0  # and the SCP carries on


# -- shutdown ----------------------------------------------------------------------------------


async def test_stop_refuses_new_associations_and_closes_open_ones(tmp_path, small_study):
    from mwm.config import settings_from_mapping

    service = Service(settings_from_mapping(scp_config(tmp_path)))
    await service.start()
    port = service.dicom_port
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    idle = await asyncio.to_thread(ae.associate, "127.0.0.1", port, ae_title="MWM")
    assert idle.is_established
    await asyncio.wait_for(service.stop(), 15)
    await eventually(lambda: _false(idle.is_established), timeout=5, what="idle association closed")
    result = await echoscu(port)
    assert result.returncode != 0


async def _false(value: bool) -> bool:
    return not value


# -- wire encodings ----------------------------------------------------------------------------


def test_file_meta_encoding_reads_back_with_pydicom(tmp_path):
    path = tmp_path / "meta.dcm"
    path.write_bytes(
        encode_file_meta(
            sop_class_uid=CT_IMAGE_STORAGE,
            sop_instance_uid="1.2.3.4.55",
            transfer_syntax_uid="1.2.840.10008.1.2.4.80",
            implementation_class_uid="1.2.826.0.1.3680043.9.3811.3.0.4",
            implementation_version_name="PYNETDICOM_304",
            source_ae_title="CT1",
        )
        + b"\x08\x00\x18\x00UI\x0a\x001.2.3.4.55"
    )
    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    assert meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4.55"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert meta.ImplementationVersionName == "PYNETDICOM_304"
    assert meta.SourceApplicationEntityTitle == "CT1"
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert ds.SOPInstanceUID == "1.2.3.4.55"


@pytest.mark.parametrize("comment", [None, "instance larger than the limit", "odd"])
def test_store_response_encoding_matches_pynetdicom(comment):
    from pynetdicom.dimse_messages import C_STORE_RSP

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CT_IMAGE_STORAGE
    rsp.AffectedSOPInstanceUID = "1.2.3.4.5"
    rsp.Status = 0xA700 if comment else 0
    rsp.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (expected,) = list(message.encode_msg(1, 0))
    encoded = encode_store_response(7, rsp.Status, comment or "", CT_IMAGE_STORAGE, "1.2.3.4.5")
    assert encoded is not None and b"\x03" + encoded == expected.presentation_data_value_list[0][1]


def test_error_comments_are_ascii_without_backslashes_and_at_most_64_characters():
    from mwm.scp import _comment

    assert _comment("cannot write /données\\x") == "cannot write /donn?es/x"
    assert len(_comment("x" * 100)) == 64


def _stall_mid_pdu(port: int) -> socket.socket:
    """Associate, then send the first bytes of a PDU and nothing more (the socket stays open)."""
    ae = AE(ae_title="STALLER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MWM")
    assert assoc.is_established
    raw: socket.socket = assoc.dul.socket.socket
    raw.sendall(b"\x04\x00\x00\x00\x10\x00")  # a P-DATA-TF header announcing 4096 bytes
    return raw


async def test_a_peer_stalled_mid_pdu_is_cut_off_after_the_network_timeout(tmp_path, make_service):
    service = await make_service(scp_config(tmp_path, dicom={"network_timeout": "1s"}))
    raw = await asyncio.to_thread(_stall_mid_pdu, service.dicom_port)
    try:
        assert service.dicom.associations == 1
        await eventually(lambda: _zero(service.dicom.associations), timeout=10, what="the stalled association cut off")
        assert (await echoscu(service.dicom_port)).returncode == 0
    finally:
        raw.close()


async def stop_during_a_c_store(
    config: dict[str, Any],
    study: Any,
    make_service: Any,
    client_for: Any,
    arm: Callable[[Service, Callable[[], None]], None],
) -> None:
    """Send one instance, stop the service at the point ``arm`` marks, and check that the peer
    was told success and that the instance is there after a restart."""
    from mwm.config import settings_from_mapping

    service = Service(settings_from_mapping(config))
    await service.start()
    reached = asyncio.Event()
    loop = asyncio.get_running_loop()
    arm(service, lambda: loop.call_soon_threadsafe(reached.set))
    sending = asyncio.create_task(asyncio.to_thread(c_store, service.dicom_port, study.paths[:1]))
    await asyncio.wait_for(reached.wait(), 10)
    await service.stop()
    assert await sending == [0x0000]
    restarted = await make_service(config)
    client = await client_for(restarted)
    assert len(await instances(client)) == 1


async def test_stop_lets_a_c_store_in_progress_finish(tmp_path, make_service, client_for, small_study):
    def arm(service: Service, reached: Callable[[], None]) -> None:
        original = service.ingestor.ingest_blocking

        def slow(*args: Any, **kwargs: Any) -> Any:  # on the association's thread
            reached()
            time.sleep(0.5)
            return original(*args, **kwargs)

        service.ingestor.ingest_blocking = slow  # type: ignore[method-assign]

    await stop_during_a_c_store(scp_config(tmp_path), small_study, make_service, client_for, arm)


async def test_stop_never_overtakes_a_response_on_its_way_out(
    tmp_path, make_service, client_for, small_study, monkeypatch
):
    """The handler has returned (the instance is recorded) but its response is not yet queued:
    stop's abort must wait for it, or the peer never hears that mwm has the instance."""
    from mwm import scp

    command_pdu = scp._command_pdu

    def arm(service: Service, reached: Callable[[], None]) -> None:
        def slow_response(context_id: int, command: bytes) -> bytes:  # on the DUL thread, after the handler
            reached()
            time.sleep(0.5)
            return command_pdu(context_id, command)

        monkeypatch.setattr(scp, "_command_pdu", slow_response)

    await stop_during_a_c_store(scp_config(tmp_path), small_study, make_service, client_for, arm)


async def metrics_text(client) -> str:
    async with client.session.get(client.url + "/metrics") as response:
        return await response.text()

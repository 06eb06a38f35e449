"""The ``dicom`` sink's presentation contexts against destinations that accept little.

The destinations are real: pynetdicom SCPs started here (on 127.0.0.1, ports the kernel
chooses) that support only the SOP classes and transfer syntaxes a test gives them, dcmtk's
storescp restricted to implicit VR little endian, and bare TCP peers that misbehave during
association negotiation.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
import pytest
from peers import (
    CT_IMAGE_STORAGE,
    StoreScp,
    convert,
    dataset_bytes,
    dcmtk,
    dicom_sink,
    free_port,
    new_uid_copy,
    peer_env,
    port_open,
    results,
    stop_process,
    wait_for,
)
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE

from mwm.sinks import DeliveryOutcome
from mwm.sinks.dicom import proposed_syntaxes
from mwm.storage.local import LocalStorage

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
WORD_VRS = {"OW", "OF", "OL", "OD", "OV"}
VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
    b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
    b"UR", b"US", b"UT", b"UV",
}  # fmt: skip


# -- peers -------------------------------------------------------------------------------------


@dataclass
class Peer:
    """A pynetdicom storage SCP: what it was proposed and what it received (as Part-10 files)."""

    port: int = 0
    ae_title: str = "PACS"
    proposed: list[list[tuple[str, list[str]]]] = field(default_factory=list)
    received: dict[str, Path] = field(default_factory=dict)


@contextlib.contextmanager
def scp(folder: Path, supported: dict[str, Sequence[str]], *, maximum_associations: int = 10) -> Iterator[Peer]:
    """A storage SCP supporting exactly ``supported`` (SOP class: transfer syntaxes)."""
    folder.mkdir(parents=True, exist_ok=True)
    peer = Peer()
    ae = AE(ae_title=peer.ae_title)
    ae.maximum_associations = maximum_associations
    for sop_class, syntaxes in supported.items():
        ae.add_supported_context(sop_class, list(syntaxes))

    def on_requested(event: evt.Event) -> None:
        contexts = event.assoc.requestor.requested_contexts
        peer.proposed.append([(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax]) for cx in contexts])

    def on_store(event: evt.Event) -> int:
        uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        path = folder / f"{uid}.dcm"
        path.write_bytes(event.encoded_dataset())  # the data set as received, after its file meta
        peer.received[uid] = path
        return 0x0000

    handlers: list[Any] = [(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    assert server is not None
    peer.port = server.server_address[1]
    try:
        yield peer
    finally:
        server.shutdown()


async def deliver_to(peer: Peer, storage: LocalStorage, tmp_path: Path, batch: Any) -> list[DeliveryOutcome]:
    """``batch`` delivered by a ``dicom`` sink to ``peer``, over one association."""
    sink = await dicom_sink(storage, tmp_path, ae_title=peer.ae_title, host="127.0.0.1", port=peer.port)
    try:
        return await sink.deliver(batch)
    finally:
        await sink.close()


@contextlib.contextmanager
def misbehaving_peer(answer: bytes | None, *, close: bool) -> Iterator[int]:
    """A TCP peer that reads the association request, then sends ``answer`` (if any) and closes
    the connection (``close``) or says nothing more."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                if answer is not None:
                    connection.sendall(answer)
                if not close:
                    stop.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(10)
        server.close()


@pytest.fixture
def implicit_storescp(tmp_path: Path) -> Iterator[StoreScp]:
    """dcmtk's storescp accepting implicit VR little endian only (``+xi``), writing what it
    receives in the transfer syntax it was received in."""
    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    log = tmp_path / "storescp.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [dcmtk("storescp"), "--aetitle", "PACS", "+xi", "--output-directory", str(folder), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=peer_env(),
        )
    try:
        wait_for(lambda: port_open(port), process, "storescp", log)
        yield StoreScp(port, folder, ae_title="PACS")
    finally:
        stop_process(process)


# -- test data ---------------------------------------------------------------------------------


def segmentation_from(source: Path, dest: Path) -> Path:
    """An instance of the Segmentation Storage SOP class (its content is never sent)."""
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SEGMENTATION_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.save_as(dest, enforce_file_format=True)
    return dest


def big_endian_with_a_private_un(source: Path, dest: Path) -> Path:
    """Explicit VR big endian, with a private element whose VR (UN) gives no byte order."""
    ds = pydicom.dcmread(convert("dcmconv", ["+tb"], source, dest))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    block = ds.private_block(0x0011, "MWM TEST", create=True)
    block.add_new(0x01, "UN", b"\x01\x02\x03\x04")
    ds.save_as(dest, enforce_file_format=True)
    return dest


def first_vr(data: bytes) -> bytes | None:
    """The VR of the first element of an encoded data set, or None if it is implicit VR."""
    return data[4:6] if data[4:6] in VRS else None


def assert_same_data_set(stored: Dataset, received: Dataset) -> None:
    """Element by element, nested ones too, the same tags, VRs and values. Words held as bytes
    (OW, OF, ...) differ between byte orders: pixel data are compared decoded."""
    swapped = stored.original_encoding[1] != received.original_encoding[1]
    ours = [e for e in stored.iterall() if e.tag.element != 0]  # group lengths depend on the encoding
    theirs = [e for e in received.iterall() if e.tag.element != 0]
    assert [e.tag for e in theirs] == [e.tag for e in ours]
    for mine, got in zip(ours, theirs, strict=True):
        assert got.VR == mine.VR, mine.tag
        if mine.VR == "SQ" or (swapped and mine.VR in WORD_VRS):
            continue  # items: compared element by element; words: below
        assert got.value == mine.value, mine.tag
    assert np.array_equal(received.pixel_array, stored.pixel_array)


def outcome_of(outcomes: Sequence[DeliveryOutcome]) -> list[tuple[str, bool]]:
    return [(o.state, o.retryable) for o in outcomes]


# -- proposals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "proposed"),
    [
        (ExplicitVRLittleEndian, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
        (ImplicitVRLittleEndian, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        (ExplicitVRBigEndian, [ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
        (
            DeflatedExplicitVRLittleEndian,
            [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        ),
        (JPEGBaseline8Bit, [JPEGBaseline8Bit]),
        (JPEGLSLossless, [JPEGLSLossless]),
        (RLELossless, [RLELossless]),
        ("1.2.840.10008.1.2.4.90", ["1.2.840.10008.1.2.4.90"]),  # JPEG 2000 lossless
    ],
)
def test_proposed_syntaxes(stored, proposed):
    assert proposed_syntaxes(stored) == proposed


# -- conversion --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "accepted"),
    [
        ("explicit", ImplicitVRLittleEndian),
        ("deflated", ImplicitVRLittleEndian),
        ("big-endian", ImplicitVRLittleEndian),
        ("big-endian-mr", ImplicitVRLittleEndian),
        ("implicit", ExplicitVRLittleEndian),
    ],
)
async def test_uncompressed_result_is_sent_in_the_transfer_syntax_the_destination_accepts(
    tmp_path, storage, encoded, kind, accepted
):
    if kind == "big-endian":
        path = convert("dcmconv", ["+tb"], encoded["explicit"].path, tmp_path / "big-endian.dcm")
    elif kind == "big-endian-mr":
        path = new_uid_copy(Path(get_testdata_file("MR_small_bigendian.dcm")), tmp_path / "mr-big-endian.dcm")
    else:
        path = encoded[kind].path
    stored = pydicom.dcmread(path)
    stored_syntax = str(stored.file_meta.TransferSyntaxUID)
    assert stored_syntax != accepted
    batch = await results(storage, [path], extra_text=False)
    with scp(tmp_path / "peer", {CT_IMAGE_STORAGE: [accepted], MR_IMAGE_STORAGE: [accepted]}) as peer:
        outcomes = await deliver_to(peer, storage, tmp_path, batch)
    assert [(o.state, o.error) for o in outcomes] == [("delivered", None)]
    assert peer.proposed == [[(str(stored.SOPClassUID), proposed_syntaxes(stored_syntax))]]
    received_path = peer.received[str(stored.SOPInstanceUID)]
    received = pydicom.dcmread(received_path)
    assert received.file_meta.TransferSyntaxUID == accepted
    expected_vr = None if accepted == ImplicitVRLittleEndian else received[min(received.keys())].VR.encode()
    assert first_vr(dataset_bytes(received_path)) == expected_vr  # really encoded so, not just labelled
    assert received.original_encoding == (accepted.is_implicit_VR, True)
    assert_same_data_set(stored, received)


async def test_implicit_only_storescp_receives_explicit_results_and_never_decompressed_ones(
    tmp_path, storage, encoded, implicit_storescp
):
    """dcmtk's storescp accepting implicit VR little endian only, as some PACS do."""
    paths = [encoded["explicit"].path, encoded["jpeg-ls"].path, encoded["deflated"].path]
    batch = await results(storage, paths, extra_text=False)
    sink = await dicom_sink(
        storage, tmp_path, ae_title=implicit_storescp.ae_title, host="127.0.0.1", port=implicit_storescp.port
    )
    try:
        outcomes = await sink.deliver(batch)
    finally:
        await sink.close()
    assert outcome_of(outcomes) == [("delivered", True), ("failed", False), ("delivered", True)]
    assert outcomes[1].error == (
        "the destination accepts no presentation context for CT Image Storage (1.2.840.10008.5.1.4.1.1.2) "
        "in JPEG-LS Lossless Image Compression"
    )
    received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in implicit_storescp.files()}
    assert sorted(received) == sorted([encoded["explicit"].sop_instance_uid, encoded["deflated"].sop_instance_uid])
    for name in ("explicit", "deflated"):
        got = pydicom.dcmread(received[encoded[name].sop_instance_uid])
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert_same_data_set(pydicom.dcmread(encoded[name].path), got)


async def test_a_result_that_cannot_be_converted_losslessly_fails_for_good(tmp_path, storage, encoded):
    path = big_endian_with_a_private_un(encoded["explicit"].path, tmp_path / "big-endian-un.dcm")
    batch = await results(storage, [path], extra_text=False)
    with scp(tmp_path / "peer", {CT_IMAGE_STORAGE: [ImplicitVRLittleEndian]}) as peer:
        (outcome,) = await deliver_to(peer, storage, tmp_path, batch)
    assert (outcome.state, outcome.retryable) == ("failed", False)
    assert outcome.error == (
        "cannot convert the stored result to Implicit VR Little Endian: "
        "the byte order of (0011,1001) (VR UN) is unknown"
    )
    assert peer.received == {}


# -- no presentation context -------------------------------------------------------------------


async def test_segmentation_to_a_ct_only_destination_fails_for_good(tmp_path, storage, encoded):
    """The only context proposed is refused: the association cannot be used at all."""
    seg = segmentation_from(encoded["explicit"].path, tmp_path / "seg.dcm")
    batch = await results(storage, [seg], extra_text=False)
    with scp(tmp_path / "peer", {CT_IMAGE_STORAGE: UNCOMPRESSED}) as peer:
        (outcome,) = await deliver_to(peer, storage, tmp_path, batch)
    assert (outcome.state, outcome.retryable) == ("failed", False)
    assert outcome.error == (
        "the destination accepts no presentation context for Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4) "
        "in Explicit VR Little Endian or Implicit VR Little Endian"
    )
    assert peer.proposed == [[(SEGMENTATION_STORAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]]
    assert peer.received == {}


async def test_a_refused_sop_class_fails_for_good_and_the_rest_of_the_batch_is_delivered(tmp_path, storage, encoded):
    seg = segmentation_from(encoded["explicit"].path, tmp_path / "seg.dcm")
    paths = [encoded["explicit"].path, seg, encoded["rle"].path, encoded["implicit"].path]
    batch = await results(storage, paths, extra_text=False)
    with scp(tmp_path / "peer", {CT_IMAGE_STORAGE: [ExplicitVRLittleEndian, ImplicitVRLittleEndian]}) as peer:
        outcomes = await deliver_to(peer, storage, tmp_path, batch)
    assert outcome_of(outcomes) == [("delivered", True), ("failed", False), ("failed", False), ("delivered", True)]
    assert "Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4)" in str(outcomes[1].error)
    assert str(outcomes[2].error).endswith("for CT Image Storage (1.2.840.10008.5.1.4.1.1.2) in RLE Lossless")
    (proposed,) = peer.proposed
    assert (CT_IMAGE_STORAGE, [RLELossless]) in proposed  # a compressed result: its own syntax only
    assert sorted(peer.received) == sorted(str(batch[n].sop_instance_uid) for n in (0, 3))
    explicit = peer.received[str(batch[0].sop_instance_uid)]  # accepted as stored: the stored bytes
    assert dataset_bytes(explicit) == dataset_bytes(paths[0])
    implicit = pydicom.dcmread(peer.received[str(batch[3].sop_instance_uid)])  # in the peer's choice
    assert_same_data_set(pydicom.dcmread(paths[3]), implicit)


# -- the association itself --------------------------------------------------------------------


async def test_a_transient_rejection_is_retryable(tmp_path, storage, encoded):
    batch = await results(storage, [encoded["explicit"].path], extra_text=False)
    with scp(tmp_path / "peer", {CT_IMAGE_STORAGE: UNCOMPRESSED}, maximum_associations=1) as peer:
        other = AE(ae_title="OTHER")
        other.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
        busy = other.associate("127.0.0.1", peer.port, ae_title=peer.ae_title)
        assert busy.is_established
        try:
            (outcome,) = await deliver_to(peer, storage, tmp_path, batch)
        finally:
            busy.release()
    assert (outcome.state, outcome.retryable) == ("failed", True)
    assert outcome.error == (
        f"PACS@127.0.0.1:{peer.port}: association rejected (transient, service provider (presentation)): "
        "local limit exceeded"
    )


A_ABORT_RQ = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 2, 0)  # source 2: service provider


@pytest.mark.parametrize(
    ("answer", "close", "timeout", "error"),
    [
        (A_ABORT_RQ, True, "5s", "the destination aborted the association request (service provider)"),
        (None, True, "5s", "the destination closed the connection during association negotiation"),
        (None, False, "1s", "no answer to the association request within 1 s"),
    ],
    ids=["abort", "closed", "silent"],
)
async def test_association_failures_are_retryable_and_say_what_happened(
    tmp_path, storage, encoded, answer, close, timeout, error
):
    batch = await results(storage, [encoded["explicit"].path], extra_text=False)
    with misbehaving_peer(answer, close=close) as port:
        sink = await dicom_sink(storage, tmp_path, ae_title="PACS", host="127.0.0.1", port=port, timeout=timeout)
        started = time.monotonic()
        try:
            (outcome,) = await sink.deliver(batch)
        finally:
            await sink.close()
    assert time.monotonic() - started < 5
    assert (outcome.state, outcome.retryable) == ("failed", True)
    assert outcome.error == f"PACS@127.0.0.1:{port}: {error}"

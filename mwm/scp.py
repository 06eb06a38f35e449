"""The DICOM SCP: C-ECHO and C-STORE into the one ingest path.

pynetdicom runs each association on its own threads. The C-STORE handler only hands the
received file to the event loop (``Ingestor.ingest_file``), waits for the commit and answers
with the outcome's DICOM status. The data set is never decoded: as its fragments arrive they are
written to ``<staging>/<random>.dcm`` behind a preamble and a File Meta Information naming the
transfer syntax negotiated for the presentation context, so the file holds exactly the bytes
that were sent, and memory stays bounded by one PDU per association whatever the size.

Statuses sent back (PS3.4 B.2.3, PS3.7 C):

======  ==========================================================================
0x0000  stored, or already stored (a duplicate SOP Instance UID)
0x0122  refused: the SOP class is not accepted by the called AE title (``dicom.aes``)
0xA700  refused, out of resources: storage or database failure, disk full, mwm
        stopping, instance larger than ``server.max_instance_size`` -- try later
0xC210  cannot understand: not a parsable DICOM data set (missing or invalid UIDs, ...)
======  ==========================================================================

Associations are refused at negotiation with the standard reasons: an unknown called AE title
(rejected permanent, service user, "called AE title not recognised"), an unknown calling AE
title or a known one from another address when ``dicom.sources`` are enforced ("calling AE
title not recognised"), and more than ``dicom.max_associations`` at once (rejected transient,
service provider, "local limit exceeded"); each refusal is logged once, with the calling AE
title and the peer's address. Where a sender proposes several transfer syntaxes in one
presentation context, its own order of preference wins, so nothing is converted for mwm.

Source hosts. A source's ``host`` is an IP address, used as it is, or a host name, resolved on a
thread of its own (never on the event loop) at start-up and again when an association from that
AE title arrives and the last answer is older than ``RESOLVE_INTERVAL`` (``RETRY_INTERVAL`` after
a failure). A name that does not resolve is logged and its AE title refused until it does; a
failed lookup of a name that resolved before keeps its last addresses. Only a ``host`` that is
neither a host name nor an address is a configuration error.

Speed. Out of the box pynetdicom polls: its DUL thread sleeps 1 ms whenever the socket has no
data and its association thread sleeps 1 ms on every turn, so each C-STORE waits about 2 ms
for nothing; and it builds the file meta and the C-STORE response through pydicom data sets
(about 0.9 ms of CPU per instance, under the GIL). ``_PromptAssociation`` keeps pynetdicom's
state machine and replaces only that: the DUL thread blocks in ``select`` on the socket and on
a wake-up socket pair signalled when a primitive is queued for it; the association thread
blocks on its DIMSE message queue, which pynetdicom feeds on every message and abort (and now
on a release request); PDUs are read whole with ``MSG_WAITALL``; the file meta and the plain
C-STORE response are encoded directly. These classes rely on pynetdicom 3.0 internals; with
another version the stock classes are used (slower) and a warning is logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import ipaddress
import logging
import os
import queue
import re
import select
import shutil
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_RELEASE, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from .errors import ConfigError
from .ingest import Origin, Outcome, Received
from .metrics import Metrics

if TYPE_CHECKING:
    from .apps import AppRegistry
    from .config import DicomAe, DicomSource, Settings
    from .ingest import Ingestor

log = logging.getLogger(__name__)

#: Transfer syntaxes accepted for every storage SOP class, in the order mwm prefers them. The
#: bytes are stored as received, so accepting a compressed syntax costs nothing here.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_REFUSED = 0x0122  # Refused: SOP Class Not Supported (PS3.7 C.5.3)
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (PS3.4 B.2.3)
STATUS_CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (PS3.4 B.2.3)

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CONGESTION = (0x02, 0x03, 0x01)  # transient, service provider (presentation), temporary congestion
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded

#: How long the addresses a source's host name resolved to are used before it is resolved again
#: (when an association from its AE title arrives), and how soon a name that could not be
#: resolved is tried again.
RESOLVE_INTERVAL = 60.0
RETRY_INTERVAL = 10.0
#: Longest an association request (or start-up) waits for a name being resolved; the lookup
#: carries on, and its answer serves the associations after it.
RESOLVE_WAIT = 5.0

#: How long the pynetdicom threads of an idle association sleep between checks of their timers
#: (network idle timeout, ARTIM). Data, responses, releases and aborts wake them at once.
IDLE_WAIT = 0.05
#: The accept loop's poll interval: bounds how long ``stop`` waits for it to notice.
ACCEPT_POLL = 0.05
#: Longest the pynetdicom threads may take to end after an A-ABORT at shutdown.
ABORT_GRACE = 5.0

_PROMPT = pynetdicom.__version__.startswith("3.0.")
_MSG_WAITALL = getattr(socket, "MSG_WAITALL", 0)


# -- wire encodings: the few fixed structures mwm writes itself ---------------------------------

#: Explicit VR elements whose length field is 4 bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", 0x0002, element)
    if vr in _LONG_VRS:
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def encode_file_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str,
    source_ae_title: str,
) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) of a received instance.

    Written by hand because pydicom's encoder costs about half a millisecond per instance; the
    tests compare the result with pydicom's reading of it.
    """
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\0\1"),
            _explicit(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
            _explicit(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
            _explicit(0x0010, b"UI", _padded(transfer_syntax_uid, b"\0")),
            _explicit(0x0012, b"UI", _padded(implementation_class_uid, b"\0")),
            _explicit(0x0013, b"SH", _padded(implementation_version_name, b" ")),
            *((_explicit(0x0016, b"AE", _padded(source_ae_title, b" ")),) if source_ae_title else ()),
        )
    )
    return b"\0" * 128 + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _implicit(group_element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, group_element, len(value)) + value


def encode_store_response(
    message_id: int, status: int, comment: str, sop_class_uid: str, sop_instance_uid: str
) -> bytes | None:
    """The command set of a C-STORE-RSP (Implicit VR Little Endian, PS3.7 9.3.1.2) from its fields;
    None where they cannot be encoded. Written by hand: pydicom takes a third of a millisecond."""
    try:
        elements = [
            _implicit(0x0002, _padded(sop_class_uid, b"\0")) if sop_class_uid else b"",
            _implicit(0x0100, struct.pack("<H", 0x8001)),
            _implicit(0x0120, struct.pack("<H", message_id)),
            _implicit(0x0800, struct.pack("<H", 0x0101)),
            _implicit(0x0900, struct.pack("<H", status)),
            _implicit(0x0902, _padded(comment, b" ")) if comment else b"",
            _implicit(0x1000, _padded(sop_instance_uid, b"\0")) if sop_instance_uid else b"",
        ]
    except (UnicodeEncodeError, struct.error):
        return None
    body = b"".join(elements)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def _command_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU carrying a whole command set in one PDV (last fragment of a command)."""
    return struct.pack(">BBIIBB", 0x04, 0x00, len(command) + 6, len(command) + 2, context_id, 0x03) + command


# -- prompt association: pynetdicom's state machine, with blocking waits instead of polling ----


class _WakeUp:
    """A socket pair a thread can ``select`` on, signalled by other threads."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self._closed = False

    def set(self) -> None:
        if self._closed:
            return
        try:
            self.writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already signalled (buffer full) or closing: either way the waiter wakes

    def clear(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self._closed = True
        self.reader.close()
        self.writer.close()


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that wakes the DUL thread when another thread puts something on it."""

    def __init__(self, wake: _WakeUp, owner: threading.Thread) -> None:
        super().__init__()
        self._wake = wake
        self._owner = owner

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if threading.current_thread() is not self._owner:
            self._wake.set()


class _UserQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue to the association thread: a release request also wakes that thread."""

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if isinstance(item, A_RELEASE):
            # (None, None) is what pynetdicom itself queues to wake the reactor on an abort.
            self._assoc.dimse.msg_queue.put((None, None))


class _PromptSocket(AssociationSocket):
    """``ready`` waits (boundedly) for data or a wake-up rather than answering at once."""

    def __init__(self, assoc: Association, client_socket: socket.socket, wake: _WakeUp) -> None:
        self._wake = wake
        super().__init__(assoc, client_socket=client_socket)

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or not self._is_connected:
            # pynetdicom's own pace when there is nothing to wait on (the DUL is about to stop).
            time.sleep(0.001)
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        dul = self.assoc.dul
        busy = not dul.event_queue.empty() or not dul.to_provider_queue.empty() or dul._kill_thread
        try:
            readable, _, _ = select.select([sock, self._wake.reader], [], [], 0 if busy else IDLE_WAIT)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self._wake.reader in readable:
            self._wake.clear()
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only when the peer closes), in as few calls as possible.

        ``MSG_WAITALL`` lets the kernel gather a whole PDU in one call (one release of the GIL
        instead of one per network segment); TLS sockets take no flags.
        """
        sock = cast(socket.socket, self.socket)
        flags = 0 if isinstance(sock, ssl.SSLSocket) else _MSG_WAITALL
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        done = 0
        while done < nr_bytes:
            count = sock.recv_into(view[done:], nr_bytes - done, flags)
            if not count:
                del view
                return buffer[:done]
            done += count
        return buffer


@dataclass(frozen=True)
class _Staging:
    """Where received data sets go (a new file name in the staging folder), and the largest one accepted."""

    new_path: Callable[[], Path]
    max_size: int


def _write_fully(file: io.FileIO, data: Any) -> None:
    """Write all of ``data`` to an unbuffered file (a short write is retried with the rest)."""
    view = memoryview(data).cast("B")
    while view:
        written = file.write(view)
        if written is None:  # a non-blocking file that would block: not a regular file
            raise OSError("the staging file would block")
        view = view[written:]


class _StagedDataSet(io.BytesIO):
    """A C-STORE data set written to the staging folder as its fragments arrive.

    pynetdicom appends each received fragment with ``write``; the first one of a C-STORE-RQ
    opens ``<staging>/<random>.dcm`` and writes the preamble and File Meta Information (with
    the transfer syntax negotiated for the presentation context) before it, so the file is the
    Part-10 form of exactly what was sent. Other messages' data sets stay in memory as usual.
    A write error or an instance over the size limit is remembered (``error``) and the rest
    dropped, so the association carries on and the C-STORE gets a failure status.
    """

    def __init__(self, message: DIMSEMessage, assoc: Association, staging: _Staging) -> None:
        super().__init__()
        self._message = message
        self._assoc = assoc
        self._staging = staging
        self._started = False
        self._file: Any = None
        self.path: Path | None = None
        self.size = 0
        self.error: str | None = None
        self.error_status = STATUS_OUT_OF_RESOURCES
        # Hashed as it arrives, on the thread reading the network, so nothing is left to read back.
        self._digest = hashlib.sha256()

    def _start(self) -> None:
        self._started = True
        message = self._message
        command = message.command_set
        if command.get("CommandField") != 0x0001:  # not a C-STORE-RQ
            return
        context = self._assoc._accepted_cx.get(cast(int, message.context_id))
        if context is None:
            return
        ae = self._assoc.ae
        self.path = self._staging.new_path()
        try:
            meta = encode_file_meta(
                sop_class_uid=str(command.AffectedSOPClassUID).rstrip("\0 "),
                sop_instance_uid=str(command.AffectedSOPInstanceUID).rstrip("\0 "),
                transfer_syntax_uid=str(context.transfer_syntax[0]),
                implementation_class_uid=str(ae.implementation_class_uid),
                implementation_version_name=str(ae.implementation_version_name or ""),
                source_ae_title=str(self._assoc.requestor.ae_title).strip(),
            )
        except (UnicodeEncodeError, AttributeError, struct.error):
            self.error = "the C-STORE request has unusable SOP Class or Instance UIDs"
            self.error_status = STATUS_CANNOT_UNDERSTAND
            return
        try:
            # Unbuffered: each fragment goes to the file as it arrives, in one system call, without
            # a copy through a buffer (a fresh 256 KiB buffer per file cost more than it saved).
            self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in finish/discard
            _write_fully(self._file, meta)
            self._digest.update(meta)
        except OSError as exc:
            self._fail(f"cannot write the received instance: {exc.strerror or exc}")

    def write(self, data: Any) -> int:
        if not self._started:
            self._start()
        if self.path is None:
            return super().write(data)
        count = len(data)
        self.size += count
        if self.error is None:
            if self.size > self._staging.max_size:
                self._fail(f"instance larger than the limit of {self._staging.max_size} bytes")
            else:
                try:
                    _write_fully(self._file, data)
                    self._digest.update(data)
                except OSError as exc:
                    self._fail(f"cannot write the received instance: {exc.strerror or exc}")
        return count

    def _fail(self, reason: str) -> None:
        self.error = reason
        self.discard()

    def finish(self) -> Path:
        """Close the file; the caller owns it from here."""
        assert self.path is not None and self._file is not None
        self._file.close()
        return self.path

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def discard(self) -> None:
        """Close and remove the file (an aborted transfer, a refused or failed instance)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass
class _Tally:
    """What one accepted association brought, for its closing log line."""

    opened: float = field(default_factory=time.monotonic)
    stored: int = 0
    refused: int = 0


def _association_correlation_id(assoc: Association) -> str:
    """One correlation id for everything sent over one association (made at its first C-STORE)."""
    correlation_id = getattr(assoc, "_mwm_correlation_id", None)
    if correlation_id is None:
        correlation_id = uuid.uuid4().hex
        assoc._mwm_correlation_id = correlation_id  # type: ignore[attr-defined]
    return str(correlation_id)


class _ServingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE provider's queue of received messages: a C-STORE request whose data set is staged
    is served by the thread putting it (the DUL's); everything else waits for the association thread."""

    def __init__(self, dimse: _StagingDIMSE) -> None:
        super().__init__()
        self._dimse = dimse

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, message = item
        if (
            type(message) is C_STORE
            and isinstance(message.DataSet, _StagedDataSet)
            and message.MessageIDBeingRespondedTo is None
            and self._dimse.serve_store(cast(int, context_id), message)
        ):
            return
        super().put(item, block, timeout)


class _StagingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, receiving C-STORE data sets into staging files and answering
    them where they complete (``serve_store``)."""

    def __init__(self, assoc: Association, staging: _Staging) -> None:
        super().__init__(assoc)
        self._staging = staging
        self.msg_queue = _ServingQueue(self)
        #: What answers a C-STORE (``DicomServer._on_store``); None: pynetdicom's service classes do.
        self.store_handler: Callable[[evt.Event], int | Dataset] | None = None

    def serve_store(self, context_id: int, request: C_STORE) -> bool:
        """Answer a C-STORE request whose data set is staged, here on the DUL thread that has
        just received its last fragment: no hand-over to the association thread and back. The
        response is written to the socket before this thread reads or sends anything else.
        False (nothing done) when the request must take pynetdicom's usual way."""
        handler = self.store_handler
        assoc = self.assoc
        context = assoc._accepted_cx.get(context_id)
        if handler is None or context is None or request.MessageID is None:
            return False
        try:
            answer = handler(evt.Event(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple}))
        except Exception:
            log.exception("C-STORE handler raised")
            answer = STATUS_OUT_OF_RESOURCES
        if isinstance(answer, Dataset):
            status, comment = int(answer.Status), str(answer.get("ErrorComment", "") or "")
        else:
            status, comment = int(answer), ""
        message_id = int(request.MessageID)
        command = encode_store_response(
            message_id,
            status,
            comment,
            str(request.AffectedSOPClassUID or ""),
            str(request.AffectedSOPInstanceUID or ""),
        ) or encode_store_response(message_id, status, "", "", "")  # the UIDs and the comment are optional
        limit = self.maximum_pdu_size
        pdu = _command_pdu(context_id, command or b"")
        if not limit or len(pdu) - 6 <= limit:
            cast(AssociationSocket, self.dul.socket).send(pdu)
        else:
            response: Any = C_STORE()  # pynetdicom's stubs type its fields None
            response.MessageIDBeingRespondedTo = request.MessageID
            response.AffectedSOPClassUID = request.AffectedSOPClassUID
            response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
            response.Status = status
            if comment:
                response.ErrorComment = comment
            self.send_msg(response, context_id)
        return True

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            message = DIMSEMessage()
            message.data_set = _StagedDataSet(message, self.assoc, self._staging)
            self.message = message
        super().receive_primitive(primitive)


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, carrying the staging settings to its associations.

    The TLS handshake is left to each connection's own thread (``_RequestHandler``): pynetdicom
    does it in the accept loop, where one client that never finishes it stops every other.
    """

    def __init__(
        self, *args: Any, staging: _Staging, handshake_timeout: float, io_timeout: float, **kwargs: Any
    ) -> None:
        self.staging = staging
        #: Answers C-STORE requests on the associations' DUL threads (set by the DICOM server).
        self.store_handler: Callable[[evt.Event], int | Dataset] | None = None
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        super().__init__(*args, **kwargs)

    def service_actions(self) -> None:
        """Nothing between two turns of the accept loop: pynetdicom runs a full garbage collection
        every 60 turns here (every 3 s at mwm's poll interval), holding every thread up meanwhile;
        the interpreter's own collector frees finished associations."""

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small responses go out at once
        client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self.io_timeout > 0:
            # pynetdicom reads a PDU with blocking calls once its first bytes are there: bound
            # them, so a peer that goes quiet in the middle of one cannot hold its threads forever.
            seconds, fraction = divmod(self.io_timeout, 1.0)
            timeval = struct.pack("ll", int(seconds), int(fraction * 1e6))
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


class _RequestHandler(RequestHandler):
    """pynetdicom's request handler, completing the TLS handshake (bounded) on its own thread."""

    def handle(self) -> None:
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.settimeout(cast(_Server, self.server).handshake_timeout)
                sock.do_handshake()
                sock.settimeout(None)
            except (OSError, ValueError) as exc:
                log.warning("DICOM connection from %s: TLS handshake failed: %s", self.client_address[0], exc)
                with contextlib.suppress(OSError):
                    sock.close()
                return
        super().handle()


class _PromptAssociation(Association):
    """An acceptor association whose threads block on events instead of sleeping in loops."""

    def __init__(self, ae: AE, staging: _Staging) -> None:
        super().__init__(ae, "acceptor")
        self.dimse = _StagingDIMSE(self, staging)
        self.wake = _WakeUp()
        dul = self.dul
        dul.to_provider_queue = _WakingQueue(self.wake, dul)
        dul.event_queue = _WakingQueue(self.wake, dul)
        dul.to_user_queue = _UserQueue(self)
        dul._run_loop_delay = 0  # the wait happens in _PromptSocket.ready
        self._abort_requested = False

    def abort_between_requests(self) -> None:
        """Abort once the request being served (if any) has queued its response.

        An A-ABORT queued from another thread while a handler is returning would overtake that
        handler's response: the peer would lose the answer to an instance that mwm stored.
        """
        self._abort_requested = True
        self.dimse.msg_queue.put((None, None))  # wakes the reactor if it is waiting for a request

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            if self._started_dul:
                self.dul.kill_dul()
                self.wake.set()
                self.dul.join(ABORT_GRACE)
            self.wake.close()

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, blocking on the DIMSE queue instead of sleeping 1 ms a turn."""
        messages = self.dimse.msg_queue
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = messages.get(timeout=IDLE_WAIT)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self._abort_requested:
                self.abort()
                self.kill()
                return
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.warning("DICOM association from %s: network timeout, aborting", self.requestor.ae_title)
                self.abort()
                self.kill()
                return


class _PromptRequestHandler(_RequestHandler):
    """pynetdicom's request handler, building a ``_PromptAssociation``."""

    def _create_association(self) -> Association:
        server = cast(_Server, self.server)
        assoc = _PromptAssociation(self.ae, server.staging)
        cast(_StagingDIMSE, assoc.dimse).store_handler = server.store_handler
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(_PromptSocket(assoc, cast(socket.socket, self.request), assoc.wake))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # pynetdicom deep-copies these; negotiation only reads them, and ~170 SOP classes x 16
        # transfer syntaxes take milliseconds to copy on every association.
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Any, Any]], handlers):
                    assoc.bind(event, handler, args)
        return assoc


@functools.cache
def supported_contexts() -> list[PresentationContext]:
    """Verification, and every storage SOP class with ``TRANSFER_SYNTAXES`` (built once)."""
    contexts = [build_context(Verification)]
    contexts += [
        build_context(cast(str, cx.abstract_syntax), list(TRANSFER_SYNTAXES)) for cx in AllStoragePresentationContexts
    ]
    return contexts


@functools.cache
def _syntaxes_by_sop_class() -> dict[str, tuple[str, ...]]:
    return {str(cx.abstract_syntax): tuple(str(ts) for ts in cx.transfer_syntax) for cx in supported_contexts()}


@functools.lru_cache(maxsize=4096)
def _context(sop_class: str, syntaxes: tuple[str, ...]) -> PresentationContext:
    return build_context(sop_class, list(syntaxes))


def contexts_for(requested: Iterable[PresentationContext]) -> list[PresentationContext]:
    """The acceptor's contexts for one association request, honouring the sender's preferences.

    pynetdicom picks, for each proposed context, the first of the acceptor's transfer syntaxes
    the requestor also proposed. Listing the requestor's own order first means a sender offering
    "JPEG lossless, else Explicit VR" keeps its JPEG lossless instead of decompressing for us.
    """
    ours = _syntaxes_by_sop_class()
    contexts: dict[str, PresentationContext] = {}
    for proposed in requested:
        sop_class = str(proposed.abstract_syntax)
        supported = ours.get(sop_class)
        if supported is None or sop_class in contexts:
            continue
        preferred = tuple(str(ts) for ts in proposed.transfer_syntax if str(ts) in supported)
        order = preferred + tuple(ts for ts in supported if ts not in preferred)
        contexts[sop_class] = _context(sop_class, order)
    return list(contexts.values())


# -- policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SopRules:
    allow: frozenset[str]
    deny: frozenset[str]

    def accepts(self, sop_class_uid: str) -> bool:
        if sop_class_uid in self.deny:
            return False
        return not self.allow or sop_class_uid in self.allow


def _literal_address(host: str) -> str | None:
    """``host`` as a normalised IP address, if it is one (``10.1.2.3``, ``::1``, ``[::1]``)."""
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _normalise_address(address: str) -> str:
    """A peer's or a resolved address, written as ``_literal_address`` writes it."""
    return _literal_address(address) or address


_HOST_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


def _is_host_name(host: str) -> bool:
    """Whether ``host`` is written as a DNS host name (internationalised names included)."""
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    name = ascii_host.removesuffix(".")
    return (
        0 < len(name) <= 253
        and _HOST_NAME.fullmatch(ascii_host) is not None
        and not name.rsplit(".", 1)[-1].isdigit()  # 10.1.2.300 is a mistyped address, not a name
    )


def resolve_host(host: str) -> frozenset[str]:
    """The addresses ``host`` resolves to now. Blocking (DNS): called on threads of its own.

    Raises ``OSError`` when it does not resolve.
    """
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    addresses = frozenset(_normalise_address(str(info[4][0])) for info in infos)
    if not addresses:
        raise OSError(f"{host} has no address")
    return addresses


def _now() -> float:
    """The clock of the source host cache."""
    return time.monotonic()


@dataclass(frozen=True)
class _Source:
    """Where one calling AE title may connect from."""

    anywhere: bool = False
    addresses: frozenset[str] = frozenset()  # IP addresses, as configured
    hosts: tuple[str, ...] = ()  # host names, resolved when needed


def _parse_sources(sources: Iterable[DicomSource]) -> dict[str, _Source]:
    """``dicom.sources`` by calling AE title; a ``host`` that is neither a host name nor an IP
    address is a configuration error."""
    anywhere: set[str] = set()
    addresses: dict[str, set[str]] = {}
    hosts: dict[str, list[str]] = {}
    for index, source in enumerate(sources):
        title = source.ae_title
        addresses.setdefault(title, set())
        hosts.setdefault(title, [])
        if source.host is None:
            anywhere.add(title)
            continue
        literal = _literal_address(source.host)
        if literal is not None:
            addresses[title].add(literal)
        elif _is_host_name(source.host):
            if source.host not in hosts[title]:
                hosts[title].append(source.host)
        else:
            raise ConfigError(f"dicom.sources[{index}].host: {source.host!r} is not a host name or an IP address")
    return {
        title: _Source(True) if title in anywhere else _Source(False, frozenset(addresses[title]), tuple(hosts[title]))
        for title in addresses
    }


@dataclass
class _Lookup:
    """What is known of one source host name."""

    sources: tuple[str, ...]  # the AE titles naming it, for the log
    addresses: frozenset[str] = frozenset()  # from the last lookup that succeeded
    error: str | None = None  # why the last lookup failed, if it did
    resolved_at: float | None = None  # when the last lookup ended; None: never
    pending: concurrent.futures.Future[None] | None = None  # the lookup in progress


class _SourceHosts:
    """The addresses of the host names of ``dicom.sources``, resolved off the event loop.

    ``lookup`` resolves a name again, on a thread of its own, when its last answer is older
    than ``RESOLVE_INTERVAL`` (``RETRY_INTERVAL`` after a failure), and waits at most
    ``RESOLVE_WAIT`` for it; whoever asks meanwhile waits for that same lookup. A failed lookup
    keeps the addresses of the last one that succeeded.
    """

    def __init__(self, names: dict[str, tuple[str, ...]]) -> None:
        self._lock = threading.Lock()
        self._lookups = {host: _Lookup(sources) for host, sources in names.items()}

    def resolve_all(self) -> None:
        """Resolve every name, in parallel, waiting at most ``RESOLVE_WAIT`` (at start-up)."""
        pending = [future for future in map(self._refresh, self._lookups) if future is not None]
        concurrent.futures.wait(pending, timeout=RESOLVE_WAIT)

    def lookup(self, host: str) -> tuple[frozenset[str], str | None]:
        """The addresses ``host`` stands for, and why its last lookup failed (if it did)."""
        pending = self._refresh(host)
        if pending is not None:
            with contextlib.suppress(TimeoutError):
                pending.result(timeout=RESOLVE_WAIT)
        with self._lock:
            entry = self._lookups[host]
            return entry.addresses, entry.error

    def _refresh(self, host: str) -> concurrent.futures.Future[None] | None:
        """The lookup of ``host`` in progress, started here when its last answer is too old."""
        with self._lock:
            entry = self._lookups[host]
            if entry.pending is None:
                interval = RESOLVE_INTERVAL if entry.error is None else RETRY_INTERVAL
                if entry.resolved_at is None or _now() - entry.resolved_at >= interval:
                    entry.pending = concurrent.futures.Future()
                    threading.Thread(
                        target=self._resolve, args=(host, entry), name="mwm-dicom-resolve", daemon=True
                    ).start()
            return entry.pending

    def _resolve(self, host: str, entry: _Lookup) -> None:
        addresses: frozenset[str] = frozenset()
        error: str | None = "the lookup did not complete"
        try:
            addresses = resolve_host(host)
            error = None
        except (OSError, UnicodeError, ValueError) as exc:
            error = str(exc) or type(exc).__name__
        finally:
            with self._lock:
                before, failed_before, first = entry.addresses, entry.error, entry.resolved_at is None
                if error is None:
                    entry.addresses, entry.error = addresses, None
                else:
                    entry.error = error
                entry.resolved_at = _now()
                pending, entry.pending = entry.pending, None
            if pending is not None:
                pending.set_result(None)
        sources = ", ".join(entry.sources)
        if error is not None:
            if before:
                outcome = f"still accepting it from {', '.join(sorted(before))}, as last resolved"
            else:
                outcome = "its associations are refused until it resolves"
            log.warning("DICOM source %s: cannot resolve host %r: %s; %s", sources, host, error, outcome)
        elif failed_before is not None or (not first and addresses != before):
            log.info("DICOM source %s: host %r now resolves to %s", sources, host, ", ".join(sorted(addresses)))
        else:
            log.debug("DICOM source %s: host %r resolves to %s", sources, host, ", ".join(sorted(addresses)))


def _sop_rules(aes: Iterable[DicomAe]) -> dict[str, _SopRules]:
    return {ae.ae_title: _SopRules(frozenset(ae.allow_sop_classes), frozenset(ae.deny_sop_classes)) for ae in aes}


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    dicom = settings.dicom
    if dicom.tls_cert is None or dicom.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(dicom.tls_cert, dicom.tls_key)
        if dicom.tls_ca is not None:
            context.load_verify_locations(cafile=dicom.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"dicom.tls_cert: cannot load the TLS certificate, key or CA: {exc}") from None
    return context


def _called_aet(assoc: Association) -> str:
    """The AE title the peer called (the one this association serves)."""
    request = assoc.requestor.primitive
    return str(request.called_ae_title).strip() if request is not None else ""


def _calling_aet(assoc: Association) -> str:
    """The peer's own AE title, as it gave it in its request."""
    request = assoc.requestor.primitive
    return str(request.calling_ae_title).strip() if request is not None else ""


def _peer(assoc: Association) -> str:
    """``CALLING@address`` of the peer, for the log."""
    return f"{_calling_aet(assoc)}@{assoc.requestor.address}"


def _open_associations(assoc: Association) -> int:
    """Associations accepted or being negotiated by this AE, ``assoc`` included (as pynetdicom counts them)."""
    return sum(1 for other in assoc.ae.active_associations if other.is_acceptor)


def _comment(text: str) -> str:
    """An Error Comment (LO: at most 64 characters, no backslash; ASCII, as the command set has no
    character set to name another)."""
    return text.replace("\\", "/").encode("ascii", "replace").decode("ascii")[:64]


def _status_of(answer: int | Dataset) -> int:
    return answer if isinstance(answer, int) else int(answer.Status)


# -- the server ------------------------------------------------------------------------------


class DicomServer:
    """The DICOM listener of ``server.dicom``; owned by the service.

    ``await start()`` returns once the socket is bound (``port`` is then the real port);
    ``await stop()`` refuses new associations, lets C-STOREs in progress finish (within
    ``server.shutdown_timeout``), then aborts what is left open.
    """

    def __init__(
        self, *, settings: Settings, ingestor: Ingestor, apps: AppRegistry, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.apps = apps
        self.metrics = metrics or Metrics()
        self.port: int | None = None
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._in_flight = 0
        self._sop_rules = _sop_rules(settings.dicom.aes)
        self._sources = _parse_sources(settings.dicom.sources)
        names: dict[str, tuple[str, ...]] = {}
        for title, source in self._sources.items():
            for host in source.hosts:
                names[host] = (*names.get(host, ()), title)
        self._hosts = _SourceHosts(names)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``settings.server.dicom`` and start accepting associations."""
        self._loop = asyncio.get_running_loop()
        self._warn_of_aes_serving_nothing_else()
        await asyncio.to_thread(self._start)

    def _warn_of_aes_serving_nothing_else(self) -> None:
        """An ``aes`` entry serves its AE title by itself: one that no other setting serves is most
        likely a typo, which would leave the AE title meant without its SOP class rules."""
        settings = self.settings
        elsewhere = {settings.server.ae_title, *settings.dicom.ae_titles}
        for app in self.apps.all():
            elsewhere.update(app.match.called_aet)
        for index, ae in enumerate(settings.dicom.aes):
            if ae.ae_title not in elsewhere:
                log.warning(
                    "dicom.aes[%d]: %r is served only because of this entry (it is not server.ae_title, in"
                    " dicom.ae_titles or an application's called_aet): a typo? Served: %s",
                    index,
                    ae.ae_title,
                    ", ".join(sorted(elsewhere)),
                )

    def _start(self) -> None:
        settings = self.settings
        assert settings.server.dicom is not None
        host, _, port = settings.server.dicom.rpartition(":")
        host = host.strip("[]")
        if settings.dicom.rejects_unknown_sources:
            self._hosts.resolve_all()  # a name that does not resolve is logged, and tried again later
        ssl_context = _tls_context(settings)

        # Process-wide pynetdicom option: no per-message log formatting (mwm logs what matters).
        _config.LOG_HANDLER_LEVEL = "none"
        if not _PROMPT:
            log.warning(
                "pynetdicom %s is not the tested 3.0 series: using its stock polling associations (slower)",
                pynetdicom.__version__,
            )
            # The stock association keeps data sets in memory unless told to spool them to a file.
            _config.STORE_RECV_CHUNKED_DATASET = True

        dicom = settings.dicom
        ae = AE(ae_title=settings.server.ae_title)
        ae.maximum_associations = dicom.max_associations
        ae.maximum_pdu_size = dicom.max_pdu_size
        ae.acse_timeout = float(dicom.acse_timeout)
        ae.dimse_timeout = float(dicom.dimse_timeout)
        ae.network_timeout = float(dicom.network_timeout)
        ae.require_called_aet = False  # several AE titles are served: checked in _on_requested
        ae.require_calling_aet = []
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store_counted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        staging = _Staging(self.ingestor.staging_name, int(self.ingestor.max_instance_size))
        try:
            server = ae.make_server(
                (host, int(port)),
                contexts=supported_contexts(),
                ssl_context=ssl_context,
                evt_handlers=handlers,
                server_class=_Server,
                request_handler=_PromptRequestHandler if _PROMPT else _RequestHandler,
                staging=staging,
                handshake_timeout=float(dicom.acse_timeout),
                io_timeout=float(dicom.network_timeout),
            )
        except OSError as exc:
            raise ConfigError(
                f"server.dicom: cannot listen on {settings.server.dicom}: {exc.strerror or exc}"
            ) from None
        server.daemon_threads = True
        cast(_Server, server).store_handler = self._on_store_counted
        ae._servers.append(server)
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": ACCEPT_POLL}, name="mwm-dicom-accept", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        """Refuse new associations, let in-flight C-STOREs finish, then close everything."""
        server = self._server
        if server is None:
            return
        self._server = None
        with self._lock:
            self._stopping = True
        await asyncio.to_thread(server.shutdown)  # no new connections from here on
        deadline = time.monotonic() + float(self.settings.server.shutdown_timeout)
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._in_flight:
            log.warning("DICOM SCP: %d C-STORE(s) still in progress at shutdown; aborting", self._in_flight)
        associations = list(server.active_associations)
        if associations:
            await asyncio.to_thread(self._abort_all, associations)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, ABORT_GRACE)

    @staticmethod
    def _abort_all(associations: list[Association]) -> None:
        for assoc in associations:
            if isinstance(assoc, _PromptAssociation):
                assoc.abort_between_requests()
            else:
                assoc.abort(block=False)
        for assoc in associations:
            assoc.join(ABORT_GRACE)
            if assoc.is_alive():  # a handler still busy: cut the connection under it
                assoc.abort(block=False)

    @property
    def associations(self) -> int:
        """Associations currently open."""
        server = self._server
        if server is None:
            return 0
        return sum(1 for assoc in server.active_associations if assoc.is_established)

    # -- negotiation ------------------------------------------------------------------------

    def served_ae_titles(self) -> set[str]:
        """The AE titles mwm answers to; read at each association so API-added apps count."""
        settings = self.settings
        titles = {settings.server.ae_title, *settings.dicom.ae_titles, *(ae.ae_title for ae in settings.dicom.aes)}
        # AppRegistry.all() copies its dict in one C call: safe to read from this thread.
        for app in self.apps.all():
            titles.update(app.match.called_aet)
        return titles

    def _source_refusal(self, calling_aet: str, address: str) -> str | None:
        """Why ``calling_aet`` may not connect from ``address`` under ``dicom.sources``; None if it may.

        Blocking when a host name is due to be resolved again: called on the association's thread.
        """
        source = self._sources.get(calling_aet)
        if source is None:
            return f"unknown calling AE title {calling_aet!r}"
        peer = _normalise_address(address)
        if source.anywhere or peer in source.addresses:
            return None
        expected = sorted(source.addresses)
        for host in source.hosts:
            addresses, error = self._hosts.lookup(host)
            if peer in addresses:
                return None
            known = [", ".join(sorted(addresses))] if addresses else []
            if error is not None:
                known.append(f"cannot resolve: {error}")
            expected.append(f"{host} ({'; '.join(known) or 'not resolved yet'})")
        return f"calling AE title {calling_aet!r} from {peer}, expected {' or '.join(expected)}"

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        called = _called_aet(assoc)
        calling = _calling_aet(assoc)
        address = str(assoc.requestor.address)
        reject: tuple[int, int, int] | None = None
        reason: str | None = None
        kind = ""
        if called not in self.served_ae_titles():
            reason, reject, kind = f"called AE title {called!r} is not served", REJECT_CALLED_AET, "called_aet"
        elif self.settings.dicom.rejects_unknown_sources and (refusal := self._source_refusal(calling, address)):
            reason, reject, kind = refusal, REJECT_CALLING_AET, "calling_aet"
        elif (open_now := _open_associations(assoc) - 1) >= assoc.ae.maximum_associations:
            reason = f"too many associations ({open_now} open, at most {assoc.ae.maximum_associations})"
            reject, kind = REJECT_LIMIT, "limit"
        elif (pressure := self.ingestor.pressure) is not None:
            reason, reject, kind = pressure, REJECT_CONGESTION, "congestion"
        if reject is not None:
            log.warning("DICOM association from %s@%s refused: %s", calling, address, reason)
            self.metrics.dicom_associations_rejected.labels(kind).inc()
            assoc._mwm_refused = True  # type: ignore[attr-defined]  # logged: _on_rejected stays quiet
            assoc.acse.send_reject(*reject)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        request = assoc.requestor.primitive
        if request is not None:
            assoc.acceptor.supported_contexts = contexts_for(request.presentation_context_definition_list)
        assoc._mwm_tally = _Tally()  # type: ignore[attr-defined]
        log.info("DICOM association from %s@%s to %s accepted", calling, address, called)

    def _on_rejected(self, event: evt.Event) -> None:
        """Log a rejection pynetdicom made itself (its own count of associations is taken a
        moment after ``_on_requested``'s)."""
        assoc = event.assoc
        if not assoc.is_acceptor or getattr(assoc, "_mwm_refused", False):
            return
        self.metrics.dicom_associations_rejected.labels("other").inc()
        response = assoc.acceptor.primitive
        reason = response.reason_str if response is not None and response.result is not None else "rejected"
        log.warning(
            "DICOM association from %s@%s refused: %s", _calling_aet(assoc), assoc.requestor.address, reason.lower()
        )

    # -- services ---------------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store_counted(self, event: evt.Event) -> int | Dataset:
        """``_on_store``, its outcome counted for the association's closing log line."""
        answer = self._on_store(event)
        tally: _Tally | None = getattr(event.assoc, "_mwm_tally", None)
        if tally is not None:
            if _status_of(answer) == STATUS_SUCCESS:
                tally.stored += 1
            else:
                tally.refused += 1
        return answer

    def _on_store(self, event: evt.Event) -> int | Dataset:
        data = cast(C_STORE, event.request).DataSet
        received = data if isinstance(data, _StagedDataSet) and data.path is not None else None
        try:
            refusal = self._refusal(event, received)
            if refusal is not None:
                return refusal
            with self._lock:  # one lock with stop(): it waits for every C-STORE counted here
                if self._stopping:
                    return self._status(STATUS_OUT_OF_RESOURCES, "mwm is stopping; send again later")
                self._in_flight += 1
            try:
                assoc = event.assoc
                origin = Origin(
                    source="dicom",
                    calling_aet=str(assoc.requestor.ae_title).strip(),
                    called_aet=_called_aet(assoc),
                    peer_address=str(assoc.requestor.address),
                    correlation_id=_association_correlation_id(assoc),
                )
                try:
                    staged = self._stage(event, received)
                except OSError as exc:
                    log.error("C-STORE from %s: cannot stage the received instance: %s", origin.calling_aet, exc)
                    return self._status(STATUS_OUT_OF_RESOURCES, "cannot write the received instance")
                sha256 = received.sha256 if received is not None else None
                received = None  # from here the staged file is ingest's, whatever happens
                # Parsed and placed on this (the association's) thread; the event loop only records it.
                outcome = self._ingest(self.ingestor.receive_file(staged, sha256), origin)
                answer = self._answer(outcome)
                if outcome.status == "rejected":  # failures to store are logged by ingest
                    detail = f" ({outcome.detail})" if outcome.detail else ""
                    log.warning(
                        "C-STORE from %s to %s refused (0x%04X): %s%s",
                        _peer(assoc),
                        origin.called_aet,
                        _status_of(answer),
                        outcome.reason or outcome.status,
                        detail,
                    )
                return answer
            finally:
                with self._lock:
                    self._in_flight -= 1
        finally:
            if received is not None:
                received.discard()

    def _refusal(self, event: evt.Event, received: _StagedDataSet | None) -> Dataset | None:
        """The failure status of a C-STORE refused before ingest, if it is."""
        called = _called_aet(event.assoc)
        sop_class = str(cast(C_STORE, event.request).AffectedSOPClassUID)
        rules = self._sop_rules.get(called)
        if rules is not None and not rules.accepts(sop_class):
            log.warning(
                "C-STORE from %s to %s refused (0x%04X): SOP class %s is not accepted there",
                _peer(event.assoc),
                called,
                STATUS_SOP_CLASS_REFUSED,
                sop_class,
            )
            self.metrics.rejections.labels("dicom", "SOP class not accepted").inc()
            return self._status(STATUS_SOP_CLASS_REFUSED, f"SOP class not accepted by {called}")
        if received is not None and received.error is not None:
            log.warning(
                "C-STORE from %s to %s refused (0x%04X): %s",
                _peer(event.assoc),
                called,
                received.error_status,
                received.error,
            )
            return self._status(received.error_status, received.error)
        return None

    def _stage(self, event: evt.Event, received: _StagedDataSet | None) -> Path:
        """The received Part-10 file (preamble, file meta, data set as received) in staging."""
        if received is not None:
            return received.finish()
        staged = self.ingestor.staging_name()
        spooled = cast(Path | None, getattr(event.request, "_dataset_path", None))
        if spooled is not None:
            # pynetdicom's own chunked receive wrote it; it removes what is left after the handler.
            try:
                os.replace(spooled, staged)
            except OSError:
                shutil.copyfile(spooled, staged)
            return staged
        request = cast(C_STORE, event.request)
        meta = encode_file_meta(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            implementation_class_uid=str(event.assoc.ae.implementation_class_uid),
            implementation_version_name=str(event.assoc.ae.implementation_version_name or ""),
            source_ae_title=str(event.assoc.requestor.ae_title).strip(),
        )
        try:
            with open(staged, "wb") as f:
                f.write(meta)
                f.write(cast(io.BytesIO, request.DataSet).getbuffer())
        except OSError:
            staged.unlink(missing_ok=True)
            raise
        return staged

    def _ingest(self, staged: Received, origin: Origin) -> Outcome:
        """Record the instance from this (the association's) thread; the event loop only hears of
        new buckets. Instances that still need the loop (storage kinds that upload) go through it."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.ingestor.discard_blocking(staged)
            return Outcome(status="failed", reason="mwm is stopping", dicom_status=STATUS_OUT_OF_RESOURCES)
        try:
            return self.ingestor.ingest_blocking(staged, origin, loop)
        except (concurrent.futures.CancelledError, RuntimeError):  # the event loop stopped meanwhile
            return Outcome(status="failed", reason="mwm is stopping", dicom_status=STATUS_OUT_OF_RESOURCES)
        except Exception as exc:
            log.exception("C-STORE from %s: ingest raised", origin.calling_aet)
            return Outcome(status="failed", reason=f"internal error: {type(exc).__name__}", dicom_status=0xA700)

    def _answer(self, outcome: Outcome) -> int | Dataset:
        if outcome.accepted:
            return STATUS_SUCCESS
        status = outcome.dicom_status
        if status == STATUS_SUCCESS:  # a failure must never look like a success
            status = STATUS_CANNOT_UNDERSTAND if outcome.status == "rejected" else STATUS_OUT_OF_RESOURCES
        return self._status(status, outcome.reason or outcome.status)

    @staticmethod
    def _status(status: int, comment: str) -> Dataset:
        ds = Dataset()
        ds.Status = status
        ds.ErrorComment = _comment(comment)
        return ds

    @staticmethod
    def _on_closed(event: evt.Event) -> None:
        """Remove what had been received of a data set when the connection ends mid-way, and log
        what the association brought.

        Runs on the DUL thread (the one writing that file), after the last byte it will read.
        """
        tally: _Tally | None = getattr(event.assoc, "_mwm_tally", None)
        if tally is not None:
            assoc = event.assoc
            log.info(
                "DICOM association from %s@%s to %s closed after %.1f s: %d instance(s) stored, %d refused",
                _calling_aet(assoc),
                assoc.requestor.address,
                _called_aet(assoc),
                time.monotonic() - tally.opened,
                tally.stored,
                tally.refused,
            )
        message = getattr(event.assoc.dimse, "message", None)
        data = getattr(message, "data_set", None)
        if isinstance(data, _StagedDataSet):
            data.discard()
        partial = getattr(message, "_data_set_file", None)  # pynetdicom's chunked receive
        if partial is not None:
            try:
                partial.close()
                os.unlink(partial.name)
            except OSError:
                pass

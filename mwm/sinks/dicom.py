"""The ``dicom`` sink: results sent with C-STORE to a remote AE (a PACS, a viewer, a router).

Each batch goes over one association (more only when it holds more than 128 distinct
SOP class / transfer syntax pairs), with one presentation context per pair. A result stored
in an uncompressed transfer syntax (explicit or implicit VR little endian, explicit VR big
endian, deflated explicit VR little endian) is proposed in its own transfer syntax first, then
in explicit and implicit VR little endian, which every destination supports; a compressed one
(JPEG, JPEG-LS, JPEG 2000, RLE, ...) only in its own, as it is never decompressed.

When the destination accepts the stored transfer syntax, the stored bytes are sent as they are:
pynetdicom streams the data set from the stored file (``STORE_SEND_CHUNKED_DATASET``), never
decoding it. Otherwise the data set is read and encoded in the accepted transfer syntax, value
for value (big endian binary values byte-swapped), so the destination gets the same data set.

Outcome of each instance, from the C-STORE response status (PS3.4 B.2.3, PS3.7 C):

==========================================  ===========================================
0x0000                                      delivered
0xB000, 0xB006, 0xB007 (any 0xBxxx)         delivered; the warning is kept as its note
0xA7xx out of resources, 0x0110 processing  failed, retryable (the destination may
failure, 0x0213 resource limitation         recover)
0xA9xx, 0xCxxx, 0x01xx/0x02xx refusals      failed for good: the destination refuses
(SOP class not supported, not authorised)   this data set, sending it again cannot help
no response (time-out, abort)               failed, retryable
==========================================  ===========================================

and from the association:

==========================================  ===========================================
no presentation context accepted for the    failed for good, naming the SOP class and
instance's SOP class and transfer syntaxes  the transfer syntaxes proposed
association rejected (A-ASSOCIATE-RJ)       failed; retryable only when the rejection is
                                            transient
unreachable, connection closed or aborted,  failed, retryable
no answer in time
==========================================  ===========================================

Every wait is bounded by ``timeout``, and associations run on the sink's own thread, so a
destination that is down holds up nothing but its own deliveries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import shutil
import ssl
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import _config, build_context
from pynetdicom.association import Association
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from ..echo import AssociationFailed, RequestorAE, Target, request_association
from ..errors import ConfigError, MwmError
from ..options import Duration, positive
from . import Delivery, DeliveryOutcome, Sink

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts per association (PS3.8: odd context IDs 1..255)
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_RETRYABLE_FAILURES = frozenset({0x0110, 0x0213})
#: Transfer syntaxes a data set can be re-encoded in without loss, and those proposed besides
#: the stored one (PS3.5 10.1: every SCP supports implicit VR little endian).
_UNCOMPRESSED = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)
_ALTERNATIVES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Binary VRs whose values are kept as bytes, by their word size (swapped between endiannesses).
_WORDS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _check_aet(value: str, where: str) -> None:
    if not _AE_TITLE.match(value) or value.strip() != value:
        raise ConfigError(f"{where}: {value!r} is not a valid AE title (1 to 16 printable characters)")


def _check_port(value: int, where: str) -> None:
    if not 0 < value < 65536:
        raise ConfigError(f"{where}: expected a TCP port (1 to 65535), got {value!r}")


def _check_pdu(value: int, where: str) -> None:
    if value != 0 and value < 4096:
        raise ConfigError(f"{where}: expected 0 (unlimited) or at least 4096 bytes, got {value!r}")


@dataclass(frozen=True)
class DicomOptions:
    """Where to send: the remote AE title, host and port, and how."""

    ae_title: str = field(metadata={"check": _check_aet})
    host: str
    port: int = field(metadata={"check": _check_port})
    calling_aet: str = field(default="MWM", metadata={"check": _check_aet})
    timeout: Duration = field(default=Duration(30.0), metadata={"check": positive})
    max_pdu_size: int = field(default=0, metadata={"check": _check_pdu})  # what mwm accepts; 0: unlimited
    tls: bool = False  # implied by tls_ca or tls_cert
    tls_ca: Path | None = None  # verify the destination against this CA (default: the system's)
    tls_cert: Path | None = None  # client certificate, with tls_key
    tls_key: Path | None = None
    tls_verify: bool = True


def store_outcome(delivery_id: int, status: int) -> DeliveryOutcome:
    """The outcome of one C-STORE from its response status (see the module's table)."""
    if status == 0x0000:
        return DeliveryOutcome(delivery_id, "delivered")
    description = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", "unknown status"))[1]
    text = f"status 0x{status:04X} ({description})"
    if 0xB000 <= status <= 0xBFFF:
        return DeliveryOutcome(delivery_id, "delivered", f"delivered with a warning: {text}")
    retryable = 0xA700 <= status <= 0xA7FF or status in _RETRYABLE_FAILURES
    return DeliveryOutcome(delivery_id, "failed", f"refused with {text}", retryable)


def proposed_syntaxes(stored: str) -> list[str]:
    """The transfer syntaxes proposed for a result stored in ``stored``, its own first."""
    if stored not in _UNCOMPRESSED:
        return [stored]
    return [stored, *(syntax for syntax in _ALTERNATIVES if syntax != stored)]


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _either(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def no_context_message(sop_class: str, syntaxes: Sequence[str]) -> str:
    """Why an instance cannot be sent: no presentation context for it was accepted."""
    names = [UID(syntax).name for syntax in syntaxes]
    return f"the destination accepts no presentation context for {_uid_name(sop_class)} in {_either(names)}"


def _swapped(value: bytes, size: int) -> bytes:
    """``value`` with the byte order of each ``size``-byte word reversed."""
    if len(value) % size:
        raise ValueError(f"{len(value)} bytes are not a whole number of {size}-byte words")
    out = bytearray(len(value))
    for n in range(size):
        out[n::size] = value[size - 1 - n :: size]
    return bytes(out)


def _to_other_endianness(elem: DataElement) -> None:
    """Byte-swap the value of ``elem`` if it is held as bytes of multi-byte words."""
    if elem.value is None or elem.value == b"":
        return
    if elem.VR == "UN":
        raise ValueError(f"the byte order of {elem.tag} (VR UN) is unknown")
    size = _WORDS.get(elem.VR)
    if size is not None:
        if not isinstance(elem.value, bytes):
            raise ValueError(f"{elem.tag} ({elem.VR}) is not held as bytes")
        elem.value = _swapped(elem.value, size)


def converted(path: Path, syntax: str) -> Dataset:
    """The data set of the file at ``path``, uncompressed, ready to be encoded in ``syntax``
    (an uncompressed transfer syntax): every value as stored."""
    target = UID(syntax)
    ds = dcmread(path)
    source = UID(ds.file_meta.TransferSyntaxUID)
    if source not in _UNCOMPRESSED or target not in _UNCOMPRESSED:
        raise ValueError(f"{source.name} cannot be converted to {target.name}")
    # Decode every element (nested ones too) in the stored encoding, then resolve the VRs an
    # implicit VR encoding leaves ambiguous (US or SS, OB or OW, ...).
    elements = list(ds.iterall())
    correct_ambiguous_vr(ds, source.is_little_endian)
    if source.is_little_endian != target.is_little_endian:
        for elem in elements:
            _to_other_endianness(elem)
    ds.file_meta.TransferSyntaxUID = target
    # What pynetdicom encodes in: the accepted transfer syntax (all values are decoded, so
    # nothing is written in the stored encoding).
    ds.set_original_encoding(target.is_implicit_VR, target.is_little_endian)
    return ds


@dataclass
class _Item:
    delivery: Delivery
    path: Path
    sop_class_uid: str = ""
    transfer_syntax_uid: str = ""


class DicomSink(Sink):
    """C-STORE SCU; one association per batch, on the sink's own thread."""

    kind = "dicom"
    Options = DicomOptions

    def __init__(self, sink_id: str, options: DicomOptions, **kwargs: Any) -> None:
        super().__init__(sink_id, options, **kwargs)
        if (options.tls_cert is None) != (options.tls_key is None):
            raise ConfigError(f"sink {sink_id!r}: tls_cert and tls_key go together")
        self.target = Target(options.ae_title, options.host, options.port)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tls: ssl.SSLContext | None = None
        self._current: Association | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        # Send data sets straight from their files (process-wide pynetdicom option; only
        # send_c_store with a file path is affected, which only this sink uses).
        _config.STORE_SEND_CHUNKED_DATASET = True
        if self.options.tls or self.options.tls_ca or self.options.tls_cert:
            self._tls = await asyncio.to_thread(self._tls_context)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{self.id}")

    def _tls_context(self) -> ssl.SSLContext:
        options = self.options
        try:
            context = ssl.create_default_context(cafile=options.tls_ca)
            if options.tls_cert is not None:
                context.load_cert_chain(options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"sink {self.id!r}: cannot load the TLS files: {exc}") from None
        if not options.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def close(self) -> None:
        with self._lock:
            current = self._current
        if current is not None:
            await asyncio.to_thread(current.abort)
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)

    async def deliver(self, batch: Sequence[Delivery]) -> list[DeliveryOutcome]:
        outcomes: dict[int, DeliveryOutcome] = {}
        items: list[_Item] = []
        with contextlib.ExitStack() as stack:
            fetched: Path | None = None
            for delivery in batch:
                if not delivery.is_dicom:
                    outcomes[delivery.delivery_id] = DeliveryOutcome(
                        delivery.delivery_id, "skipped", "not a DICOM instance"
                    )
                    continue
                path = self.storage.local_path(delivery.storage_key)
                if path is None:  # object storage: a local copy for the time of the batch
                    if fetched is None:
                        fetched = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mwm-dicom-sink-")))
                    path = fetched / f"{delivery.delivery_id}.dcm"
                    try:
                        await self.storage.fetch(delivery.storage_key, path)
                    except MwmError as exc:
                        outcomes[delivery.delivery_id] = DeliveryOutcome(
                            delivery.delivery_id, "failed", f"cannot read the stored result: {exc.message}"
                        )
                        continue
                items.append(_Item(delivery, path, delivery.sop_class_uid or "", delivery.transfer_syntax_uid or ""))
            if items:
                executor = self._executor
                if executor is None:
                    raise MwmError(f"sink {self.id!r} is not open")
                loop = asyncio.get_running_loop()
                for outcome in await loop.run_in_executor(executor, self._send, items):
                    outcomes[outcome.delivery_id] = outcome
            if fetched is not None:
                await asyncio.to_thread(shutil.rmtree, fetched, True)
        return [outcomes[d.delivery_id] for d in batch]

    # -- on the sink's thread -----------------------------------------------------------------

    def _send(self, items: list[_Item]) -> list[DeliveryOutcome]:
        outcomes: list[DeliveryOutcome] = []
        ready: list[_Item] = []
        for item in items:
            problem = self._complete(item)
            if problem is not None:
                outcomes.append(problem)
            else:
                ready.append(item)
        pairs: dict[tuple[str, str], list[_Item]] = {}
        for item in ready:
            pairs.setdefault((item.sop_class_uid, item.transfer_syntax_uid), []).append(item)
        keys = list(pairs)
        for start in range(0, len(keys), MAX_CONTEXTS):
            chunk = keys[start : start + MAX_CONTEXTS]
            outcomes += self._send_over_one_association({key: pairs[key] for key in chunk})
        return outcomes

    @staticmethod
    def _complete(item: _Item) -> DeliveryOutcome | None:
        """Fill in the SOP class and transfer syntax from the file when the record lacks them."""
        if not item.path.is_file():
            return DeliveryOutcome(item.delivery.delivery_id, "failed", "the stored result is missing", False)
        if item.sop_class_uid and item.transfer_syntax_uid:
            return None
        try:
            meta = read_file_meta_info(item.path)
            item.sop_class_uid = item.sop_class_uid or str(meta.MediaStorageSOPClassUID)
            item.transfer_syntax_uid = item.transfer_syntax_uid or str(meta.TransferSyntaxUID)
        except (OSError, InvalidDicomError, AttributeError) as exc:
            return DeliveryOutcome(item.delivery.delivery_id, "failed", f"unreadable DICOM file meta: {exc}", False)
        return None

    def _send_over_one_association(self, pairs: dict[tuple[str, str], list[_Item]]) -> list[DeliveryOutcome]:
        options = self.options
        contexts = [build_context(sop_class, proposed_syntaxes(syntax)) for sop_class, syntax in pairs]
        ae = RequestorAE(ae_title=options.calling_aet)
        try:
            assoc = request_association(
                ae,
                self.target,
                timeout=float(options.timeout),
                contexts=contexts,
                max_pdu=options.max_pdu_size,
                tls=self._tls,
            )
        except AssociationFailed as exc:
            return self._not_associated(exc, pairs)
        with self._lock:
            self._current = assoc
        try:
            return self._store_all(assoc, pairs)
        finally:
            with self._lock:
                self._current = None
            if assoc.is_established:
                assoc.release()

    def _not_associated(
        self, exc: AssociationFailed, pairs: dict[tuple[str, str], list[_Item]]
    ) -> list[DeliveryOutcome]:
        """The outcomes of a batch for which no association could be established: for good
        when the destination takes none of the presentation contexts, naming them; retried
        otherwise. A rejection, even "rejected-permanent", is retried: it most often means the
        destination does not know mwm yet, and once it does the results go through by themselves
        (within delivery.max_attempts). Its message says which it was."""
        log.warning("sink %s: %s: %s", self.id, self.target, exc.message)
        if exc.no_context:
            return [
                DeliveryOutcome(
                    item.delivery.delivery_id, "failed", no_context_message(sop_class, proposed_syntaxes(syntax)), False
                )
                for (sop_class, syntax), group in pairs.items()
                for item in group
            ]
        return [
            DeliveryOutcome(item.delivery.delivery_id, "failed", f"{self.target}: {exc.message}", True)
            for group in pairs.values()
            for item in group
        ]

    def _store_all(self, assoc: Association, pairs: dict[tuple[str, str], list[_Item]]) -> list[DeliveryOutcome]:
        accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        outcomes: list[DeliveryOutcome] = []
        message_id = 0
        for (sop_class, syntax), group in pairs.items():
            proposed = proposed_syntaxes(syntax)
            usable = accepted.get(sop_class, set())
            agreed = next((candidate for candidate in proposed if candidate in usable), None)
            for item in group:
                delivery_id = item.delivery.delivery_id
                if agreed is None:
                    outcomes.append(
                        DeliveryOutcome(delivery_id, "failed", no_context_message(sop_class, proposed), False)
                    )
                    continue
                if not assoc.is_established:
                    outcomes.append(DeliveryOutcome(delivery_id, "failed", f"{self.target}: association aborted"))
                    continue
                dataset: Path | Dataset = item.path
                if agreed != syntax:
                    try:
                        dataset = converted(item.path, agreed)
                    except (ValueError, AttributeError, TypeError, OSError, InvalidDicomError) as exc:
                        problem = f"cannot convert the stored result to {UID(agreed).name}: {exc}"
                        outcomes.append(DeliveryOutcome(delivery_id, "failed", problem, False))
                        continue
                message_id = message_id % 0xFFFF + 1
                try:
                    response = assoc.send_c_store(dataset, msg_id=message_id)
                except (ValueError, AttributeError, OSError, InvalidDicomError) as exc:
                    outcomes.append(
                        DeliveryOutcome(delivery_id, "failed", f"cannot send the stored result: {exc}", False)
                    )
                    continue
                if "Status" not in response:
                    outcomes.append(
                        DeliveryOutcome(delivery_id, "failed", f"{self.target}: no response (time-out or abort)")
                    )
                    continue
                outcomes.append(store_outcome(delivery_id, int(response.Status)))
        return outcomes

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {
            **super().describe(),
            "ae_title": o.ae_title,
            "host": o.host,
            "port": o.port,
            "calling_aet": o.calling_aet,
            "tls": self._tls is not None or bool(o.tls or o.tls_ca or o.tls_cert),
        }

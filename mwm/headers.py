"""Header extraction from DICOM Part-10 bytes, without reading pixel data into memory."""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from . import part10
from .errors import InvalidDicom
from .uids import is_valid_uid

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
# Values larger than this are not read, only located: pixel data stays on disk.
DEFER_SIZE = 4096


@dataclass(frozen=True)
class InstanceHeaders:
    """What mwm records about an instance; UIDs are validated."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    modality: str = ""
    series_description: str = ""
    body_part: str = ""
    study_date: str = ""
    accession_number: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)  # every field is a str: no need for asdict's deep copy


def _raw(ds: Dataset, keyword: str) -> str | None:
    """An attribute's value as text, read from its raw bytes.

    pydicom's own conversion would validate (and warn about) values we check ourselves, and
    would decode more than we need; UIDs and the few codes we record are ASCII.
    """
    number = tag_for_keyword(keyword)
    if number is None:
        return None
    tag = Tag(number)
    if tag not in ds._dict:
        return None
    element = ds._dict[tag]
    value = getattr(element, "value", None)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1").strip("\0 ")
    if value is None:
        return ""
    return str(value).strip("\0 ")


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = _raw(ds, keyword)
    except Exception:  # noqa: BLE001 - a malformed optional attribute is not fatal
        return ""
    return "" if value is None else value[:256]


def _uid(ds: Dataset, keyword: str, label: str) -> str:
    text = _raw(ds, keyword)
    if not text:
        raise InvalidDicom(f"missing {label}")
    if not is_valid_uid(text):
        raise InvalidDicom(f"invalid {label}", f"{text[:80]!r} is not a DICOM UID")
    return text


def _check_complete(ds: Dataset, size: int) -> None:
    """Reject a truncated file: every element must end inside the file, the last one at its end."""
    end = 0
    raw_elements = getattr(ds, "_dict", {})
    for element in raw_elements.values():
        tell = getattr(element, "value_tell", None)
        length = getattr(element, "length", None)
        if tell is None or length is None:
            continue
        if length == UNDEFINED_LENGTH:
            # pydicom read it up to its delimiter, so it is complete; we cannot place its end.
            end = -1
            continue
        element_end = tell + length
        if element_end > size:
            raise InvalidDicom("truncated file", f"an element ends at byte {element_end}, the file has {size}")
        end = max(end, element_end)
    if end >= 0 and end != size and end != 0:
        raise InvalidDicom("truncated file", f"{size - end} bytes after the last complete element")


def _parse(stream: BinaryIO, size: int) -> InstanceHeaders:
    head = stream.read(PREAMBLE_LENGTH + 4)
    if len(head) < PREAMBLE_LENGTH + 4 or head[PREAMBLE_LENGTH:] != MAGIC:
        raise InvalidDicom("not a DICOM Part-10 file", "no 'DICM' prefix after the 128-byte preamble")
    stream.seek(0)
    try:
        ds = pydicom.dcmread(stream, defer_size=DEFER_SIZE)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError, MemoryError) as exc:
        raise InvalidDicom("cannot parse the DICOM file", str(exc)[:300]) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on malformed input
        raise InvalidDicom("cannot parse the DICOM file", f"{type(exc).__name__}: {str(exc)[:300]}") from None
    meta = getattr(ds, "file_meta", None)
    # In a deflated data set pydicom's offsets count in the inflated stream, not in the file.
    if meta is None or meta.get("TransferSyntaxUID") != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        _check_complete(ds, size)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise InvalidDicom("missing Transfer Syntax UID in the file meta information")
    headers = InstanceHeaders(
        sop_instance_uid=_uid(ds, "SOPInstanceUID", "SOP Instance UID"),
        sop_class_uid=_uid(ds, "SOPClassUID", "SOP Class UID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID", "Study Instance UID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID", "Series Instance UID"),
        transfer_syntax_uid=_uid(meta, "TransferSyntaxUID", "Transfer Syntax UID"),
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality"),
        series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined"),
        study_date=_text(ds, "StudyDate"),
        accession_number=_text(ds, "AccessionNumber"),
    )
    return headers


HEAD_SIZE = 64 << 10  # the beginning of a file read for its element headers when it comes in pieces
REQUIRED_UIDS = ("sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid")
TEXTS = ("patient_id", "modality", "series_description", "body_part", "study_date", "accession_number")


def _from_walk(buf: bytes | bytearray | memoryview | mmap.mmap, size: int | None = None) -> InstanceHeaders | None:
    """The headers by the fast reader, when it is sure of the file and every UID is valid
    (``buf`` may be only the beginning of a file of ``size`` bytes)."""
    found = part10.read_attributes(buf, size)
    if found is None or not all(is_valid_uid(found.get(name)) for name in (*REQUIRED_UIDS, "transfer_syntax_uid")):
        return None
    return InstanceHeaders(
        sop_instance_uid=found["sop_instance_uid"],
        sop_class_uid=found["sop_class_uid"],
        study_instance_uid=found["study_instance_uid"],
        series_instance_uid=found["series_instance_uid"],
        transfer_syntax_uid=found["transfer_syntax_uid"],
        **{name: found.get(name, "")[:256] for name in TEXTS},
    )


def read_headers_in_pieces(pieces: Sequence[bytes | bytearray | memoryview], size: int) -> InstanceHeaders:
    """``read_headers`` of a file received in pieces, without joining them when the fast reader
    finds what it needs in the first ones (it nearly always does: it reads element headers only)."""
    head: bytes | bytearray | memoryview = pieces[0] if pieces else b""
    if len(head) < HEAD_SIZE and len(pieces) > 1:
        taken, length = [], 0
        for piece in pieces:
            taken.append(piece)
            length += len(piece)
            if length >= HEAD_SIZE:
                break
        head = b"".join(taken)
    headers = _from_walk(head, size)
    if headers is not None:
        return headers
    return read_headers(b"".join(pieces))


def read_headers(source: Path | bytes | bytearray | memoryview | mmap.mmap) -> InstanceHeaders:
    """Parse and validate a Part-10 file's headers; raises ``InvalidDicom`` with the reason.

    The fast reader (``mwm.part10``) answers for well-formed files; pydicom decides the rest and
    words the reasons. Blocking: call it from a thread when on the event loop.
    """
    if isinstance(source, (bytes, bytearray, memoryview, mmap.mmap)):
        headers = _from_walk(source)
        if headers is not None:
            return headers
        data = bytes(source)
        return _parse(io.BytesIO(data), len(data))
    with open(source, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size >= part10.PREAMBLE_END:
            with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                headers = _from_walk(mapped)
            if headers is not None:
                return headers
        return _parse(stream, size)

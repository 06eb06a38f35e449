"""A fast, strict reader of the few attributes mwm records from a well-formed Part-10 file.

It walks the element headers of the file meta information and of the top-level data set, in the
two encodings nearly every file uses (explicit and implicit VR little endian; compressed transfer
syntaxes are explicit VR little endian with encapsulated pixel data), skipping values by their
lengths: pixel data is never touched. It answers only when the file is well-formed to its last
byte; anything it is not sure of (another encoding, a length that does not add up, deep nesting,
an attribute longer than it reads) makes it answer ``None``, and pydicom decides instead
(``mwm.headers``). It never rejects a file by itself.
"""

from __future__ import annotations

from struct import Struct
from typing import Any

PREAMBLE_END = 132  # 128-byte preamble + b"DICM"
UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 16  # sequences nested deeper than this are left to pydicom
MAX_VALUE = 4096  # the longest value read (as pydicom's defer_size): longer ones are left to pydicom

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# Encodings this reader does not walk: explicit VR big endian, and the deflated ones.
NOT_WALKED = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})

# Explicit VRs whose length is 4 bytes after 2 reserved ones (PS3.5 §7.1.2).
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
VALID_VRS = LONG_VRS | frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())

ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
TRANSFER_SYNTAX = 0x00020010

#: The attributes recorded, by tag, with the name ``InstanceHeaders`` gives them.
WANTED = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
    0x00100020: "patient_id",
    0x00080060: "modality",
    0x0008103E: "series_description",
    0x00180015: "body_part",
    0x00080020: "study_date",
    0x00080050: "accession_number",
}

WANTED_GROUPS = frozenset(tag >> 16 for tag in WANTED)

_TAG = Struct("<HH")
_SHORT = Struct("<HH2sH")  # group, element, VR, 2-byte length
_LONG_LENGTH = Struct("<L")
_IMPLICIT = Struct("<HHL")  # group, element, 4-byte length


class NotWalked(Exception):
    """The reader is not sure of this file; pydicom will decide."""


def _element(buf: bytes | memoryview, pos: int, end: int, explicit: bool) -> tuple[int, int, int, bool]:
    """The element header at ``pos``: (tag, value start, value length, is a sequence)."""
    if pos + 8 > end:
        raise NotWalked
    if explicit:
        group, elem, vr, length = _SHORT.unpack_from(buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:  # item and delimiters carry no VR
            (length,) = _LONG_LENGTH.unpack_from(buf, pos + 4)
            return tag, pos + 8, length, False
        if vr in LONG_VRS:
            if pos + 12 > end:
                raise NotWalked
            (length,) = _LONG_LENGTH.unpack_from(buf, pos + 8)
            return tag, pos + 12, length, vr == b"SQ"
        if vr not in VALID_VRS:
            raise NotWalked
        return tag, pos + 8, length, False
    group, elem, length = _IMPLICIT.unpack_from(buf, pos)
    return group << 16 | elem, pos + 8, length, False


def _skip_undefined(
    buf: bytes | memoryview, pos: int, end: int, explicit: bool, depth: int, fragments: bool = False
) -> int:
    """Walk a sequence, or encapsulated pixel data (``fragments``), of undefined length; the
    position after it."""
    if depth > MAX_DEPTH:
        raise NotWalked
    while True:
        tag, start, length, _ = _element(buf, pos, end, explicit)
        if tag == SEQUENCE_END:
            if length != 0:
                raise NotWalked
            return start
        if tag != ITEM:
            raise NotWalked
        if length == UNDEFINED:
            if fragments:
                raise NotWalked
            pos = _walk_item(buf, start, end, explicit, depth + 1)
        else:
            pos = start + length
            if pos > end:
                raise NotWalked


def _walk_item(buf: bytes | memoryview, pos: int, end: int, explicit: bool, depth: int) -> int:
    """Walk the data set of an item of undefined length up to its delimiter; the position after it."""
    while True:
        tag, start, length, sequence = _element(buf, pos, end, explicit)
        if tag == ITEM_END:
            if length != 0:
                raise NotWalked
            return start
        if tag >> 16 == 0xFFFE:
            raise NotWalked
        pos = _skip_value(buf, tag, start, length, sequence, end, explicit, depth)


def _skip_value(
    buf: bytes | memoryview, tag: int, start: int, length: int, sequence: bool, end: int, explicit: bool, depth: int
) -> int:
    """The position after an element's value."""
    if length != UNDEFINED:
        after = start + length
        if after > end:
            raise NotWalked
        return after
    if tag == PIXEL_DATA and not sequence:
        return _skip_undefined(buf, start, end, explicit, depth + 1, fragments=True)
    # Otherwise only a sequence may have an undefined length (with implicit VR it can only be one;
    # an explicit UN of undefined length holds implicit VR data: left to pydicom).
    if explicit and not sequence:
        raise NotWalked
    return _skip_undefined(buf, start, end, explicit, depth + 1)


def _text(value: bytes | memoryview) -> str:
    return bytes(value).decode("latin-1").strip("\0 ")


def read_attributes(buf: Any, size: int | None = None) -> dict[str, str] | None:
    """The transfer syntax and the ``WANTED`` attributes of a well-formed Part-10 file, or None.

    ``buf`` holds the file, or only its beginning when ``size`` (the whole file's) is larger: the
    element headers are then read from the beginning and the values beyond it skipped by their
    lengths (None when something needed lies beyond it). The answer holds the attributes present
    (absent ones are left out) and ``transfer_syntax_uid``; values are the raw text without
    padding. None means: not sure, ask pydicom.
    """
    avail = len(buf)
    end = avail if size is None else size
    if avail < PREAMBLE_END or end < avail or bytes(buf[128:132]) != b"DICM":
        return None
    try:
        return _read(buf, end, avail)
    except (NotWalked, UnicodeDecodeError):
        return None


def _read(buf: Any, end: int, avail: int) -> dict[str, str] | None:
    found: dict[str, str] = {}
    pos = PREAMBLE_END
    transfer_syntax = None
    # File meta information: always explicit VR little endian, group 0002.
    while pos + 8 <= avail and _TAG.unpack_from(buf, pos)[0] == 0x0002:
        tag, start, length, _ = _element(buf, pos, avail, True)
        if length == UNDEFINED or start + length > avail:
            return None
        if tag == TRANSFER_SYNTAX:
            if length > 64 + 1:
                return None
            transfer_syntax = _text(buf[start : start + length])
        pos = start + length
    if not transfer_syntax or transfer_syntax in NOT_WALKED:
        return None
    found["transfer_syntax_uid"] = transfer_syntax
    explicit = transfer_syntax != IMPLICIT_VR_LITTLE_ENDIAN
    if pos == end:
        return None  # no data set at all: let pydicom word the answer
    # The top level, inlined (one pass over ~100 elements is most of the cost); sequences and
    # encapsulated pixel data of undefined length go through _skip_value.
    wanted = WANTED
    groups = WANTED_GROUPS
    long_vrs = LONG_VRS
    valid_vrs = VALID_VRS
    unpack_long = _LONG_LENGTH.unpack_from
    unpack = _SHORT.unpack_from if explicit else _IMPLICIT.unpack_from
    while pos < end:
        if pos + 8 > avail:
            return None
        if explicit:
            group, elem, vr, length = unpack(buf, pos)
            if vr in long_vrs:
                if pos + 12 > avail:
                    return None
                (length,) = unpack_long(buf, pos + 8)
                start = pos + 12
            elif vr in valid_vrs:
                start = pos + 8
            else:
                return None
        else:
            group, elem, length = unpack(buf, pos)
            vr = b""
            start = pos + 8
        if group == 0xFFFE or group == 0x0002:
            return None  # a delimiter or meta element in the data set: not well-formed here
        if length == UNDEFINED:  # walked item by item: all of it must be at hand
            pos = _skip_value(buf, group << 16 | elem, start, length, vr == b"SQ", avail, explicit, 0)
            continue
        pos = start + length
        if pos > end:
            return None
        if group in groups:
            name = wanted.get(group << 16 | elem)
            if name is not None:
                if length > MAX_VALUE or pos > avail:
                    return None
                found[name] = _text(buf[start:pos])
    return found

"""The DICOM UID grammar (PS3.5 §9.1), checked before a UID names anything."""

from __future__ import annotations

import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a DICOM UID: digits and dots, no leading zeros, at most 64 chars."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and _UID.match(value) is not None

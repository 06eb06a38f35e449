"""Result collection: every file an application wrote becomes a stored, described result."""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .db import NewResult
from .errors import InvalidDicom, MwmError
from .headers import read_headers
from .storage import Storage, key

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
MAX_METADATA_SIZE = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_segment(name: str) -> str:
    """A file name an application chose, made safe to use as a storage key segment."""
    cleaned = _UNSAFE.sub("_", name)[:200]
    if not cleaned or not cleaned[0].isalnum():
        cleaned = "f" + cleaned[:199]
    return cleaned


@dataclass(frozen=True)
class OutputFile:
    path: Path
    relative: str  # safe, '/'-separated


def list_outputs(folder: Path) -> list[OutputFile]:
    """Regular files under ``folder``; links are not followed (an application cannot point us at /etc)."""
    found: list[OutputFile] = []
    if not folder.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                log.warning("ignoring %s: not a regular file", path)
                continue
            parts = path.relative_to(folder).parts
            found.append(OutputFile(path, "/".join(safe_segment(p) for p in parts)))
    return found


def describe(path: Path, relative: str, storage_key: str) -> NewResult:
    """Size, media type and (for DICOM) the identifying UIDs of one output file."""
    size = path.stat().st_size
    try:
        headers = read_headers(path)
    except InvalidDicom:
        media_type = mimetypes.guess_type(relative)[0] or "application/octet-stream"
        return NewResult(path=relative, storage_key=storage_key, size=size, media_type=media_type)
    return NewResult(
        path=relative,
        storage_key=storage_key,
        size=size,
        media_type="application/dicom",
        sop_instance_uid=headers.sop_instance_uid,
        sop_class_uid=headers.sop_class_uid,
        study_instance_uid=headers.study_instance_uid,
        series_instance_uid=headers.series_instance_uid,
        transfer_syntax_uid=headers.transfer_syntax_uid,
    )


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """The application's ``metadata.json``, when it wrote a valid one."""
    path = folder / METADATA_FILE
    if not path.is_file() or path.is_symlink():
        return None
    if path.stat().st_size > MAX_METADATA_SIZE:
        return {"error": f"{METADATA_FILE} is larger than {MAX_METADATA_SIZE} bytes"}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return {"error": f"{METADATA_FILE} is not valid JSON: {exc}"}
    return data if isinstance(data, dict) else {"value": data}


async def collect(storage: Storage, job_id: int, folder: Path) -> tuple[list[NewResult], dict[str, Any] | None]:
    """Store every output file under ``results/<job>/`` and describe it.

    Keys are deterministic, so collecting the same folder again (after a crash) rewrites the
    same objects rather than adding new ones.
    """
    outputs = await asyncio.to_thread(list_outputs, folder)
    results: list[NewResult] = []
    for output in outputs:
        storage_key = key("results", str(job_id), output.relative)
        result = await asyncio.to_thread(describe, output.path, output.relative, storage_key)
        try:
            await storage.put_file(storage_key, output.path)
        except MwmError:
            raise
        results.append(result)
    metadata = await asyncio.to_thread(read_metadata, folder)
    return results, metadata

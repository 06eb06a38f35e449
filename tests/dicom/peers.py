"""Real DICOM peers and test data for the tests of the SCP, ``mwm echo`` and the DICOM sinks.

dcmtk's command-line tools and Orthanc (with its DICOMweb plugin) run as subprocesses on
127.0.0.1, on ports the kernel chooses, in temporary folders. Debian builds both with Nagle's
algorithm on unless ``TCP_NODELAY=1`` is in their environment, so it always is. A test is
skipped, saying which, only when a program is not installed. The fixtures are in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest
from pydicom.uid import generate_uid

from mwm.options import build
from mwm.sinks import Delivery
from mwm.sinks.dicom import DicomOptions, DicomSink
from mwm.storage.local import LocalStorage

DCMTK = Path("/usr/bin")
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
START_TIMEOUT = 20.0


def dcmtk(name: str) -> str:
    """The path of a dcmtk program; skips the test when dcmtk is not installed.

    Always the system's: the venv's pynetdicom installs its own ``storescu``/``echoscu``.
    """
    path = DCMTK / name
    if not path.exists():
        pytest.skip(f"dcmtk's {name} is not installed ({path})")
    return str(path)


def peer_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


@dataclass
class Completed:
    returncode: int
    output: str


async def run(*argv: str, timeout: float = 60.0) -> Completed:
    """Run a program without blocking the event loop; its stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=peer_env()
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return Completed(process.returncode if process.returncode is not None else -1, out.decode("utf-8", "replace"))


async def storescu(
    port: int, files: Sequence[Path], *options: str, called: str = "MWM", calling: str = "STORESCU"
) -> Completed:
    return await run(
        dcmtk("storescu"), "-aet", calling, "-aec", called, *options, "127.0.0.1", str(port), *map(str, files)
    )


async def echoscu(port: int, *, called: str = "MWM", calling: str = "ECHOSCU") -> Completed:
    return await run(dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port))


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part-10 file as encoded: what follows the File Meta Information."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part-10 file"
    # (0002,0000) UL, explicit VR little endian: tag 4 + VR 2 + length 2 + value 4
    assert data[132:138] == b"\x02\x00\x00\x00UL", f"{path} has no File Meta Information Group Length"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(check: Any, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT} s")


# -- dcmtk storescp ----------------------------------------------------------------------------


@dataclass
class StoreScp:
    """dcmtk's storescp: writes what it receives, bit-preserving, into ``folder``."""

    port: int
    folder: Path
    ae_title: str = "STORESCP"

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


# -- Orthanc -----------------------------------------------------------------------------------


def dicomweb_plugin() -> Path | None:
    for folder in DICOMWEB_PLUGIN_DIRS:
        path = folder / "libOrthancDicomWeb.so"
        if path.exists():
            return path
    return None


@dataclass
class Orthanc:
    """An Orthanc server; ``mwm_port`` is where its configuration says the modality "mwm" listens."""

    http_port: int
    dicom_port: int
    mwm_port: int
    ae_title: str = "ORTHANC"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        async with aiohttp.ClientSession() as session:
            data = body if isinstance(body, bytes) else json.dumps(body) if body is not None else None
            async with session.request(method, self.url + path, data=data) as response:
                text = await response.text()
                assert response.status < 400, f"Orthanc {method} {path}: HTTP {response.status}: {text[:300]}"
                if response.content_type == "application/json":
                    return json.loads(text)
                return text

    async def find_instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """The instance with this SOP Instance UID, with its tags, if Orthanc has it."""
        found = await self.request(
            "POST", "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}, "Expand": True}
        )
        return found[0] if found else None


# -- test data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One instance in a given transfer syntax, and the storescu option that proposes it."""

    path: Path
    transfer_syntax_uid: str
    sop_instance_uid: str
    propose: tuple[str, ...]


def new_uid_copy(source: Path, dest: Path) -> Path:
    """A copy of ``source`` with a new SOP Instance UID; the data set's encoding is kept."""
    ds = pydicom.dcmread(source)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(dest, enforce_file_format=True)
    return dest


def convert(program: str, options: Sequence[str], source: Path, dest: Path) -> Path:
    result = subprocess.run([dcmtk(program), *options, str(source), str(dest)], capture_output=True, env=peer_env())
    assert result.returncode == 0, f"{program} {options}: {result.stderr.decode(errors='replace')}"
    return dest


# -- sinks ------------------------------------------------------------------------------------


async def results(storage: LocalStorage, paths: Sequence[Path], *, extra_text: bool = True) -> list[Delivery]:
    """Store ``paths`` as results of job 1 and describe them as the delivery service would;
    with ``extra_text``, a ``metadata.json`` (not DICOM) comes last."""
    deliveries = []
    for n, path in enumerate(paths, 1):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        key = f"results/1/{n}.dcm"
        await storage.put_file(key, path)
        deliveries.append(
            Delivery(
                delivery_id=n,
                result_id=n,
                job_id=1,
                app_id="app",
                correlation_id="c",
                attempts=0,
                path=f"{n}.dcm",
                storage_key=key,
                size=path.stat().st_size,
                media_type="application/dicom",
                study_instance_uid=str(ds.StudyInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            )
        )
    if extra_text:
        await storage.put_bytes("results/1/metadata.json", b"{}")
        n = len(deliveries) + 1
        key = "results/1/metadata.json"
        text = Delivery(n, n, 1, "app", "c", 0, "metadata.json", key, 2, "application/json", "", None, None, None)
        deliveries.append(text)
    return deliveries


async def dicom_sink(storage: LocalStorage, base_dir: Path, **options: Any) -> DicomSink:
    """An opened ``dicom`` sink with these options (the caller closes it)."""
    sink = DicomSink("pacs", build(DicomOptions, options, "sinks[0]"), storage=storage, base_dir=base_dir)
    await sink.open()
    return sink

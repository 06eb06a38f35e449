"""Fixtures starting real DICOM peers (dcmtk's storescp, Orthanc) and making test data.

Each peer listens on 127.0.0.1 on a port the kernel chooses, works in a temporary folder, and
is stopped at the end; the helpers they use are in ``peers.py``.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pydicom
import pytest
import synthetic
from peers import (
    ORTHANC,
    Encoded,
    Orthanc,
    StoreScp,
    convert,
    dcmtk,
    dicomweb_plugin,
    free_port,
    new_uid_copy,
    peer_env,
    port_open,
    stop_process,
    wait_for,
)
from pydicom.data import get_testdata_file

from mwm.storage.local import LocalOptions, LocalStorage


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    program = dcmtk("storescp")
    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    log = tmp_path / "storescp.log"
    with open(log, "wb") as out:
        # +xa: accept every transfer syntax dcmtk knows; +B: write the data set exactly as received
        process = subprocess.Popen(
            [program, "--aetitle", "STORESCP", "+xa", "+B", "--output-directory", str(folder), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=peer_env(),
        )
    try:
        wait_for(lambda: port_open(port), process, "storescp", log)
        yield StoreScp(port, folder)
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not ORTHANC.exists():
        pytest.skip(f"Orthanc is not installed ({ORTHANC})")
    plugin = dicomweb_plugin()
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin (libOrthancDicomWeb.so, package orthanc-dicomweb) is not installed")
    folder = tmp_path_factory.mktemp("orthanc")
    server = Orthanc(http_port=free_port(), dicom_port=free_port(), mwm_port=free_port())
    config = {
        "Name": "mwm-tests",
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": server.ae_title,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {"mwm": ["MWM", "127.0.0.1", server.mwm_port]},
        "DicomScuTimeout": 30,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    log = folder / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(ORTHANC), str(path)], stdout=out, stderr=subprocess.STDOUT, env=peer_env())

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{server.url}/system", timeout=1):
                return port_open(server.dicom_port)
        except OSError:
            return False

    try:
        wait_for(ready, process, "Orthanc", log)
        yield server
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Encoded]:
    """The same kinds of instance in every transfer syntax mwm should store byte for byte.

    Uncompressed, deflated, JPEG lossless, JPEG-LS and RLE are made by dcmtk from a synthetic
    16-bit CT; JPEG baseline (8-bit colour) and JPEG 2000 come from pydicom's test files.
    """
    folder = tmp_path_factory.mktemp("encoded")
    study = synthetic.generate_study(folder / "ct", series_count=1, instances_per_series=8, rows=64, cols=64, seed=7)
    ct = study.paths
    made = {
        "explicit": (new_uid_copy(ct[0], folder / "explicit.dcm"), ("-xe",)),
        "implicit": (convert("dcmconv", ["+ti"], ct[1], folder / "implicit.dcm"), ("-xi",)),
        "deflated": (convert("dcmconv", ["+td"], ct[2], folder / "deflated.dcm"), ("-xd",)),
        "jpeg-lossless": (convert("dcmcjpeg", ["+e1"], ct[3], folder / "jpeg-lossless.dcm"), ("-xs",)),
        "jpeg-ls": (convert("dcmcjpls", [], ct[4], folder / "jpeg-ls.dcm"), ("-xt",)),
        "rle": (convert("dcmcrle", [], ct[5], folder / "rle.dcm"), ("-xr",)),
        "jpeg-baseline": (
            new_uid_copy(Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")), folder / "jpeg-baseline.dcm"),
            ("-xy",),
        ),
        "j2k-lossless": (
            new_uid_copy(Path(get_testdata_file("MR_small_jp2klossless.dcm")), folder / "j2k-lossless.dcm"),
            ("-xv",),
        ),
        "j2k": (new_uid_copy(Path(get_testdata_file("JPEG2000.dcm")), folder / "j2k.dcm"), ("-xw",)),
    }
    out = {}
    for name, (path, propose) in made.items():
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        out[name] = Encoded(path, str(meta.file_meta.TransferSyntaxUID), str(meta.SOPInstanceUID), propose)
    return out


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    """A local storage for results a sink sends (in its own folder of the test's)."""
    store = LocalStorage(LocalOptions(), data_dir=tmp_path / "data")
    await store.open()
    yield store
    await store.close()

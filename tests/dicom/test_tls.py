"""DICOM over TLS: mwm's SCP with a certificate, the ``dicom`` sink as a TLS client of it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from peers import dicom_sink, echoscu, results, run
from support import base_config

from mwm.storage.local import LocalOptions, LocalStorage


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        [
            openssl,
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def mutual_tls_peer(tmp_path: Path, make_service: Any) -> tuple[Any, Path, Path, Path]:
    """An mwm whose SCP speaks TLS only and asks for a client certificate (``client.pem``): the
    service, its certificate, and the client's certificate and key."""
    server_cert, server_key = make_certificate(tmp_path, "server")
    client_cert, client_key = make_certificate(tmp_path, "client")
    peer = await make_service(
        base_config(
            tmp_path / "peer",
            server={"dicom": "127.0.0.1:0"},
            dicom={"tls_cert": str(server_cert), "tls_key": str(server_key), "tls_ca": str(client_cert)},
        )
    )
    return peer, server_cert, client_cert, client_key


async def test_dicom_sink_delivers_over_tls_with_client_certificates(tmp_path, make_service, client_for, small_study):
    peer, server_cert, client_cert, client_key = await mutual_tls_peer(tmp_path, make_service)
    client = await client_for(peer)
    assert (await echoscu(peer.dicom_port)).returncode != 0  # plain TCP is refused

    storage = LocalStorage(LocalOptions(), data_dir=tmp_path / "data")
    await storage.open()
    batch = await results(storage, small_study.paths[:2], extra_text=False)
    target = {"ae_title": "MWM", "host": "127.0.0.1", "port": peer.dicom_port, "tls_ca": str(server_cert)}

    anonymous = await dicom_sink(storage, tmp_path, **target)
    try:
        assert [o.state for o in await anonymous.deliver(batch)] == ["failed", "failed"]
    finally:
        await anonymous.close()

    sink = await dicom_sink(storage, tmp_path, **target, tls_cert=str(client_cert), tls_key=str(client_key))
    try:
        assert [o.state for o in await sink.deliver(batch)] == ["delivered", "delivered"]
    finally:
        await sink.close()
    rows = (await client.get("/v1/instances"))["instances"]
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in small_study.paths[:2]}
    assert {r["sop_instance_uid"] for r in rows} == sent
    await storage.close()


async def test_a_client_that_never_completes_the_handshake_holds_up_no_one(tmp_path, make_service, small_study):
    server_cert, server_key = make_certificate(tmp_path, "server")
    peer = await make_service(
        base_config(
            tmp_path / "peer",
            server={"dicom": "127.0.0.1:0"},
            dicom={"tls_cert": str(server_cert), "tls_key": str(server_key), "acse_timeout": "1s"},
        )
    )
    silent = socket.create_connection(("127.0.0.1", peer.dicom_port))  # connects, says nothing
    storage = LocalStorage(LocalOptions(), data_dir=tmp_path / "data")
    await storage.open()
    try:
        batch = await results(storage, small_study.paths[:1], extra_text=False)
        sink = await dicom_sink(
            storage, tmp_path, ae_title="MWM", host="127.0.0.1", port=peer.dicom_port, tls_ca=str(server_cert)
        )
        try:
            assert [o.state for o in await sink.deliver(batch)] == ["delivered"]
        finally:
            await sink.close()
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed by mwm once the handshake time ran out
    finally:
        silent.close()
        await storage.close()


async def test_mwm_echo_over_tls(tmp_path, make_service):
    """``mwm echo`` checks a TLS node the way the sink reaches it: the peer verified against a CA,
    with a client certificate when the node asks for one."""
    peer, server_cert, client_cert, client_key = await mutual_tls_peer(tmp_path, make_service)
    target = f"MWM@127.0.0.1:{peer.dicom_port}"
    echo = [sys.executable, "-m", "mwm", "echo", target, "--timeout", "5"]
    trusted = ["--tls-ca", str(server_cert), "--tls-cert", str(client_cert), "--tls-key", str(client_key)]
    result = await run(*echo, *trusted)
    assert result.returncode == 0, result.output
    assert "association accepted in" in result.output and "(TLS)" in result.output
    without_certificate = await run(*echo, "--tls-ca", str(server_cert))
    assert without_certificate.returncode == 1  # the node asks for a client certificate
    untrusted = await run(*echo, "--tls", "--tls-cert", str(client_cert), "--tls-key", str(client_key))
    assert untrusted.returncode == 1  # the node's certificate is not signed by a CA the system knows
    half = await run(*echo, "--tls-cert", str(client_cert))
    assert half.returncode == 2 and "a client certificate and its key go together" in half.output

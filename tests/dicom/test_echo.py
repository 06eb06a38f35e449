"""``mwm echo`` against dcmtk's storescp and against mwm's own SCP."""

from __future__ import annotations

import asyncio
import sys

import pytest
from peers import free_port, run
from support import base_config

from mwm.echo import parse_target


async def mwm_echo(target: str, *args: str) -> tuple[int, str]:
    result = await run(sys.executable, "-m", "mwm", "echo", target, *args)
    return result.returncode, result.output


async def test_echo_storescp_several_times(storescp):
    code, output = await mwm_echo(f"{storescp.ae_title}@127.0.0.1:{storescp.port}", "--count", "3", "--timeout", "5")
    assert code == 0, output
    assert "association accepted" in output
    assert output.count("success in") == 3
    assert "3 response(s), 0 failure(s)" in output


async def test_echo_reports_a_rejection_with_its_reason(tmp_path, make_service):
    service = await make_service(base_config(tmp_path, server={"dicom": "127.0.0.1:0"}))
    code, output = await mwm_echo(f"NOT-MWM@127.0.0.1:{service.dicom_port}")
    assert code == 1
    assert "association rejected (permanent, service user): called ae title not recognised" in output
    code, output = await mwm_echo(f"MWM@127.0.0.1:{service.dicom_port}", "--calling-aet", "ECHOER")
    assert code == 0, output


async def test_echo_to_a_node_without_verification_says_so(tmp_path):
    """A storage-only SCP (no Verification service): the association is accepted with no usable
    presentation context; the message says so instead of guessing."""

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="STOREONLY")
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        code, output = await mwm_echo(f"STOREONLY@127.0.0.1:{port}", "--timeout", "5")
    finally:
        await asyncio.to_thread(server.shutdown)
    assert code == 1
    assert "the destination accepts none of the presentation contexts proposed" in output
    assert "TLS?" not in output


async def test_echo_says_when_nothing_listens():
    code, output = await mwm_echo(f"ANY@127.0.0.1:{free_port()}", "--timeout", "2")
    assert code == 1
    assert "cannot reach 127.0.0.1" in output and "refused" in output.lower()


async def test_echo_rejects_a_malformed_target():
    code, output = await mwm_echo("127.0.0.1:104")
    assert code == 2
    assert "expected AE@HOST:PORT" in output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@10.0.0.5:104", ("PACS", "10.0.0.5", 104)),
        ("MY AE@host.example:11112", ("MY AE", "host.example", 11112)),
        ("V6@[::1]:4242", ("V6", "::1", 4242)),
    ],
)
def test_parse_target(text, expected):
    target = parse_target(text)
    assert (target.ae_title, target.host, target.port) == expected


@pytest.mark.parametrize(
    "text",
    ["", "PACS", "PACS@host", "PACS@host:0", "PACS@host:70000", "@host:104", "SEVENTEEN-CHARS-X@h:1", "A\\B@h:1"],
)
def test_parse_target_refuses(text):
    with pytest.raises(ValueError):
        parse_target(text)

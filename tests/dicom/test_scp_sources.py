"""``dicom.sources`` whose hosts are names: resolved off the event loop, at start-up and again
when an association arrives, without a name that does not resolve stopping mwm."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from peers import echoscu
from support import base_config, eventually

from mwm import scp
from mwm.errors import ConfigError


def scp_config(tmp_path: Path, sources: list[dict[str, Any]]) -> dict[str, Any]:
    return base_config(tmp_path, server={"dicom": "127.0.0.1:0"}, dicom={"sources": sources})


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    """mwm.scp's lines at ``level``, leaving out the accepted and closed lines of every association."""
    lines = [r.getMessage() for r in caplog.records if r.name == "mwm.scp" and r.levelno == level]
    return [line for line in lines if not (line.endswith(" accepted") or " closed after " in line)]


class FakeDns:
    """Stands for ``scp.resolve_host``: answers from ``answers`` (a missing name does not resolve),
    records each lookup and the thread it ran on, and blocks while ``gate`` is set and closed."""

    def __init__(self, answers: dict[str, set[str]] | None = None) -> None:
        self.answers = dict(answers or {})
        self.calls: list[tuple[str, threading.Thread]] = []
        self.gate: threading.Event | None = None

    def __call__(self, host: str) -> frozenset[str]:
        self.calls.append((host, threading.current_thread()))
        if self.gate is not None:
            assert self.gate.wait(30), "the test never released the lookup"
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return frozenset(self.answers[host])


class Clock:
    """Stands for the host cache's clock; moved on by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    monkeypatch.setattr(scp, "resolve_host", fake)
    return fake


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(scp, "_now", fake)
    return fake


async def accepted(port: int, calling: str) -> bool:
    result = await echoscu(port, calling=calling)
    if result.returncode == 0:
        return True
    assert "calling ae title not recognized" in result.output.lower(), result.output
    return False


async def test_a_source_whose_name_does_not_resolve_does_not_stop_mwm(tmp_path, make_service, caplog):
    """Real DNS: names under .invalid never resolve."""
    caplog.set_level(logging.INFO, logger="mwm.scp")
    sources = [{"ae_title": "CT1", "host": "ct1.invalid"}, {"ae_title": "LOCAL", "host": "127.0.0.1"}]
    service = await make_service(scp_config(tmp_path, sources))
    (startup,) = [m for m in messages(caplog) if "ct1.invalid" in m]
    assert startup.startswith("DICOM source CT1: cannot resolve host 'ct1.invalid': ")
    assert startup.endswith("; its associations are refused until it resolves")
    assert await accepted(service.dicom_port, "LOCAL")
    caplog.clear()
    assert not await accepted(service.dicom_port, "CT1")  # "calling AE title not recognised"
    (refused,) = messages(caplog)
    assert refused.startswith(
        "DICOM association from CT1@127.0.0.1 refused: "
        "calling AE title 'CT1' from 127.0.0.1, expected ct1.invalid (cannot resolve: "
    ), refused
    assert await accepted(service.dicom_port, "LOCAL")


async def test_a_source_is_accepted_once_its_name_resolves(tmp_path, make_service, dns, clock, caplog):
    caplog.set_level(logging.INFO, logger="mwm.scp")
    loop_thread = threading.current_thread()
    service = await make_service(scp_config(tmp_path, [{"ae_title": "CT1", "host": "ct1.example.org"}]))
    port = service.dicom_port
    assert [host for host, _ in dns.calls] == ["ct1.example.org"]  # at start-up, which went on
    assert any(m.startswith("DICOM source CT1: cannot resolve host 'ct1.example.org'") for m in messages(caplog))

    assert not await accepted(port, "CT1")
    dns.answers["ct1.example.org"] = {"127.0.0.1"}
    clock.now += scp.RETRY_INTERVAL - 1
    assert not await accepted(port, "CT1")  # the failure is still recent: not looked up again
    assert len(dns.calls) == 1

    clock.now += 1
    caplog.clear()
    assert await accepted(port, "CT1")  # looked up again, as the association arrived
    assert len(dns.calls) == 2
    assert messages(caplog, logging.INFO) == ["DICOM source CT1: host 'ct1.example.org' now resolves to 127.0.0.1"]
    clock.now += scp.RESOLVE_INTERVAL - 1
    for _ in range(3):
        assert await accepted(port, "CT1")
    assert len(dns.calls) == 2  # its answer serves RESOLVE_INTERVAL
    assert all(thread is not loop_thread for _, thread in dns.calls)


async def test_a_source_whose_address_changed_is_accepted_after_its_name_is_resolved_again(
    tmp_path, make_service, dns, clock, caplog
):
    """A modality given a new address (DHCP, a DNS update) needs no restart of mwm."""
    caplog.set_level(logging.INFO, logger="mwm.scp")
    dns.answers["ct1.example.org"] = {"192.0.2.4"}
    service = await make_service(scp_config(tmp_path, [{"ae_title": "CT1", "host": "ct1.example.org"}]))
    port = service.dicom_port
    assert not await accepted(port, "CT1")
    assert messages(caplog)[-1] == (
        "DICOM association from CT1@127.0.0.1 refused: calling AE title 'CT1' from 127.0.0.1, "
        "expected ct1.example.org (192.0.2.4)"
    )
    dns.answers["ct1.example.org"] = {"127.0.0.1", "::1"}
    assert not await accepted(port, "CT1")
    assert len(dns.calls) == 1
    clock.now += scp.RESOLVE_INTERVAL
    assert await accepted(port, "CT1")
    assert len(dns.calls) == 2
    assert "DICOM source CT1: host 'ct1.example.org' now resolves to 127.0.0.1, ::1" in messages(caplog, logging.INFO)


async def test_a_failed_lookup_keeps_the_addresses_last_resolved(tmp_path, make_service, dns, clock, caplog):
    caplog.set_level(logging.INFO, logger="mwm.scp")
    dns.answers["ct1.example.org"] = {"127.0.0.1"}
    service = await make_service(scp_config(tmp_path, [{"ae_title": "CT1", "host": "ct1.example.org"}]))
    assert await accepted(service.dicom_port, "CT1")
    del dns.answers["ct1.example.org"]  # the DNS server is down
    clock.now += scp.RESOLVE_INTERVAL
    assert await accepted(service.dicom_port, "CT1")
    assert len(dns.calls) == 2
    assert messages(caplog) == [
        "DICOM source CT1: cannot resolve host 'ct1.example.org': [Errno -2] Name or service not known; "
        "still accepting it from 127.0.0.1, as last resolved"
    ]
    clock.now += scp.RETRY_INTERVAL - 1
    assert await accepted(service.dicom_port, "CT1")
    assert len(dns.calls) == 2


async def test_associations_arriving_during_a_lookup_wait_for_it_and_the_event_loop_does_not(
    tmp_path, make_service, client_for, dns, clock
):
    dns.answers["ct1.example.org"] = {"127.0.0.1"}
    service = await make_service(scp_config(tmp_path, [{"ae_title": "CT1", "host": "ct1.example.org"}]))
    client = await client_for(service)
    dns.gate = threading.Event()  # the next lookup hangs until released
    clock.now += scp.RESOLVE_INTERVAL
    sending = [asyncio.create_task(echoscu(service.dicom_port, calling="CT1")) for _ in range(3)]
    try:

        async def looking_up() -> bool:
            return len(dns.calls) == 2

        await eventually(looking_up, timeout=10, what="the name looked up again")
        # The event loop goes on meanwhile: the HTTP API answers.
        assert (await client.get("/v1/instances"))["instances"] == []
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in sending)
    finally:
        dns.gate.set()
    results = await asyncio.gather(*sending)
    assert [r.returncode for r in results] == [0, 0, 0], [r.output for r in results]
    assert len(dns.calls) == 2  # one lookup served all three


async def test_addresses_are_not_looked_up(tmp_path, make_service, dns):
    sources = [
        {"ae_title": "CT1", "host": "127.0.0.1"},
        {"ae_title": "CT2", "host": "[::1]"},
        {"ae_title": "CT3", "host": "::ffff:127.0.0.1"},  # IPv4-mapped: the same peer as 127.0.0.1
        {"ae_title": "CT4", "host": "192.0.2.7"},
    ]
    service = await make_service(scp_config(tmp_path, sources))
    assert await accepted(service.dicom_port, "CT1")
    assert await accepted(service.dicom_port, "CT3")
    assert not await accepted(service.dicom_port, "CT2")
    assert not await accepted(service.dicom_port, "CT4")
    assert dns.calls == []


async def test_names_are_not_looked_up_when_sources_are_not_enforced(tmp_path, make_service, dns):
    config = scp_config(tmp_path, [{"ae_title": "CT1", "host": "ct1.example.org"}])
    config["dicom"]["reject_unknown_sources"] = False
    service = await make_service(config)
    assert await accepted(service.dicom_port, "CT1")
    assert await accepted(service.dicom_port, "ANYONE")
    assert dns.calls == []


async def test_an_unknown_calling_ae_title_is_logged_as_such(tmp_path, make_service, dns, caplog):
    service = await make_service(scp_config(tmp_path, [{"ae_title": "CT1", "host": "127.0.0.1"}]))
    assert not await accepted(service.dicom_port, "STRANGER")
    assert messages(caplog) == [
        "DICOM association from STRANGER@127.0.0.1 refused: unknown calling AE title 'STRANGER'"
    ]


@pytest.mark.parametrize(
    "host",
    [
        "ct 1.example.org",
        "10.1.2.0/24",
        "10.1.2.300",
        "",
        "-ct1.example.org",
        "ct1..example.org",
        "ct1.example.org:104",
    ],
)
async def test_a_host_that_is_neither_a_name_nor_an_address_is_a_configuration_error(host, tmp_path, make_service, dns):
    sources = [{"ae_title": "CT1", "host": "ct1.example.org"}, {"ae_title": "CT2", "host": host}]
    with pytest.raises(ConfigError) as raised:
        await make_service(scp_config(tmp_path, sources))
    assert raised.value.message == f"dicom.sources[1].host: {host!r} is not a host name or an IP address"
    assert dns.calls == []


@pytest.mark.parametrize("host", ["CT1.Example.ORG.", "ct_1.example.org", "ct1", "röntgen.example.org"])
async def test_host_names_are_looked_up_as_written(host, tmp_path, make_service, dns):
    dns.answers[host] = {"127.0.0.1"}
    service = await make_service(scp_config(tmp_path, [{"ae_title": "CT1", "host": host}]))
    assert await accepted(service.dicom_port, "CT1")
    assert [name for name, _ in dns.calls] == [host]


async def test_a_lookup_that_hangs_holds_up_neither_start_up_nor_associations_for_long(
    tmp_path, make_service, dns, clock, caplog, monkeypatch
):
    monkeypatch.setattr(scp, "RESOLVE_WAIT", 0.2)
    dns.answers["ct1.example.org"] = {"127.0.0.1"}
    dns.gate = threading.Event()  # the DNS server does not answer
    try:
        service = await asyncio.wait_for(
            make_service(scp_config(tmp_path, [{"ae_title": "CT1", "host": "ct1.example.org"}])), 10
        )
        assert not await accepted(service.dicom_port, "CT1")
        assert messages(caplog)[-1] == (
            "DICOM association from CT1@127.0.0.1 refused: calling AE title 'CT1' from 127.0.0.1, "
            "expected ct1.example.org (not resolved yet)"
        )
    finally:
        dns.gate.set()  # it answers at last: the same lookup, still in progress, is used
    assert await accepted(service.dicom_port, "CT1")
    assert len(dns.calls) == 1

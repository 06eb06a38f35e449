"""DICOM verification (``mwm echo``) and the association request it shares with the ``dicom`` sink.

``run_echo`` opens one association with ``AE@HOST:PORT``, sends C-ECHO ``count`` times, prints
each round trip and returns the exit code. ``request_association`` turns every way an
association can fail (name resolution, refused or timed-out connection, rejection with its
reason, abort) into one ``AssociationFailed`` with a message a person can act on.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation, AssociationSocket

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class AssociationFailed(Exception):
    """No association: ``unreachable`` when no TCP connection could be made at all,
    ``no_context`` when the peer accepted none of the presentation contexts proposed."""

    def __init__(self, message: str, *, unreachable: bool = False, no_context: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.unreachable = unreachable
        self.no_context = no_context


#: A-ABORT sources (PS3.8 9.3.8).
_ABORT_SOURCES = {0: "service user", 2: "service provider"}


@dataclass(frozen=True)
class Target:
    """A remote application entity."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def parse_target(text: str) -> Target:
    """``AE@HOST:PORT`` (an IPv6 host in brackets); ``ValueError`` says what is wrong."""
    example = "expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242"
    ae_title, at, address = text.rpartition("@")
    if not at:
        raise ValueError(f"{text!r}: no '@' ({example})")
    ae_title = ae_title.strip()
    if not _AE_TITLE.match(ae_title):
        raise ValueError(f"{text!r}: {ae_title!r} is not an AE title (1 to 16 printable characters, no '\\')")
    host, colon, port = address.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: bad HOST:PORT {address!r} ({example})")
    return Target(ae_title, host, int(port))


class _ClosingSocket(AssociationSocket):
    """pynetdicom's socket, closed even when it never connected (pynetdicom 3.0 leaks it then)."""

    def _shutdown_socket(self) -> None:
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class RequestorAE(AE):
    """An AE for requesting associations whose sockets are always closed."""

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        sock = _ClosingSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def _rejection(assoc: Association) -> str:
    primitive = assoc.acceptor.primitive
    if primitive is None or primitive.result is None:
        return "association rejected"
    kind = {1: "permanent", 2: "transient"}.get(primitive.result, "unknown result")
    return f"association rejected ({kind}, {primitive.source_str.lower()}): {primitive.reason_str.lower()}"


def _connection_error(target: Target, timeout: float) -> str:
    """Why no TCP connection could be made (only called after pynetdicom failed to connect)."""
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout):
            return f"cannot connect to {target.host}:{target.port}"
    except socket.gaierror as exc:
        return f"cannot resolve {target.host!r}: {exc.strerror or exc}"
    except TimeoutError:
        return f"cannot reach {target.host}:{target.port}: no answer within {timeout:g} s"
    except OSError as exc:
        return f"cannot reach {target.host}:{target.port}: {exc.strerror or exc}"


def request_association(
    ae: AE,
    target: Target,
    *,
    timeout: float,
    contexts: Sequence[PresentationContext] | None = None,
    max_pdu: int = 0,
    tls: ssl.SSLContext | None = None,
) -> Association:
    """An established association with ``target``, or ``AssociationFailed`` with the reason.

    Blocking: call it from a thread. Every wait (connection, negotiation, messages, idle
    network) is bounded by ``timeout``.
    """
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    connected = False
    peer_abort: A_ABORT_RQ | None = None
    started = time.monotonic()

    def on_open(event: evt.Event) -> None:
        nonlocal connected
        connected = True

    def on_pdu(event: evt.Event) -> None:
        nonlocal peer_abort
        pdu = getattr(event, "pdu", None)
        if isinstance(pdu, A_ABORT_RQ):
            peer_abort = pdu

    try:
        assoc = ae.associate(
            target.host,
            target.port,
            contexts=list(contexts) if contexts is not None else None,
            ae_title=target.ae_title,
            max_pdu=max_pdu,
            tls_args=(tls, target.host) if tls is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_PDU_RECV, on_pdu)],
        )
    except socket.gaierror as exc:  # pynetdicom resolves the host name first
        raise AssociationFailed(f"cannot resolve {target.host!r}: {exc.strerror or exc}", unreachable=True) from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise AssociationFailed(_rejection(assoc))
    if not connected:
        if time.monotonic() - started >= 0.9 * timeout:
            no_answer = f"cannot reach {target.host}:{target.port}: no answer within {timeout:g} s"
            raise AssociationFailed(no_answer, unreachable=True)
        # A quick failure (refused, no route): one more attempt, bounded, tells which.
        raise AssociationFailed(_connection_error(target, min(timeout, 2.0)), unreachable=True)
    answer = assoc.acceptor.primitive
    if isinstance(answer, A_ASSOCIATE) and answer.result == 0x00 and not assoc.accepted_contexts:
        # Accepted, but with every presentation context refused (pynetdicom then aborts).
        raise AssociationFailed("the destination accepts none of the presentation contexts proposed", no_context=True)
    if peer_abort is not None:
        code = peer_abort.source
        source = _ABORT_SOURCES.get(code, f"source {code}") if code is not None else "no source given"
        raise AssociationFailed(f"the destination aborted the association request ({source})")
    if assoc.is_aborted and time.monotonic() - started < 0.9 * timeout:
        raise AssociationFailed("the destination closed the connection during association negotiation")
    raise AssociationFailed(f"no answer to the association request within {timeout:g} s")


@contextlib.contextmanager
def _quiet_pynetdicom() -> Iterator[None]:
    """pynetdicom logs its failures itself; the command prints them once, its own way."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _status_text(status: Any) -> str:
    code = int(status.Status)
    return "success" if code == 0 else f"failure (0x{code:04X})"


def tls_context(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None, verify: bool = True
) -> ssl.SSLContext:
    """A TLS client context: the peer verified against ``ca`` (default: the system's), our
    certificate ``cert``/``key`` when the peer asks for one. Raises ``ValueError`` with a reason."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate and its key go together")
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS files: {exc}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def run_echo(
    target: str,
    *,
    calling_aet: str = "MWM-ECHO",
    timeout: float = 10.0,
    count: int = 1,
    tls: ssl.SSLContext | None = None,
) -> int:
    """C-ECHO ``target`` ``count`` times over one association (over ``tls`` when given); print
    the round trips.

    Returns 0 when every C-ECHO succeeded, 1 when any failed or no association could be made,
    2 for a malformed target or argument.
    """
    try:
        remote = parse_target(target)
    except ValueError as exc:
        print(f"mwm echo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not _AE_TITLE.match(calling_aet):
        print(f"mwm echo: {calling_aet!r} is not an AE title (1 to 16 printable characters)", file=sys.stderr)
        return EXIT_USAGE
    if count < 1 or timeout <= 0:
        print("mwm echo: --count and --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE

    ae = RequestorAE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    with _quiet_pynetdicom():
        started = time.perf_counter()
        try:
            assoc = request_association(ae, remote, timeout=timeout, tls=tls)
        except AssociationFailed as exc:
            print(f"{remote}: {exc.message}")
            return EXIT_FAILED
        setup = (time.perf_counter() - started) * 1000
        print(f"{remote}: association accepted in {setup:.1f} ms" + (" (TLS)" if tls is not None else ""))
        times: list[float] = []
        failed = 0
        try:
            for n in range(1, count + 1):
                sent = time.perf_counter()
                status = assoc.send_c_echo()
                elapsed = (time.perf_counter() - sent) * 1000
                if "Status" not in status:
                    print(f"C-ECHO {n}: no response within {timeout:g} s (association aborted)")
                    failed += count - n + 1
                    break
                times.append(elapsed)
                if int(status.Status) != 0:
                    failed += 1
                print(f"C-ECHO {n}: {_status_text(status)} in {elapsed:.2f} ms")
        finally:
            if assoc.is_established:
                assoc.release()
    if times:
        print(
            f"{len(times)} response(s), {failed} failure(s); round trip min/avg/max = "
            f"{min(times):.2f}/{statistics.fmean(times):.2f}/{max(times):.2f} ms"
        )
    return EXIT_OK if failed == 0 else EXIT_FAILED


__all__ = ["AssociationFailed", "RequestorAE", "Target", "parse_target", "request_association", "run_echo"]

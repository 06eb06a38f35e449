"""The ``dicomweb`` sink: results stored with STOW-RS (``POST {url}/studies``, PS3.18 10.5).

Each request carries up to ``batch_size`` instances as ``multipart/related;
type="application/dicom"``, streamed from storage as they are stored. The response's
``application/dicom+json`` body says what became of each instance: an entry in the
ReferencedSOPSequence (0008,1199) is stored (a WarningReason (0008,1196) is kept as a note), an
entry in the FailedSOPSequence (0008,1198) failed with its FailureReason (0008,1197).

==================================  ============================================================
HTTP 200, 202, 409                  per instance, from the body; 0xA7xx (out of resources) and
                                    0x0110 (processing failure) are retryable, other reasons
                                    are not; 0x0111 (already stored there) counts as delivered
HTTP 401, 403                       failed, not retryable (the credentials need fixing)
other HTTP 4xx                      failed, not retryable (the request is refused as such)
HTTP 5xx, time-outs, connections    failed, retryable
==================================  ============================================================
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ..errors import ConfigError, MwmError
from ..options import Duration, positive
from . import Delivery, DeliveryOutcome, Sink

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
_RETRYABLE_REASONS = frozenset({0x0110, 0x0213})
_ALREADY_STORED = 0x0111


def _check_url(value: str, where: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {value!r}")


@dataclass(frozen=True)
class DicomWebOptions:
    """The DICOMweb service's base URL (``.../dicom-web``) and how to authenticate."""

    url: str = field(metadata={"check": _check_url})
    username: str | None = None  # HTTP basic, with password
    password: str | None = None
    token: str | None = None  # bearer
    token_file: Path | None = None  # bearer, read at each request (rotated tokens)
    timeout: Duration = field(default=Duration(60.0), metadata={"check": positive})
    verify_tls: bool = True
    ca_bundle: Path | None = None
    batch_size: int = field(default=50, metadata={"check": positive})


def _reason(code: int) -> str:
    names = {
        0x0110: "processing failure",
        0x0111: "duplicate SOP instance",
        0x0122: "SOP class not supported",
        0x0124: "not authorised",
        0xA700: "out of resources",
        0xA900: "data set does not match SOP class",
        0xC000: "cannot understand",
        0xB000: "coercion of data elements",
        0xB006: "elements discarded",
        0xB007: "data set does not match SOP class",
    }
    name = names.get(code) or ("out of resources" if 0xA700 <= code <= 0xA7FF else "")
    return f"0x{code:04X}" + (f" ({name})" if name else "")


def _first(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def instance_outcomes(body: Any, by_uid: dict[str, Delivery], http_status: int) -> dict[int, DeliveryOutcome]:
    """Outcomes read from a STOW-RS response body (a DICOM JSON object, or a list holding one)."""
    if isinstance(body, list):
        body = body[0] if body else {}
    if not isinstance(body, dict):
        return {}
    outcomes: dict[int, DeliveryOutcome] = {}
    for item in body.get(REFERENCED_SOP_SEQUENCE, {}).get("Value") or []:
        delivery = by_uid.get(str(_first(item, REFERENCED_SOP_INSTANCE_UID)))
        if delivery is None:
            continue
        warning = _first(item, WARNING_REASON)
        note = f"stored with a warning: {_reason(int(warning))}" if warning is not None else None
        outcomes[delivery.delivery_id] = DeliveryOutcome(delivery.delivery_id, "delivered", note)
    for item in body.get(FAILED_SOP_SEQUENCE, {}).get("Value") or []:
        delivery = by_uid.get(str(_first(item, REFERENCED_SOP_INSTANCE_UID)))
        if delivery is None:
            continue
        reason = _first(item, FAILURE_REASON)
        code = int(reason) if reason is not None else 0
        if code == _ALREADY_STORED:
            outcomes[delivery.delivery_id] = DeliveryOutcome(delivery.delivery_id, "delivered", "already stored there")
            continue
        retryable = 0xA700 <= code <= 0xA7FF or code in _RETRYABLE_REASONS
        text = (
            f"refused (HTTP {http_status}): {_reason(code)}" if reason is not None else f"refused (HTTP {http_status})"
        )
        outcomes[delivery.delivery_id] = DeliveryOutcome(delivery.delivery_id, "failed", text, retryable)
    return outcomes


class DicomWebSink(Sink):
    """STOW-RS client; one request per ``batch_size`` instances, one HTTP session per sink."""

    kind = "dicomweb"
    Options = DicomWebOptions

    def __init__(self, sink_id: str, options: DicomWebOptions, **kwargs: Any) -> None:
        super().__init__(sink_id, options, **kwargs)
        basic = options.username is not None or options.password is not None
        if basic and (options.username is None or options.password is None):
            raise ConfigError(f"sink {sink_id!r}: username and password go together")
        if sum((basic, options.token is not None, options.token_file is not None)) > 1:
            raise ConfigError(f"sink {sink_id!r}: choose one of username/password, token and token_file")
        self.studies_url = options.url.rstrip("/") + "/studies"
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        options = self.options
        if options.token_file is not None:  # read at each request, but a missing one is a mistake now
            try:
                await asyncio.to_thread(options.token_file.read_text, encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(f"sink {self.id!r}: cannot read token_file {options.token_file}: {reason}") from None
        tls: ssl.SSLContext | bool = True
        if not options.verify_tls:
            tls = False
        elif options.ca_bundle is not None:
            try:
                tls = await asyncio.to_thread(ssl.create_default_context, cafile=str(options.ca_bundle))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"sink {self.id!r}: cannot load ca_bundle {options.ca_bundle}: {exc}") from None
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=float(options.timeout), sock_read=float(options.timeout)
        )
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=tls, limit=4))

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _headers(self, boundary: str, length: int) -> dict[str, str]:
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),
            "Accept": "application/dicom+json",
        }
        if self.options.username is not None and self.options.password is not None:
            pair = f"{self.options.username}:{self.options.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        token = self.options.token
        if self.options.token_file is not None:
            try:
                token = (await asyncio.to_thread(self.options.token_file.read_text, encoding="utf-8")).strip()
            except OSError as exc:
                raise MwmError(f"cannot read token_file {self.options.token_file}", str(exc)) from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def deliver(self, batch: Sequence[Delivery]) -> list[DeliveryOutcome]:
        outcomes: dict[int, DeliveryOutcome] = {}
        dicom: list[Delivery] = []
        for delivery in batch:
            if delivery.is_dicom:
                dicom.append(delivery)
            else:
                outcomes[delivery.delivery_id] = DeliveryOutcome(
                    delivery.delivery_id, "skipped", "not a DICOM instance"
                )
        size = self.options.batch_size
        for start in range(0, len(dicom), size):
            outcomes.update(await self._store(dicom[start : start + size]))
        return [outcomes[d.delivery_id] for d in batch]

    async def _store(self, chunk: Sequence[Delivery]) -> dict[int, DeliveryOutcome]:
        def failed(text: str, retryable: bool = True) -> dict[int, DeliveryOutcome]:
            return {d.delivery_id: DeliveryOutcome(d.delivery_id, "failed", text, retryable) for d in chunk}

        session = self._session
        if session is None:
            return failed(f"sink {self.id!r} is not open")
        boundary = uuid.uuid4().hex
        try:
            sizes = [await self.storage.size(d.storage_key) for d in chunk]
        except MwmError as exc:
            return failed(f"cannot read the stored results: {exc.message}", False)
        part_head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        closing = f"--{boundary}--\r\n".encode()
        length = sum(len(part_head) + size + 2 for size in sizes) + len(closing)

        async def body() -> AsyncIterator[bytes]:
            for delivery in chunk:
                yield part_head
                async for data in self.storage.stream(delivery.storage_key):
                    yield data
                yield b"\r\n"
            yield closing

        try:
            headers = await self._headers(boundary, length)
            async with session.post(self.studies_url, data=body(), headers=headers) as response:
                status = response.status
                text = await response.text(errors="replace")
        except MwmError as exc:
            return failed(exc.message)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return failed(f"{self.studies_url}: {type(exc).__name__}: {exc}")
        if status in (401, 403):
            return failed(f"{self.studies_url}: HTTP {status}: the credentials were refused", False)
        if status not in (200, 202, 409):
            retryable = status >= 500 or status in (408, 429)
            return failed(f"{self.studies_url}: HTTP {status}: {text[:200].strip()}", retryable)
        try:
            parsed = json.loads(text) if text.strip() else {}
        except ValueError:
            parsed = {}
        outcomes = instance_outcomes(parsed, {str(d.sop_instance_uid): d for d in chunk}, status)
        for delivery in chunk:
            if delivery.delivery_id not in outcomes:
                if status == 200:
                    outcomes[delivery.delivery_id] = DeliveryOutcome(delivery.delivery_id, "delivered")
                else:
                    outcomes[delivery.delivery_id] = DeliveryOutcome(
                        delivery.delivery_id, "failed", f"HTTP {status}: the response does not mention this instance"
                    )
        return outcomes

    def describe(self) -> dict[str, Any]:
        o = self.options
        auth = "basic" if o.username else "bearer" if (o.token or o.token_file) else "none"
        return {**super().describe(), "url": o.url, "auth": auth, "batch_size": o.batch_size}

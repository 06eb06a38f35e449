"""The HTTP client the CLI (and the TUI) use to talk to a running mwm."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from .errors import MwmError

DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(MwmError):
    """The service answered with an error, or could not be reached."""

    code = "client_error"

    def __init__(
        self, message: str, detail: str | None = None, *, status: int | None = None, unreachable: bool = False
    ) -> None:
        super().__init__(message, detail)
        self.status = status
        #: No connection could be made at all (refused, unknown host, TLS rejected): nothing was sent.
        self.unreachable = unreachable


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def normalise_url(url: str) -> str:
    """mwm's address as given to ``--url``: ``HOST:PORT`` (as the configuration writes it) means
    ``http://HOST:PORT``; any scheme other than http or https is a :class:`ClientError`."""
    text = url.strip()
    if not text:
        raise ClientError("--url is empty", "give mwm's address, e.g. http://127.0.0.1:8080")
    match = _SCHEME.match(text)
    if match is None:
        text = "http://" + text
    elif match.group(1).lower() not in ("http", "https"):
        raise ClientError("--url must start with http:// or https://", f"{match.group(1)}:// is not supported")
    try:
        parsed = URL(text)
    except ValueError as exc:
        raise ClientError(f"--url is not a valid address: {url.strip()!r}", str(exc)) from None
    if not parsed.host or any(c.isspace() for c in parsed.host):
        raise ClientError(f"--url is not a valid address: {url.strip()!r}", "it names no host")
    return text.rstrip("/")


def connection_failure(url: str, exc: aiohttp.ClientError) -> ClientError:
    """A :class:`ClientError` saying, in a few words, why the request to ``url`` got no answer."""
    unreachable = isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = f"TLS certificate rejected ({exc.certificate_error})"
    elif isinstance(exc, aiohttp.ClientSSLError):
        reason = f"TLS failed ({exc.os_error})"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        reason = _os_reason(exc.os_error)
    elif isinstance(exc, aiohttp.ConnectionTimeoutError):
        reason = "connection timed out"
    elif isinstance(exc, aiohttp.ServerTimeoutError):
        reason = "timed out waiting for an answer"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        reason = "the server disconnected"
    else:
        reason = str(exc) or type(exc).__name__
    return ClientError(f"cannot reach mwm at {url}: {reason}", status=None, unreachable=unreachable)


def _os_reason(error: OSError) -> str:
    if isinstance(error, socket.gaierror):
        return f"unknown host ({(error.strerror or str(error)).lower()})"
    if isinstance(error, TimeoutError):
        return "connection timed out"
    if error.errno == errno.ECONNREFUSED:
        return "connection refused"
    if error.errno is not None and error.errno in errno.errorcode:
        return os.strerror(error.errno).lower()
    return str(error) or type(error).__name__


def check_token(token: str | None) -> str | None:
    """The token as given, without surrounding white space (a file's line end); a token with
    other control characters cannot go in a header: a :class:`ClientError` that never shows it."""
    if token is None:
        return None
    token = token.strip()
    if any(not c.isprintable() or c.isspace() for c in token):
        raise ClientError("the token contains spaces or control characters (--token, MWM_TOKEN)")
    return token or None


class Client:
    """``async with Client(url, token) as c: await c.get("/v1/jobs")``.

    ``url`` may leave out the scheme (``127.0.0.1:8080``, as the configuration writes addresses):
    it is then ``http://``. Another scheme than http or https raises :class:`ClientError`.
    """

    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = 30.0, cafile: str | None = None
    ) -> None:
        self.url = normalise_url(url)
        self.token = check_token(token)
        self.cafile = cafile
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout * 10)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        connector = None
        if self.cafile:
            try:
                context = ssl.create_default_context(cafile=self.cafile)
            except (OSError, ssl.SSLError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                where = f"the CA certificate {self.cafile} (--cacert, MWM_CACERT)"
                raise ClientError(f"cannot use {where}: {reason}") from None
            connector = aiohttp.TCPConnector(ssl=context)
        self._session = aiohttp.ClientSession(headers=headers, timeout=self.timeout, connector=connector)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use the client as an async context manager"
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        expect_json: bool = True,
    ) -> Any:
        try:
            async with self.session.request(
                method, self.url + path, params=params, json=json_body, data=data, headers=headers
            ) as response:
                body = await response.read()
                if response.status >= 400:
                    raise self._error(response.status, body)
                if not expect_json:
                    return body
                if not body:
                    return None
                try:
                    return json.loads(body)
                except ValueError:
                    raise ClientError(
                        f"the service answered {response.status} with a body that is not JSON",
                        body[:200].decode("utf-8", "replace"),
                        status=response.status,
                    ) from None
        except aiohttp.ClientError as exc:
            raise connection_failure(self.url, exc) from None

    @staticmethod
    def _error(status: int, body: bytes) -> ClientError:
        try:
            data = json.loads(body)
            return ClientError(
                data.get("message") or data.get("error") or f"HTTP {status}", data.get("detail"), status=status
            )
        except (ValueError, AttributeError):
            return ClientError(f"HTTP {status}", body[:200].decode("utf-8", "replace"), status=status)

    async def upload(
        self, parts: Sequence[bytes], *, params: Sequence[tuple[str, str]], headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """POST instances as ``multipart/related; type="application/dicom"``; the status and JSON answer."""
        writer = aiohttp.MultipartWriter("related")
        for part in parts:
            writer.append(part, {"Content-Type": "application/dicom"})
        content_type = f'multipart/related; type="application/dicom"; boundary="{writer.boundary}"'
        try:
            async with self.session.post(
                self.url + "/v1/instances",
                data=writer,
                params=params,
                headers={**headers, "Content-Type": content_type},
            ) as response:
                body = await response.read()
                try:
                    data = json.loads(body)
                except ValueError:
                    raise self._error(response.status, body) from None
                if not isinstance(data, dict) or ("instances" not in data and response.status >= 400):
                    raise self._error(response.status, body)
                return response.status, data
        except aiohttp.ClientError as exc:
            raise connection_failure(self.url, exc) from None

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    async def download(self, path: str, choose_target: Callable[[str | None], Path]) -> tuple[Path, int]:
        """GET ``path`` into a file: ``choose_target`` gets the name the answer suggests
        (``Content-Disposition``) and returns where to write. Written under a temporary name
        beside it and renamed when complete, so a failed transfer leaves no half file."""
        try:
            async with self.session.get(self.url + path) as response:
                if response.status >= 400:
                    raise self._error(response.status, await response.read())
                target = choose_target(response.content_disposition.filename if response.content_disposition else None)
                partial = target.with_name(f".{target.name}.part")
                size = 0
                try:
                    try:
                        out = open(partial, "wb")  # noqa: SIM115 - closed by the with below
                    except OSError as exc:
                        raise ClientError(f"cannot write {target}: {exc.strerror or exc}") from None
                    with out:
                        async for chunk in response.content.iter_chunked(1 << 20):
                            out.write(chunk)
                            size += len(chunk)
                    if response.content_length is not None and size != response.content_length:
                        raise ClientError(f"the download stopped after {size} of {response.content_length} bytes")
                    os.replace(partial, target)
                except BaseException:
                    partial.unlink(missing_ok=True)
                    raise
                return target, size
        except aiohttp.ClientError as exc:
            raise connection_failure(self.url, exc) from None

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, json_body=body)

    async def put(self, path: str, body: Any) -> Any:
        return await self.request("PUT", path, json_body=body)

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

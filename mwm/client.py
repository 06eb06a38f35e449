"""The HTTP client the CLI (and the TUI) use to talk to a running mwm."""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp

from .errors import MwmError

DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(MwmError):
    """The service answered with an error, or could not be reached."""

    code = "client_error"

    def __init__(self, message: str, detail: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message, detail)
        self.status = status


class Client:
    """``async with Client(url, token) as c: await c.get("/v1/jobs")``."""

    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = 30.0, cafile: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.cafile = cafile
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout * 10)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        connector = None
        if self.cafile:
            connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=self.cafile))
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
        except aiohttp.ClientConnectionError as exc:
            raise ClientError(f"cannot reach mwm at {self.url}", str(exc)) from None

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
        except aiohttp.ClientConnectionError as exc:
            raise ClientError(f"cannot reach mwm at {self.url}", str(exc)) from None

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, json_body=body)

    async def put(self, path: str, body: Any) -> Any:
        return await self.request("PUT", path, json_body=body)

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

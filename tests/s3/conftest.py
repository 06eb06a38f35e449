"""Fixtures of the S3 storage tests: S3 servers over HTTP and HTTPS, and storages opened on them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mwm.options import build

from .servers import MotoServer, moto_http, moto_https  # noqa: F401 - fixtures

OpenStorage = Callable[..., Awaitable[Any]]


@pytest.fixture
async def open_s3(tmp_path: Path) -> AsyncIterator[OpenStorage]:
    """Open S3 storages from a server and option overrides; each is closed at the end."""
    from mwm.storage.s3 import S3Options, S3Storage

    opened: list[S3Storage] = []

    async def factory(server: MotoServer, bucket: str | None = None, **options: Any) -> S3Storage:
        table = server.storage_options(bucket or server.new_bucket(), **options)
        table.pop("kind")
        storage = S3Storage(build(S3Options, table, "storage"), data_dir=tmp_path)
        await storage.open()
        opened.append(storage)
        return storage

    yield factory
    for storage in opened:
        await storage.close()

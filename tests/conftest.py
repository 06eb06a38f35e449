"""Shared fixtures: a real mwm service on an ephemeral port, synthetic studies, an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import synthetic
from support import ServiceFactory, base_config

from mwm.client import Client
from mwm.config import settings_from_mapping
from mwm.service import Service


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """Start services from configuration tables; every one started is stopped at the end."""
    started: list[Service] = []

    async def factory(config: dict[str, Any] | None = None, **sections: Any) -> Service:
        settings = settings_from_mapping(config if config is not None else base_config(tmp_path, **sections))
        service = Service(settings)
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in reversed(started):
        await service.stop()


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    clients: list[Client] = []

    async def factory(service: Service, token: str | None = None) -> Client:
        client = Client(f"http://127.0.0.1:{service.http_port}", token)
        await client.__aenter__()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.__aexit__(None, None, None)


@pytest.fixture(scope="session")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> synthetic.StudyInfo:
    """2 series x 6 slices of 64x64: quick to send and to process."""
    out = tmp_path_factory.mktemp("small-study")
    return synthetic.generate_study(out, series_count=2, instances_per_series=6, rows=64, cols=64, seed=11)

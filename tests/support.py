"""Shared test support: configurations, uploads over the real HTTP API, waiting for states."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mwm.client import Client
from mwm.service import Service

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_APP = ["python", str(ROOT / "samples" / "apps" / "ct_sample" / "app.py")]

T = TypeVar("T")
ServiceFactory = Callable[..., Awaitable[Service]]


#: An application script that writes one result, r.txt.
WRITE_R = "import os; open(os.environ['HOLOSCAN_OUTPUT_PATH'] + '/r.txt', 'w').write('r')"


def base_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A configuration on the embedded defaults, in ``tmp_path``, listening on an ephemeral port."""
    config: dict[str, Any] = {
        # A small reserve: the suite must pass on a machine with little disk space left.
        "server": {
            "http": "127.0.0.1:0",
            "data_dir": str(tmp_path / "data"),
            "disk_reserve": "16MB",
            "disk_watermark": 99.9,
        },
        "storage": {"fsync": True},
        "jobs": {"retry_backoff": "100ms", "retry_backoff_max": "1s"},
        "delivery": {"retry_backoff": "100ms", "retry_backoff_max": "1s"},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return config


def python_app(app_id: str, script: str, **options: Any) -> dict[str, Any]:
    """An application running a Python snippet (paths from the environment, no -i/-o arguments)."""
    return {"id": app_id, "command": [sys.executable, "-c", script], "arguments": False, **options}


def url_of(service: Service) -> str:
    return f"http://127.0.0.1:{service.http_port}"


async def upload_files(
    client: Client,
    paths: Sequence[Path],
    *,
    apps: Sequence[str] = (),
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    parts = [p.read_bytes() for p in paths]
    return await client.upload(parts, params=[("app", a) for a in apps], headers=headers or {})


async def post_raw(
    client: Client,
    body: bytes,
    *,
    content_type: str = "application/dicom",
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with client.session.post(
        client.url + "/v1/instances",
        data=body,
        params=params,
        headers={"Content-Type": content_type, **(headers or {})},
    ) as response:
        return response.status, await response.json()


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


async def wait_jobs(
    client: Client, count: int, states: Sequence[str] = ("succeeded",), *, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Wait until exactly ``count`` jobs exist and all are in ``states``."""

    async def check() -> list[dict[str, Any]] | None:
        jobs = (await client.get("/v1/jobs", limit=1000))["jobs"]
        if len(jobs) == count and all(j["state"] in states for j in jobs):
            return sorted(jobs, key=lambda j: j["id"])
        return None

    return await eventually(check, timeout=timeout, what=f"{count} jobs in {states}")


async def wait_job_state(
    client: Client, job_id: int, states: Sequence[str], *, timeout: float = 60.0
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job = await client.get(f"/v1/jobs/{job_id}")
        return job if job["state"] in states else None

    return await eventually(check, timeout=timeout, what=f"job {job_id} in {states}")

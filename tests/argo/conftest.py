"""Fixtures of the Argo engine tests: an S3 server (moto), a strict fake Argo Server, configurations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from s3.servers import MotoServer, moto_http  # noqa: F401 - fixture
from support import base_config

from .fake_argo import FakeArgo

TOKEN = "argo-test-token-0123456789"
NAMESPACE = "mwm-jobs"
SECRET = "mwm-s3"


@pytest.fixture
async def fake_argo(moto_http: MotoServer) -> AsyncIterator[FakeArgo]:  # noqa: F811
    """A started fake Argo Server whose cluster reaches the S3 test server through secret ``mwm-s3``."""
    fake = FakeArgo(
        s3_url=moto_http.url,
        secrets={SECRET: {"accessKey": moto_http.access_key_id, "secretKey": moto_http.secret_access_key}},
        tokens={TOKEN},
    )
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
    assert fake.violations == [], "requests or answers outside the Argo API description:\n" + "\n".join(fake.violations)


def argo_config(
    tmp_path: Path,
    moto: MotoServer,
    fake: FakeArgo,
    *,
    bucket: str,
    app: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
    sink: bool = False,
    **sections: Any,
) -> dict[str, Any]:
    """mwm on S3 storage with one application run by the Argo engine (results to a folder sink with ``sink``)."""
    config = base_config(
        tmp_path,
        apps=[
            {
                "id": "seg",
                "engine": "argo",
                "image": "registry.example.org/seg:1.0",
                "timeout": "200ms",
                "sinks": ["out"] if sink else [],
                "cpu_request": "500m",
                "memory_limit": "2Gi",
                **(app or {}),
            }
        ],
        sinks=[{"id": "out", "kind": "folder", "path": str(tmp_path / "out"), "layout": "job"}],
        **sections,
    )
    config["storage"] = moto.storage_options(bucket, prefix="mwm")
    config["engines"] = {
        "argo": {
            "url": fake.url,
            "token": TOKEN,
            "namespace": NAMESPACE,
            "poll_interval": "100ms",
            "retry_backoff": "50ms",
            "retry_backoff_max": "200ms",
            "artifact_repository": {
                "s3_endpoint": moto.endpoint,
                "s3_insecure": True,
                "s3_access_key_secret": {"name": SECRET, "key": "accessKey"},
                "s3_secret_key_secret": {"name": SECRET, "key": "secretKey"},
            },
            **(engine or {}),
        }
    }
    return config

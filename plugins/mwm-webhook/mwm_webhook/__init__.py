"""A webhook sink: POSTs a JSON description of each batch of results to an HTTP endpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import aiohttp

from mwm.options import Duration
from mwm.sinks import Delivery, DeliveryOutcome, Sink

RETRYABLE_STATUSES = {408, 425, 429}


@dataclass(frozen=True)
class WebhookOptions:
    url: str
    token: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    timeout: Duration = Duration(10.0)
    public_url: str = "http://127.0.0.1:8080"


class WebhookSink(Sink):
    """Tells an HTTP endpoint about results; the endpoint downloads them from mwm if it wants them."""

    kind = "webhook"
    Options = WebhookOptions

    def __init__(self, sink_id: str, options: WebhookOptions, **kwargs: Any) -> None:
        super().__init__(sink_id, options, **kwargs)
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        headers = dict(self.options.headers)
        if self.options.token:
            headers["Authorization"] = f"Bearer {self.options.token}"
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=float(self.options.timeout))
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def document(self, batch: Sequence[Delivery]) -> dict[str, Any]:
        base = self.options.public_url.rstrip("/")
        return {
            "sink": self.id,
            "results": [
                {
                    "result_id": d.result_id,
                    "job_id": d.job_id,
                    "app_id": d.app_id,
                    "correlation_id": d.correlation_id,
                    "study_instance_uid": d.study_instance_uid,
                    "path": d.path,
                    "media_type": d.media_type,
                    "size": d.size,
                    "sop_instance_uid": d.sop_instance_uid,
                    "download": f"{base}/v1/results/{d.result_id}",
                }
                for d in batch
            ],
        }

    async def deliver(self, batch: Sequence[Delivery]) -> list[DeliveryOutcome]:
        assert self._session is not None, "the sink was not opened"

        def outcome(state: str, error: str | None = None, retryable: bool = True) -> list[DeliveryOutcome]:
            return [DeliveryOutcome(d.delivery_id, state, error, retryable) for d in batch]  # type: ignore[arg-type]

        try:
            async with self._session.post(self.options.url, json=self.document(batch)) as response:
                if 200 <= response.status < 300:
                    return outcome("delivered")
                text = (await response.text())[:200]
                retryable = response.status >= 500 or response.status in RETRYABLE_STATUSES
                return outcome("failed", f"{self.options.url} answered {response.status}: {text}", retryable)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return outcome("failed", f"cannot reach {self.options.url}: {exc or type(exc).__name__}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.options.url}

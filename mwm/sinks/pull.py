"""The ``pull`` sink: results wait until a consumer (a gateway) downloads and acknowledges them.

``GET /v1/sinks/{id}/results`` lists them, ``GET /v1/results/{id}`` downloads one,
``POST /v1/results/{id}/ack`` marks it delivered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import Delivery, DeliveryOutcome, Sink


@dataclass(frozen=True)
class PullOptions:
    """The pull sink has no options: its consumer comes to it."""


class PullSink(Sink):
    kind = "pull"
    Options = PullOptions
    pulled = True

    async def deliver(self, batch: Sequence[Delivery]) -> list[DeliveryOutcome]:
        # Never called for a pulled sink; deliveries are completed by the consumer's ack.
        return []

"""The ``Sink`` contract: a destination for results (folder, DICOM C-STORE, DICOMweb, pull, ...).

Kinds are plugins resolved by name through the ``mwm.sinks`` entry points. The delivery
service hands a sink batches of its due deliveries and records the outcome of each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..storage import Storage


@dataclass(frozen=True)
class Delivery:
    """One result to deliver to one sink."""

    delivery_id: int
    result_id: int
    job_id: int
    app_id: str
    correlation_id: str
    attempts: int
    path: str  # the result's relative path in the job's output
    storage_key: str
    size: int
    media_type: str
    study_instance_uid: str  # the result's, else the job's
    sop_instance_uid: str | None
    sop_class_uid: str | None
    transfer_syntax_uid: str | None

    @property
    def is_dicom(self) -> bool:
        return self.media_type == "application/dicom" and self.sop_instance_uid is not None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Delivery:
        return cls(
            delivery_id=int(row["delivery_id"]),
            result_id=int(row["id"]),
            job_id=int(row["job_id"]),
            app_id=row["app_id"],
            correlation_id=row["correlation_id"],
            attempts=int(row["attempts"]),
            path=row["path"],
            storage_key=row["storage_key"],
            size=int(row["size"]),
            media_type=row["media_type"],
            study_instance_uid=row["study_instance_uid"] or row.get("job_study_instance_uid") or "",
            sop_instance_uid=row["sop_instance_uid"],
            sop_class_uid=row["sop_class_uid"],
            transfer_syntax_uid=row["transfer_syntax_uid"],
        )


@dataclass(frozen=True)
class DeliveryOutcome:
    """``delivered``; ``skipped`` (will never be sent here, with the reason); or ``failed``
    (``retryable`` says whether trying again may help)."""

    delivery_id: int
    state: Literal["delivered", "skipped", "failed"]
    error: str | None = None
    retryable: bool = True


class Sink(ABC):
    """Delivers results.

    Contract:
    - ``deliver`` receives a batch of deliveries (all to this sink) and returns one outcome per
      delivery; it may also raise ``SinkError`` when the whole batch failed.
    - Delivery is at-least-once: the same result may be delivered again after a crash, so a sink
      should make a repeat harmless where the destination allows (same SOP Instance UID, same name).
    - ``pulled`` sinks are not pushed to: their results wait until a consumer acknowledges them.
    """

    kind: ClassVar[str]
    #: A frozen dataclass of the sink's options.
    Options: ClassVar[type[Any]]
    pulled: ClassVar[bool] = False

    def __init__(self, sink_id: str, options: Any, *, storage: Storage, base_dir: Path) -> None:
        self.id = sink_id
        self.options = options
        self.storage = storage
        self.base_dir = base_dir

    async def open(self) -> None:
        """Acquire connections; must not fail because the destination is down (that is a delivery failure)."""

    async def close(self) -> None: ...

    @abstractmethod
    async def deliver(self, batch: Sequence[Delivery]) -> list[DeliveryOutcome]: ...

    def describe(self) -> dict[str, Any]:
        """What the API shows about this sink (no secrets)."""
        return {"id": self.id, "kind": self.kind, "pulled": self.pulled}

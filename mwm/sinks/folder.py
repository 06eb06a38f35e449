"""The ``folder`` sink: results copied under ``<path>/<study>/<app>/...`` or ``<path>/job-<id>/...``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from ..errors import MwmError
from ..results import safe_segment
from ..storage.local import fsync_dir
from ..uids import is_valid_uid
from . import Delivery, DeliveryOutcome, Sink


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


async def _open_for_writing(path: Path) -> BinaryIO:
    """Open in a thread without leaking the file if the caller is cancelled meanwhile."""
    opening = asyncio.ensure_future(asyncio.to_thread(open, path, "wb"))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(lambda t: None if t.cancelled() or t.exception() else t.result().close())
        raise


@dataclass(frozen=True)
class FolderOptions:
    path: Path
    layout: Literal["study", "job"] = "study"
    fsync: bool = True


class FolderSink(Sink):
    """Writes each result atomically (temporary name, then rename); a repeat overwrites the same file."""

    kind = "folder"
    Options = FolderOptions

    def __init__(self, sink_id: str, options: FolderOptions, **kwargs: Any) -> None:
        super().__init__(sink_id, options, **kwargs)
        self.root = (self.base_dir / options.path).absolute()

    def target(self, delivery: Delivery) -> Path:
        if self.options.layout == "job":
            folder = self.root / f"job-{delivery.job_id}"
        else:
            study = delivery.study_instance_uid if is_valid_uid(delivery.study_instance_uid) else "unknown-study"
            folder = self.root / study / safe_segment(delivery.app_id)
        # The stored relative path was made safe segment by segment when it was collected.
        return folder.joinpath(*(safe_segment(p) for p in delivery.path.split("/")))

    async def _deliver_one(self, delivery: Delivery) -> DeliveryOutcome:
        target = self.target(delivery)
        temp = target.parent / f".{target.name}.{uuid.uuid4().hex}.part"
        try:
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            with await _open_for_writing(temp) as f:
                async for chunk in self.storage.stream(delivery.storage_key):
                    await asyncio.to_thread(f.write, chunk)
                await asyncio.to_thread(f.flush)
                if self.options.fsync:
                    await asyncio.to_thread(os.fsync, f.fileno())
            await asyncio.to_thread(os.replace, temp, target)
            if self.options.fsync:
                await asyncio.to_thread(fsync_dir, target.parent)
        except (OSError, MwmError) as exc:
            await asyncio.to_thread(_remove_quietly, temp)
            message = exc.message if isinstance(exc, MwmError) else f"{exc.strerror or exc}"
            return DeliveryOutcome(delivery.delivery_id, "failed", f"cannot write {target}: {message}")
        return DeliveryOutcome(delivery.delivery_id, "delivered")

    async def deliver(self, batch: Sequence[Delivery]) -> list[DeliveryOutcome]:
        return [await self._deliver_one(d) for d in batch]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.root), "layout": self.options.layout}

"""Batching of concurrent requests into one operation (group commit), each caller getting its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from .errors import ShuttingDown

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Runs ``operation`` on everything submitted while the previous run was busy.

    One run at a time; its cost (an fsync, a commit) is shared by the batch, so the more callers
    wait, the larger and cheaper per item each run becomes. ``operation`` returns one result per
    item, in order; if it raises, every caller of that batch gets the exception.
    """

    def __init__(self, operation: Callable[[list[Item]], Awaitable[Sequence[Result]]], max_batch: int = 256) -> None:
        self._operation = operation
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] = asyncio.Queue()

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            pending = [(item, future) for item, future in batch if not future.cancelled()]
            if not pending:
                continue
            try:
                results = await self._operation([item for item, _ in pending])
            except asyncio.CancelledError:
                for _, future in pending:
                    if not future.done():
                        future.set_exception(ShuttingDown("mwm is stopping"))
                raise
            except Exception as exc:  # noqa: BLE001 - every caller must learn of the failure
                for _, future in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(pending, results, strict=True):
                if not future.done():
                    future.set_result(result)

"""Group commit: concurrent requests batched into one blocking operation, each caller getting its own answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, cast

from .errors import ShuttingDown

Item = TypeVar("Item")
Result = TypeVar("Result")
#: Who waits for an item's result: a task on the event loop, or a blocked thread.
Waiter = asyncio.Future[Result] | concurrent.futures.Future[Result]


class GroupCommit(Generic[Item, Result]):
    """Runs the blocking ``operation`` on a worker thread over everything submitted meanwhile.

    One batch at a time; its fixed cost (a flush, a commit) is shared by the batch, so the more
    callers wait, the larger and cheaper per item each batch becomes. Batches follow each other on
    the worker thread without a trip through the event loop in between: the loop only hands items
    in and receives answers. ``run_on`` queues a callable on the worker thread (for the database,
    its single writer thread, so other writes take turns between batches). ``operation`` returns
    one result per item, in order; if it raises, every caller of that batch gets the exception.
    """

    def __init__(
        self,
        operation: Callable[[list[Item]], Sequence[Result]],
        run_on: Callable[[Callable[[], None]], Any],
        *,
        max_batch: int = 256,
    ) -> None:
        self._operation = operation
        self._run_on = run_on
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: deque[tuple[Item, Waiter[Result]]] = deque()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: Item) -> Result:
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._enqueue(item, future)
        return await future

    def submit_blocking(self, item: Item) -> Result:
        """``submit`` for a caller on another thread (not the event loop's): waits for the batch
        on the calling thread, without a trip through the loop."""
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        self._enqueue(item, future)
        return future.result()

    def _enqueue(self, item: Item, waiter: Waiter[Result]) -> None:
        with self._lock:
            self._pending.append((item, waiter))
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            self._schedule()

    def _schedule(self) -> None:
        try:
            self._run_on(self._drain)
        except RuntimeError:  # the worker is shut down
            with self._lock:
                abandoned = list(self._pending)
                self._pending.clear()
                self._scheduled = False
            self._answer_threadsafe(abandoned, None, ShuttingDown("mwm is stopping"))

    def _drain(self) -> None:
        """On the worker thread: one batch, then the next one queued behind other work, if any."""
        with self._lock:
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), self._max_batch))]
        # A caller that gave up before its batch started is left out (reading a future's state
        # from another thread is a plain attribute read).
        batch = [(item, future) for item, future in batch if not future.cancelled()]
        results: Sequence[Result] | None = None
        error: BaseException | None = None
        if batch:
            try:
                results = self._operation([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller must learn of the failure
                error = exc
            self._answer_threadsafe(batch, results, error)
        with self._lock:
            again = bool(self._pending)
            if not again:
                self._scheduled = False
        if again:
            self._schedule()

    def _answer_threadsafe(
        self,
        batch: list[tuple[Item, Waiter[Result]]],
        results: Sequence[Result] | None,
        error: BaseException | None,
    ) -> None:
        """Answer the blocking callers at once (from this thread), the others on the event loop."""
        if error is None and (results is None or len(results) != len(batch)):
            error = RuntimeError(f"group commit answered {len(results or ())} results for {len(batch)} items")
        values: Sequence[Result | None] = results if error is None and results is not None else [None] * len(batch)
        answers = list(zip(batch, values, strict=True))
        on_loop: list[tuple[asyncio.Future[Result], Result | None]] = [
            (waiter, result) for (_, waiter), result in answers if isinstance(waiter, asyncio.Future)
        ]
        for (_, waiter), result in answers:
            if isinstance(waiter, concurrent.futures.Future) and not waiter.done():
                if error is None:
                    waiter.set_result(cast(Result, result))
                else:
                    waiter.set_exception(error)
        if self._loop is None or not on_loop:
            return
        try:
            self._loop.call_soon_threadsafe(self._answer, on_loop, error)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _answer(self, answers: list[tuple[asyncio.Future[Result], Result | None]], error: BaseException | None) -> None:
        for future, result in answers:
            if future.done():
                continue
            if error is None:
                future.set_result(cast(Result, result))
            else:
                future.set_exception(error)

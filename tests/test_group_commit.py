"""Group commit: batches on a worker thread, one answer per caller, failures reach every caller."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mwm.batching import GroupCommit
from mwm.errors import ShuttingDown


@pytest.fixture
def worker():
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-writer")
    yield executor
    executor.shutdown(wait=True)


async def test_concurrent_callers_share_batches_and_each_gets_its_answer(worker) -> None:
    batches: list[list[int]] = []
    threads: set[str] = set()
    release = threading.Event()

    def operation(items: list[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        if not batches:
            release.wait(5)  # hold the first batch so the others queue up behind it
        batches.append(items)
        return [item * 10 for item in items]

    commit = GroupCommit(operation, worker.submit)
    first = asyncio.ensure_future(commit.submit(0))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(commit.submit(i)) for i in range(1, 40)]
    await asyncio.sleep(0.05)
    release.set()
    answers = await asyncio.gather(first, *rest)
    assert answers == [i * 10 for i in range(40)]
    assert batches[0] == [0] and sorted(i for b in batches[1:] for i in b) == list(range(1, 40))
    assert len(batches) == 2  # everything that waited went in one batch
    assert threads == {next(iter(threads))} and next(iter(threads)).startswith("test-writer")


async def test_a_failed_batch_fails_every_caller_in_it_and_the_next_batch_runs(worker) -> None:
    def operation(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return items

    commit = GroupCommit(operation, worker.submit)
    with pytest.raises(ValueError, match="unlucky"):
        await commit.submit(13)
    assert await commit.submit(7) == 7


async def test_a_wrong_number_of_results_is_an_error_not_a_hang(worker) -> None:
    commit = GroupCommit(lambda items: [], worker.submit)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        await asyncio.wait_for(commit.submit(1), 5)


async def test_after_shutdown_callers_are_told_so(worker) -> None:
    commit = GroupCommit(lambda items: items, worker.submit)
    worker.shutdown(wait=True)
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(commit.submit(1), 5)


async def test_a_caller_that_gave_up_is_left_out_of_its_batch(worker) -> None:
    seen: list[list[int]] = []
    gate = threading.Event()

    def operation(items: list[int]) -> list[int]:
        gate.wait(5)
        seen.append(items)
        return items

    commit = GroupCommit(operation, worker.submit)
    holding = asyncio.ensure_future(commit.submit(1))
    await asyncio.sleep(0.05)
    gave_up = asyncio.ensure_future(commit.submit(2))
    kept = asyncio.ensure_future(commit.submit(3))
    await asyncio.sleep(0.01)
    gave_up.cancel()
    gate.set()
    assert await holding == 1 and await kept == 3
    assert seen == [[1], [3]]


async def test_callers_on_other_threads_share_batches_with_callers_on_the_loop(worker) -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def operation(items: list[int]) -> list[int]:
        gate.wait(5)
        batches.append(items)
        return [-item for item in items]

    commit = GroupCommit(operation, worker.submit)
    on_loop = asyncio.ensure_future(commit.submit(1))
    await asyncio.sleep(0.05)  # the first batch holds the worker; the rest queue up behind it
    threads = [asyncio.ensure_future(asyncio.to_thread(commit.submit_blocking, i)) for i in (2, 3)]
    also_on_loop = asyncio.ensure_future(commit.submit(4))
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.gather(on_loop, *threads, also_on_loop) == [-1, -2, -3, -4]
    assert batches[0] == [1] and sorted(batches[1]) == [2, 3, 4]


async def test_callers_on_other_threads_are_answered_while_the_loop_is_busy(worker) -> None:
    commit = GroupCommit(lambda items: [-item for item in items], worker.submit)
    answered = threading.Event()

    def caller() -> None:
        assert commit.submit_blocking(5) == -5
        answered.set()

    thread = threading.Thread(target=caller)
    thread.start()
    # The loop is blocked here (no await): the answer must not need it.
    assert answered.wait(5)
    thread.join()


async def test_a_failed_batch_reaches_callers_on_other_threads(worker) -> None:
    def operation(items: list[int]) -> list[int]:
        raise ValueError("disk on fire")

    commit = GroupCommit(operation, worker.submit)
    with pytest.raises(ValueError, match="disk on fire"):
        await asyncio.to_thread(commit.submit_blocking, 1)

"""The replaceable work queue and the worker group that drains it (SPEC §4.2)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from keepstore.workers.group import WorkerGroup
from keepstore.workers.queue import QueueClosed, QueueStatus, WorkQueue

R = TypeVar("R")


def run(coro: Coroutine[Any, Any, R], timeout: float = 5.0) -> R:
    """Run one test coroutine with a safety timeout, so that a queue bug fails the test instead of hanging it."""

    async def bounded() -> R:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def settle(rounds: int = 5) -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(pred: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0)


def status(q: WorkQueue[Any]) -> tuple[int, int]:
    st = q.status()
    return st.queued, st.in_progress


# --- WorkQueue ---------------------------------------------------------------------------------------------------


def test_new_queue_is_empty_and_open() -> None:
    q: WorkQueue[int] = WorkQueue()
    assert status(q) == (0, 0)
    assert not q.closed
    assert q.replaced == 0


def test_fifo_order() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.replace(["a", "b", "c", "d"])
        assert status(q) == (4, 0)
        got = [await q.get() for _ in range(4)]
        assert got == ["a", "b", "c", "d"]
        assert status(q) == (0, 4)
        for n in (3, 2, 1, 0):
            q.done()
            assert status(q) == (0, n)

    run(main())


def test_replace_accepts_any_iterable() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        q.replace(i * i for i in range(4))
        assert [await q.get() for _ in range(4)] == [0, 1, 4, 9]

    run(main())


def test_get_blocks_until_replace_provides_work() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        task = asyncio.create_task(q.get())
        await settle()
        assert not task.done()
        assert status(q) == (0, 0)
        q.replace(["x"])
        assert await asyncio.wait_for(task, 1.0) == "x"
        assert status(q) == (0, 1)
        q.done()
        assert status(q) == (0, 0)

    run(main())


def test_replace_drops_queued_items_and_keeps_in_progress() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        q.replace([1, 2, 3, 4])
        assert await q.get() == 1
        assert await q.get() == 2
        assert status(q) == (2, 2)

        q.replace([10, 20])
        assert q.replaced == 2
        assert status(q) == (2, 2)  # 3 and 4 are gone; 1 and 2 are still being worked on
        assert await q.get() == 10
        assert await q.get() == 20
        assert status(q) == (0, 4)

        waiter = asyncio.create_task(q.get())  # 3 and 4 must never come back
        await settle()
        assert not waiter.done()
        for n in (3, 2, 1, 0):
            q.done()
            assert status(q) == (0, n)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    run(main())


def test_replace_is_atomic_when_the_new_list_fails_to_materialise() -> None:
    def broken() -> Iterator[int]:
        yield 100
        yield 200
        raise RuntimeError("boom")

    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        q.replace([1, 2, 3])
        with pytest.raises(RuntimeError):
            q.replace(broken())
        assert status(q) == (3, 0)
        assert q.replaced == 1
        assert [await q.get() for _ in range(3)] == [1, 2, 3]

    run(main())


def test_replace_while_workers_are_busy() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        delivered: list[str] = []
        release = asyncio.Event()

        async def worker() -> None:
            while True:
                try:
                    item = await q.get()
                except QueueClosed:
                    return
                delivered.append(item)
                if item.startswith("old"):
                    await release.wait()
                q.done()

        workers = [asyncio.create_task(worker()) for _ in range(3)]
        q.replace([f"old{i}" for i in range(6)])
        await until(lambda: len(delivered) == 3)
        await settle()
        assert delivered == ["old0", "old1", "old2"]
        assert status(q) == (3, 3)

        q.replace(["new0", "new1"])
        assert status(q) == (2, 3)  # old3..old5 dropped; the three busy workers carry on
        await settle()
        assert status(q) == (2, 3)  # every worker is busy: nobody takes the new items yet

        release.set()
        await until(lambda: status(q) == (0, 0) and len(delivered) == 5)
        await settle()
        assert delivered == ["old0", "old1", "old2", "new0", "new1"]
        assert status(q) == (0, 0)

        q.close()
        await asyncio.wait_for(asyncio.gather(*workers), 1.0)

    run(main())


def test_replace_with_empty_list_clears_the_queue() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        q.replace([1, 2, 3])
        assert await q.get() == 1
        q.replace([])
        assert status(q) == (0, 1)
        waiter = asyncio.create_task(q.get())
        await settle()
        assert not waiter.done()  # nothing left to take
        q.replace([7])
        assert await asyncio.wait_for(waiter, 1.0) == 7
        assert status(q) == (0, 2)

    run(main())


def test_close_wakes_every_waiting_worker_with_queue_closed() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        waiters = [asyncio.create_task(q.get()) for _ in range(5)]
        await settle()
        assert not any(w.done() for w in waiters)
        q.close()
        assert q.closed
        results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1.0)
        assert all(isinstance(r, QueueClosed) for r in results), results
        assert status(q) == (0, 0)

    run(main())


def test_close_drops_queued_items() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        q.replace([1, 2, 3])
        assert await q.get() == 1
        q.close()
        assert status(q) == (0, 1)  # queued items dropped, the taken one is still in progress
        with pytest.raises(QueueClosed):
            await q.get()
        q.done()
        assert status(q) == (0, 0)

    run(main())


def test_get_after_close_raises_queue_closed() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        q.close()
        for _ in range(3):
            with pytest.raises(QueueClosed):
                await asyncio.wait_for(q.get(), 1.0)
        # A list arriving after close (e.g. during shutdown) must not restart anybody.
        q.replace([1, 2])
        with pytest.raises(QueueClosed):
            await asyncio.wait_for(q.get(), 1.0)
        assert q.status().in_progress == 0

    run(main())


def test_cancelled_waiter_that_was_just_woken_passes_the_wake_up_on() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        first = asyncio.create_task(q.get())
        await settle()  # first is registered as the oldest waiter
        second = asyncio.create_task(q.get())
        await settle()
        q.replace(["only"])  # wakes exactly one waiter: the first
        first.cancel()  # same tick, before first could run and take the item
        assert await asyncio.wait_for(second, 1.0) == "only"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert first.cancelled()
        assert status(q) == (0, 1)

    run(main())


def test_waiter_cancelled_before_any_wake_up_does_not_swallow_one() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        first = asyncio.create_task(q.get())
        await settle()
        second = asyncio.create_task(q.get())
        await settle()
        first.cancel()
        q.replace(["only"])  # first is cancelled but has not run yet: the wake-up must go to second
        assert await asyncio.wait_for(second, 1.0) == "only"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert status(q) == (0, 1)

    run(main())


def test_woken_waiter_that_finds_the_queue_empty_waits_again() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        waiter = asyncio.create_task(q.get())
        await settle()
        q.replace(["a"])
        assert await q.get() == "a"  # taken by a worker that did not have to wait, before the waiter runs
        await settle()
        assert not waiter.done()
        q.replace(["b"])
        assert await asyncio.wait_for(waiter, 1.0) == "b"
        assert status(q) == (0, 2)

    run(main())


def test_status_as_json_shape() -> None:
    assert QueueStatus(queued=3, in_progress=2).as_json() == {"Queued": 3, "InProgress": 2}

    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        assert q.status().as_json() == {"Queued": 0, "InProgress": 0}
        q.replace(range(5))
        await q.get()
        doc = q.status().as_json()
        assert doc == {"Queued": 4, "InProgress": 1}
        assert all(type(v) is int for v in doc.values())
        assert json.loads(json.dumps(doc)) == doc

    run(main())


def test_many_workers_drain_every_item_exactly_once() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        seen: list[int] = []
        per_worker = [0] * 10

        async def worker(i: int) -> None:
            while True:
                try:
                    item = await q.get()
                except QueueClosed:
                    return
                seen.append(item)
                per_worker[i] += 1
                await asyncio.sleep(0)
                q.done()

        workers = [asyncio.create_task(worker(i)) for i in range(10)]
        await settle()
        q.replace(range(1000))
        await until(lambda: len(seen) == 1000 and status(q) == (0, 0))
        await settle()
        assert seen == list(range(1000))  # exactly once each, taken in FIFO order
        assert sum(per_worker) == 1000
        assert sum(1 for n in per_worker if n) > 1  # the work really was shared
        q.close()
        await asyncio.wait_for(asyncio.gather(*workers), 1.0)
        assert status(q) == (0, 0)

    run(main())


# --- WorkerGroup -------------------------------------------------------------------------------------------------


def test_group_counts_outcomes_per_returned_string() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        outcomes: dict[str, int] = {}
        handled: list[int] = []

        async def handle(item: int) -> str:
            handled.append(item)
            await asyncio.sleep(0)
            return "pulled" if item % 3 else "skipped"

        group = WorkerGroup("pull", q, handle, outcomes, count=3)
        group.start()
        q.replace(range(9))
        await until(lambda: sum(outcomes.values()) == 9)
        assert outcomes == {"pulled": 6, "skipped": 3}
        assert sorted(handled) == list(range(9))
        assert status(q) == (0, 0)
        await asyncio.wait_for(group.stop(), 1.0)
        assert outcomes == {"pulled": 6, "skipped": 3}

    run(main())


def test_group_handler_exception_counts_as_error_and_the_worker_keeps_going(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        outcomes: dict[str, int] = {}
        handled: list[int] = []

        async def handle(item: int) -> str:
            handled.append(item)
            if item in (1, 3):
                raise ValueError(f"bad item {item}")
            return "ok"

        group = WorkerGroup("trash", q, handle, outcomes, count=1)  # one worker: it must survive the errors
        group.start()
        q.replace(range(5))
        await until(lambda: sum(outcomes.values()) == 5)
        assert handled == [0, 1, 2, 3, 4]
        assert outcomes == {"ok": 3, "error": 2}
        assert status(q) == (0, 0)
        q.replace([5])  # still alive
        await until(lambda: sum(outcomes.values()) == 6)
        assert outcomes == {"ok": 4, "error": 2}
        await asyncio.wait_for(group.stop(), 1.0)

    with caplog.at_level(logging.ERROR, logger="keepstore.workers"):
        run(main())
    errors = [r for r in caplog.records if r.name == "keepstore.workers" and r.levelno >= logging.ERROR]
    assert len(errors) == 2
    assert all(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in errors)


def test_group_stop_cancels_workers_blocked_in_a_long_handler() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        outcomes: dict[str, int] = {}
        started: list[int] = []

        async def handle(item: int) -> str:
            started.append(item)
            await asyncio.sleep(3600)
            return "ok"

        group = WorkerGroup("pull", q, handle, outcomes, count=3)
        group.start()
        q.replace(range(5))
        await until(lambda: len(started) == 3)
        await settle()
        assert status(q) == (2, 3)

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(group.stop(), 1.0)
        assert loop.time() - t0 < 0.5
        assert q.closed
        assert status(q) == (0, 0)  # queued items dropped; done() was called for each cancelled item
        assert sorted(started) == [0, 1, 2]  # 3 and 4 never started
        assert outcomes == {"cancelled": 3}

    run(main())


def test_group_stop_ends_idle_workers_promptly() -> None:
    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        outcomes: dict[str, int] = {}

        async def handle(item: int) -> str:
            return "ok"

        group = WorkerGroup("trash", q, handle, outcomes, count=4)
        group.start()
        await settle()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(group.stop(), 1.0)
        assert loop.time() - t0 < 0.5
        assert outcomes == {}
        assert status(q) == (0, 0)
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("trash-")]

    run(main())

"""keepstore.aio.ThreadPool: the volumes' threads. run() returns, even when cancelled, only once its thread is done."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from keepstore.aio import ThreadPool


def test_returns_results_and_raises_errors() -> None:
    def add(a: int, b: int) -> int:
        return a + b

    def fail() -> None:
        raise KeyError("boom")

    async def main() -> None:
        pool = ThreadPool(2, "t")
        assert await pool.run(add, 1, 2) == 3
        with pytest.raises(KeyError):
            await pool.run(fail)
        assert await asyncio.gather(*(pool.run(add, i, i) for i in range(50))) == [2 * i for i in range(50)]
        await pool.shutdown()

    asyncio.run(main())


def test_work_runs_in_threads_up_to_the_limit() -> None:
    seen: set[str] = set()
    lock = threading.Lock()
    running = 0
    most = 0

    def work() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            seen.add(threading.current_thread().name)
        time.sleep(0.02)
        with lock:
            running -= 1

    async def main() -> None:
        pool = ThreadPool(3, "lim")
        await asyncio.gather(*(pool.run(work) for _ in range(12)))
        await pool.shutdown()

    asyncio.run(main())
    assert most == 3
    assert threading.main_thread().name not in seen
    assert all(name.startswith("lim_") for name in seen)


def test_one_thread_runs_jobs_one_at_a_time_in_order() -> None:
    order: list[int] = []
    overlap = threading.Event()
    busy = threading.Lock()

    def work(i: int) -> None:
        if not busy.acquire(blocking=False):
            overlap.set()
            return
        try:
            time.sleep(0.002)
            order.append(i)
        finally:
            busy.release()

    async def main() -> None:
        pool = ThreadPool(1, "serial")
        await asyncio.gather(*(pool.run(work, i) for i in range(20)))
        await pool.shutdown()

    asyncio.run(main())
    assert not overlap.is_set()
    assert order == list(range(20))


def test_cancelled_run_returns_only_once_the_thread_is_done() -> None:
    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def work() -> str:
        started.set()
        release.wait(10)
        time.sleep(0.02)
        finished.set()
        return "done"

    async def main() -> None:
        pool = ThreadPool(1, "c")
        task = asyncio.create_task(pool.run(work))
        while not started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done(), "run returned while its thread was still running"
        task.cancel()  # a second cancellation does not cut the wait short either
        await asyncio.sleep(0.05)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()
        assert await pool.run(lambda: 7) == 7  # the pool goes on
        await pool.shutdown()

    asyncio.run(main())


def test_shutdown_lets_queued_jobs_finish_then_refuses_new_ones() -> None:
    done: list[int] = []

    def work(i: int) -> None:
        time.sleep(0.005)
        done.append(i)

    async def main() -> None:
        pool = ThreadPool(1, "s")
        jobs = [asyncio.ensure_future(pool.run(work, i)) for i in range(5)]
        await asyncio.sleep(0)  # the jobs are queued
        await pool.shutdown()
        assert done == list(range(5))
        await asyncio.gather(*jobs)
        with pytest.raises(RuntimeError):
            await pool.run(work, 99)

    asyncio.run(main())


def test_rejects_a_pool_without_threads() -> None:
    with pytest.raises(ValueError):
        ThreadPool(0, "none")


def test_cancelled_run_whose_thread_fails_still_ends_cancelled() -> None:
    started = threading.Event()
    release = threading.Event()

    def work() -> None:
        started.set()
        release.wait(10)
        raise OSError("disk on fire")

    async def main() -> None:
        pool = ThreadPool(1, "f")
        task = asyncio.create_task(pool.run(work))
        while not started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0.02)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.shutdown()

    asyncio.run(main())

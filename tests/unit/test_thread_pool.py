"""keepstore.aio.ThreadPool: the volumes' threads. run() returns, even when cancelled, only once its thread is done."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from keepstore.aio import BatchingThreadPool, ThreadPool


async def _until(event: threading.Event) -> None:
    """Wait (5 s at most) until a pool thread has set ``event``: it has taken the job."""
    for _ in range(1000):
        if event.is_set():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no pool thread took the job")


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
        await _until(started)
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
        await _until(started)
        task.cancel()
        await asyncio.sleep(0.02)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.shutdown()

    asyncio.run(main())


# --- BatchingThreadPool ------------------------------------------------------------------------------------------


class _Gate:
    """A batch function that records its batches and holds the first one until ``open`` is called."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[object, ...]]] = []
        self.taken = threading.Event()
        self.released = threading.Event()

    def __call__(self, jobs: list[tuple[object, ...]]) -> list[object]:
        self.batches.append(jobs)
        self.taken.set()
        self.released.wait(10)
        return [KeyError(job[0]) if job[0] == "bad" else f"done {job[0]}" for job in jobs]


def test_jobs_queued_while_a_batch_runs_form_the_next_batch_and_get_their_own_results() -> None:
    gate = _Gate()
    wakeups: list[str] = []

    async def main() -> None:
        # Each call_soon_threadsafe is a write to the loop's self-pipe: a batch's results go back in one.
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            if threading.current_thread().name.startswith("b_"):  # the pool's thread, not the executor's
                wakeups.append(threading.current_thread().name)
            return real(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
        pool = BatchingThreadPool(gate, 1, "b")
        first = asyncio.ensure_future(pool.submit("a"))
        await _until(gate.taken)
        rest = [asyncio.ensure_future(pool.submit(x)) for x in ("b", "bad", "c")]
        await asyncio.sleep(0.05)
        gate.released.set()
        assert await first == "done a"
        assert await rest[0] == "done b"
        with pytest.raises(KeyError):
            await rest[1]  # an error entry fails its own job only
        assert await rest[2] == "done c"
        await pool.shutdown()

    asyncio.run(main())
    assert gate.batches == [[("a",)], [("b",), ("bad",), ("c",)]]
    assert len(wakeups) == 2  # one per batch, not one per job


def test_batches_are_capped() -> None:
    gate = _Gate()

    async def main() -> None:
        pool = BatchingThreadPool(gate, 1, "b", max_batch=2)
        first = asyncio.ensure_future(pool.submit(0))
        await _until(gate.taken)
        rest = [asyncio.ensure_future(pool.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        gate.released.set()
        assert await asyncio.gather(first, *rest) == [f"done {i}" for i in range(6)]
        await pool.shutdown()

    asyncio.run(main())
    assert [len(b) for b in gate.batches] == [1, 2, 2, 1]


def test_a_failing_batch_fails_each_of_its_jobs() -> None:
    def broken(jobs: list[tuple[object, ...]]) -> list[object]:
        raise OSError("disk on fire")

    def short(jobs: list[tuple[object, ...]]) -> list[object]:
        return []

    async def main() -> None:
        for fn, error in ((broken, OSError), (short, RuntimeError)):
            pool = BatchingThreadPool(fn, 2, "b")
            results = await asyncio.gather(*(pool.submit(i) for i in range(5)), return_exceptions=True)
            assert [type(r) for r in results] == [error] * 5
            await pool.shutdown()

    asyncio.run(main())


def test_cancelled_batched_job_returns_only_once_its_batch_is_done() -> None:
    gate = _Gate()

    async def main() -> None:
        pool = BatchingThreadPool(gate, 1, "b")
        job = asyncio.ensure_future(pool.submit("a"))
        await _until(gate.taken)
        job.cancel()
        await asyncio.sleep(0.05)
        assert not job.done()  # the batch still reads what the job handed it
        gate.released.set()
        with pytest.raises(asyncio.CancelledError):
            await job
        await pool.shutdown()

    asyncio.run(main())


def test_jobs_submitted_in_one_turn_of_the_loop_form_one_batch() -> None:
    batches: list[list[tuple[object, ...]]] = []

    def record(jobs: list[tuple[object, ...]]) -> list[object]:
        batches.append(jobs)
        return [job[0] for job in jobs]

    async def main() -> None:
        pool = BatchingThreadPool(record, 1, "b", max_batch=3)
        # Five submissions in one turn: handed to the idle thread together at its end (in batches of at most 3),
        # not the first alone while the others are still being submitted.
        assert await asyncio.gather(*(pool.submit(i) for i in range(5))) == list(range(5))
        assert await pool.submit("later") == "later"
        await pool.shutdown()

    asyncio.run(main())
    assert batches == [[(0,), (1,), (2,)], [(3,), (4,)], [("later",)]]


def test_shutdown_runs_jobs_held_for_the_end_of_the_turn() -> None:
    async def main() -> None:
        pool = BatchingThreadPool(lambda jobs: [job[0] * 2 for job in jobs], 1, "b")
        first = asyncio.ensure_future(pool.submit(1))
        await asyncio.sleep(0)  # the job is submitted, the thread started, the hand-over still to come
        second = asyncio.ensure_future(pool.submit(2))
        await asyncio.sleep(0)
        assert pool._held  # (what this test is about: a job not yet handed over when shutdown starts)
        await pool.shutdown()
        assert (await first, await second) == (2, 4)
        with pytest.raises(RuntimeError):
            await pool.submit(3)

    asyncio.run(main())

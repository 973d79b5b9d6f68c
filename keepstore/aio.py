"""Running blocking work in threads without losing track of it."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("keepstore")


def repeat(interval: float, fn: Callable[[], object]) -> Callable[[], None]:
    """Call ``fn`` now and then every ``interval`` seconds from the running event loop; returns what stops it.

    Each call is scheduled after the one before has run: a loop that stalls makes the calls stop, which is what
    heartbeats and watchdog pings are for.
    """
    loop = asyncio.get_running_loop()
    handle: asyncio.TimerHandle | None = None
    stopped = False

    def tick() -> None:
        nonlocal handle
        if stopped:
            return
        try:
            fn()
        except Exception:
            # One failure must not end the repetition (a heartbeat, a certificate check): logged, and on.
            log.exception("repeated call failed", extra={"fields": {"call": getattr(fn, "__qualname__", repr(fn))}})
        handle = loop.call_later(interval, tick)

    def stop() -> None:
        nonlocal stopped
        stopped = True
        if handle is not None:
            handle.cancel()

    tick()
    return stop


class ThreadPool:
    """Threads for a volume's blocking work, with the least machinery between them and the event loop.

    ``run`` returns, even when cancelled, only once the thread is done with the job: a thread cannot be stopped, and
    callers hand it pooled buffers and open files that must not be released or reused while it runs (the work is
    bounded: a disk read or write of at most one block, so the wait is too).

    It costs a fraction of what ``ThreadPoolExecutor`` + ``asyncio.wrap_future`` + ``shield`` did: a 4 KiB durable
    PUT spent more of its Python time handing its one write to such an executor and back than anywhere else. Here
    the job goes on a SimpleQueue with the loop's own future, and the thread completes that future through
    ``call_soon_threadsafe``. Jobs run in submission order on up to ``max_threads`` threads, started as the number
    of jobs in flight requires (one thread: strictly one job at a time, in order).

    Use one pool from one event loop at a time (its bookkeeping is done on the loop's thread).
    """

    def __init__(self, max_threads: int, name: str) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self._max = max_threads
        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # jobs (a batching pool: lists of them), None
        self._threads: list[threading.Thread] = []
        self._in_flight = 0
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("thread pool is shut down")
        loop = asyncio.get_running_loop()
        job = _PoolJob(fn, args, loop)
        self._in_flight += 1
        if self._in_flight > len(self._threads) and len(self._threads) < self._max:
            thread = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._enqueue(job, loop)
        try:
            return await job.future
        except asyncio.CancelledError:
            # Cancelled while the thread may still read the caller's buffer or file: wait for it (bounded work).
            while not job.finished:
                job.waiter = loop.create_future()
                try:
                    await job.waiter
                except asyncio.CancelledError:
                    continue
            raise
        finally:
            # Counted down here (on the loop's thread), once the thread is done with the job: job.future is
            # completed, or job.finished set, only by _finished, which the thread schedules after the job.
            self._in_flight -= 1

    def _enqueue(self, job: _PoolJob[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._queue.put(job)

    async def shutdown(self) -> None:
        """Let queued jobs finish, then stop the threads."""
        self._flush()
        self._closed = True
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)

        def join() -> None:
            for thread in threads:
                thread.join()

        if threads:
            await asyncio.get_running_loop().run_in_executor(None, join)

    def _flush(self) -> None:
        """Hand over jobs held back for the end of the loop's turn (BatchingThreadPool)."""

    def _work(self) -> None:
        get = self._queue.get
        while (job := get()) is not None:
            try:
                value, error = job.fn(*job.args), None
            except BaseException as exc:
                value, error = None, exc
            try:
                job.loop.call_soon_threadsafe(_finished, job, value, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits for this job any more
            del job, value, error


class BatchingThreadPool(ThreadPool):
    """A ThreadPool whose threads take every job queued (up to ``max_batch``) and run them in one call.

    ``batch(jobs)`` gets the argument tuples of the jobs, in submission order, and returns one entry per job: its
    value, or a BaseException instance to raise from that job's ``run``. While a batch runs, new jobs queue up and
    form the next one, so batches grow with the load by themselves and a lone job never waits for company. Jobs
    submitted during one turn of the event loop reach the threads together, at the end of that turn: a burst of
    requests that arrived with one wake-up of the loop then forms one batch, where the thread, woken by the first,
    would have taken it alone and left the rest for a second batch (for group commit: a second fdatasync). Nothing
    waits beyond the turn under way, and no timer is involved. ``run`` keeps ThreadPool's contract (``fn`` is not
    used): it returns, even when cancelled, only once its batch is done.
    """

    def __init__(
        self, batch: Callable[[list[tuple[Any, ...]]], list[Any]], max_threads: int, name: str, max_batch: int = 64
    ) -> None:
        super().__init__(max_threads, name)
        self._batch = batch
        self._max_batch = max_batch
        self._held: list[_PoolJob[Any]] = []  # submitted this turn of the loop, handed over by _flush at its end

    def _enqueue(self, job: _PoolJob[Any], loop: asyncio.AbstractEventLoop) -> None:
        if not self._held:
            loop.call_soon(self._flush)
        self._held.append(job)

    def _flush(self) -> None:
        held, self._held = self._held, []
        for start in range(0, len(held), self._max_batch):
            self._queue.put(held[start : start + self._max_batch])

    async def submit(self, *args: Any) -> Any:
        """Queue one job with these arguments; its entry in the batch's results."""
        return await self.run(_in_batch, *args)

    def _work(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        stop = False
        carry: list[_PoolJob[Any]] = []  # what did not fit in the last batch: the start of the next
        while carry or not stop:
            if carry:
                jobs, carry = carry, []
            elif (first := get()) is None:
                break
            else:
                jobs, first = first, None
            while not stop and len(jobs) < self._max_batch:
                try:
                    more = get_nowait()
                except queue.Empty:
                    break
                if more is None:  # shutdown: this thread's stop mark; finish what it has first
                    stop = True
                    break
                room = self._max_batch - len(jobs)
                jobs.extend(more[:room])
                carry = more[room:]
                if carry:
                    break
            try:
                results = self._batch([j.args for j in jobs])
                if len(results) != len(jobs):
                    raise RuntimeError(f"batch returned {len(results)} results for {len(jobs)} jobs")
            except BaseException as exc:
                results = [exc] * len(jobs)
            # One wake-up per event loop for the whole batch, not one per job: each call_soon_threadsafe writes to
            # the loop's self-pipe, a system call here and a wake-up and a read there.
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_PoolJob[Any], Any, BaseException | None]]] = {}
            for j, result in zip(jobs, results, strict=True):
                error = result if isinstance(result, BaseException) else None
                by_loop.setdefault(j.loop, []).append((j, None if error is not None else result, error))
            for loop, done in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_finished_all, done)
                except RuntimeError:
                    pass  # the loop is closed: nobody waits for these jobs any more
            del jobs, results, by_loop


def _in_batch(*args: Any) -> Any:
    raise AssertionError("a batched job runs as part of its batch")  # pragma: no cover


class _PoolJob(Generic[T]):
    __slots__ = ("args", "finished", "fn", "future", "loop", "waiter")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...], loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.args = args
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()
        self.waiter: asyncio.Future[None] | None = None
        self.finished = False


def _finished_all(done: list[tuple[_PoolJob[Any], Any, BaseException | None]]) -> None:
    for job, value, error in done:
        _finished(job, value, error)


def _finished(job: _PoolJob[Any], value: Any, error: BaseException | None) -> None:
    job.finished = True
    future = job.future
    if not future.done():
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    waiter = job.waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(None)

"""MD5 off the event loop, many streams per core.

Every byte keepstore stores or serves is hashed, and on two cores MD5 is what verified reads and writes run out of
first: OpenSSL's MD5 does ~650 MB/s on one core here, because each of its 64 steps per block waits for the one
before. The :class:`HashEngine` therefore hashes *independent* streams together: concurrent requests hand it their
data, and one thread advances up to eight MD5 states at once in the lanes of an AVX2 register (``keepstore._md5mb``,
a small C extension: 3 GB/s per core for eight streams, 1.5 GB/s for four). The digests are ordinary MD5; nothing
is hashed less, only more of it per core-second.

Without the extension (it did not build, or another CPU architecture) the engine falls back to ``hashlib`` in as
many threads as there are CPUs, which is what keepstore did before the engine existed.

Contract for callers: a buffer handed to the engine is read until the returned future is done, so it must not be
released or reused before then. :func:`hash_into` waits for that even when cancelled (it asks the engine to drop
the job at its next round, a few milliseconds at most), as :class:`keepstore.aio.ThreadPool` does for threads.
Small inputs are hashed inline: a hop to another thread costs more than hashing 64 KiB.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

INLINE_LIMIT = 64 * 1024  # hash inline up to this many bytes
SEGMENT = 4 * 1024 * 1024  # StreamHasher hands segments of at least this size to the engine
ROUND = 1 << 20  # the most of one stream the engine hashes before it looks for new streams


class Md5State(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


try:
    from . import _md5mb

    def new_md5(checkpoint: int = 0) -> Md5State:
        """An MD5 state; with ``checkpoint``, it records its chaining value every that many bytes (see below)."""
        return _md5mb.Md5(checkpoint=checkpoint)

    def _update_many(states: Sequence[Md5State], data: Sequence[memoryview]) -> None:
        _md5mb.update_many(states, data)

    SIMD_LANES = _md5mb.simd_lanes()
    CHECKPOINTS = True
except ImportError:  # pragma: no cover - the extension is built by every supported install path
    _md5mb = None  # type: ignore[assignment]

    def new_md5(checkpoint: int = 0) -> Md5State:
        return hashlib.md5()

    def _update_many(states: Sequence[Md5State], data: Sequence[memoryview]) -> None:
        for state, chunk in zip(states, data, strict=True):
            state.update(chunk)

    SIMD_LANES = 1
    CHECKPOINTS = False


# --- checkpoints: verifying one block in parallel ---------------------------------------------------------------
#
# One block is one MD5 stream, and a stream's 64 steps per 64-byte block each wait for the one before: a single
# verified GET could use one lane only. But MD5 is a chain: the state after byte k depends only on the state after
# byte j < k and the bytes in between. When a block is written, its hasher records the 16-byte chaining value at
# every segment boundary (a segment is a 64 KiB multiple, about 1/8 of the block); the volume keeps these
# "checkpoints" beside the block (an extended attribute for directory volumes). A read then hashes all segments at
# once, segment i in lane i starting from checkpoint i, and accepts the block when segment i ends exactly on
# checkpoint i+1 for every i and the last segment's digest is the block's hash. By induction that is precisely
# "MD5(block) == hash": the checkpoints are hints that are themselves verified, never trusted. A wrong checkpoint
# (or none) only costs speed: the block is then hashed from the start as before.

SEGMENT_QUANTUM = 64 * 1024
PARALLEL_MIN = 256 * 1024  # smaller blocks are hashed in one piece (below this the split does not pay)
CHECKPOINT_LANES = 8
_CHECKPOINT_VERSION = 1


def segment_length(size: int) -> int:
    """The checkpoint interval for a block of ``size`` bytes: ~size/8, rounded up to a multiple of 64 KiB."""
    per_lane = -(-size // CHECKPOINT_LANES)
    return max(SEGMENT_QUANTUM, -(-per_lane // SEGMENT_QUANTUM) * SEGMENT_QUANTUM)


@dataclass(frozen=True)
class Checkpoints:
    """The chaining values of a block's MD5 at every multiple of ``interval`` bytes (the first is after one)."""

    interval: int
    chains: bytes  # 16 bytes per checkpoint

    @classmethod
    def of(cls, state: Md5State, interval: int, size: int) -> Checkpoints | None:
        """What a writer's hasher (``new_md5(interval)``) recorded, trimmed to what a block of ``size`` needs."""
        if not CHECKPOINTS or interval <= 0 or size < PARALLEL_MIN:
            return None
        needed = -(-size // interval) - 1
        chains = state.checkpoints()  # type: ignore[attr-defined]
        if needed < 1 or len(chains) < 16 * needed:
            return None
        return cls(interval, bytes(chains[: 16 * needed]))

    def encode(self) -> bytes:
        return bytes([_CHECKPOINT_VERSION]) + self.interval.to_bytes(4, "little") + self.chains

    @classmethod
    def decode(cls, value: bytes, size: int) -> Checkpoints | None:
        """Parse ``encode()``'s output for a block of ``size`` bytes; None if it does not fit that block."""
        if not CHECKPOINTS or len(value) < 5 or value[0] != _CHECKPOINT_VERSION:
            return None
        interval = int.from_bytes(value[1:5], "little")
        if interval <= 0 or interval % 64:
            return None
        chains = value[5:]
        if size < PARALLEL_MIN or len(chains) != 16 * (-(-size // interval) - 1) or not chains:
            return None
        return cls(interval, chains)

    @property
    def segments(self) -> int:
        return len(self.chains) // 16 + 1

    def chain(self, i: int) -> bytes:
        """Checkpoint ``i`` (1-based: the state after ``i`` segments)."""
        return self.chains[16 * (i - 1) : 16 * i]


class ShortRead(Exception):
    """The data source ended before the size it was said to have."""


STRIPE = 256 * 1024  # bytes of each segment read and hashed per round


def digest_segments(
    read: Callable[[memoryview, int], int],
    size: int,
    checkpoints: Checkpoints,
    scratch: memoryview,
    keep: bool = False,
) -> str | None:
    """Thread side: MD5 of ``size`` bytes got with ``read(view, offset)``, all segments hashed at once.

    Returns the digest if every segment ends on its checkpoint, else None (the caller hashes from the start).
    ``scratch`` holds two rounds of stripes (2 x segments x STRIPE bytes, less if it is smaller): one is read into
    while the engine hashes the other. With ``keep`` (``scratch`` at least ``size`` long), every stripe is read to
    its own offset instead, so that ``scratch`` holds the block afterwards. Raises ShortRead if ``read`` returns
    less than asked.
    """
    interval, n = checkpoints.interval, checkpoints.segments
    keep = keep and len(scratch) >= size
    stripe = min(STRIPE, interval) if keep else min(STRIPE, interval, (len(scratch) // (2 * n)) // 64 * 64)
    if stripe <= 0:
        return None  # no room for two rounds of stripes: the caller hashes from the start
    states = [new_md5()] + [_md5mb.Md5.resume(checkpoints.chain(i), i * interval) for i in range(1, n)]
    pending: list[concurrent.futures.Future[None]] = []
    try:
        for rnd, offset in enumerate(range(0, interval, stripe)):
            base = (rnd % 2) * n * stripe
            batch: list[tuple[Md5State, memoryview]] = []
            for i in range(n):
                start = i * interval + offset
                length = min(stripe, min(size, (i + 1) * interval) - start)
                if length <= 0:
                    continue
                at = start if keep else base + i * stripe
                window = scratch[at : at + length]
                if read(window, start) != length:
                    raise ShortRead(f"short read at {start} of {size} bytes")
                batch.append((states[i], window))
            concurrent.futures.wait(pending)
            for fut in pending:
                fut.result()  # an engine failure (a bug) surfaces here rather than as a chain mismatch
            pending = engine().submit_many(batch)
    finally:
        concurrent.futures.wait(pending)  # the engine reads scratch until then
    for fut in pending:
        fut.result()
    if any(states[i].chain() != checkpoints.chain(i + 1) for i in range(n - 1)):  # type: ignore[attr-defined]
        return None
    return states[-1].hexdigest()


FILE_SEGMENTS_MAX = 64  # the most segments the native digest_file takes (keepstore/_md5mb.c); more go the engine's way


def digest_file(fd: int, size: int, checkpoints: Checkpoints, scratch: memoryview, keep: bool = False) -> str | None:
    """Thread side: digest_segments over ``size`` bytes of the open file ``fd`` (same contract, same result).

    With the vector code, one native call reads the stripes and hashes all segments in this thread, the GIL
    released throughout: per 1 MiB GET that replaced ~60 Python-level steps, eight futures and two thread hand-offs
    with one call (docs/benchmarks.md). Without it, the hash engine's threads do the hashing as before.
    """
    if SIMD_LANES > 1 and checkpoints.segments <= FILE_SEGMENTS_MAX:
        try:
            keep = keep and len(scratch) >= size
            digest = _md5mb.digest_file(fd, size, checkpoints.interval, checkpoints.chains, scratch, keep)
        except EOFError as exc:
            raise ShortRead(str(exc)) from None
        return None if digest is None else digest.hex()

    def read(window: memoryview, offset: int) -> int:
        got = 0
        while got < len(window):
            n = os.preadv(fd, [window[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got

    return digest_segments(read, size, checkpoints, scratch, keep)


class _Job:
    __slots__ = ("abandoned", "data", "future", "pos", "state")

    def __init__(self, state: Md5State, data: memoryview) -> None:
        self.state = state
        self.data = data
        self.pos = 0
        self.abandoned = False
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()


class _Lane:
    """One engine thread and its queue of jobs."""

    def __init__(self, engine: HashEngine, index: int) -> None:
        self.engine = engine
        self.cond = threading.Condition(threading.Lock())
        self.queue: collections.deque[_Job] = collections.deque()
        self.load = 0  # jobs queued or running here (read without the lock to pick a thread: a hint)
        self.thread = threading.Thread(target=self._run, name=f"md5-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        per_round = self.engine.lanes
        active: list[_Job] = []
        cond, queue = self.cond, self.queue
        while True:
            with cond:
                while not queue and not active:
                    if self.engine.closed:
                        return
                    cond.wait()
                while queue and len(active) < per_round:
                    active.append(queue.popleft())
            active = self._round(active)

    def _round(self, active: list[_Job]) -> list[_Job]:
        """Hash up to ROUND bytes of each active job; return the jobs that are not done.

        A method of its own so that no slice of a caller's buffer outlives the round in a local variable.
        """
        live = []
        for job in active:
            if job.abandoned:
                self._done(job)
            else:
                live.append(job)
        if not live:
            return []
        pieces = [job.data[job.pos : job.pos + ROUND] for job in live]
        try:
            _update_many([job.state for job in live], pieces)
        except BaseException as exc:  # a bug, not bad data: fail these jobs, keep serving the others
            for job in live:
                self._done(job, exc)
            return []
        for piece in pieces:
            piece.release()
        rest = []
        for job in live:
            job.pos = min(len(job.data), job.pos + ROUND)
            if job.pos >= len(job.data):
                self._done(job)
            else:
                rest.append(job)
        return rest

    def _done(self, job: _Job, exc: BaseException | None = None) -> None:
        job.data = memoryview(b"")  # no reference to the caller's buffer survives the job
        with self.cond:
            self.load -= 1
        if exc is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(exc)


class HashEngine:
    """Threads that hash submitted (state, data) jobs, each thread advancing up to ``lanes`` of them at once."""

    def __init__(self, threads: int, lanes: int) -> None:
        self.lanes = max(1, lanes)
        self.closed = False
        self._threads = [_Lane(self, i) for i in range(max(1, threads))]

    def submit(self, state: Md5State, data: memoryview) -> _Job:
        """Queue ``state.update(data)``; thread-safe. The job's future completes once ``data`` is no longer read.

        A state must not have two jobs in flight at once (MD5 is sequential): wait for one before the next.
        """
        job = _Job(state, data)
        lane = min(self._threads, key=lambda t: t.load)  # spread streams while there are fewer than threads
        with lane.cond:
            lane.load += 1
            lane.queue.append(job)
            lane.cond.notify()
        return job

    def submit_many(self, jobs: Sequence[tuple[Md5State, memoryview]]) -> list[concurrent.futures.Future[None]]:
        """Queue several jobs on one thread, so that they share its lanes (the segments of one block)."""
        queued = [_Job(state, data) for state, data in jobs]
        lane = min(self._threads, key=lambda t: t.load)
        with lane.cond:
            lane.load += len(queued)
            lane.queue.extend(queued)
            lane.cond.notify()
        return [job.future for job in queued]

    def close(self) -> None:
        self.closed = True
        for lane in self._threads:
            with lane.cond:
                lane.cond.notify_all()


def _default_engine() -> HashEngine:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if SIMD_LANES > 1:
        # One thread per share of the CPUs: a thread with eight streams in its lanes hashes twice as much per
        # core-second as two threads with four each. Worker processes each get their own engine (configure()).
        return HashEngine(threads=max(1, cpus // _workers), lanes=SIMD_LANES)
    return HashEngine(threads=max(2, min(8, cpus)), lanes=1)


_workers = 1
_engine: HashEngine | None = None
_engine_lock = threading.Lock()


def configure(processes: int) -> None:
    """Size the engine for one of ``processes`` worker processes sharing this machine (before first use)."""
    global _workers, _engine
    with _engine_lock:
        _workers = max(1, processes)
        if _engine is not None:
            _engine.close()
            _engine = None


def engine() -> HashEngine:
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = _default_engine()
    return _engine


def submit(state: Md5State, data: memoryview) -> concurrent.futures.Future[None]:
    """``state.update(data)`` through the engine, for a thread that overlaps its reads with hashing.

    The future is done once ``data`` is no longer read (small inputs: at once, hashed inline).
    """
    if len(data) <= INLINE_LIMIT:
        state.update(data)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_result(None)
        return done
    return engine().submit(state, data).future


async def hash_into(state: Md5State, data: memoryview) -> None:
    """``state.update(data)`` without blocking the event loop; returns (even if cancelled) once data is unread."""
    if len(data) <= INLINE_LIMIT:
        state.update(data)
        return
    await _wait(engine().submit(state, data))


async def _wait(job: _Job) -> None:
    fut = asyncio.wrap_future(job.future)
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        job.abandoned = True
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        raise


async def md5_hex(data: memoryview) -> str:
    state = new_md5()
    await hash_into(state, data)
    return state.hexdigest()


class StreamHasher:
    """MD5 of a buffer that fills up over time (a request body arriving), hashed in order by the engine.

    ``advance(n)`` says the first ``n`` bytes are in place; completed segments are hashed in the background while
    more data arrives, so the digest is ready soon after the last byte. ``finish`` and ``aclose`` wait for any
    running job, so the buffer is never released while the engine still reads it.
    """

    def __init__(self, view: memoryview, size_hint: int | None = None) -> None:
        self._view = view
        # Checkpoints at the interval a block of the announced size uses (a chunked body: the largest block's).
        self._interval = segment_length(size_hint if size_hint is not None else len(view)) if CHECKPOINTS else 0
        self._md5 = new_md5(self._interval)
        self._hashed = 0  # bytes handed to _md5 so far (done or in progress)
        self._pending: _Job | None = None

    def advance(self, filled: int) -> None:
        if filled - self._hashed < SEGMENT:
            return
        pending = self._pending
        if pending is not None:
            if not pending.future.done():
                return  # the engine is behind; the next call hands it a bigger segment
            pending.future.result()  # re-raise a hashing error, if any (there should be none)
        segment = self._view[self._hashed : filled]
        self._hashed = filled
        self._pending = engine().submit(self._md5, segment)

    async def finish(self, filled: int) -> str:
        await self.aclose()
        rest = self._view[self._hashed : filled]
        self._hashed = filled
        await hash_into(self._md5, rest)
        return self._md5.hexdigest()

    def checkpoints(self, size: int) -> Checkpoints | None:
        """After ``finish``: the checkpoints of the block, for the volume to keep beside it."""
        return Checkpoints.of(self._md5, self._interval, size)

    async def aclose(self) -> None:
        """Wait (even if cancelled) until the engine no longer reads the buffer."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await _wait(pending)

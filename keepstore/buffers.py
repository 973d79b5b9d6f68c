"""The bounded pool of block buffers.

Every byte of block data keepstore holds in memory (a PUT body, a block being read and verified, a pulled block)
lives in a buffer from this pool, so ``MaxKeepBlobBuffers`` x 64 MiB bounds block memory however many requests
arrive. Requests beyond that wait in :meth:`BufferPool.acquire`, which is cancellable: a client that hangs up while
waiting stops waiting at once and takes nothing.

Buffers are anonymous ``mmap`` regions, allocated on first use and kept for reuse. The kernel commits their pages
only when touched, so a pool that served 4 KiB blocks costs a few KiB per buffer (2 MiB with huge pages), not
64 MiB; buffers left idle for a while are trimmed back (``BufferPool.trim``).

With ``huge_pages`` (``KeepstorePy.HugePageBuffers``) the regions ask for transparent huge pages (madvise
MADV_HUGEPAGE). Block data goes from these buffers straight to the device (O_DIRECT, see keepstore/_fileio.c), and a
direct write is split into one device request per run of physically contiguous memory, at most ``max_segments`` runs
(254 4 KiB pages on a virtio disk): from 4 KiB pages, which are rarely adjacent, a 1 MiB block usually takes two
requests, one of them 8 KiB, and a 64 MiB block 65; from 2 MiB pages one and 16 (``max_sectors_kb``). On the AMD
EPYC machine that doubled bare durable writes of 1 MiB blocks and raised keepstore's 1 MiB PUTs by about a third
(docs/benchmarks.md). Huge pages also cut page faults and TLB misses when a buffer is filled. What they cost: memory
is committed 2 MiB at a time, so a small block commits 2 MiB of the buffer it lands in (trimming keeps that much,
``KEEP_RESIDENT``), and a fault where no huge page is free may compact memory first (the kernel's ``defrag``
setting; with ``never`` or ``defer`` it falls back to small pages at once): buffers are filled on the event loop, so
that wait is the whole worker's.

Invariant for users: a buffer must not be released while any thread or transport still reads or writes it. Code
that hands a buffer to a thread uses :class:`keepstore.aio.ThreadPool`, which does not return (even when cancelled)
before the thread has finished.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .locator import BLOCK_SIZE

_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
_MADV_NOHUGEPAGE: int | None = getattr(mmap, "MADV_NOHUGEPAGE", None)

HUGE_PAGE = 2 << 20
# Trimming keeps the start of a buffer, where small blocks live, so that they never fault it back in: one huge page
# with huge pages (a range that ended inside one would split it into small pages), else the first MiB.
KEEP_RESIDENT = HUGE_PAGE
KEEP_RESIDENT_SMALL_PAGES = 1 << 20


class Buffer:
    """One pooled block buffer. ``view`` is a writable memoryview of the whole capacity.

    With ``huge_pages`` the view starts on a huge-page boundary of a mapping one huge page longer (kernels before
    6.7 do not align anonymous mappings to one; the slack is never touched, so it costs address space only): the
    buffer is then whole huge pages, and trimming splits none. Without, the mapping opts out of them
    (MADV_NOHUGEPAGE), which matters where the kernel would otherwise give them to every mapping (``enabled`` =
    ``always``).
    """

    __slots__ = ("_mmap", "_offset", "capacity", "idle_since", "keep_resident", "trimmed", "view")

    def __init__(self, capacity: int, huge_pages: bool = True) -> None:
        self.capacity = capacity
        huge_pages = huge_pages and _MADV_HUGEPAGE is not None
        slack = HUGE_PAGE if huge_pages and capacity >= HUGE_PAGE else 0
        self._mmap = mmap.mmap(-1, capacity + slack, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._offset = -_address(self._mmap) % HUGE_PAGE if slack else 0  # (a multiple of the page size)
        advice = _MADV_HUGEPAGE if huge_pages else _MADV_NOHUGEPAGE
        if advice is not None:
            try:
                self._mmap.madvise(advice)
            except OSError:
                pass  # a kernel without transparent huge pages (EINVAL): small pages, as without the setting
        self.view = memoryview(self._mmap)[self._offset : self._offset + capacity]
        self.keep_resident = KEEP_RESIDENT if huge_pages else KEEP_RESIDENT_SMALL_PAGES
        self.idle_since = 0.0
        self.trimmed = True

    def trim(self) -> None:
        """Give the memory beyond ``keep_resident`` back to the kernel (it reads as zeros when touched again)."""
        keep = self.keep_resident
        if self.capacity > keep:
            self._mmap.madvise(mmap.MADV_DONTNEED, self._offset + keep, self.capacity - keep)
        self.trimmed = True


def _address(region: mmap.mmap) -> int:
    """Where ``region`` starts in this process's address space."""
    anchor = ctypes.c_char.from_buffer(region)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # (an exported buffer would keep the mmap from ever closing)


@dataclass(frozen=True)
class PoolStatus:
    max_buffers: int
    in_use: int
    allocated: int
    waiting: int
    bytes_allocated: int


class BufferPool:
    """At most ``max_buffers`` buffers of ``buffer_size`` bytes, handed out first-come first-served."""

    def __init__(self, max_buffers: int, buffer_size: int = BLOCK_SIZE, huge_pages: bool = True) -> None:
        if max_buffers <= 0:
            raise ValueError("max_buffers must be positive")
        self.max_buffers = max_buffers
        self.buffer_size = buffer_size
        self.huge_pages = huge_pages
        self._free: list[Buffer] = []
        self._allocated = 0
        self._in_use = 0
        self._waiters: list[asyncio.Future[Buffer]] = []
        self.wait_seconds_total = 0.0

    @asynccontextmanager
    async def buffer(self) -> AsyncIterator[Buffer]:
        buf = await self.acquire()
        try:
            yield buf
        finally:
            self.release(buf)

    def would_wait(self) -> bool:
        return bool(self._waiters) or (not self._free and self._allocated >= self.max_buffers)

    def try_acquire(self) -> Buffer | None:
        """A buffer if one can be had without waiting, else None (then ``acquire``, which queues)."""
        return self._take() if not self._waiters else None

    async def acquire(self) -> Buffer:
        """Return a buffer, waiting (cancellably, FIFO) while all are in use."""
        buf = self.try_acquire()
        if buf is not None:
            return buf
        fut: asyncio.Future[Buffer] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        started = time.monotonic()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # We were handed a buffer in the same tick we were cancelled: pass it on.
                self.release(fut.result())
            elif fut in self._waiters:  # release() may already have dropped our cancelled future
                self._waiters.remove(fut)
            raise
        finally:
            self.wait_seconds_total += time.monotonic() - started

    def release(self, buf: Buffer) -> None:
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(buf)  # ownership passes straight to the next waiter
                return
        self._in_use -= 1
        buf.idle_since = time.monotonic()
        buf.trimmed = False
        self._free.append(buf)

    def trim(self, idle: float) -> int:
        """Return the memory of buffers unused for ``idle`` seconds to the kernel; how many were trimmed.

        A burst of large blocks leaves every buffer it used resident; trimming them once they have been idle a while
        brings the process back to its resting size without slowing down the buffers in steady use.
        """
        now = time.monotonic()
        n = 0
        for buf in self._free:
            if not buf.trimmed and now - buf.idle_since >= idle:
                buf.trim()
                n += 1
        return n

    def _take(self) -> Buffer | None:
        if self._free:
            self._in_use += 1
            return self._free.pop()
        if self._allocated < self.max_buffers:
            buf = Buffer(self.buffer_size, self.huge_pages)
            self._allocated += 1
            self._in_use += 1
            return buf
        return None

    def status(self) -> PoolStatus:
        return PoolStatus(
            max_buffers=self.max_buffers,
            in_use=self._in_use,
            allocated=self._allocated,
            waiting=sum(1 for w in self._waiters if not w.done()),
            bytes_allocated=self._allocated * self.buffer_size,
        )

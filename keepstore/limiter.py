"""The request limiter (SPEC §6.3): at most MaxConcurrentRequests at once, a bounded priority queue behind them.

Requests with an ``Origin`` header (browsers) queue at a higher priority than others, FIFO within a priority. When
the queue grows past MaxQueuedRequests, the lowest-priority, most recently queued request is turned away with
:class:`Overloaded` (503, empty body). A queued request whose client disconnects leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import Overloaded


@dataclass(order=True)
class _Waiter:
    key: tuple[int, int]  # (-priority, sequence): the smallest key is served first
    future: asyncio.Future[None] = field(compare=False)


class RequestLimiter:
    def __init__(self, max_concurrent: int, max_queued: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.active = 0
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()

    @staticmethod
    def priority(headers: Mapping[str, str]) -> int:
        return 1 if headers.get("Origin") else 0

    def queued(self) -> dict[str, int]:
        counts = {"low": 0, "normal": 0, "high": 0}
        for w in self._queue:
            counts["high" if -w.key[0] > 0 else "normal"] += 1
        return counts

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued (no wait, no coroutine: the common case)."""
        if self.max_concurrent <= 0 or (self.active < self.max_concurrent and not self._queue):
            self.active += 1
            return True
        return False

    async def acquire(self, priority: int = 0) -> None:
        if self.try_acquire():
            return
        waiter = _Waiter((-priority, next(self._seq)), asyncio.get_running_loop().create_future())
        bisect.insort(self._queue, waiter)
        if len(self._queue) > self.max_queued:
            # Turn away the lowest-priority, most recently queued request (maybe this one).
            victim = self._queue.pop()
            victim.future.set_exception(Overloaded())
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release()  # a slot was handed to us as we were cancelled: pass it on
            elif waiter in self._queue:
                self._queue.remove(waiter)
            raise

    def release(self) -> None:
        while self._queue:
            waiter = self._queue.pop(0)
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot passes to the waiter; active is unchanged
                return
        self.active -= 1

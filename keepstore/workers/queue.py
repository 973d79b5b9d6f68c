"""The replaceable work queue shared by the pull and trash workers (SPEC §4.2).

A data manager sends whole lists; each list *replaces* what is still queued (items a worker already took carry on).
Workers block in :meth:`WorkQueue.get` until there is work or the queue is closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueClosed(Exception):
    """The queue was closed: the worker should stop."""


@dataclass(frozen=True)
class QueueStatus:
    queued: int
    in_progress: int

    def as_json(self) -> dict[str, int]:
        return {"Queued": self.queued, "InProgress": self.in_progress}


class WorkQueue(Generic[T]):
    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._in_progress = 0
        self._closed = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.replaced = 0  # how many lists have been received

    def replace(self, items: Iterable[T]) -> None:
        """Drop everything still queued and queue ``items`` instead, atomically."""
        self._items = deque(items)
        self.replaced += 1
        self._wake(len(self._items))

    async def get(self) -> T:
        """Take the next item (FIFO); the caller must call :meth:`done` when finished with it."""
        while not self._items:
            if self._closed:
                raise QueueClosed()
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake(1)  # we were woken for an item we will not take: pass the wake-up on
                raise
            finally:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
        if self._closed:
            raise QueueClosed()
        self._in_progress += 1
        return self._items.popleft()

    def done(self) -> None:
        self._in_progress -= 1

    def close(self) -> None:
        """Wake every waiting worker with QueueClosed; queued items are dropped."""
        self._closed = True
        self._items.clear()
        self._wake(len(self._waiters))

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> QueueStatus:
        return QueueStatus(queued=len(self._items), in_progress=self._in_progress)

    def _wake(self, n: int) -> None:
        for fut in list(self._waiters):
            if n <= 0:
                break
            if not fut.done():
                fut.set_result(None)
                n -= 1

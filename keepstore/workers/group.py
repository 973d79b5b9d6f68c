"""A group of worker coroutines draining one WorkQueue, with a lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .queue import QueueClosed, WorkQueue

T = TypeVar("T")
log = logging.getLogger("keepstore.workers")


class WorkerGroup(Generic[T]):
    """``count`` coroutines, each taking one item at a time and recording the handler's outcome string.

    ``stop`` closes the queue (waiting workers end), cancels the workers where they stand and waits for them:
    handlers are written so that cancellation leaves nothing half-done (writes are atomic; buffers are released
    only after their threads finish).
    """

    def __init__(
        self,
        name: str,
        queue: WorkQueue[T],
        handle: Callable[[T], Awaitable[str]],
        outcomes: dict[str, int],
        count: int,
    ) -> None:
        self.name = name
        self.queue = queue
        self.handle = handle
        self.outcomes = outcomes
        self.count = count
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(), name=f"{self.name}-{i}") for i in range(self.count)]
        log.info(f"started {self.count} {self.name} workers")

    async def stop(self) -> None:
        self.queue.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self) -> None:
        while True:
            try:
                item = await self.queue.get()
            except QueueClosed:
                return
            outcome = "error"
            try:
                outcome = await self.handle(item)
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            except Exception:
                log.exception(f"{self.name} worker failed on an item")
            finally:
                self.queue.done()
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

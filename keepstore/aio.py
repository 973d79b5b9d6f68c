"""Running blocking work in threads without losing track of it."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def run_blocking(
    executor: concurrent.futures.Executor | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``fn`` in ``executor`` and return its result.

    If the calling task is cancelled, this still waits for the thread to finish before re-raising: a thread cannot
    be stopped, and callers hand it pooled buffers and open files that must not be released or reused while it
    runs. The work given to threads here is bounded (a disk read or write of at most one block), so the wait is too.
    """
    loop = asyncio.get_running_loop()
    if kwargs:
        fut = loop.run_in_executor(executor, lambda: fn(*args, **kwargs))
    else:
        fut = loop.run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        raise

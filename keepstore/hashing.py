"""MD5 off the event loop.

hashlib releases the GIL while it hashes more than 2 KiB, so hashing in threads uses both cores; hashing on the
event loop would stall every other request (64 MiB takes ~100 ms). Small inputs are hashed inline: a thread hop
costs more than hashing 64 KiB.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os

from .aio import run_blocking

INLINE_LIMIT = 64 * 1024  # hash inline up to this many bytes
SEGMENT = 4 * 1024 * 1024  # StreamHasher hands segments of at least this size to a thread

_executor = concurrent.futures.ThreadPoolExecutor(
    max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="md5"
)


async def md5_hex(data: memoryview) -> str:
    if len(data) <= INLINE_LIMIT:
        return hashlib.md5(data).hexdigest()
    return await run_blocking(_executor, _md5_hex, data)


def _md5_hex(data: memoryview) -> str:
    return hashlib.md5(data).hexdigest()


class StreamHasher:
    """MD5 of a buffer that fills up over time (a request body arriving), hashed in order in a thread.

    ``advance(n)`` says the first ``n`` bytes are in place; completed segments are hashed in the background while
    more data arrives, so the digest is ready soon after the last byte. ``finish`` and ``aclose`` wait for any
    running thread, so the buffer is never released while a thread still reads it.
    """

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._md5 = hashlib.md5()
        self._hashed = 0  # bytes handed to _md5 so far (done or in progress)
        self._pending: asyncio.Future[None] | None = None

    def advance(self, filled: int) -> None:
        if filled - self._hashed < SEGMENT:
            return
        if self._pending is not None and not self._pending.done():
            return  # the thread is behind; the next call hands it a bigger segment
        if self._pending is not None:
            self._pending.result()  # re-raise a hashing error, if any (there should be none)
        segment = self._view[self._hashed : filled]
        self._hashed = filled
        self._pending = asyncio.get_running_loop().run_in_executor(_executor, self._md5.update, segment)

    async def finish(self, filled: int) -> str:
        await self.aclose()
        rest = self._view[self._hashed : filled]
        self._hashed = filled
        if len(rest) <= INLINE_LIMIT:
            self._md5.update(rest)
        else:
            await run_blocking(_executor, self._md5.update, rest)
        return self._md5.hexdigest()

    async def aclose(self) -> None:
        """Wait (even if cancelled) until no thread uses the buffer."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        cancelled = False
        while not pending.done():
            try:
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                cancelled = True
            except BaseException:
                break
        if cancelled:
            raise asyncio.CancelledError()
        pending.result()

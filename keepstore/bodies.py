"""Receiving a block body into a pool buffer while hashing it: shared by client PUTs and pull workers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import StreamReader

from .errors import KeepError, TooLarge
from .hashing import Checkpoints, StreamHasher
from .locator import BLOCK_SIZE
from .volumes import BlockWriter


@dataclass(frozen=True)
class Body:
    """A block body received into a buffer: its size, its MD5 and the checkpoints recorded on the way."""

    size: int
    md5: str
    checkpoints: Checkpoints | None


async def receive(
    stream: StreamReader,
    view: memoryview,
    limit: int = BLOCK_SIZE,
    writer: WriterPipe | None = None,
    size_hint: int | None = None,
) -> Body:
    """Copy ``stream`` into ``view`` and hash it. TooLarge past ``limit`` bytes.

    With a ``writer``, the data also goes to disk as it arrives. ``size_hint`` (the announced size) sets where MD5
    checkpoints are recorded (keepstore.hashing). Errors of the stream itself (connection lost, bad framing)
    propagate unchanged for the caller to classify. Returns (and raises) only once no thread is reading the buffer
    any more.
    """
    hasher = StreamHasher(view, size_hint)
    filled = 0
    try:
        while chunk := await stream.readany():
            end = filled + len(chunk)
            if end > limit:
                raise TooLarge()
            view[filled:end] = chunk
            filled = end
            hasher.advance(filled)
            if writer is not None:
                writer.advance(filled)
        if writer is not None:
            await writer.finish(filled)
        digest = await hasher.finish(filled)
        return Body(filled, digest, hasher.checkpoints(filled))
    finally:
        await hasher.aclose()
        if writer is not None:
            await writer.aclose()


class WriterPipe:
    """Hands a buffer that fills up over time to a BlockWriter, one segment at a time, in order.

    At most one write runs at once; while it runs, data keeps arriving and the next segment grows. A failed
    write stops the pipe (``error`` is set): the caller aborts the writer and stores the block the normal way.
    """

    SEGMENT = 8 * 1024 * 1024
    # Segments but the last end on a multiple of this: a writer can then put them on disk with O_DIRECT, which
    # wants file offsets aligned to the device's block size (see keepstore/_fileio.c write_data).
    ALIGN = 64 * 1024

    def __init__(self, view: memoryview, writer: BlockWriter) -> None:
        self.view = view
        self.writer = writer
        self.written = 0
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    def advance(self, filled: int) -> None:
        filled -= filled % self.ALIGN
        if self.error is not None or filled - self.written < self.SEGMENT:
            return
        if self._task is not None:
            if not self._task.done():
                return  # the disk is behind; the next segment will be bigger
            self._collect()
            if self.error is not None:
                return
        self._task = asyncio.ensure_future(self.writer.write(self.view[self.written : filled]))
        self.written = filled

    async def finish(self, filled: int) -> None:
        await self.aclose()
        if self.error is None and filled > self.written:
            try:
                await self.writer.write(self.view[self.written : filled])
                self.written = filled
            except KeepError as exc:
                self.error = exc

    async def aclose(self) -> None:
        """Wait (even if cancelled) for the running write: it reads the buffer."""
        task = self._task
        if task is None:
            return
        cancelled = False
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                cancelled = True
        self._collect()
        if cancelled:
            raise asyncio.CancelledError()

    def _collect(self) -> None:
        task, self._task = self._task, None
        if task is None or task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.error is None:
            self.error = exc

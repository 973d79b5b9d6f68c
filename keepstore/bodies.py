"""Receiving a block body into a pool buffer while hashing it: shared by client PUTs and pull workers."""

from __future__ import annotations

from aiohttp import StreamReader

from .errors import TooLarge
from .hashing import StreamHasher
from .locator import BLOCK_SIZE


async def receive(stream: StreamReader, view: memoryview, limit: int = BLOCK_SIZE) -> tuple[int, str]:
    """Copy ``stream`` into ``view`` and return (size, md5 hex). TooLarge past ``limit`` bytes.

    Errors of the stream itself (connection lost, bad framing) propagate unchanged for the caller to classify.
    Returns (and raises) only once no thread is hashing the buffer any more.
    """
    hasher = StreamHasher(view)
    filled = 0
    try:
        while chunk := await stream.readany():
            end = filled + len(chunk)
            if end > limit:
                raise TooLarge()
            view[filled:end] = chunk
            filled = end
            hasher.advance(filled)
        return filled, await hasher.finish(filled)
    finally:
        await hasher.aclose()

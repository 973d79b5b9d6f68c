"""Keep-alive on the fast path (keepstore.http.protocol): a running request is never taken for an idle connection.

aiohttp closes a keep-alive connection whose timer fires while its own request loop is parked; a fast-path request
leaves that loop parked while it runs. These run the real connection handler with a short keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from keepstore.http.app import Call, Exchange, Reply
from keepstore.http.protocol import KeepServer

KEEPALIVE = 0.3
PATH = "/" + "0" * 32


async def _serve(delay: float) -> tuple[asyncio.AbstractServer, int, list[str]]:
    served: list[str] = []

    async def fast(exchange: Exchange) -> None:
        await asyncio.sleep(delay)
        call = Call(exchange=exchange, service=None, request_id="req-1", started=0.0)  # type: ignore[arg-type]
        await call.reply(Reply(200, b"ok", "text/plain"))
        served.append("fast")

    async def slow_path(request: web.BaseRequest) -> web.StreamResponse:
        served.append("aiohttp")
        return web.Response(text="other")

    server = KeepServer(slow_path, fast=fast, keepalive_timeout=KEEPALIVE)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    return listener, listener.sockets[0].getsockname()[1], served


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(f"GET {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split()[1])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return head.split(b"\r\n")[0] + b" " + body


@contextlib.asynccontextmanager
async def _connection(delay: float) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, list[str]]]:
    """A connection to a fresh server; on the way out, checks that the idle connection is closed by the server."""
    listener, port, served = await _serve(delay)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        yield reader, writer, served
        # Idle now: the keep-alive timeout closes the connection.
        assert await asyncio.wait_for(reader.read(1), 10 * KEEPALIVE) == b""
        writer.close()
    finally:
        listener.close()
        await listener.wait_closed()


def test_request_longer_than_keepalive_timeout_completes_and_idle_connection_closes() -> None:
    async def main() -> None:
        async with _connection(delay=3 * KEEPALIVE) as (reader, writer, served):
            # The second request runs while the keep-alive timer armed after the first one fires.
            assert await _get(reader, writer) == b"HTTP/1.1 200 OK ok"
            assert await _get(reader, writer) == b"HTTP/1.1 200 OK ok"
            assert await _get(reader, writer) == b"HTTP/1.1 200 OK ok"
            assert served == ["fast", "fast", "fast"]

    asyncio.run(main())


def test_quick_requests_keep_the_connection_open_past_the_timeout() -> None:
    async def main() -> None:
        async with _connection(delay=0) as (reader, writer, served):
            loop = asyncio.get_running_loop()
            end = loop.time() + 4 * KEEPALIVE
            count = 0
            while loop.time() < end:  # bounded: a few seconds at most
                assert await _get(reader, writer) == b"HTTP/1.1 200 OK ok"
                count += 1
                await asyncio.sleep(KEEPALIVE / 3)
            assert count >= 5 and served == ["fast"] * count

    asyncio.run(main())

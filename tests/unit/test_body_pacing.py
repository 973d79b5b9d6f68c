"""A request body that waits (for a buffer or a request slot) stays mostly in the kernel (keepstore.http.protocol).

These run the real connection handler: a client sends an 8 MiB body as fast as the socket takes it while the handler
waits, and the test watches how much of that body the server process has taken off the socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from aiohttp import web

from keepstore.http.app import AiohttpExchange
from keepstore.http.protocol import IDLE_READ_SIZE, WAITING_BODY_HIGH_WATER, KeepServer

BODY = os.urandom(8 << 20)
BOUND = WAITING_BODY_HIGH_WATER + IDLE_READ_SIZE  # reading pauses past the mark; the read that passed it is kept


async def _watch_then_read(paced: bool, **server_args: int) -> tuple[int, int, str]:
    """(most body bytes taken off the socket while the handler waited, bytes read in the end, their md5)."""
    seen: list[int] = []
    release = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        exchange = AiohttpExchange(request)
        if paced:
            exchange.pace_body(False)
        while not release.is_set():
            seen.append(request.content.total_bytes)
            await asyncio.sleep(0.01)
        exchange.pace_body(True)
        md5 = hashlib.md5()
        n = 0
        while chunk := await request.content.readany():
            md5.update(chunk)
            n += len(chunk)
        return web.Response(text=f"{n} {md5.hexdigest()}")

    server = KeepServer(handler, **server_args)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"PUT /{'0' * 32} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        # A second for the server to read what it will (the client has all of the body queued); a body that
        # passes the bound ends the wait early.
        deadline = asyncio.get_running_loop().time() + 1
        while asyncio.get_running_loop().time() < deadline and max(seen, default=0) <= BOUND:
            await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait_for(writer.drain(), 10)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split()[1])
        n, digest = (await asyncio.wait_for(reader.readexactly(length), 10)).decode().split()
        writer.close()
        return max(seen), int(n), digest
    finally:
        listener.close()
        await listener.wait_closed()


def test_waiting_body_holds_at_most_one_read_past_the_small_high_water_mark_then_arrives_whole() -> None:
    most, n, digest = asyncio.run(_watch_then_read(paced=True))
    assert 0 < most <= BOUND
    assert (n, digest) == (len(BODY), hashlib.md5(BODY).hexdigest())


def test_body_waits_paced_before_its_handler_runs() -> None:
    # Data that arrives between the headers and the handler's first step is held to the same bound.
    most, n, digest = asyncio.run(_watch_then_read(paced=False))
    assert 0 < most <= BOUND
    assert (n, digest) == (len(BODY), hashlib.md5(BODY).hexdigest())


def test_at_aiohttp_defaults_a_waiting_body_piles_up_past_the_bound() -> None:
    # The contrast that shows the tests above measure something: aiohttp's own flow control stops much later.
    most, n, digest = asyncio.run(_watch_then_read(paced=False, read_bufsize=2**16))
    assert most > BOUND
    assert (n, digest) == (len(BODY), hashlib.md5(BODY).hexdigest())

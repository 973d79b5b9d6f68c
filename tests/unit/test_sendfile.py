"""Call.sendfile over a real loopback connection: which way the bytes go, in what order, and what a short file does.

The server side is a plain asyncio transport (what both HTTP paths hand to Call.sendfile); the client is a real
socket. Spies on ``os.sendfile`` (the direct call from the handler) and the event loop's ``sendfile`` say which way
the bytes went: the direct way must never run while the transport holds unsent bytes, or those would arrive after
the file's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from keepstore.errors import VolumeError
from keepstore.http import app
from keepstore.http.app import Call


@dataclass
class Spy:
    direct: int = 0  # os.sendfile calls from Call.sendfile
    loop: list[int] = field(default_factory=list)  # counts asked of loop.sendfile


class _Os:
    """keepstore.http.app's view of the os module with another sendfile (the event loop keeps the real one)."""

    def __init__(self, sendfile: Any) -> None:
        self.sendfile = sendfile

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    seen = Spy()

    def counting_sendfile(out: int, fd: int, offset: int | None, count: int) -> int:
        seen.direct += 1
        return os.sendfile(out, fd, offset, count)

    monkeypatch.setattr(app, "os", _Os(counting_sendfile))
    real_loop_sendfile = asyncio.BaseEventLoop.sendfile

    async def counting_loop_sendfile(self: Any, transport: Any, file: Any, offset: int = 0, count: Any = None) -> Any:
        seen.loop.append(count)
        return await real_loop_sendfile(self, transport, file, offset, count)

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", counting_loop_sendfile)
    yield seen


class Link:
    """A server-side transport and the client socket at the other end of one loopback connection."""

    def __init__(self, transport: asyncio.Transport, client: socket.socket) -> None:
        self.transport = transport
        self.client = client

    def call(self) -> Call:
        request = SimpleNamespace(transport=self.transport)
        return Call(exchange=SimpleNamespace(request=request), service=None, request_id="t", started=0.0)  # type: ignore[arg-type]

    async def read(self, n: int) -> bytes:
        """Read exactly n bytes (fewer if the server closes first)."""
        loop = asyncio.get_running_loop()
        out = bytearray()
        while len(out) < n:
            chunk = await loop.sock_recv(self.client, min(1 << 20, n - len(out)))
            if not chunk:
                break
            out += chunk
        return bytes(out)


@contextlib.asynccontextmanager
async def linked() -> AsyncIterator[Link]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            accepted.set_result(transport)

    server = await loop.create_server(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, ("127.0.0.1", port))
    transport = await asyncio.wait_for(accepted, 10)
    try:
        yield Link(transport, client)
    finally:
        transport.abort()
        client.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
def block() -> Iterator[tuple[int, bytes]]:
    data = os.urandom(3 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            yield fd, data
        finally:
            os.close(fd)


def run(scenario: Callable[[Link], Awaitable[None]]) -> None:
    async def main() -> None:
        async with linked() as link:
            await asyncio.wait_for(scenario(link), 60)

    asyncio.run(main())


def sends_whole_file(fd: int, data: bytes) -> Callable[[Link], Awaitable[None]]:
    """A plain sendfile of the whole file: the peer gets every byte, and ``sent`` says so."""

    async def scenario(link: Link) -> None:
        call = link.call()
        reader = asyncio.ensure_future(link.read(len(data)))
        await call.sendfile(fd, len(data))
        assert await reader == data
        assert call.sent == len(data)

    return scenario


def test_empty_transport_sends_straight_from_the_handler(block: tuple[int, bytes], spy: Spy) -> None:
    fd, data = block

    run(sends_whole_file(fd, data))
    assert spy.direct >= 1
    # (Whatever the socket did not take at once went through the event loop, which then knew only the rest.)
    assert all(count < len(data) for count in spy.loop)


def test_unsent_bytes_in_the_transport_go_first(block: tuple[int, bytes], spy: Spy) -> None:
    fd, data = block
    head = os.urandom(16 << 20)

    async def scenario(link: Link) -> None:
        # Nobody reads yet: the kernel's buffers fill and the transport keeps the rest of the head.
        link.transport.write(head)
        assert link.transport.get_write_buffer_size() > 0
        call = link.call()
        reader = asyncio.ensure_future(link.read(len(head) + len(data)))
        await call.sendfile(fd, len(data))
        got = await reader
        assert got[: len(head)] == head and got[len(head) :] == data
        assert call.sent == len(data)

    run(scenario)
    assert spy.direct == 0
    assert spy.loop == [len(data)]


def test_file_shorter_than_promised_raises_with_what_was_sent(block: tuple[int, bytes], spy: Spy) -> None:
    fd, data = block

    async def scenario(link: Link) -> None:
        call = link.call()
        reader = asyncio.ensure_future(link.read(len(data)))
        with pytest.raises(VolumeError, match=f"file ended after {len(data)} of {len(data) + 4096} bytes"):
            await call.sendfile(fd, len(data) + 4096)
        assert await reader == data
        assert call.sent == len(data)

    run(scenario)
    assert spy.direct >= 1


def test_file_shorter_than_promised_through_the_event_loop(block: tuple[int, bytes], spy: Spy) -> None:
    fd, data = block
    head = b"x" * (16 << 20)

    async def scenario(link: Link) -> None:
        link.transport.write(head)  # the event loop's way, as above
        call = link.call()
        reader = asyncio.ensure_future(link.read(len(head) + len(data)))
        with pytest.raises(VolumeError, match=f"file ended after {len(data)} of {len(data) + 1} bytes"):
            await call.sendfile(fd, len(data) + 1)
        assert (await reader)[len(head) :] == data
        assert call.sent == len(data)

    run(scenario)
    assert spy.direct == 0
    assert spy.loop == [len(data) + 1]


def test_refused_sendfile_falls_back_to_the_event_loop(
    block: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, data = block
    calls = 0

    def refusing_sendfile(out: int, fd: int, offset: int | None, count: int) -> int:
        nonlocal calls
        calls += 1
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(app, "os", _Os(refusing_sendfile))

    run(sends_whole_file(fd, data))
    assert calls == 1


def test_connection_reset_mid_file_raises_with_what_was_sent(block: tuple[int, bytes], spy: Spy) -> None:
    fd, data = block

    async def scenario(link: Link) -> None:
        link.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        link.client.close()  # a reset: nothing more can be sent
        await asyncio.sleep(0.1)
        call = link.call()
        with pytest.raises(ConnectionError):
            await call.sendfile(fd, len(data))
        assert call.sent < len(data)

    run(scenario)


def test_closed_transport_raises_connection_reset(block: tuple[int, bytes], spy: Spy) -> None:
    fd, data = block

    async def scenario(link: Link) -> None:
        link.transport.abort()
        with pytest.raises(ConnectionResetError):
            await link.call().sendfile(fd, len(data))

    run(scenario)
    assert spy.direct == 0 and spy.loop == []

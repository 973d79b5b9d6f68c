"""Accepting on one socket shared by workers, least-loaded first (keepstore.accept).

Workers are stood in for by acceptors in one process, each with its own connection handler (its own count of open
connections) and one shared Loads, on one real listening socket; clients are real TCP connections.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from keepstore.accept import PATIENCE, POLL, BalancedAcceptor, Loads
from keepstore.http.protocol import KeepServer


def test_least_loaded_compares_with_every_worker_that_is_up() -> None:
    loads = Loads(3)
    assert [loads.get(i) for i in range(3)] == [Loads.DOWN] * 3
    loads.set(0, 2)
    loads.set(1, 1)
    assert loads.least_loaded(1) and not loads.least_loaded(0)  # worker 2 is down: not a rival
    loads.set(2, 1)
    assert loads.least_loaded(1) and loads.least_loaded(2)  # a tie: both may accept
    loads.mark_down(1)
    assert loads.least_loaded(2) and not loads.least_loaded(0)


async def _handler(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text="ok")


class Workers:
    """``count`` acceptors on one listening socket, each with its own KeepServer, sharing one Loads."""

    def __init__(self, count: int, slots: int | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.loads = Loads(slots or count)
        self.servers = [KeepServer(_handler) for _ in range(count)]
        self.acceptors = []
        for i, server in enumerate(self.servers):
            # Every worker has its own copy of the socket (it inherited it across fork).
            acceptor = BalancedAcceptor(self.listener.dup(), self.loads, i, server)
            server.connections_changed = acceptor.publish
            acceptor.start()
            self.acceptors.append(acceptor)
        self.clients: list[asyncio.StreamWriter] = []

    def counts(self) -> list[int]:
        return [s.open_connections for s in self.servers]

    async def connect(self) -> None:
        """One more client connection, returning once a worker has it."""
        before = sum(self.counts())
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.clients.append(writer)
        await _until(lambda: sum(self.counts()) == before + 1)

    async def hang_up(self, worker: int, n: int) -> None:
        """Close ``n`` of the client connections that ``worker`` holds."""
        target = self.counts()[worker] - n
        held = [h.transport.get_extra_info("peername") for h in self.servers[worker]._open]
        for writer in list(self.clients):
            if n and writer.get_extra_info("sockname") in held:
                writer.close()
                self.clients.remove(writer)
                n -= 1
        await _until(lambda: self.counts()[worker] == target)

    async def __aenter__(self) -> Workers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for writer in self.clients:
            writer.close()
        for acceptor in self.acceptors:
            acceptor.close()
            await acceptor.wait_closed()
        for server in self.servers:
            await server.shutdown(1.0)  # closes the connections it holds
        self.listener.close()


async def _until(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def _run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def test_connections_go_to_the_worker_with_fewest() -> None:
    async def main() -> None:
        async with Workers(2) as w:
            for _ in range(8):
                await w.connect()
            assert w.counts() == [4, 4]
            assert [w.loads.get(i) for i in range(2)] == [4, 4]  # what the other workers see
            await w.hang_up(0, 3)
            assert w.counts() == [1, 4]
            for _ in range(3):
                await w.connect()
            assert w.counts() == [4, 4]  # the new ones all went to the worker that had fewest

    _run(main)


def test_a_worker_that_does_not_accept_delays_connections_but_never_strands_them() -> None:
    async def main() -> None:
        # Worker 2 says it is up with no connections, and never accepts (its event loop is stuck).
        async with Workers(2, slots=3) as w:
            await w.connect()
            await w.connect()
            assert w.counts() == [1, 1]  # while worker 2 was still down
            await asyncio.sleep(10 * POLL)  # the worker that left the last one to the other has seen it taken
            w.loads.set(2, 0)
            started = time.monotonic()
            await w.connect()
            assert time.monotonic() - started >= PATIENCE  # it was left to worker 2 first
            assert sorted(w.counts()) == [1, 2]
            # While worker 2 stays stuck, the next ones are taken at once: the wait is paid once, not per connection.
            started = time.monotonic()
            for _ in range(4):
                await w.connect()
            assert sum(w.counts()) == 7
            assert time.monotonic() - started < 4 * PATIENCE

    _run(main)


def test_a_closed_acceptor_is_down_and_leaves_the_socket_to_the_others() -> None:
    async def main() -> None:
        async with Workers(2) as w:
            await w.connect()
            await w.connect()
            w.acceptors[0].close()
            assert w.loads.get(0) == Loads.DOWN
            for _ in range(3):
                await w.connect()
            assert w.counts() == [1, 4]  # the closed one kept its connection and took no new one

    _run(main)


class _FailingOnce(socket.socket):
    """A listening socket whose first accept fails as Linux passes on a network error (EPROTO)."""

    failed = False

    def accept(self) -> tuple[socket.socket, object]:
        if not _FailingOnce.failed:
            _FailingOnce.failed = True
            super().accept()[0].close()  # that connection is lost, as it would be
            raise OSError(errno.EPROTO, "Protocol error")
        return super().accept()


def test_an_accept_error_loses_that_connection_only() -> None:
    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        server = KeepServer(_handler)
        acceptor = BalancedAcceptor(_FailingOnce(fileno=os.dup(listener.fileno())), Loads(1), 0, server)
        server.connections_changed = acceptor.publish
        acceptor.start()
        writers = []
        try:
            for _ in range(2):
                writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
            await _until(lambda: server.open_connections == 1)
            assert _FailingOnce.failed
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
            await _until(lambda: server.open_connections == 2)  # it went on accepting
        finally:
            for w in writers:
                w.close()
            acceptor.close()
            await acceptor.wait_closed()
            await server.shutdown(1.0)
            listener.close()

    _run(main)

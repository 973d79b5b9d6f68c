"""Accepting connections on one listening socket shared by the worker processes, least-loaded worker first.

Workers used to accept on SO_REUSEPORT sockets of their own, and the kernel picks one of those per connection by a
hash of the addresses. That spreads thousands of connections evenly, but few long-lived ones unevenly: eight
keep-alive clients (a data manager, a few SDK pools) came out 4/4 in three tries of eight, and 1/7 or 2/6 in
others, so one worker (one core: one event loop, one GIL) served most of the load while the other idled, and the
same benchmark cell gave throughputs that differed by half from run to run.

So the supervisor binds one socket that every worker inherits, and each worker records its open connections in
memory shared by all of them (:class:`Loads`). Every worker's event loop watches the socket, but a worker accepts
only while it has no more connections than any other worker that is up; the others look again a millisecond later.
If the least-loaded worker does not take a waiting connection within ``PATIENCE`` (its event loop is stuck, or it
died and the supervisor has not noticed yet), whoever looks next takes it, and for the next ``IMPATIENCE`` takes
whatever arrives at once: a connection is never left waiting for one particular process, and a stuck worker
costs one wait, not one per connection. A worker that is starting, draining, dead or out of file descriptors counts
as down and is not waited for.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import select
import socket
import ssl
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import BaseSite

from .http.protocol import KeepServer

log = logging.getLogger("keepstore.workers")

POLL = 0.001  # seconds between looks at the socket while another worker should take what waits there
PATIENCE = 0.05  # seconds a waiting connection is left to the least-loaded worker before another takes it
IMPATIENCE = 1.0  # seconds after taking a connection another worker left waiting, during which none is left waiting
BURST = 64  # connections accepted per wake-up at most (as asyncio's own accept loop bounds it by the backlog)
_RETRY_AFTER = 1.0  # seconds before accepting again after running out of file descriptors or memory (as asyncio)
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds an accepted connection may take to complete its TLS handshake


class Loads:
    """Open connections per worker, in an anonymous shared mapping: made before fork, seen by every worker.

    Each worker writes only its own slot (aligned 8-byte stores: never torn); the supervisor marks a slot down
    before it starts that worker and after it died. Readers may see a slightly old figure, which is harmless: it
    only decides who accepts the next connection.
    """

    DOWN = 1 << 62  # never the least loaded

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self._map = mmap.mmap(-1, 8 * count)  # MAP_SHARED | MAP_ANONYMOUS
        self._slots = memoryview(self._map).cast("q")
        for i in range(count):
            self._slots[i] = self.DOWN

    def set(self, index: int, connections: int) -> None:
        self._slots[index] = connections

    def mark_down(self, index: int) -> None:
        self._slots[index] = self.DOWN

    def get(self, index: int) -> int:
        return int(self._slots[index])

    def least_loaded(self, index: int) -> bool:
        """Whether worker ``index`` has no more connections than any other worker that is up (ties: all of them)."""
        slots = self._slots
        mine = slots[index]
        for i in range(len(slots)):
            if slots[i] < mine:
                return False
        return True


class BalancedAcceptor:
    """Accepts on ``sock`` for worker ``index`` whenever it is the least loaded, and hands connections to
    ``server`` (the aiohttp connection factory). Has the ``close`` of an asyncio server, which is all aiohttp's
    site needs; closing stops accepting, marks this worker down and closes this process's copy of the socket."""

    def __init__(
        self,
        sock: socket.socket,
        loads: Loads,
        index: int,
        server: KeepServer,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._sock = sock
        self._loads = loads
        self._index = index
        self._server = server
        self._ssl = ssl_context
        self._loop = asyncio.get_running_loop()
        self._starting: set[RequestHandler] = set()  # accepted, connection_made not called yet
        self._reading = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None  # when this worker first left a waiting connection to another
        self._closed = False
        self._backing_off = False  # out of descriptors: down for _RETRY_AFTER
        self._impatient_until = 0.0  # loop time until which this worker does not wait for a less-loaded one
        self._tasks: set[asyncio.Task[None]] = set()
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def start(self) -> None:
        self._sock.setblocking(False)
        self.publish()
        self._resume()

    def publish(self, handler: RequestHandler | None = None) -> None:
        """Record this worker's load: connections open, and accepted but not set up yet. Called with the handler
        whenever one is made or lost (``KeepServer.connections_changed``)."""
        if handler is not None:
            self._starting.discard(handler)  # made (now in open_connections), or lost
        if not self._closed and not self._backing_off:
            self._loads.set(self._index, self._server.open_connections + len(self._starting))

    @property
    def sockets(self) -> list[socket.socket]:
        """As an asyncio server's (aiohttp's ``runner.addresses`` reads it)."""
        return [] if self._closed else [self._sock]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loads.mark_down(self._index)
        # TLS connections still in their handshake would be made after the drain has looked for connections to
        # finish: closed now instead of cut at exit. (A plain one is set up within this loop pass: it is served.)
        if self._ssl is not None:
            for task in self._tasks:
                task.cancel()
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sock.close()

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _resume(self) -> None:
        if not self._closed and not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._ready)
            self._reading = True

    def _pause(self, delay: float) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_later(delay, self._look_again)

    def _waiting(self) -> bool:
        return bool(self._poll.poll(0))

    def _look_again(self) -> None:
        self._timer = None
        if self._closed:
            return
        if self._backing_off:
            self._backing_off = False
            self.publish()
        try:
            self._ready()
        finally:
            if self._timer is None:  # whatever happened, keep watching the socket
                self._resume()

    def _ready(self) -> None:
        for _ in range(BURST):
            if not self._waiting():
                # Nothing (left) to take: watch the socket again; the next connection starts a new wait.
                self._waiting_since = None
                self._resume()
                return
            if not self._loads.least_loaded(self._index):
                now = self._loop.time()
                if now >= self._impatient_until:
                    if self._waiting_since is None:
                        self._waiting_since = now
                    if now - self._waiting_since < PATIENCE:
                        self._pause(POLL)
                        return
                    # The least-loaded worker has left a connection waiting too long: take it, and for the next
                    # second take whatever waits at once (a stuck worker costs one wait, not one per connection).
                    self._impatient_until = now + IMPATIENCE
            self._waiting_since = None
            if not self._accept_one():
                return
        self._resume()

    def _accept_one(self) -> bool:
        """Accept one connection if one waits: whether to go on."""
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return True  # another worker took it: _ready looks again
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors or memory: step aside (down, so that the others take the connections) and
                # try again later, as asyncio's own accept loop does.
                log.error(
                    "cannot accept connections", extra={"fields": {"error": str(exc), "retry_seconds": _RETRY_AFTER}}
                )
                self._backing_off = True
                self._loads.mark_down(self._index)
                self._pause(_RETRY_AFTER)
                return False
            # ECONNABORTED, and the network errors Linux accept() passes on (EPROTO, ENETUNREACH, EPERM...): that
            # connection is gone, the next may be fine.
            log.warning("accept failed", extra={"fields": {"error": str(exc)}})
            return True
        try:
            conn.setblocking(False)
            handler = self._server()  # made now, so that it counts from now on
        except Exception as exc:
            conn.close()
            log.warning("accepted connection could not be set up", extra={"fields": {"error": str(exc)}})
            return True
        self._starting.add(handler)
        self.publish()
        task = self._loop.create_task(self._connect(conn, handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _connect(self, conn: socket.socket, handler: RequestHandler) -> None:
        try:
            # With TLS this returns after the handshake: until then the connection counts as starting.
            if self._ssl is None:
                await self._loop.connect_accepted_socket(lambda: handler, conn)
            else:
                await self._loop.connect_accepted_socket(
                    lambda: handler, conn, ssl=self._ssl, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT
                )
        except (OSError, TimeoutError) as exc:
            # A client that hung up, or failed or never finished its TLS handshake (a port scan, plain HTTP sent
            # to the TLS port): routine, and the client knows.
            conn.close()
            log.debug("connection lost before it was set up", extra={"fields": {"error": _describe(exc)}})
        except Exception as exc:
            conn.close()
            log.warning("accepted connection lost before it was set up", extra={"fields": {"error": _describe(exc)}})
        finally:
            if handler in self._starting:  # never made: it no longer counts
                self.publish(handler)


class BalancedSite(BaseSite):
    """An aiohttp site that accepts with a :class:`BalancedAcceptor` (instead of ``loop.create_server``)."""

    __slots__ = ("_index", "_loads", "_name", "_sock", "_ssl")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        loads: Loads,
        index: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner)
        self._sock = sock
        self._loads = loads
        self._index = index
        self._ssl = ssl_context
        host, port = sock.getsockname()[:2]
        self._name = f"{'https' if ssl_context is not None else 'http'}://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, KeepServer)
        acceptor = BalancedAcceptor(self._sock, self._loads, self._index, server, self._ssl)
        server.connections_changed = acceptor.publish
        acceptor.start()
        self._server: Any = acceptor  # what BaseSite.stop closes


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

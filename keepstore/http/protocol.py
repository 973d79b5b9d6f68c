"""An aiohttp server that accepts Keep's ``TOUCH`` method without giving up the fast C parser.

aiohttp parses requests with llhttp (C), which knows a fixed list of methods and answers anything else, ``TOUCH``
included, with ``400 Invalid method`` before a handler runs. aiohttp's pure-Python parser accepts any token as a
method but is several times slower, and ``AIOHTTP_NO_EXTENSIONS=1`` would impose it on every request.

So each connection starts on the C parser. When llhttp rejects a request's method, and the bytes it rejected begin
with one of our extension methods at a request boundary, that connection switches to the Python parser, which parses
the same bytes again. Only connections that actually send ``TOUCH`` (an admin operation, rare) pay for the slower
parser; GET and PUT traffic never does. ``bench/parser.py`` measures both paths.

The same connection handler also takes simple block reads past aiohttp's request machinery (keepstore.http.fast):
for a request that qualifies it runs the pipeline itself instead of queueing the message for aiohttp's
per-connection loop. A chunk that holds one whole simple request is parsed by keepstore/_reqparse.c, which accepts
only what llhttp would parse the same way (tests/unit/test_reqparse.py holds it to that); anything else is parsed
by llhttp as before, and once llhttp has had a chunk that was not a whole request, so is everything after it on
that connection (only llhttp knows where its partial request ends). Ordering is kept: a request is taken this way
only while that loop is idle with nothing queued, and anything that arrives meanwhile is queued for the loop, which
is woken when the fast request is done. This relies on aiohttp's RequestHandler internals (pinned in
requirements.lock); if they are not what this module expects, the fast path turns itself off with a warning and
aiohttp serves everything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from multidict import CIMultiDict, CIMultiDictProxy

from .fast import FastExchange, FastRequest, is_block_path, qualifies

_parse_simple: Callable[[bytes], tuple[str, str, list[tuple[str, str]], int] | None] | None
try:
    from .._reqparse import parse as _parse_simple
except ImportError:  # pragma: no cover - built by every supported install path; llhttp parses everything then
    _parse_simple = None

log = logging.getLogger("keepstore.http")

FastServe = Callable[[FastExchange], Awaitable[object]]

# What the fast path touches of aiohttp's RequestHandler (checked on the first connection).
_INTERNALS = (
    "_messages _waiter _force_close _close _payload_parser _upgraded _request_count _parser _keepalive_handle "
    "_keepalive_timeout _next_keepalive_close_time _max_msg_queue_size _buffer_paused _message_tail _loop _read_bufsize"
).split()
_METHODS = ("_pause_reading_for_buffer", "_process_keepalive", "_drain_helper")

EXTENSION_METHODS = (b"TOUCH ",)

# How much a connection takes off its socket per read, and how much of a request body may pile up in the process
# before reading pauses. Once the body has a buffer to go into (Exchange.pace_body): asyncio's 256 KiB reads, and a
# pause only past 1 MiB (at aiohttp's 128 KiB every read of a streaming body paused and resumed the socket, two
# epoll_ctl calls per 256 KiB: 64 MiB PUTs took 10-20 % more CPU). Until then far less: 64 clients sending 64 MiB
# blocks to 8 buffers leave 56 bodies waiting, and at aiohttp's defaults each holds up to 384 KiB of heap, 21 MiB
# in all; this way at most 96 KiB.
BODY_READ_SIZE = 256 * 1024
BODY_HIGH_WATER = 1024 * 1024
IDLE_READ_SIZE = 64 * 1024
WAITING_BODY_HIGH_WATER = 32 * 1024


class _FallbackParser:
    """Feeds the C parser; on an extension method at a request boundary, hands the connection to the Python one."""

    def __init__(self, protocol: KeepRequestHandler, primary: Any, make_fallback: Any) -> None:
        self._protocol = protocol
        self._active = primary
        self._make_fallback = make_fallback
        self.switched = False

    def feed_data(self, data: bytes) -> Any:
        if self.switched:
            return self._active.feed_data(data)
        try:
            return self._active.feed_data(data)
        except BadHttpMethod:
            if not (bytes(data[:8]).startswith(EXTENSION_METHODS) and self._protocol.at_request_boundary()):
                raise
            self._active = self._make_fallback()
            self.switched = True
            return self._active.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._active, name)


class KeepRequestHandler(RequestHandler):
    """aiohttp's connection handler with the C-then-Python parser above."""

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        primary = self._parser
        read_bufsize = self._read_bufsize

        def make_fallback() -> Any:
            return HttpRequestParserPy(
                self,
                self._loop,
                read_bufsize,
                max_line_size=self.max_line_size,
                max_field_size=self.max_field_size,
                max_headers=self.max_headers,
                payload_exception=RequestPayloadError,
                auto_decompress=False,
            )

        self._parser = _FallbackParser(self, primary, make_fallback)  # type: ignore[assignment]
        self._fast_serve: FastServe | None = getattr(manager, "fast", None) if _fast_path_usable(self) else None
        self._fast_task: asyncio.Task[None] | None = None
        self.force_close_after = False  # set by the fast path's exchange: close once its response is out
        # Whether llhttp may hold part of a request (it has been fed a chunk that was not one whole simple request):
        # from then on every chunk goes to it, since only it knows where its requests end.
        self._llhttp_midway = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._set_read_size(IDLE_READ_SIZE)

    def pace_body(self, payload: StreamReader, full: bool) -> None:
        """See :meth:`keepstore.http.app.Exchange.pace_body`."""
        self._set_read_size(BODY_READ_SIZE if full else IDLE_READ_SIZE)
        if payload is EMPTY_PAYLOAD or not hasattr(payload, "_high_water"):
            return
        # Reading pauses once the high-water mark is passed, and resumes when the handler reads below half of it.
        high = BODY_HIGH_WATER if full else WAITING_BODY_HIGH_WATER
        payload._low_water, payload._high_water = high // 2, high

    def _set_read_size(self, size: int) -> None:
        transport = self.transport
        if transport is None:
            return
        if hasattr(transport, "max_size"):
            # asyncio's socket transports read max_size bytes per recv()
            transport.max_size = size
        elif hasattr(transport, "set_read_buffer_limits"):
            # TLS: its reads are keepstore.tls.READ_SIZE; what it may hold of undecrypted data while reading is
            # paused is this limit (256 KiB by default).
            transport.set_read_buffer_limits(high=size)

    # --- the fast path (keepstore.http.fast) ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        serve = self._fast_serve
        if (
            serve is None
            or self._parser is None
            or self._force_close
            or self._close
            or self._payload_parser is not None
            or self._upgraded
        ):
            self._llhttp_midway |= bool(data)
            super().data_received(data)
            return
        if self._fast_task is not None:
            self._llhttp_midway |= bool(data)
            self._queue(*self._parse(data), wake=False)  # behind the fast request, in order
            return
        waiter = self._waiter
        if self._messages or waiter is None or waiter.done():
            self._llhttp_midway |= bool(data)
            super().data_received(data)  # aiohttp's loop is busy: this request is ordered behind its work
            return
        if data and not self._llhttp_midway and _parse_simple is not None:
            # One whole simple request in this chunk (keepstore/_reqparse.c): a block request is served without
            # llhttp and the objects aiohttp builds around it (~5 us of a 4 KiB GET's ~55); any other such request
            # still leaves llhttp at a request boundary. (Empty data is aiohttp resuming its own parser after a
            # pause: it changes nothing of what llhttp holds.)
            simple = _parse_simple(data)
            if simple is not None:
                request = self._simple_request(data, *simple)
                if request is not None:
                    self._request_count += 1
                    self._start_fast(serve, request)
                    return
            else:
                self._llhttp_midway = True
        messages, upgraded, tail = self._parse(data)
        if len(messages) == 1 and not upgraded:
            message, payload = messages[0]
            if isinstance(message, RawRequestMessage) and qualifies(message, payload):
                self._request_count += 1
                self._parser.message_consumed()
                self._start_fast(serve, FastRequest.parsed(message, payload, self.transport))
                return
        self._queue(messages, upgraded, tail, wake=True)

    def _simple_request(
        self, data: bytes, method: str, target: str, headers: list[tuple[str, str]], body_at: int
    ) -> FastRequest | None:
        """The fast path's request for what ``_reqparse.parse`` found, if it is a block request."""
        if not is_block_path(method, target):
            return None
        payload: StreamReader = EMPTY_PAYLOAD
        if method == "PUT" and body_at < len(data):
            # As llhttp's parser would have left it: the whole body fed, then its end (an empty one: no reader).
            payload = StreamReader(self, self._read_bufsize, loop=self._loop)
            payload.feed_data(data[body_at:])
            payload.feed_eof()
        return FastRequest(method, target, CIMultiDictProxy(CIMultiDict(headers)), payload, self.transport)

    def _parse(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        assert self._parser is not None
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:  # as aiohttp does: its loop answers 400
            return [(_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)], False, b""
        return list(messages), upgraded, tail

    def _queue(self, messages: list[Any], upgraded: bool, tail: bytes, wake: bool) -> None:
        """What aiohttp's data_received does with parsed messages; ``wake`` False keeps its loop parked."""
        for message in messages:
            self._request_count += 1
            self._messages.append(message)
        waiter = self._waiter
        if wake and messages and waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._buffer_paused and len(self._messages) >= self._max_msg_queue_size:
            self._pause_reading_for_buffer()
        self._upgraded = upgraded
        if upgraded and tail:
            self._message_tail = tail

    def _start_fast(self, serve: FastServe, request: FastRequest) -> None:
        # The keep-alive timer stays as it is (cancelling and re-arming it cost a timer per request): should it
        # fire while the request runs, _process_keepalive sees the request and looks again later.
        self.force_close_after = False
        exchange = FastExchange(self, request)
        coro = self._run_fast(serve, exchange)
        # Run the request right here up to its first real wait, as Python 3.12's eager tasks do: a small cached GET
        # usually finishes without one, and then costs no task and no extra turn of the event loop. Only if it
        # waits does a task take over, from where it stopped.
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        task = self._loop.create_task(_continue(coro, waiting))
        exchange.task = self._fast_task = task

    async def _run_fast(self, serve: FastServe, exchange: FastExchange) -> None:
        """Serve one fast-path request; never raises (failures close the connection)."""
        failed = False
        try:
            await serve(exchange)
        except asyncio.CancelledError:
            failed = True  # connection lost or shutting down: the pipeline logged it
        except ConnectionError:
            failed = True
        except BaseException:
            log.exception("unhandled error on the fast path")
            failed = True
        finally:
            self._fast_task = None
        if failed or self.force_close_after or not exchange.request.content.is_eof():
            self.force_close()
            return
        if self._force_close or self._close or self.transport is None:
            return
        loop = self._loop
        if self._keepalive_timeout > 0:
            close_time = loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
        waiter = self._waiter
        if self._messages and waiter is not None and not waiter.done():
            waiter.set_result(None)  # what arrived meanwhile goes to aiohttp's loop, in order

    def _process_keepalive(self) -> None:
        if self._fast_task is not None and not self._force_close and self._keepalive_timeout > 0:
            # aiohttp's own loop looks idle while a fast-path request runs; the connection is not.
            loop = self._loop
            self._keepalive_handle = loop.call_at(loop.time() + self._keepalive_timeout, self._process_keepalive)
            return
        super()._process_keepalive()

    def connection_lost(self, exc: BaseException | None) -> None:
        task = self._fast_task
        super().connection_lost(exc)
        if task is not None:
            task.cancel()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        task = self._fast_task
        if task is not None:
            self._force_close = True  # take nothing more on this connection
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
            except Exception:
                pass  # _run_fast reports its own failures
        await super().shutdown(timeout)

    def at_request_boundary(self) -> bool:
        """True when no request is partly received: queued requests are complete and the current body is read."""
        if self._messages:
            return False
        current = self._current_request
        return current is None or current.content.is_eof()


async def _continue(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Drive ``coro`` on from the point where its eager start (KeepRequestHandler._start_fast) left it.

    ``waiting`` is what the coroutine yielded: the future it waits for (asyncio's protocol), or None for a bare
    yield. What a task does for its coroutine is done here: wait for that future, resume the coroutine, and pass a
    cancellation of this task on to it.
    """
    while True:
        cancel = False
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                # The coroutine's own await marked the future as awaited (asyncio refuses a second await of a
                # future so marked); a task would have cleared the mark on taking the future over, so do that.
                waiting._asyncio_future_blocking = False
                await waiting  # a cancellation of this task cancels ``waiting``, as for a task awaiting it
        except asyncio.CancelledError:
            # Through ``waiting`` the coroutine sees it when resumed; otherwise (a bare yield, or a future that was
            # already done) it has to be thrown in.
            cancel = waiting is None or not waiting.cancelled()
        except BaseException:
            pass  # the future's own error: the coroutine gets it from the future when resumed
        try:
            waiting = coro.throw(asyncio.CancelledError()) if cancel else coro.send(None)
        except StopIteration:
            return


class KeepServer(web.Server):
    """``web.Server`` whose connections use :class:`KeepRequestHandler`; ``fast`` serves the fast path."""

    def __init__(self, handler: Any, *, fast: FastServe | None = None, **kwargs: Any) -> None:
        # Every body starts out as one that waits: aiohttp's payload limit sets its high-water mark at twice this.
        kwargs.setdefault("read_bufsize", WAITING_BODY_HIGH_WATER // 2)
        super().__init__(handler, **kwargs)
        self.fast = fast
        # Called with the handler after each connection_made and connection_lost (keepstore.accept counts them).
        self.connections_changed: Callable[[RequestHandler], None] | None = None
        self._open: set[RequestHandler] = set()

    def __call__(self) -> RequestHandler:
        return KeepRequestHandler(self, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        """Connections made and not yet lost (aiohttp's own list keeps a closed one until its handler task ends)."""
        return len(self._open)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._open.add(handler)
        if self.connections_changed is not None:
            self.connections_changed(handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if handler in self._open:
            self._open.discard(handler)
            if self.connections_changed is not None:
                self.connections_changed(handler)


_usable: bool | None = None


def _fast_path_usable(handler: RequestHandler) -> bool:
    global _usable
    if _usable is None:
        missing = [a for a in _INTERNALS if not hasattr(handler, a)] + [m for m in _METHODS if not hasattr(handler, m)]
        _usable = not missing
        if missing:
            log.warning(
                "aiohttp internals changed: fast path for block reads disabled", extra={"fields": {"missing": missing}}
            )
    return _usable

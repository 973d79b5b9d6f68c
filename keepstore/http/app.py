"""Request pipeline and routing (SPEC §1.1, §2.1).

One pipeline does, in order: request id, "request" log line, operational endpoints (health, metrics, status: outside
the limiter and without CORS headers), the request limiter, CORS headers, the route table, error mapping, "response"
log line. Routes match the percent-decoded path like gorilla/mux does upstream, with path cleaning off:
``//<locator>`` is a GET alias and nothing is normalised, so ``/../x`` or ``/%2e%2e/x`` simply match no route (400).
No handler ever builds a file path from anything but a validated 32-hex hash.

Handlers never see the HTTP server's own request and response types: they read an :class:`Incoming` request and
answer with a :class:`Reply` (a whole response) or stream through :class:`Call` (``start``, ``send``, ``sendfile``).
An :class:`Exchange` puts that on the wire: :class:`AiohttpExchange` for requests that went through aiohttp's
server, ``keepstore.http.fast.FastExchange`` for block reads taken straight off the connection (see that module).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import StreamReader, web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDictProxy

from ..errors import BadRoute, ClientGone, KeepError, Overloaded, VolumeError
from ..logs import log_request, log_response, new_request_id, redact, request_lines_enabled
from .errors import status_of

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger("keepstore.http")

CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, HEAD, PUT, OPTIONS",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Authorization, Content-Length, Content-Type, X-Keep-Desired-Replicas, "
    "X-Keep-Signature, X-Keep-Storage-Classes",
    "Access-Control-Expose-Headers": "X-Keep-Locator, X-Keep-Replicas-Stored, X-Keep-Storage-Classes-Confirmed",
    "Access-Control-Max-Age": "86486400",
}

TEXT = "text/plain; charset=utf-8"
OCTETS = "application/octet-stream"


class Incoming(Protocol):
    """What handlers may read of a request (aiohttp's BaseRequest has it all; so does the fast path's request)."""

    @property
    def method(self) -> str: ...
    @property
    def raw_path(self) -> str: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def host(self) -> str: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> StreamReader: ...
    @property
    def cookies(self) -> Mapping[str, str]: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...


@dataclass(slots=True)
class Reply:
    """A whole response, known before anything is sent."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] | None = None


def text_reply(status: int, body: str) -> Reply:
    return Reply(status, body.encode(), TEXT)


def json_reply(body: str, status: int = 200) -> Reply:
    return Reply(status, body.encode(), "application/json")


def error_reply(exc: KeepError) -> Reply:
    status = status_of(exc)
    if isinstance(exc, (Overloaded, ClientGone)):
        return Reply(status)
    reply = text_reply(status, f"{exc}\n")
    if isinstance(exc, BadRoute):
        reply.headers = {"X-Content-Type-Options": "nosniff"}
    return reply


class Exchange(ABC):
    """Puts one call's response on the wire."""

    request: Incoming
    task: asyncio.Task[Any] | None = None  # the task serving the request (RequestTimeout cancels it)

    @abstractmethod
    async def reply(self, call: Call, reply: Reply) -> None:
        """Send a whole response (status line, headers, body)."""

    @abstractmethod
    async def start(self, call: Call, status: int, content_type: str | None, length: int | None) -> None:
        """Send the status line and headers of a response whose body follows (``length`` None: chunked)."""

    @abstractmethod
    async def send(self, data: bytes | memoryview) -> None:
        """Send body bytes after ``start``; returns once the transport has taken them or copied them."""

    @abstractmethod
    async def end(self) -> None:
        """Finish a started response."""

    @abstractmethod
    def cut_short(self) -> None:
        """Abort the connection: a started response cannot be completed."""

    @abstractmethod
    def close_after(self) -> None:
        """Close the connection once this response is sent (the request's framing cannot be trusted)."""

    @abstractmethod
    async def send_continue(self) -> None:
        """Send ``100 Continue`` (the client waits for it before sending the body)."""

    @abstractmethod
    def pace_body(self, full: bool) -> None:
        """Take the request body off the socket at full speed (``full``: a buffer is ready for it) or in small
        steps that stop early (the request waits; most of its body stays in the kernel's socket buffer)."""


Handler = Callable[["Call", "re.Match[str]"], Awaitable[Reply | None]]


@dataclass(slots=True)
class Call:
    """One request in flight: what handlers need beside the request itself.

    A handler returns a Reply, or streams its response with ``start`` / ``send`` / ``sendfile`` and returns None.
    """

    exchange: Exchange
    service: Service
    request_id: str
    started: float
    cors: bool = False
    status_time: float | None = None
    fields: dict[str, object] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # set on whatever response goes out, errors included
    status: int = 0  # of the response, once it has started
    sent: int = 0  # body bytes sent
    error_body: bytes = b""  # the body of an error reply, for the log
    log_shared: str = ""  # the request fields, encoded once for both log lines
    deadline: float = 0.0  # RequestTimeout: when the deadline sweeper cancels the exchange's task (0: none)
    timed_out: bool = False

    @property
    def request(self) -> Incoming:
        return self.exchange.request

    @property
    def responded(self) -> bool:
        """Whether the status line is out (an error can no longer become a status)."""
        return self.status_time is not None

    def response_headers(self) -> dict[str, str]:
        out = {"X-Request-Id": self.request_id}
        if self.cors:
            out.update(CORS_HEADERS)
        out.update(self.headers)
        return out

    def _started(self, status: int) -> None:
        self.status_time = time.monotonic()
        self.status = status

    async def reply(self, reply: Reply) -> None:
        self._started(reply.status)
        if reply.status >= 400:
            self.error_body = reply.body
        await self.exchange.reply(self, reply)
        self.sent += len(reply.body)

    async def start(self, length: int | None, content_type: str | None = OCTETS, status: int = 200) -> None:
        self._started(status)
        await self.exchange.start(self, status, content_type, length)

    async def send(self, data: bytes | memoryview) -> None:
        await self.exchange.send(data)
        self.sent += len(data)

    async def sendfile(self, fd: int, size: int) -> None:
        """Send ``size`` bytes of an open file with sendfile(2), after ``start``: Python touches none of them.

        First straight from here while the socket takes it (on loopback a whole 1 MiB block in one call), and only
        the rest through the event loop's sendfile, which pauses reading, waits for the transport's buffer to
        drain and re-arms epoll around every call: 4 epoll_ctl and a dozen Python frames per GET that the
        direct call saves (docs/benchmarks.md). Writing to the socket beside the transport is safe only while the
        transport holds nothing unsent, which is checked first. A file that ends before ``size`` raises VolumeError
        (the caller then cuts the connection: the response promised ``size`` bytes).
        """
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Connection lost")
        offset = 0
        try:
            sock = transport.get_extra_info("socket")
            # Never over TLS: there "socket" is the TCP socket under the encryption (the block handler sends TLS
            # bodies from its buffer, so this is the second guard, not the only one).
            if (
                sock is not None
                and transport.get_extra_info("sslcontext") is None
                and not transport.get_write_buffer_size()
            ):
                out = sock.fileno()
                while offset < size:
                    try:
                        n = os.sendfile(out, fd, offset, size - offset)
                    except (BlockingIOError, InterruptedError):
                        break  # the socket is full: the event loop waits for room
                    except OSError as exc:
                        if offset or isinstance(exc, ConnectionError):
                            raise
                        break  # sendfile(2) refused (a file system without it): the event loop's copies instead
                    if n == 0:
                        raise _short_file(offset, size)
                    offset += n
            if offset < size:
                with open(fd, "rb", buffering=0, closefd=False) as f:
                    offset += await asyncio.get_running_loop().sendfile(transport, f, offset, size - offset)
                if offset < size:
                    raise _short_file(offset, size)
        finally:
            self.sent += offset

    async def end(self) -> None:
        await self.exchange.end()


def _short_file(sent: int, size: int) -> VolumeError:
    # The response promised ``size`` bytes: the caller cuts the connection (serve) rather than leave the client
    # waiting for the rest, or reading the next response as the end of this body.
    return VolumeError(f"file ended after {sent} of {size} bytes while sending")


class AiohttpExchange(Exchange):
    """Responses through aiohttp's server: ``response`` is what the aiohttp handler returns."""

    def __init__(self, request: BaseRequest) -> None:
        self.request = request
        self._request = request
        self.task = asyncio.current_task()
        self.response: web.StreamResponse | None = None

    def _decorated(self, call: Call, resp: web.StreamResponse, content_type: str | None) -> web.StreamResponse:
        resp.headers.update(call.response_headers())
        if content_type is not None:
            resp.headers["Content-Type"] = content_type
        return resp

    def unsent(self, call: Call, reply: Reply) -> web.Response:
        """The reply as a response aiohttp will send (when handing back to aiohttp is all that is left)."""
        resp = web.Response(status=reply.status, body=reply.body)
        if reply.headers:
            resp.headers.update(reply.headers)
        self._decorated(call, resp, reply.content_type)
        return resp

    async def reply(self, call: Call, reply: Reply) -> None:
        resp = self.unsent(call, reply)
        self.response = resp
        await resp.prepare(self._request)
        await resp.write_eof()

    async def start(self, call: Call, status: int, content_type: str | None, length: int | None) -> None:
        resp = self._decorated(call, web.StreamResponse(status=status), content_type)
        if length is not None:
            resp.content_length = length
        self.response = resp
        await resp.prepare(self._request)

    async def send(self, data: bytes | memoryview) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def cut_short(self) -> None:
        if self._request.transport is not None:
            self._request.transport.abort()

    def close_after(self) -> None:
        self._request.protocol.force_close()

    async def send_continue(self) -> None:
        await self._request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def pace_body(self, full: bool) -> None:
        pace = getattr(self._request.protocol, "pace_body", None)  # keepstore.http.protocol.KeepRequestHandler
        if pace is not None:
            pace(self._request.content, full)


_LOC = r"(?P<loc>[0-9a-f]{32}.*)"


class Router:
    """Method + path -> handler, first match wins; anything unmatched is 400 Bad Request."""

    def __init__(self) -> None:
        self._routes: list[tuple[frozenset[str], re.Pattern[str], Handler]] = []

    def add(self, methods: str, pattern: str, handler: Handler) -> None:
        self._routes.append((frozenset(methods.split()), re.compile(pattern), handler))

    def match(self, method: str, path: str) -> tuple[Handler, re.Match[str]]:
        for methods, pattern, handler in self._routes:
            if method in methods:
                m = pattern.fullmatch(path)
                if m is not None:
                    return handler, m
        raise BadRoute()


class KeepHTTP:
    """The request pipeline: ``handle`` is what aiohttp's server calls, ``serve`` what the fast path calls."""

    def __init__(self, service: Service) -> None:
        from . import admin, blocks, ops

        self.service = service
        self.ops: dict[str, Handler] = ops.routes()
        r = Router()
        r.add("GET HEAD", rf"/{_LOC}", blocks.read)
        r.add("GET HEAD", rf"//{_LOC}", blocks.read)  # compatibility alias; PUT //x stays 400
        r.add("GET HEAD", r"/index", admin.index)
        r.add("GET HEAD", r"/index/(?P<prefix>[0-9a-f]{0,32})", admin.index)
        r.add("GET HEAD", r"/mounts", admin.mounts)
        r.add("GET HEAD", r"/mounts/(?P<uuid>[^/]+)/blocks", admin.index)
        r.add("GET HEAD", r"/mounts/(?P<uuid>[^/]+)/blocks/(?P<prefix>[0-9a-f]{0,32})", admin.index)
        r.add("PUT", rf"/{_LOC}", blocks.write)
        r.add("PUT", r"/pull", admin.pull_list)
        r.add("PUT", r"/trash", admin.trash_list)
        r.add("PUT", rf"/untrash/{_LOC}", admin.untrash)
        r.add("TOUCH", rf"/{_LOC}", admin.touch)
        r.add("DELETE", rf"/{_LOC}", admin.trash)
        r.add("OPTIONS", r"/.*", blocks.options)
        self.router = r
        self.in_flight: dict[int, Call] = {}
        self.fast_served = 0  # requests served by keepstore.http.fast
        self._sweeper: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def serve_fast(self, exchange: Exchange) -> Call:
        """``serve`` for a request taken off the connection by the fast path (counted for /metrics)."""
        self.fast_served += 1
        return await self.serve(exchange)

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        exchange = AiohttpExchange(request)
        call = await self.serve(exchange)
        if exchange.response is None:  # the pipeline left the (error) reply for aiohttp to send
            exchange.response = exchange.unsent(call, text_reply(500, "internal error\n"))
        return exchange.response

    async def serve(self, exchange: Exchange) -> Call:
        """Run one request through the pipeline and send its response."""
        request = exchange.request
        request_id = request.headers.get("X-Request-Id") or new_request_id()
        call = Call(exchange=exchange, service=self.service, request_id=request_id, started=time.monotonic())
        self.in_flight[id(call)] = call
        path = _unquote(request.raw_path.partition("?")[0])
        self._log_request(call)
        status = 0
        try:
            op = self.ops.get(path)
            if op is not None:
                reply = await op(call, _EMPTY_MATCH)
            else:
                call.cors = True
                reply = await self._routed(call, path)
            if reply is not None:
                await call.reply(reply)
            else:
                await call.end()
            status = call.status
            return call
        except asyncio.CancelledError:
            status = 499  # the client went away (or we are shutting down) mid-request
            raise
        except Exception as exc:
            if call.responded:
                # The status line and headers are out: a second response would land inside the body. All that is
                # left is to cut the body short (the client sees fewer bytes than Content-Length, or no final
                # chunk) and close the connection.
                if not isinstance(exc, (ConnectionError, KeepError)):
                    log.exception("error while sending a response", extra={"fields": {"RequestID": call.request_id}})
                call.fields["error"] = redact(f"response cut short: {exc}")
                exchange.cut_short()
                status = call.status if not isinstance(exc, ConnectionError) else 499
                return call
            if isinstance(exc, ConnectionResetError):
                status = 499  # the client went away before anything was sent
                raise
            # A bug: say so in the log with the request id, answer 500.
            log.exception("unhandled error", extra={"fields": {"RequestID": call.request_id}})
            status = 500
            try:
                await call.reply(text_reply(500, "internal error\n"))
            except Exception:
                exchange.cut_short()
            return call
        finally:
            del self.in_flight[id(call)]
            self._log_response(call, status)

    async def _routed(self, call: Call, path: str) -> Reply | None:
        try:
            handler, match = self.router.match(call.request.method, path)
            limiter = self.service.limiter
            if not limiter.try_acquire():
                call.exchange.pace_body(False)
                await limiter.acquire(limiter.priority(call.request.headers))
            try:
                return await self._timed(handler, call, match)
            finally:
                limiter.release()
        except KeepError as exc:
            if call.responded:
                raise  # too late for an error status: serve() cuts the response short
            if isinstance(exc, Overloaded):
                call.cors = False  # the limiter sits outside the CORS layer upstream
            call.fields["error"] = redact(str(exc))
            return error_reply(exc)

    async def _timed(self, handler: Handler, call: Call, match: re.Match[str]) -> Reply | None:
        """Run the handler under RequestTimeout (SPEC §1.1): past it, the request ends as ClientGone (499).

        One sweeper task per process enforces every deadline (see _sweep) instead of a timer per request: a timer
        (asyncio.timeout) costs more than a small cached GET's whole verification.
        """
        timeout = self.service.config.request_timeout
        if timeout <= 0 or getattr(handler, "no_deadline", False):
            return await handler(call, match)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(timeout))
        call.deadline = call.started + timeout
        try:
            return await handler(call, match)
        except asyncio.CancelledError:
            task = call.exchange.task
            if call.timed_out and task is not None and task.uncancel() == 0:
                raise ClientGone("request timeout") from None
            raise
        finally:
            call.deadline = 0.0

    async def _sweep(self, timeout: float) -> None:
        """Cancel handlers past their deadline; checks often enough that none overruns by more than 1/8 of it."""
        interval = min(1.0, max(0.02, timeout / 8))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            # A call with a deadline is suspended inside its handler (_timed clears the deadline on the way out), so
            # the cancellation lands there and _timed turns it into ClientGone.
            for call in list(self.in_flight.values()):
                task = call.exchange.task
                if call.deadline and now >= call.deadline and task is not None and not call.timed_out:
                    call.timed_out = True
                    task.cancel()

    def _log_request(self, call: Call) -> None:
        if not request_lines_enabled():
            return  # nothing would be written: build nothing (call.fields may still collect an "error")
        req = call.request
        path, _, query = req.raw_path.partition("?")
        call.fields = {
            "RequestID": call.request_id,
            "remoteAddr": peer_of(req.transport),
            "reqForwardedFor": req.headers.get("X-Forwarded-For", ""),
            "reqMethod": req.method,
            "reqHost": req.host,
            "reqPath": redact(path.lstrip("/")),
            "reqQuery": redact(query),
            "reqBytes": req.content_length if req.content_length is not None else -1,
        }
        call.log_shared = log_request(call.fields)

    def _log_response(self, call: Call, status: int) -> None:
        now = time.monotonic()
        status = status or call.status
        to_status = (call.status_time or now) - call.started
        self.service.metrics.observe(call.request.method, status, now - call.started, to_status)
        if not call.log_shared and not request_lines_enabled():
            return
        fields: dict[str, object] = {
            "respStatusCode": status,
            "respStatus": REASONS.get(status, ""),
            "respBytes": call.sent,
            "timeTotal": round(now - call.started, 6),
            "timeToStatus": round(to_status, 6),
            "timeWriteBody": round(now - call.started - to_status, 6),
        }
        if status >= 400 and call.error_body:
            fields["respBody"] = redact(call.error_body[:512].decode("utf-8", "replace"))
        log_response(call.fields, call.log_shared, fields)


def peer_of(transport: Any) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return ""


def _unquote(path: str) -> str:
    if "%" not in path:
        return path  # nearly every path: skip the decoder
    from urllib.parse import unquote

    return unquote(path)


_EMPTY_MATCH: re.Match[str] = re.match("", "")  # type: ignore[assignment]  # always matches

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}

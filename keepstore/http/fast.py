"""Block reads and small block writes taken straight off the connection, past aiohttp's request machinery.

A 4 KiB GET costs aiohttp ~100 us of Python before and after the handler (a request object, a handler task, a
response object and its header serialisation): as much as everything keepstore itself does for the request, and the
reason small GETs were stuck at a fifth of nginx's rate. So the connection handler
(:class:`keepstore.http.protocol.KeepRequestHandler`) parses each request (with keepstore/_reqparse.c where it is
one whole simple request in one read, else with aiohttp's parser, llhttp) and hands a request that is

* ``GET`` or ``HEAD`` of a path that can only route to a block read (``/<32 hex>...`` or ``//<32 hex>...``),
  without a body, or ``PUT /<32 hex>...`` whose whole body arrived with its headers (no ``Expect``),
* HTTP/1.1 with keep-alive, and not pipelined behind anything unfinished,

to :meth:`keepstore.http.app.KeepHTTP.serve` with a :class:`FastExchange` instead of building aiohttp's objects.
It is the same pipeline (request id, log lines, limiter, CORS, signature check, verification, error table, metrics,
``/_inspect/requests``, RequestTimeout); only the bytes on the wire are written here. Everything else (admin, ops,
bodies still arriving, ``Connection: close``, HTTP/1.0, pipelined bursts) goes through aiohttp exactly as before.
``bench/http_bench.py`` and the functional tests exercise both paths.

The response matches what aiohttp would send for the same reply: the same status line, ``Content-Type``,
``Content-Length``, ``Date`` and ``Server`` headers, then the pipeline's own headers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import TYPE_CHECKING

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy

from .app import CORS_HEADERS, Call, Exchange, Reply

if TYPE_CHECKING:
    from .protocol import KeepRequestHandler

# (Matched at the start of the path: the router judges the rest.)
_PUT_PATH = re.compile(r"/[0-9a-f]{32}")
_GET_PATH = re.compile(r"//?[0-9a-f]{32}")
WRITE_HIGH_WATER = 1 << 20  # wait for the client to read when more than this is queued in the transport


def qualifies(message: RawRequestMessage, payload: StreamReader) -> bool:
    """Whether a parsed request may take the fast path (see the module docstring)."""
    method = message.method
    if message.should_close or message.upgrade or message.chunked or message.version != (1, 1):
        return False
    if not is_block_path(method, message.path):
        return False
    if method == "PUT":
        # A block write whose whole body has arrived with its headers (small blocks: one read from the socket).
        # Bodies still on their way, and anything asking for 100-continue, go through aiohttp.
        return "Expect" not in message.headers and payload.is_eof() and payload.exception() is None
    return payload is EMPTY_PAYLOAD


def is_block_path(method: str, path: str) -> bool:
    """Whether ``method`` and ``path`` can only route to a block read (GET, HEAD) or write (PUT)."""
    if method == "PUT":
        return _PUT_PATH.match(path) is not None
    return (method == "GET" or method == "HEAD") and _GET_PATH.match(path) is not None


class FastRequest:
    """The :class:`keepstore.http.app.Incoming` view of a parsed request."""

    __slots__ = ("_cookies", "content", "headers", "method", "raw_path", "transport")

    def __init__(
        self,
        method: str,
        raw_path: str,
        headers: CIMultiDictProxy[str],
        payload: StreamReader,
        transport: asyncio.Transport | None,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.content = payload
        self.transport = transport
        self._cookies: Mapping[str, str] | None = None

    @classmethod
    def parsed(
        cls, message: RawRequestMessage, payload: StreamReader, transport: asyncio.Transport | None
    ) -> FastRequest:
        """The request as aiohttp's parser (llhttp) gave it."""
        return cls(message.method, message.path, message.headers, payload, transport)

    @property
    def host(self) -> str:
        host = self.headers.get("Host")
        if host is not None:
            return host
        sockname = self.transport.get_extra_info("sockname") if self.transport is not None else None
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            return f"{sockname[0]}:{sockname[1]}"
        return ""

    @property
    def content_length(self) -> int | None:
        length = self.headers.get("Content-Length")
        return int(length) if length is not None else None  # llhttp accepted it: digits only

    @property
    def cookies(self) -> Mapping[str, str]:
        if self._cookies is None:
            header = self.headers.get("Cookie")
            if not header:
                self._cookies = MappingProxyType({})
            else:
                from aiohttp._cookie_helpers import parse_cookie_header  # as aiohttp's own request does

                self._cookies = MappingProxyType({name: m.value for name, m in parse_cookie_header(header)})
        return self._cookies


class FastExchange(Exchange):
    """Writes a response straight to the connection's transport."""

    def __init__(self, protocol: KeepRequestHandler, request: FastRequest) -> None:
        self.protocol = protocol
        self.request = request
        self._head_only = request.method == "HEAD"

    async def reply(self, call: Call, reply: Reply) -> None:
        body = b"" if self._head_only else reply.body
        self._write(_head(reply.status, reply.content_type, len(reply.body), call, reply.headers) + body)
        await self._drain()

    async def start(self, call: Call, status: int, content_type: str | None, length: int | None) -> None:
        if length is None:
            raise ValueError("the fast path sends only responses of known length")
        self._write(_head(status, content_type, length, call, None))

    async def send(self, data: bytes | memoryview) -> None:
        if self._head_only:
            return
        self._write(data)
        await self._drain()

    async def end(self) -> None:
        pass  # Content-Length framing: nothing to send

    def cut_short(self) -> None:
        transport = self.protocol.transport
        if transport is not None:
            transport.abort()

    def close_after(self) -> None:
        self.protocol.force_close_after = True

    async def send_continue(self) -> None:
        self._write(b"HTTP/1.1 100 Continue\r\n\r\n")  # never needed: qualifies() leaves Expect to aiohttp

    def pace_body(self, full: bool) -> None:
        pass  # qualifies() takes only requests whose whole body has arrived

    def _write(self, data: bytes | memoryview) -> None:
        transport = self.protocol.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Connection lost")
        transport.write(data)

    async def _drain(self) -> None:
        transport = self.protocol.transport
        if transport is not None and transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await self.protocol._drain_helper()


_date = ("", 0)


def _date_server() -> str:
    """The Date and Server header lines, as aiohttp sends them (Date changes once a second)."""
    global _date
    now = int(time.time())
    if _date[1] != now:
        _date = (f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n", now)
    return _date[0]


def _status_line(status: int) -> str:
    try:
        reason = HTTPStatus(status).phrase  # what aiohttp sends
    except ValueError:
        reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n"


_STATUS_LINES = {status: _status_line(status) for status in (200, 400, 401, 403, 404, 405, 413, 500, 502, 503, 507)}
_CORS_LINES = "".join(f"{name}: {value}\r\n" for name, value in CORS_HEADERS.items())


def _header_lines(headers: dict[str, str]) -> str:
    out = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value:  # never from our own code; an echoed X-Request-Id passed llhttp already
            value = value.replace("\r", " ").replace("\n", " ")
        out.append(f"{name}: {value}\r\n")
    return "".join(out)


def _head(status: int, content_type: str | None, length: int, call: Call, extra: dict[str, str] | None) -> bytes:
    """The status line and headers: those aiohttp would send, then the call's (``Call.response_headers``)."""
    request_id = call.request_id
    if "\r" in request_id or "\n" in request_id:
        request_id = request_id.replace("\r", " ").replace("\n", " ")
    head = (
        (_STATUS_LINES.get(status) or _status_line(status))
        + (f"Content-Type: {content_type}\r\n" if content_type is not None else "")
        + f"Content-Length: {length}\r\n"
        + _date_server()
        + f"X-Request-Id: {request_id}\r\n"
        + (_CORS_LINES if call.cors else "")
        + (_header_lines(call.headers) if call.headers else "")
        + (_header_lines(extra) if extra else "")
        + "\r\n"
    )
    return head.encode("latin-1", "replace")

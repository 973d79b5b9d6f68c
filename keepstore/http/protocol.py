"""An aiohttp server that accepts Keep's ``TOUCH`` method without giving up the fast C parser.

aiohttp parses requests with llhttp (C), which knows a fixed list of methods and answers anything else, ``TOUCH``
included, with ``400 Invalid method`` before a handler runs. aiohttp's pure-Python parser accepts any token as a
method but is several times slower, and ``AIOHTTP_NO_EXTENSIONS=1`` would impose it on every request.

So each connection starts on the C parser. When llhttp rejects a request's method, and the bytes it rejected begin
with one of our extension methods at a request boundary, that connection switches to the Python parser, which parses
the same bytes again. Only connections that actually send ``TOUCH`` (an admin operation, rare) pay for the slower
parser; GET and PUT traffic never does. ``bench/parser.py`` measures both paths.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

EXTENSION_METHODS = (b"TOUCH ",)


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

    def at_request_boundary(self) -> bool:
        """True when no request is partly received: queued requests are complete and the current body is read."""
        if self._messages:
            return False
        current = self._current_request
        return current is None or current.content.is_eof()


class KeepServer(web.Server):
    """``web.Server`` whose connections use :class:`KeepRequestHandler`."""

    def __call__(self) -> RequestHandler:
        return KeepRequestHandler(self, loop=self._loop, **self._kwargs)


def peer_of(request: BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return ""

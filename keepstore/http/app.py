"""Request pipeline and routing (SPEC §1.1, §2.1).

One aiohttp low-level handler does, in order: request id, "request" log line, operational endpoints (health,
metrics, status: outside the limiter and without CORS headers), the request limiter, CORS headers, the route table,
error mapping, "response" log line. Routes match the percent-decoded path like gorilla/mux does upstream, with path
cleaning off: ``//<locator>`` is a GET alias and nothing is normalised, so ``/../x`` or ``/%2e%2e/x`` simply match no
route (400). No handler ever builds a file path from anything but a validated 32-hex hash.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web
from aiohttp.web_request import BaseRequest

from ..errors import BadRoute, ClientGone, KeepError, Overloaded
from ..logs import log_request, log_response, new_request_id, redact
from .errors import status_of
from .protocol import peer_of

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


@dataclass
class Call:
    """One request in flight: what handlers need beside the aiohttp request."""

    request: BaseRequest
    service: Service
    request_id: str
    started: float
    cors: bool = False
    status_time: float | None = None
    fields: dict[str, object] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # set on whatever response goes out, errors included
    sent: int = 0  # body bytes written to a streamed response
    response: web.StreamResponse | None = None  # set once a response has started (headers sent)
    log_shared: str = ""  # the request fields, encoded once for both log lines

    def decorate(self, resp: web.StreamResponse) -> None:
        resp.headers["X-Request-Id"] = self.request_id
        if self.cors:
            resp.headers.update(CORS_HEADERS)
        resp.headers.update(self.headers)

    async def prepare(self, resp: web.StreamResponse) -> None:
        """Start a streamed response (headers go out now)."""
        self.decorate(resp)
        self.status_time = time.monotonic()
        self.response = resp
        await resp.prepare(self.request)

    async def write(self, resp: web.StreamResponse, data: bytes | memoryview) -> None:
        await resp.write(data)
        self.sent += len(data)


Handler = Callable[[Call, "re.Match[str]"], Awaitable[web.StreamResponse]]

_LOC = r"(?P<loc>[0-9a-f]{32}.*)"


def text_response(status: int, body: str) -> web.Response:
    resp = web.Response(status=status, body=body.encode(), content_type="text/plain", charset="utf-8")
    return resp


def error_response(exc: KeepError) -> web.Response:
    status = status_of(exc)
    if isinstance(exc, (Overloaded, ClientGone)):
        return web.Response(status=status)
    resp = text_response(status, f"{exc}\n")
    if isinstance(exc, BadRoute):
        resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


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
    """The request pipeline. ``handle`` is what the aiohttp server calls."""

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

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id") or new_request_id()
        call = Call(request=request, service=self.service, request_id=request_id, started=time.monotonic())
        self.in_flight[id(call)] = call
        path = unquote(request.raw_path.partition("?")[0])
        self._log_request(call)
        resp: web.StreamResponse | None = None
        status = 0
        try:
            op = self.ops.get(path)
            if op is not None:
                resp = await op(call, _EMPTY_MATCH)
            else:
                call.cors = True
                resp = await self._routed(call, path)
            if not resp.prepared:
                await call.prepare(resp)
            await resp.write_eof()
            status = resp.status
            return resp
        except asyncio.CancelledError:
            status = 499  # the client went away (or we are shutting down) mid-request
            raise
        except Exception as exc:
            started = call.response
            if started is not None:
                # The status line and headers are out: a second response would land inside the body. All that is
                # left is to cut the body short (the client sees fewer bytes than Content-Length, or no final
                # chunk) and close the connection.
                if not isinstance(exc, (ConnectionError, KeepError)):
                    log.exception("error while sending a response", extra={"fields": {"RequestID": call.request_id}})
                call.fields["error"] = redact(f"response cut short: {exc}")
                if call.request.transport is not None:
                    call.request.transport.abort()
                resp, status = started, (started.status if not isinstance(exc, ConnectionError) else 499)
                return resp
            if isinstance(exc, ConnectionResetError):
                status = 499  # the client went away before anything was sent
                raise
            # A bug: say so in the log with the request id, answer 500.
            log.exception("unhandled error", extra={"fields": {"RequestID": call.request_id}})
            status = 500
            resp = text_response(500, "internal error\n")
            call.decorate(resp)
            return resp
        finally:
            del self.in_flight[id(call)]
            self._log_response(call, resp, status)

    async def _routed(self, call: Call, path: str) -> web.StreamResponse:
        try:
            handler, match = self.router.match(call.request.method, path)
            limiter = self.service.limiter
            await limiter.acquire(limiter.priority(call.request))
            try:
                return await self._timed(handler, call, match)
            finally:
                limiter.release()
        except KeepError as exc:
            if call.response is not None:
                raise  # too late for an error status: handle() cuts the response short
            if isinstance(exc, Overloaded):
                call.cors = False  # the limiter sits outside the CORS layer upstream
            resp = error_response(exc)
            call.fields["error"] = redact(str(exc))
            return resp

    async def _timed(self, handler: Handler, call: Call, match: re.Match[str]) -> web.StreamResponse:
        timeout = self.service.config.request_timeout
        if timeout <= 0 or getattr(handler, "no_deadline", False):
            return await handler(call, match)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await handler(call, match)
        except TimeoutError:
            if not deadline.expired():
                raise  # a timeout of something inside the handler, not the request deadline
            raise ClientGone("request timeout") from None

    def _log_request(self, call: Call) -> None:
        req = call.request
        path, _, query = req.raw_path.partition("?")
        call.fields = {
            "RequestID": call.request_id,
            "remoteAddr": peer_of(req),
            "reqForwardedFor": req.headers.get("X-Forwarded-For", ""),
            "reqMethod": req.method,
            "reqHost": req.host,
            "reqPath": redact(path.lstrip("/")),
            "reqQuery": redact(query),
            "reqBytes": req.content_length if req.content_length is not None else -1,
        }
        call.log_shared = log_request(call.fields)

    def _log_response(self, call: Call, resp: web.StreamResponse | None, status: int) -> None:
        now = time.monotonic()
        status = status or (resp.status if resp is not None else 0)
        to_status = (call.status_time or now) - call.started
        fields: dict[str, object] = {
            "respStatusCode": status,
            "respStatus": _REASONS.get(status, ""),
            "respBytes": _body_bytes(call, resp),
            "timeTotal": round(now - call.started, 6),
            "timeToStatus": round(to_status, 6),
            "timeWriteBody": round(now - call.started - to_status, 6),
        }
        if status >= 400 and isinstance(resp, web.Response) and resp.body is not None:
            body = resp.body if isinstance(resp.body, bytes) else b""
            fields["respBody"] = redact(body[:512].decode("utf-8", "replace"))
        log_response(call.fields, call.log_shared, fields)
        self.service.metrics.observe(call.request.method, status, now - call.started, to_status)


def _body_bytes(call: Call, resp: web.StreamResponse | None) -> int:
    if isinstance(resp, web.Response):
        return len(resp.body) if isinstance(resp.body, bytes) else 0
    return call.sent


_EMPTY_MATCH: re.Match[str] = re.match("", "")  # type: ignore[assignment]  # always matches

_REASONS = {
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

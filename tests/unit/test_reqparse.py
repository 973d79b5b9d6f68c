"""keepstore._reqparse against aiohttp's own parser (llhttp), the reference it must never disagree with.

The fast path serves a request that ``_reqparse.parse`` accepts without ever showing it to llhttp, so every request
it accepts must be one that llhttp parses, whole, into the same method, target, headers and body, with keep-alive
framing; everything else it must leave to llhttp (None). Checked on hand-written cases and on a few thousand
deterministic mutations of them.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD

reqparse = pytest.importorskip("keepstore._reqparse", reason="the C extension is not built")
try:
    from aiohttp._http_parser import HttpRequestParser as LlhttpParser
except ImportError:  # pragma: no cover - aiohttp ships it for this platform (requirements.lock)
    pytest.skip("aiohttp's C parser is not available to compare with", allow_module_level=True)

HASH = "0123456789abcdef0123456789abcdef"
GET = f"GET /{HASH}+3+Aabc@5f000000 HTTP/1.1\r\nHost: 127.0.0.1:25107\r\nAuthorization: Bearer tok\r\n\r\n".encode()
PUT = f"PUT /{HASH} HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX-Keep-Desired-Replicas: 2\r\n\r\nabc".encode()


def llhttp(data: bytes) -> Any:
    """What aiohttp's parser makes of ``data`` as one chunk, as keepstore's connection handler configures it."""
    loop = asyncio.new_event_loop()
    try:
        parser = LlhttpParser(
            BaseProtocol(loop), loop, 2**16, max_line_size=8190, max_field_size=8190, max_headers=128
        )
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError:
            return "error"
        return list(messages), upgraded, tail
    finally:
        loop.close()


def agrees(data: bytes) -> None:
    """If _reqparse accepts ``data``, llhttp reads exactly the same single keep-alive request from it."""
    ours = reqparse.parse(data)
    if ours is None:
        return
    method, target, headers, body_at = ours
    theirs = llhttp(data)
    assert theirs != "error", data
    messages, upgraded, tail = theirs
    assert len(messages) == 1 and not upgraded and not tail, data
    message, payload = messages[0]
    assert (message.method, message.path) == (method, target), data
    # (Names compare without case: aiohttp spells the ones it knows its own way; both go into a CIMultiDict.)
    assert [(k.lower(), v) for k, v in message.headers.items()] == [(k.lower(), v) for k, v in headers], data
    assert (message.version, message.should_close, message.chunked, message.upgrade) == ((1, 1), False, False, False)
    if method == "PUT" and body_at < len(data):
        assert payload.is_eof() and b"".join(payload._buffer) == data[body_at:], data
    else:
        assert payload is EMPTY_PAYLOAD and body_at == len(data), data


def test_simple_requests_are_parsed_as_llhttp_parses_them() -> None:
    assert reqparse.parse(GET) == (
        "GET",
        f"/{HASH}+3+Aabc@5f000000",
        [("Host", "127.0.0.1:25107"), ("Authorization", "Bearer tok")],
        len(GET),
    )
    assert reqparse.parse(PUT) == (
        "PUT",
        f"/{HASH}",
        [("Host", "h"), ("Content-Length", "3"), ("X-Keep-Desired-Replicas", "2")],
        len(PUT) - 3,
    )
    odd_but_fine = [
        GET.replace(b"GET", b"HEAD"),
        GET.replace(b"Host: ", b"host:\t "),  # any case, blanks after the colon
        GET.replace(b"Bearer tok", b"Bearer tok \t"),  # blanks after the value are not part of it
        GET.replace(b"\r\n\r\n", b"\r\nConnection: Keep-Alive\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nX-Empty:\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nCookie: arvados_api_token=dG9r; x=y\r\n\r\n"),
        GET.replace(b"+3+A", b"?api_token=x&y=%20z+3+A"),
        PUT.replace(b"Content-Length: 3", b"Content-Length: 0")[:-3],
        PUT.replace(b"Content-Length: 3", b"Content-Length: 003"),
        GET.replace(b"Host: 127.0.0.1:25107", b"Host:"),  # present, if empty
        GET.replace(b"Authorization: Bearer tok", b"Authorization:Bearer tok"),
    ]
    for data in odd_but_fine:
        assert reqparse.parse(data) is not None, data
        agrees(data)


@pytest.mark.parametrize(
    "data",
    [
        GET.replace(b"HTTP/1.1", b"HTTP/1.0"),
        GET.replace(b"GET", b"POST"),
        GET.replace(b"GET", b"get"),
        b"TOUCH " + GET[4:],
        b"\r\n" + GET,  # a blank line first
        GET[:-2],  # headers not finished
        GET + GET,  # pipelined
        GET + b"x",
        GET.replace(b"Host: 127.0.0.1:25107\r\n", b""),  # HTTP/1.1 without Host: aiohttp answers 400
        GET.replace(b"\r\n\r\n", b"\r\nHost: again\r\n\r\n"),  # a second Host: 400
        GET.replace(b"\r\n\r\n", b"\r\nUser-Agent: a\r\nuser-agent: b\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),  # aiohttp closes after it
        GET.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive, Upgrade\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),  # a GET with a body length
        GET.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Key1: x\r\n\r\n"),
        GET.replace(b"\r\n\r\n", b"\r\nX-Folded: a\r\n b\r\n\r\n"),  # obs-fold
        GET.replace(b"Bearer tok", b"Bearer t\xc3\xb6k"),  # obs-text
        GET.replace(b"Bearer tok", b"Bearer t\x00k"),
        GET.replace(b"Bearer tok", b"Bearer t\x7fk"),
        GET.replace(b"Host:", b"Host :"),  # blank before the colon: 400 from llhttp
        GET.replace(b"Host:", b"Ho(st:"),
        GET.replace(b"\r\nAuthorization", b"\nAuthorization"),  # bare LF
        GET.replace(b"GET /", b"GET  /"),
        GET.replace(b"GET /", b"GET *"),
        GET.replace(b"+3", b"#3"),
        GET.replace(b"+3", b"\\3"),
        GET.replace(b"+3", b"\xff3"),
        GET.replace(b"\r\n\r\n", b"\r\nX-Long: " + b"a" * 8190 + b"\r\n\r\n"),  # a line over aiohttp's limit
        GET.replace(b"\r\n\r\n", b"".join(b"\r\nX-%d: v" % i for i in range(128)) + b"\r\n\r\n"),  # 130 headers
        b"GET /" + b"a" * 8190 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
        PUT[:-1],  # body not all here
        PUT + b"x",  # more than Content-Length
        PUT.replace(b"Content-Length: 3\r\n", b""),
        PUT.replace(b"Content-Length: 3", b"Content-Length: +3"),
        PUT.replace(b"Content-Length: 3", b"Content-Length: 3, 3"),
        PUT.replace(b"Content-Length: 3", b"Content-Length: 3\r\nContent-Length: 3"),
        PUT.replace(b"Content-Length: 3", b"Content-Length: 0000000000000000003"),  # 19 digits
    ],
)
def test_anything_else_is_left_to_llhttp(data: bytes) -> None:
    assert reqparse.parse(data) is None


def test_limits_are_aiohttp_s() -> None:
    at_limit = GET.replace(b"\r\n\r\n", b"\r\nX-Long: " + b"a" * (8190 - len(b"X-Long: ")) + b"\r\n\r\n")
    assert reqparse.parse(at_limit) is not None
    agrees(at_limit)
    many = GET.replace(b"\r\n\r\n", b"".join(b"\r\nX-%d: v" % i for i in range(126)) + b"\r\n\r\n")  # 128 in all
    assert reqparse.parse(many) is not None
    agrees(many)


def test_mutations_never_make_it_disagree_with_llhttp() -> None:
    rng = random.Random(20261203)
    alphabet = b" \t\r\n:/+-_.,;=?%#\\\"\x00\x7f\x80\xffaAzZ09HTPGEUO"
    seeds = [GET, PUT, GET.replace(b"GET", b"HEAD"), GET.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n")]
    accepted = 0
    for _ in range(6000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data) + 1)
            op = rng.randrange(3)
            if op == 0 and pos < len(data):
                data[pos] = rng.choice(alphabet)
            elif op == 1:
                data[pos:pos] = bytes([rng.choice(alphabet)])
            elif pos < len(data):
                del data[pos]
        raw = bytes(data)
        if reqparse.parse(raw) is not None:
            accepted += 1
        agrees(raw)
    assert accepted > 300  # the mutations reach accepted requests too, not only rejections


class _Transport(asyncio.Transport):
    """Enough of a socket transport for a connection handler that is fed by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.max_size = 65536

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_connection_handler_parses_natively_until_llhttp_holds_a_partial_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keepstore.http import protocol

    native: list[bool] = []
    real = protocol._parse_simple
    assert real is not None

    def counting(data: bytes) -> Any:
        result = real(data)
        native.append(result is not None)
        return result

    monkeypatch.setattr(protocol, "_parse_simple", counting)

    async def main() -> list[tuple[str, str]]:
        served: list[tuple[str, str]] = []

        async def fast(exchange: Any) -> None:
            served.append((exchange.request.method, exchange.request.raw_path))

        async def handler(request: Any) -> Any:
            raise AssertionError("nothing here should reach aiohttp's handler")

        server = protocol.KeepServer(handler, fast=fast)
        conn = server()
        conn.connection_made(_Transport())
        await asyncio.sleep(0)  # aiohttp's per-connection loop starts and waits for a request
        conn.data_received(GET)
        conn.data_received(b"")  # aiohttp resuming its parser: not a partial request
        conn.data_received(GET.replace(b"GET", b"HEAD"))
        conn.data_received(GET[:40])  # a partial request: llhttp holds it from here on
        conn.data_received(GET[40:])
        await asyncio.sleep(0)
        conn.data_received(GET)
        await asyncio.sleep(0)
        conn.connection_lost(None)
        await asyncio.sleep(0)
        return served

    served = asyncio.run(main())
    assert served == [("GET", GET.split()[1].decode()), ("HEAD", GET.split()[1].decode())] + [
        ("GET", GET.split()[1].decode())
    ] * 2
    assert native == [True, True, False]  # the two whole requests, then the part; llhttp alone after that

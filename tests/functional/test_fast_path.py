"""Block reads on the fast path (keepstore.http.fast) against the same reads through aiohttp, over raw sockets.

A keep-alive HTTP/1.1 GET or HEAD of a block path takes the fast path; ``Connection: close`` or HTTP/1.0 takes
aiohttp's. Both must answer byte for byte alike (but for Date), keep the order of pipelined requests, and leave the
connection usable for anything else.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from keeptest import ROOT_TOKEN, USER_TOKEN, KeepServer, ServerFactory, md5, sign, wait_for

CRLF = b"\r\n"


class Conn:
    """One client connection that sends raw requests and reads responses one at a time."""

    def __init__(self, port: int, timeout: float = 20) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def response(self, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.title() not in headers, f"duplicate header {name}"
            headers[name.title()] = value.strip()
        if headers.get("Transfer-Encoding") == "chunked" and not head_request:
            return status, headers, self._chunked()
        length = 0 if head_request else int(headers.get("Content-Length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def _chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            size_line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                self._fill()
            body += self.buf[:size]
            self.buf = self.buf[size + 2 :]
            if size == 0:
                return body

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, token: str | None = USER_TOKEN, close: bool = False, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if close:
        lines.append("Connection: close")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def put_request(data: bytes) -> bytes:
    return request("PUT", f"/{md5(data)}", **{"Content_Length": str(len(data))}) + data


def one(port: int, raw: bytes, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    c = Conn(port)
    try:
        c.send(raw)
        return c.response(head)
    finally:
        c.close()


def fast_count(srv: KeepServer) -> float:
    for line in srv.metrics().splitlines():
        if line.startswith("keepstorepy_fast_path_requests"):
            return float(line.split()[-1])
    raise AssertionError("no keepstorepy_fast_path_requests in /metrics")


def comparable(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in ("Date", "Connection")}


def test_fast_and_aiohttp_answer_alike(server: KeepServer) -> None:
    data = os.urandom(3000)
    big = os.urandom(300 * 1024)  # above the in-buffer size: streamed with sendfile after verification
    loc = server.put(data).text.strip()
    big_loc = server.put(big).text.strip()
    h = md5(data)
    cases = [
        ("GET", f"/{loc}", USER_TOKEN),
        ("GET", f"//{loc}", USER_TOKEN),
        ("HEAD", f"/{loc}", USER_TOKEN),
        ("GET", f"/{big_loc}", USER_TOKEN),
        ("HEAD", f"/{big_loc}", USER_TOKEN),
        ("GET", f"/{loc}", None),  # 401
        ("GET", f"/{loc}", "another-token"),  # 400 invalid signature
        ("GET", f"/{h}+{len(data)}", USER_TOKEN),  # 400 unsigned
        ("GET", f"/{h}", USER_TOKEN),  # 405 no size hint
        ("GET", f"/{h}g", USER_TOKEN),  # 400 invalid locator
        ("GET", "/" + sign(f"{md5(b'absent')}+6"), USER_TOKEN),  # 404
        ("HEAD", "/" + sign(f"{md5(b'absent')}+6"), USER_TOKEN),  # 404, no body
        ("GET", f"/{loc}?api_token={USER_TOKEN}", None),  # token from the query
    ]
    for method, path, token in cases:
        head = method == "HEAD"
        before = fast_count(server)
        fast = one(server.port, request(method, path, token, X_Request_Id="req-fixed"), head)
        between = fast_count(server)
        slow = one(server.port, request(method, path, token, close=True, X_Request_Id="req-fixed"), head)
        assert (between - before, fast_count(server) - between) == (1, 0), "one request on each path"
        assert fast[0] == slow[0], (method, path)
        assert fast[2] == slow[2], (method, path)
        assert comparable(fast[1]) == comparable(slow[1]), (method, path)
        assert fast[1]["X-Request-Id"] == "req-fixed"
        assert fast[1]["Vary"] == "X-Keep-Signature"
        assert fast[1]["Access-Control-Allow-Origin"] == "*"
    assert one(server.port, request("GET", f"/{loc}"))[2] == data
    assert one(server.port, request("GET", f"/{big_loc}"))[2] == big


def test_http10_and_close_go_through_aiohttp(server: KeepServer) -> None:
    data = b"old client"
    loc = server.put(data).text.strip()
    raw = f"GET /{loc} HTTP/1.0\r\nAuthorization: Bearer {USER_TOKEN}\r\n\r\n".encode()
    before = fast_count(server)
    status, _, body = one(server.port, raw)
    assert (status, body) == (200, data)
    assert fast_count(server) == before


def test_keep_alive_mixes_fast_and_other_requests(server: KeepServer) -> None:
    blocks = [os.urandom(100 + i) for i in range(5)]
    locs = [server.put(b).text.strip() for b in blocks]
    c = Conn(server.port)
    try:
        for round_ in range(20):
            i = round_ % len(blocks)
            c.send(request("GET", f"/{locs[i]}"))
            assert c.response()[::2] == (200, blocks[i])
            c.send(request("HEAD", f"/{locs[i]}"))
            status, headers, body = c.response(head_request=True)
            assert (status, headers["Content-Length"], body) == (200, str(len(blocks[i])), b"")
            if round_ % 5 == 0:
                c.send(request("GET", "/index", token=ROOT_TOKEN))
                status, _, body = c.response()
                assert status == 200 and body.endswith(b"\n\n")
                new = f"written on a kept-alive connection {round_}".encode()
                c.send(put_request(new))
                status, _, body = c.response()
                assert (status, body.decode().split("+")[0]) == (200, md5(new))
                c.send(request("TOUCH", f"/{md5(new)}", token=ROOT_TOKEN))
                assert c.response()[0] == 200
        # After TOUCH the connection runs on the Python parser; block reads still work on it.
        c.send(request("GET", f"/{locs[0]}"))
        assert c.response()[::2] == (200, blocks[0])
    finally:
        c.close()


def test_pipelined_requests_keep_their_order(server: KeepServer) -> None:
    blocks = [os.urandom(1000 + 37 * i) for i in range(4)]
    locs = [server.put(b).text.strip() for b in blocks]
    new = b"pipelined put"
    burst = (
        request("GET", f"/{locs[0]}")
        + request("GET", f"/{locs[1]}")
        + put_request(new)
        + request("HEAD", f"/{locs[2]}")
        + request("GET", f"/{locs[3]}")
    )
    c = Conn(server.port)
    try:
        c.send(burst)
        assert c.response()[::2] == (200, blocks[0])
        assert c.response()[::2] == (200, blocks[1])
        status, _, body = c.response()
        assert status == 200 and body.startswith(md5(new).encode())
        status, headers, _ = c.response(head_request=True)
        assert (status, headers["Content-Length"]) == (200, str(len(blocks[2])))
        assert c.response()[::2] == (200, blocks[3])
    finally:
        c.close()


def test_request_behind_a_running_fast_read_waits_its_turn(server: KeepServer) -> None:
    # The body goes out with sendfile(2) straight from the handler until the socket is full, and the rest through
    # the event loop's sendfile: both parts, in order, and the count of bytes sent in the log covers both.
    big = os.urandom(48 << 20)  # more than the socket buffers hold: the response stalls until we read
    small = b"small block"
    big_loc = server.put(big).text.strip()
    small_loc = server.put(small).text.strip()
    c = Conn(server.port)
    try:
        c.send(request("GET", f"/{big_loc}", X_Request_Id="req-stalled"))
        time.sleep(0.5)  # the big response is under way and stalls on our full receive buffer
        c.send(request("GET", f"/{small_loc}") + request("GET", "/mounts", token=ROOT_TOKEN))
        assert c.response()[::2] == (200, big)
        assert c.response()[::2] == (200, small)
        status, _, body = c.response()
        assert status == 200 and body.startswith(b"[")
    finally:
        c.close()

    def logged() -> list[tuple[object, object]]:
        lines = server.log_lines()
        return [
            (x["respStatusCode"], x["respBytes"])
            for x in lines
            if x.get("RequestID") == "req-stalled" and x.get("msg") == "response"
        ]

    assert wait_for(logged, what="response line of the stalled read") == [(200, len(big))]


def test_client_gone_mid_read_is_logged_and_harmless(server: KeepServer) -> None:
    big = os.urandom(16 << 20)
    loc = server.put(big).text.strip()
    c = Conn(server.port)
    c.send(request("GET", f"/{loc}", X_Request_Id="req-gone-away"))
    while len(c.buf) < 10000:
        c._fill()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # a reset, mid-body

    def logged() -> dict[str, object] | None:
        for line in server.log_lines():
            if line.get("msg") == "response" and line.get("RequestID") == "req-gone-away":
                return line
        return None

    line = wait_for(logged, what="response line of the abandoned request")
    assert line["respStatusCode"] in (200, 499)  # the status line was out; the body was cut short
    assert int(line["respBytes"]) < len(big)  # type: ignore[call-overload]
    wait_for(lambda: server.status_json()["BufferPool"]["BuffersInUse"] == 0, what="buffer returned")
    assert one(server.port, request("GET", f"/{loc}"))[2] == big


def test_fast_path_is_logged_and_counted_like_any_request(server: KeepServer) -> None:
    loc = server.put(b"counted").text.strip()
    before = _get_count(server)
    for _ in range(7):
        assert one(server.port, request("GET", f"/{loc}", X_Request_Id="req-counted"))[0] == 200
    wait_for(lambda: _get_count(server) >= before + 7, what="GETs counted in request_duration_seconds")
    wait_for(lambda: len([x for x in server.log_lines() if x.get("RequestID") == "req-counted"]) == 14, what="lines")
    lines = [x for x in server.log_lines() if x.get("RequestID") == "req-counted"]
    assert sorted(str(x["msg"]) for x in lines) == ["request"] * 7 + ["response"] * 7
    response = next(x for x in lines if x["msg"] == "response")
    assert (response["respStatusCode"], response["respBytes"], response["reqMethod"]) == (200, 7, "GET")
    assert "usertoken" not in server.log_text()  # neither token nor signature is logged


def _get_count(server: KeepServer) -> float:
    for line in server.metrics().splitlines():
        if line.startswith("request_duration_seconds_count") and 'method="get"' in line and 'code="200"' in line:
            return float(line.split()[-1])
    return 0.0


def test_limiter_applies_to_the_fast_path(server_factory: ServerFactory) -> None:
    srv = server_factory(volumes=1, api={"MaxConcurrentRequests": 1, "MaxQueuedRequests": 0})
    big = os.urandom(32 << 20)
    loc = srv.put(big).text.strip()
    small_loc = srv.put(b"tiny").text.strip()
    c = Conn(srv.port)
    try:
        c.send(request("GET", f"/{loc}"))  # holds the only request slot while it stalls on our receive buffer
        time.sleep(0.3)
        status, headers, body = one(srv.port, request("GET", f"/{small_loc}"))
        assert (status, body) == (503, b"")
        assert "Access-Control-Allow-Origin" not in headers  # the limiter sits outside the CORS layer
        assert c.response()[::2] == (200, big)
    finally:
        c.close()
    assert one(srv.port, request("GET", f"/{small_loc}"))[::2] == (200, b"tiny")


def test_sigterm_lets_a_fast_read_finish(server_factory: ServerFactory) -> None:
    srv = server_factory(volumes=1, extra={"KeepstorePy": {"Workers": 1, "DrainTimeout": "20s"}})
    big = os.urandom(24 << 20)
    loc = srv.put(big).text.strip()
    c = Conn(srv.port)
    got: list[tuple[int, dict[str, str], bytes]] = []
    try:
        c.send(request("GET", f"/{loc}"))
        while len(c.buf) < 100000:
            c._fill()
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        reader = threading.Thread(target=lambda: got.append(c.response()))
        reader.start()
        reader.join(30)
        assert got and got[0][::2] == (200, big)
        assert srv.proc.wait(30) == 0
    finally:
        c.close()


def test_small_puts_take_the_fast_path_and_answer_alike(server: KeepServer) -> None:
    good = os.urandom(5000)
    other = os.urandom(5000)
    cases = [
        (f"/{md5(good)}", good, {}),  # 200 with a signed locator
        (f"/{md5(good)}", other, {}),  # 400 content hash mismatch
        (f"/{md5(good)}+5000", good, {}),  # a locator with a size hint: accepted (SPEC Q3)
        (f"/{md5(b'')}", b"", {}),  # the empty block
        (f"/{md5(good)}", good, {"X_Keep_Storage_Classes": "nonexistent"}),  # 507: no such class
    ]
    for path, body, extra in cases:
        raw = request("PUT", path, X_Request_Id="req-put", Content_Length=str(len(body)), **extra) + body
        closing = request("PUT", path, close=True, X_Request_Id="req-put", Content_Length=str(len(body)), **extra)
        before = fast_count(server)
        fast = one(server.port, raw)
        between = fast_count(server)
        slow = one(server.port, closing + body)
        assert (between - before, fast_count(server) - between) == (1, 0), path
        assert fast[0] == slow[0], (path, fast, slow)
        if fast[0] == 200:
            # Signed locators carry an expiry of now + TTL in seconds: equal unless a second ticked in between.
            assert fast[2].split(b"@")[0] == slow[2].split(b"@")[0]
        else:
            assert fast[2] == slow[2]
        assert comparable(fast[1]) == comparable(slow[1]), path
    assert one(server.port, request("GET", "/" + sign(f"{md5(good)}+5000")))[2] == good


def test_put_bodies_still_arriving_or_expecting_continue_go_through_aiohttp(server: KeepServer) -> None:
    data = os.urandom(200_000)
    head = request("PUT", f"/{md5(data)}", Content_Length=str(len(data)))
    c = Conn(server.port)
    try:
        before = fast_count(server)
        c.send(head + data[:1000])  # the rest follows later: not all there when the headers are parsed
        time.sleep(0.2)
        c.send(data[1000:])
        status, _, body = c.response()
        assert status == 200 and body.startswith(md5(data).encode())
        c.send(request("PUT", f"/{md5(b'continue')}", Content_Length="8", Expect="100-continue"))
        status, _, _ = c.response()
        assert status == 100
        c.send(b"continue")
        status, _, body = c.response()
        assert status == 200 and body.startswith(md5(b"continue").encode())
        assert fast_count(server) == before
    finally:
        c.close()


def test_many_small_puts_on_one_connection(server: KeepServer) -> None:
    blocks = [os.urandom(100 + i) for i in range(50)]
    c = Conn(server.port)
    try:
        for data in blocks:
            c.send(put_request(data))
            status, headers, body = c.response()
            assert (status, headers["X-Keep-Replicas-Stored"]) == (200, "1")
            assert body.decode().startswith(f"{md5(data)}+{len(data)}+A")
    finally:
        c.close()
    assert sorted(server.index_hashes()) == sorted(md5(b) for b in blocks)


def test_a_request_split_across_reads_is_one_request(server: KeepServer) -> None:
    # The second part alone looks like a whole GET; the server must read both parts as the one request they are.
    # (keepstore/_reqparse.c parses only chunks that are whole requests; a part goes to llhttp, which then gets
    # everything on the connection.)
    first, second = os.urandom(100), os.urandom(200)
    loc1, loc2 = server.put(first).text.strip(), server.put(second).text.strip()
    c = Conn(server.port)
    try:
        c.send(f"GET /{loc1} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {USER_TOKEN}\r\nX-Note: ".encode())
        time.sleep(0.3)  # its own read on the server
        c.send(f"GET /{loc2} HTTP/1.1\r\n\r\n".encode())
        assert c.response()[::2] == (200, first)
        for _ in range(3):  # and the connection goes on serving whole requests
            c.send(request("GET", f"/{loc2}"))
            assert c.response()[::2] == (200, second)
    finally:
        c.close()


def test_requests_aiohttp_would_refuse_are_refused_alike(server: KeepServer) -> None:
    data = b"judged by llhttp"
    loc = server.put(data).text.strip()
    auth = f"Authorization: Bearer {USER_TOKEN}\r\n"
    cases = {
        f"GET /{loc} HTTP/1.1\r\n{auth}\r\n": 400,  # no Host
        f"GET /{loc} HTTP/1.1\r\nHost: a\r\nHost: b\r\n{auth}\r\n": 400,
        f"GET /{loc} HTTP/1.1\r\nHost : a\r\n{auth}\r\n": 400,
        f"GET /{loc} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n{auth}\r\nhello": 200,  # body read and ignored
        f"GET /{loc} HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n{auth}\r\n": 200,
    }
    for raw, status in cases.items():
        got = one(server.port, raw.encode())
        assert got[0] == status, raw
        if status == 200:
            assert got[2] == data, raw


def test_keep_alive_header_and_small_puts_take_the_fast_path(server: KeepServer) -> None:
    loc = server.put(b"native").text.strip()
    before = fast_count(server)
    c = Conn(server.port)
    try:
        for i in range(5):
            c.send(request("GET", f"/{loc}", Connection="keep-alive"))
            assert c.response()[::2] == (200, b"native")
            body = f"small put {i}".encode()
            c.send(put_request(body))
            status, _, reply = c.response()
            assert (status, reply.decode().split("+")[0]) == (200, md5(body))
    finally:
        c.close()
    assert fast_count(server) - before == 10

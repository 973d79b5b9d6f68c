"""Request limits, buffer limits and timeouts: SPEC §6.2–6.4, §11 items 75–77."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from keeptest import (
    MGMT_TOKEN,
    ROOT_TOKEN,
    USER_TOKEN,
    InProcessServer,
    ServerFactory,
    cluster_config,
    directory_volume,
    free_port,
    md5,
    request,
    sign,
    wait_for,
)

from keepstore.service import Service
from keepstore.volumes import IndexEntry
from keepstore.volumes.directory import DirectoryVolume


def slow_put(port: int, data: bytes) -> socket.socket:
    """Start a PUT that sends its headers and half its body, then stalls (the caller closes the socket)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"PUT /{md5(data)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
    s.sendall(data[: len(data) // 2])
    return s


def gauge(metrics: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", metrics, re.M)
    assert m, name
    return float(m.group(1))


def test_queue_overflow_gets_503(server_factory: ServerFactory) -> None:  # item 75
    srv = server_factory(api={"MaxConcurrentRequests": 1, "MaxQueuedRequests": 0, "MaxKeepBlobBuffers": 1})
    stalled = slow_put(srv.port, b"x" * 100_000)
    try:
        time.sleep(0.3)  # the stalled PUT now holds the only slot
        r = srv.put(b"foo")
        assert (r.status, r.body) == (503, b"")
        r = srv.req("GET", "/_health/ping", headers={"Authorization": f"Bearer {MGMT_TOKEN}"})
        assert r.status == 200  # health and metrics are outside the limiter
        assert gauge(srv.metrics(), 'arvados_concurrent_requests{queue="api"}') == 1
    finally:
        stalled.close()
    deadline = time.monotonic() + 10
    while srv.put(b"foo").status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.put(b"foo").status == 200


def test_queued_requests_wait_their_turn(server_factory: ServerFactory) -> None:
    srv = server_factory(api={"MaxConcurrentRequests": 1, "MaxQueuedRequests": 10})
    stalled = slow_put(srv.port, b"y" * 100_000)
    wait_for(lambda: srv.status_json()["RequestsCurrent"] == 1, what="the stalled PUT holding the only slot")
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(srv.put, f"block{i}".encode()) for i in range(3)]
        time.sleep(0.5)
        assert not any(f.done() for f in futures)  # queued behind the stalled request
        st = srv.status_json()
        assert st["RequestsCurrent"] == 1 and st["RequestsQueued"] == 3
        stalled.close()  # the stalled PUT fails; the queue drains
        assert [f.result().status for f in futures] == [200, 200, 200]


def test_one_buffer_no_deadlock(server_factory: ServerFactory) -> None:  # item 76
    srv = server_factory(api={"MaxKeepBlobBuffers": 1, "MaxConcurrentRequests": 64})
    blocks = [os.urandom(300_000 + i) for i in range(20)]

    def pair(data: bytes) -> tuple[int, int, bool]:
        r = srv.put(data)
        g = srv.get(r.text.strip())
        return r.status, g.status, g.body == data

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(pair, blocks))
    assert results == [(200, 200, True)] * 20
    assert gauge(srv.metrics(), "arvados_keepstore_bufferpool_inuse_buffers") == 0
    assert gauge(srv.metrics(), "arvados_keepstore_bufferpool_max_buffers") == 1


def test_waiting_for_buffer_gives_up_when_client_leaves(server_factory: ServerFactory) -> None:
    srv = server_factory(api={"MaxKeepBlobBuffers": 1})
    holder = slow_put(srv.port, b"z" * 200_000)  # holds the only buffer
    try:
        time.sleep(0.3)
        waiters = [slow_put(srv.port, b"w" * 1000) for _ in range(5)]
        time.sleep(0.3)
        assert srv.status_json()["BufferPool"]["Waiting"] == 5
        for w in waiters:
            w.close()
        deadline = time.monotonic() + 5
        while srv.status_json()["BufferPool"]["Waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.status_json()["BufferPool"]["Waiting"] == 0
    finally:
        holder.close()
    deadline = time.monotonic() + 5
    while srv.status_json()["BufferPool"]["BuffersInUse"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.status_json()["BufferPool"]["BuffersInUse"] == 0
    assert srv.put(b"after").status == 200


def test_request_timeout_aborts_slow_upload(server_factory: ServerFactory) -> None:  # item 77
    srv = server_factory(api={"RequestTimeout": "1s"})
    s = slow_put(srv.port, b"q" * 100_000)
    try:
        s.settimeout(10)
        out = s.recv(4096)
    finally:
        s.close()
    assert out.startswith(b"HTTP/1.1 499 "), out[:100]
    assert srv.index_hashes() == []
    wait_for(lambda: any(line.get("respStatusCode") == 499 for line in srv.log_lines()), timeout=5, what="499 logged")


class SlowIndexVolume(DirectoryVolume):
    """A directory volume on a disk so slow that listing it takes longer than RequestTimeout."""

    async def index(self, prefix: str) -> AsyncIterator[IndexEntry]:
        import asyncio

        async for entry in super().index(prefix):
            await asyncio.sleep(0.6)
            yield entry


def test_index_exempt_from_request_timeout(tmp_path: Path) -> None:  # item 77
    port = free_port()
    doc = cluster_config(port, [directory_volume(tmp_path / "v0", 0)], api={"RequestTimeout": "1s"})

    def slow(service: Service) -> None:
        mnt = service.store.mounts[0]
        mnt.volume = SlowIndexVolume(mnt.spec, _params(tmp_path / "v0"))
        service.store.__post_init__()

    srv = InProcessServer(doc, patch=slow)
    try:
        hashes = []
        for i in range(3):
            data = f"block {i}".encode()
            assert request(port, "PUT", f"/{md5(data)}", body=data).status == 200
            hashes.append(md5(data))
        t0 = time.monotonic()
        r = srv.req("GET", "/index", token=ROOT_TOKEN)
        assert time.monotonic() - t0 > 1.5  # longer than RequestTimeout...
        assert r.status == 200 and r.body.endswith(b"\n\n")  # ...and complete
        assert sorted(line.split()[0].split("+")[0] for line in r.text.splitlines() if line) == sorted(hashes)
        # An ordinary request on the same server is still subject to the timeout.
        assert srv.req("GET", f"/{sign(hashes[0] + '+7')}", token=USER_TOKEN).status == 200
    finally:
        srv.close()


def _params(root: Path) -> object:
    from keepstore.volumes.directory import DirectoryParameters

    return DirectoryParameters(root=str(root))


def test_timeout_after_headers_cuts_the_body_short(server_factory: ServerFactory) -> None:
    # A slow reader outlives RequestTimeout during a large GET: the 200 is already out, so the only honest answer
    # is a short body and a closed connection (never a second status line inside the body).
    srv = server_factory(volumes=1, api={"RequestTimeout": "2s"})
    data = os.urandom(32 << 20)
    loc = srv.put(data).text.strip()
    s = socket.create_connection(("127.0.0.1", srv.port))  # and then reads nothing for a while
    try:
        s.sendall(f"GET /{loc} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {USER_TOKEN}\r\n\r\n".encode())
        out = bytearray(s.recv(300))
        assert out.startswith(b"HTTP/1.1 200 OK")
        time.sleep(3.5)
        s.settimeout(10)
        while chunk := s.recv(1 << 20):  # ends with EOF: the server closed the connection
            out += chunk
    finally:
        s.close()
    head, _, body = bytes(out).partition(b"\r\n\r\n")
    assert b"Content-Length: 33554432" in head
    assert len(body) < len(data)
    assert b"HTTP/1.1" not in body
    wait_for(lambda: any("response cut short" in str(x.get("error")) for x in srv.log_lines()), timeout=5)

"""Bounded memory: block data lives only in the buffer pool, however many requests arrive."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from keeptest import USER_TOKEN, ServerFactory, peak_rss_kib, request, sign

MIB = 1 << 20
BLOCK = 64 * MIB


def _body(prefix: bytes, base: memoryview) -> Iterator[bytes]:
    yield prefix
    for pos in range(len(prefix), BLOCK, MIB):
        yield base[pos : pos + MIB]  # type: ignore[misc]


def test_32_concurrent_64mib_puts_with_4_buffers(server_factory: ServerFactory) -> None:
    srv = server_factory(volumes=1, api={"MaxKeepBlobBuffers": 4, "MaxConcurrentRequests": 64})
    base = memoryview(os.urandom(BLOCK))
    tail_md5 = hashlib.md5(base[16:])

    def put(n: int) -> tuple[int, str]:
        prefix = f"{n:016d}".encode()
        h = hashlib.md5(prefix)
        h.update(base[16:])
        digest = h.hexdigest()
        r = request(
            srv.port,
            "PUT",
            f"/{digest}",
            body=_body(prefix, base),
            headers={"Content-Length": str(BLOCK)},
            token=USER_TOKEN,
            timeout=300,
        )
        return r.status, digest

    assert tail_md5.digest_size == 16
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(put, range(32)))
    assert [s for s, _ in results] == [200] * 32
    peak_mib = peak_rss_kib(srv.pid) / 1024
    assert peak_mib < 4 * 64 + 150, f"peak RSS {peak_mib:.0f} MiB"
    # Spot-check that what was stored is right.
    digest = results[7][1]
    r = srv.get(sign(f"{digest}+{BLOCK}"), timeout=120)
    assert r.status == 200 and hashlib.md5(r.body).hexdigest() == digest

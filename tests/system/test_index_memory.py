"""A large index streams in bounded memory (RSS growth under 50 MiB while listing 100,000 blocks)."""

from __future__ import annotations

import hashlib
import http.client
import os
from pathlib import Path

from keeptest import ROOT_TOKEN, ServerFactory, peak_rss_kib

N = 100_000  # bench/index_memory.py measures 200,000 for the record


def populate(root: Path, n: int) -> None:
    """n distinct (empty) block files in the Arvados layout, as fast as the file system allows."""
    made: set[str] = set()
    for i in range(n):
        h = hashlib.md5(str(i).encode()).hexdigest()
        d = root / h[:3]
        if h[:3] not in made:
            d.mkdir(exist_ok=True)
            made.add(h[:3])
        os.close(os.open(d / h, os.O_CREAT | os.O_WRONLY, 0o644))


def test_index_of_200k_blocks_streams(server_factory: ServerFactory) -> None:
    srv = server_factory(volumes=1, start=False)
    populate(srv.volume_root(0), N)
    srv.start()
    before = peak_rss_kib(srv.pid)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    conn.request("GET", "/index", headers={"Authorization": f"Bearer {ROOT_TOKEN}"})
    resp = conn.getresponse()
    assert resp.status == 200
    lines = 0
    tail = b""
    while chunk := resp.read(1 << 16):
        lines += chunk.count(b"\n")
        tail = (tail + chunk)[-2:]
    conn.close()
    assert tail == b"\n\n"
    assert lines == N + 1
    growth_mib = (peak_rss_kib(srv.pid) - before) / 1024
    assert growth_mib < 50, f"RSS grew {growth_mib:.1f} MiB while streaming the index"

"""Index streaming memory: RSS of a keepstore process before and after listing N blocks.

    .venv/bin/python bench/index_memory.py [--blocks 200000]

Writes its figures to docs/benchmarks.md (section "index-memory").
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keeptest import ROOT_TOKEN, KeepServer, cluster_config, directory_volume, free_port, peak_rss_kib

from bench.report import machine, write_section


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ks-bench-") as tmp:
        root = Path(tmp) / "vol0"
        port = free_port()
        vol = directory_volume(root, 0)
        t0 = time.monotonic()
        for i in range(args.blocks):
            h = hashlib.md5(str(i).encode()).hexdigest()
            (root / h[:3]).mkdir(exist_ok=True)
            os.close(os.open(root / h[:3] / h, os.O_CREAT | os.O_WRONLY, 0o644))
        populate_s = time.monotonic() - t0
        srv = KeepServer(workdir=Path(tmp), port=port, config=cluster_config(port, [vol])).start()
        try:
            rss0, hwm0 = rss_kib(srv.pid), peak_rss_kib(srv.pid)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            t0 = time.monotonic()
            conn.request("GET", "/index", headers={"Authorization": f"Bearer {ROOT_TOKEN}"})
            resp = conn.getresponse()
            nbytes = lines = 0
            while chunk := resp.read(1 << 16):
                nbytes += len(chunk)
                lines += chunk.count(b"\n")
            elapsed = time.monotonic() - t0
            hwm1 = peak_rss_kib(srv.pid)
        finally:
            srv.stop()
    body = f"""## Index streaming memory (`bench/index_memory.py`)

{machine()}

| blocks | index bytes | time | lines/s | RSS before | peak RSS after | growth |
|---|---|---|---|---|---|---|
| {args.blocks:,} | {nbytes:,} | {elapsed:.2f} s | {lines / elapsed:,.0f} | {rss0 / 1024:.1f} MiB \
| {hwm1 / 1024:.1f} MiB | {(hwm1 - hwm0) / 1024:.1f} MiB |

The index is produced one 3-hex-digit directory at a time and written out every 2,000 lines, so memory does not
depend on the number of blocks (target: growth < 50 MiB). Populating the volume took {populate_s:.1f} s.
"""
    write_section("index-memory", body)
    print(body)


if __name__ == "__main__":
    main()

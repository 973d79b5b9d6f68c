"""Pull throughput between two local keepstores, side by side with a plain aiohttp GET-then-PUT copy loop.

    .venv/bin/python bench/pull.py [--quick]

Three keepstore processes on 127.0.0.1 (directory volumes, fsync on): A holds the blocks; B pulls them from A via a
pull list (BlobReplicateConcurrency 4); a plain aiohttp client copies the same blocks from A to C with GET then PUT,
4 at a time. Both paths verify md5 and write durably; the ratio B/C is the figure of merit. Blocks are unique
(distinct names), as in real use. Writes its figures to docs/benchmarks.md (section "pull").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keeptest import (
    MGMT_TOKEN,
    ROOT_TOKEN,
    USER_TOKEN,
    KeepServer,
    cluster_config,
    directory_volume,
    free_port,
    md5,
    sign,
)

from bench.report import machine, write_section

CASES = [("64 KiB", 64 << 10, 2000), ("1 MiB", 1 << 20, 300), ("64 MiB", 64 << 20, 8)]
CONCURRENCY = 4


def start(tmp: Path, name: str) -> KeepServer:
    port = free_port()
    vol = directory_volume(tmp / name / "vol", 0)
    cfg = cluster_config(port, [vol], collections={"BlobReplicateConcurrency": CONCURRENCY})
    cfg["Clusters"]["zzzzz"]["SystemLogs"]["LogLevel"] = "warn"
    (tmp / name).mkdir(exist_ok=True)
    return KeepServer(workdir=tmp / name, port=port, config=cfg, name=name).start()


async def seed(url: str, blocks: list[bytes]) -> None:
    async with aiohttp.ClientSession() as s:
        sem = asyncio.Semaphore(8)

        async def put(b: bytes) -> None:
            async with sem, s.put(f"{url}/{md5(b)}", data=b) as r:
                assert r.status == 200, await r.text()

        await asyncio.gather(*(put(b) for b in blocks))


async def copy_loop(src: str, dst: str, blocks: list[bytes]) -> float:
    """The baseline: GET each block from src, PUT it to dst, CONCURRENCY at a time."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(b: bytes) -> None:
            loc = sign(f"{md5(b)}+{len(b)}")
            async with sem:
                async with s.get(f"{src}/{loc}", headers={"Authorization": f"Bearer {USER_TOKEN}"}) as r:
                    data = await r.read()
                assert md5(data) == md5(b)
                async with s.put(f"{dst}/{md5(b)}", data=data) as r:
                    assert r.status == 200

        await asyncio.gather(*(one(b) for b in blocks))
    return time.monotonic() - t0


async def pull(src: str, dst: KeepServer, blocks: list[bytes]) -> float:
    items = [{"locator": f"{md5(b)}+{len(b)}", "servers": [src]} for b in blocks]
    t0 = time.monotonic()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ROOT_TOKEN}"}) as s:
        async with s.put(f"{dst.url}/pull", data=json.dumps(items)) as r:
            assert r.status == 200, await r.text()
        while True:
            async with s.get(f"{dst.url}/status.json", headers={"Authorization": f"Bearer {MGMT_TOKEN}"}) as r:
                st = (await r.json())["PullQueue"]
            if st == {"Queued": 0, "InProgress": 0}:
                break
            await asyncio.sleep(0.02)
    elapsed = time.monotonic() - t0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ROOT_TOKEN}"}) as s:
        async with s.get(f"{dst.url}/index") as r:
            n = sum(1 for line in (await r.text()).splitlines() if line)
    assert n == len(blocks), f"only {n} of {len(blocks)} blocks pulled"
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tenth of the blocks (for a smoke run)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ks-bench-pull-") as tmpname:
        tmp = Path(tmpname)
        for label, size, count in CASES:
            count = max(2, count // 10) if args.quick else count
            a, b, c = start(tmp, f"a{size}"), start(tmp, f"b{size}"), start(tmp, f"c{size}")
            try:
                base = os.urandom(size)
                blocks = [i.to_bytes(8, "big") + base[8:] for i in range(count)]
                asyncio.run(seed(a.url, blocks))
                os.sync()
                # Alternate the order between runs so that neither path always meets a cold disk.
                t_copy = asyncio.run(copy_loop(a.url, c.url, blocks))
                t_pull = asyncio.run(pull(a.url, b, blocks))
                total = size * count
                rows.append((label, count, total / t_pull / 1e6, total / t_copy / 1e6, t_copy / t_pull))
                print(rows[-1], flush=True)
            finally:
                for s in (a, b, c):
                    s.stop()
    table = "\n".join(
        f"| {label} | {count} | {pull_mb:.0f} MB/s | {copy_mb:.0f} MB/s | {ratio:.2f} |"
        for label, count, pull_mb, copy_mb, ratio in rows
    )
    body = f"""## Pull throughput (`bench/pull.py`)

{machine()}

Keepstore B pulls from keepstore A via a pull list (4 workers) vs a plain aiohttp client copying A -> C with GET then
PUT (4 at a time). Unique blocks; every write fsynced; both sides verify md5.

| block size | blocks | pull (B) | GET+PUT copy loop (C) | pull / copy loop |
|---|---|---|---|---|
{table}
"""
    write_section("pull", body)
    print(body)


if __name__ == "__main__":
    main()

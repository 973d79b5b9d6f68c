"""Peak memory under 64 concurrent 64 MiB PUTs, then 64 concurrent GETs, against the buffer-pool bound.

    .venv/bin/python bench/memory.py [--buffers 8] [--clients 64]

The bound is MaxKeepBlobBuffers x 64 MiB + 150 MiB (the Python processes themselves). Peak RSS is the sum of
VmHWM over the supervisor and its worker processes, which can only overstate the combined peak. Writes its
figures to docs/benchmarks.md (section "memory").
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keeptest import (
    USER_TOKEN,
    KeepServer,
    cluster_config,
    directory_volume,
    free_port,
    peak_rss_kib,
    process_tree,
    sign,
)

from bench.report import machine, write_section

MIB = 1 << 20
BLOCK = 64 * MIB


def rss_mib(pid: int) -> tuple[float, float]:
    """(sum of RSS, sum of PSS) over ``pid`` and its descendants, in MiB."""
    rss = pss = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024


class Sampler(threading.Thread):
    """Samples memory every 100 ms; ``take`` returns the peak since the previous ``take``."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = (0.0, 0.0)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            rss, pss = rss_mib(self.pid)
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))

    def take(self) -> tuple[float, float]:
        peak, self.peak = self.peak, rss_mib(self.pid)
        return (max(peak[0], self.peak[0]), max(peak[1], self.peak[1]))

    def stop(self) -> None:
        self.done.set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buffers", type=int, default=8)
    ap.add_argument("--clients", type=int, default=64)
    args = ap.parse_args()
    base = memoryview(os.urandom(BLOCK))
    state = hashlib.md5(base[: BLOCK - 16])
    with tempfile.TemporaryDirectory(prefix="ks-bench-mem-", dir=Path(__file__).parent) as tmp:
        port = free_port()
        cfg = cluster_config(
            port,
            [directory_volume(Path(tmp) / "vol", 0)],
            api={"MaxKeepBlobBuffers": args.buffers, "MaxConcurrentRequests": 2 * args.clients},
        )
        cfg["Clusters"]["zzzzz"]["SystemLogs"]["LogLevel"] = "warn"
        srv = KeepServer(workdir=Path(tmp), port=port, config=cfg).start()
        time.sleep(1)
        idle = rss_mib(srv.pid)[0]

        def put(n: int) -> tuple[int, str]:
            suffix = b"%016x" % n
            h = state.copy()
            h.update(suffix)

            def body() -> Iterator[bytes]:
                for pos in range(0, BLOCK - 16, MIB):
                    yield base[pos : min(BLOCK - 16, pos + MIB)]  # type: ignore[misc]
                yield suffix

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request(
                "PUT",
                f"/{h.hexdigest()}",
                body=body(),
                headers={"Content-Length": str(BLOCK), "Authorization": f"Bearer {USER_TOKEN}"},
            )
            r = conn.getresponse()
            r.read()
            conn.close()
            return r.status, h.hexdigest()

        def get(digest: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("GET", "/" + sign(f"{digest}+{BLOCK}"), headers={"Authorization": f"Bearer {USER_TOKEN}"})
            r = conn.getresponse()
            md5 = hashlib.md5()
            while chunk := r.read(MIB):
                md5.update(chunk)
            conn.close()
            return r.status if md5.hexdigest() == digest else -1

        sampler = Sampler(srv.pid)
        try:
            sampler.start()
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(put, range(args.clients)))
            put_s = time.monotonic() - t0
            put_peak = sampler.take()
            put_hwm = peak_rss_kib(srv.pid) / 1024
            assert all(s == 200 for s, _ in results), results
            time.sleep(16)  # idle buffers are trimmed after 10 s
            rested = rss_mib(srv.pid)
            sampler.take()
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                statuses = list(pool.map(get, [d for _, d in results]))
            get_s = time.monotonic() - t0
            get_peak = sampler.take()
            assert statuses == [200] * args.clients, statuses
            workers = len(process_tree(srv.pid)) - 1 or 1
        finally:
            sampler.stop()
            srv.stop()
    bound = args.buffers * 64 + 150
    total = args.clients * BLOCK / MIB

    def row(phase: str, moved: str, secs: str, peak: tuple[float, float]) -> str:
        ok = "yes" if peak[0] <= bound else "NO"
        return f"| {phase} | {moved} | {secs} | {peak[0]:.0f} MiB | {peak[1]:.0f} MiB | {bound} MiB | {ok} |"

    rows = "\n".join(
        [
            row("idle, after start", "-", "-", (idle, idle)),
            row(f"{args.clients} concurrent PUTs", f"{total:,.0f} MiB", f"{put_s:.1f} s", put_peak),
            row("idle 16 s later (buffers trimmed)", "-", "-", rested),
            row(f"{args.clients} concurrent verified GETs", f"{total:,.0f} MiB", f"{get_s:.1f} s", get_peak),
        ]
    )
    body = f"""## Memory under load (`bench/memory.py`)

{machine()}

MaxKeepBlobBuffers {args.buffers} ({workers} worker processes), {args.clients} clients at once, 64 MiB blocks.
Bound: {args.buffers} x 64 MiB + 150 MiB = {bound} MiB. RSS is sampled every 100 ms and summed over all keepstore
processes (which counts pages the forked workers share with each other once per process: it overstates);
PSS divides shared pages among the processes sharing them. Sum of VmHWM over the PUT phase: {put_hwm:.0f} MiB.

| phase | data moved | time | peak RSS (sum) | peak PSS (sum) | bound | RSS within bound |
|---|---|---|---|---|---|---|
{rows}

Requests beyond the pool's capacity wait for a buffer (their bodies stay in the kernel's socket buffers, not in
the process); a verified GET of a large block hashes it through the first MiB of its buffer and sends it with
sendfile(2); buffers idle for 10 s give their memory back.
"""
    write_section("memory", body)
    print(body)


if __name__ == "__main__":
    main()

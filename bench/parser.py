"""What TOUCH support costs: aiohttp's C parser (ours, with a per-connection fallback) vs the pure-Python parser.

    .venv/bin/python bench/parser.py [--duration 8]

aiohttp's C parser (llhttp) rejects the TOUCH method before any handler runs. keepstore keeps the C parser and
switches a connection to the Python parser only when that connection sends TOUCH (keepstore/http/protocol.py).
The alternative, AIOHTTP_NO_EXTENSIONS=1, puts every request on the Python parser. This runs the same GET load
against both, one worker process each (the parser is per process), and checks that TOUCH works on ours. Writes
its figures to docs/benchmarks.md (section "parser").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keeptest import (
    ROOT_TOKEN,
    USER_TOKEN,
    KeepServer,
    cluster_config,
    directory_volume,
    free_port,
    sign,
)

from bench.http_bench import Blocks, ensure_tools, run_wrk, seed
from bench.report import machine, write_section


def measure(work: Path, env: dict[str, str], duration: float, size: int) -> tuple[float, float, int]:
    port = free_port()
    cfg = cluster_config(port, [directory_volume(work / "vol", 0)], extra={"KeepstorePy": {"Workers": 1}})
    cfg["Clusters"]["zzzzz"]["SystemLogs"]["LogLevel"] = "warn"
    srv = KeepServer(workdir=work, port=port, config=cfg, env=env).start()
    try:
        blocks = Blocks(work, size)
        first, stored = blocks.names(200)
        seed(srv.url, blocks, first, stored, USER_TOKEN)
        names = work / "names"
        names.write_text("\n".join(sign(f"{n}+{size}") for n in stored) + "\n")
        touch = srv.req("TOUCH", f"/{stored[0]}+{size}", token=ROOT_TOKEN).status
        r = run_wrk(srv.url, "get.lua", names, size, 8, duration, USER_TOKEN, [srv.pid])
        assert r.errors == 0, r
        return r.rps, r.server_cpu, touch
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0)
    args = ap.parse_args()
    ensure_tools()
    rows = []
    for size, label in ((4096, "4 KiB"), (64 * 1024, "64 KiB")):
        with tempfile.TemporaryDirectory(prefix="ks-parser-", dir=Path(__file__).parent) as a:
            c_rps, c_cpu, c_touch = measure(Path(a), {}, args.duration, size)
        with tempfile.TemporaryDirectory(prefix="ks-parser-", dir=Path(__file__).parent) as b:
            py_rps, py_cpu, py_touch = measure(Path(b), {"AIOHTTP_NO_EXTENSIONS": "1"}, args.duration, size)
        rows.append(
            f"| GET {label} | {c_rps:,.0f} req/s ({c_cpu:.2f} cores), TOUCH {c_touch} | "
            f"{py_rps:,.0f} req/s ({py_cpu:.2f} cores), TOUCH {py_touch} | {c_rps / py_rps:.2f} |"
        )
        print(rows[-1], flush=True)
    body = f"""## TOUCH and the HTTP parser (`bench/parser.py`)

{machine()}. wrk, 8 connections, {args.duration:.0f} s, one worker process, GETs of stored blocks (verified).
TOUCH status is what an admin TOUCH of a stored block got on the same server (200 = it reached the handler).

| work | C parser + per-connection fallback (keepstore) | AIOHTTP_NO_EXTENSIONS=1 | ratio |
|---|---|---|---|
{chr(10).join(rows)}

Only a connection that actually sends TOUCH (an admin operation) moves to the Python parser; GET and PUT traffic
keeps llhttp.
"""
    write_section("parser", body)
    print(body)


if __name__ == "__main__":
    main()

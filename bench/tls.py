"""What TLS costs keepstore: the same cells over http and https, in alternating order, one run.

    .venv/bin/python bench/tls.py [--rounds 2] [--duration 10]

Each round starts a fresh keepstore (one directory volume, fsync on, every GET verified, its default worker
processes) once over http and once over https (a certificate from a throwaway CA made with trustme; TLS 1.3,
wrk does not verify it), in ABBA order, and runs wrk at 8 connections on GET 4 KiB, GET 1 MiB and PUT 4 KiB.
It reports requests/s, MB/s and keepstore's CPU per request (user + system) for each, and the https/http ratio,
and writes them to docs/benchmarks.md (section "tls"). Files go under bench/.work-tls and stay there (see
bench/ab.py on why nothing is deleted between cells); delete it when no benchmark runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme
from keeptest import KeepServer, cluster_config, directory_volume, free_port

from bench.ab import process_cpu
from bench.http_bench import USER_TOKEN, Blocks, children, ensure_tools, run_wrk, seed, sign, warm
from bench.report import machine, write_section

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work-tls"
CELLS = [("get", 4096), ("get", 1 << 20), ("put", 4096)]


def start(base: Path, tls: Path | None) -> KeepServer:
    port = free_port()
    vol = directory_volume(base / "vol", 0)
    cfg = cluster_config(port, [vol], api={"MaxKeepBlobBuffers": 64, "MaxConcurrentRequests": 192})
    cluster = cfg["Clusters"]["zzzzz"]
    cluster["SystemLogs"]["LogLevel"] = "warn"
    if tls is not None:
        cluster["Services"]["Keepstore"]["InternalURLs"] = {f"https://127.0.0.1:{port}": {}}
        cluster["TLS"] = {"Certificate": f"file://{tls}/tls.crt", "Key": f"file://{tls}/tls.key"}
    return KeepServer(workdir=base, port=port, config=cfg).start()


def cell(tls: Path | None, work: str, size: int, duration: float) -> dict[str, float]:
    base = WORK / f"{time.time_ns()}"
    base.mkdir(parents=True)
    srv = start(base, tls)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{srv.port}"
    try:
        blocks = Blocks(base, size)
        if work == "put":
            first, names = blocks.names_file(int(duration * 8 * 2500) + 100)
            script, extra = "put.lua", (blocks.base_path, first)
        else:
            # (a stored set the page cache holds; 1,000 blocks of 1 MiB per cell would leave gigabytes behind)
            first, stored = blocks.names(1000 if size <= 64 << 10 else 256)
            seed(url, blocks, first, stored, USER_TOKEN)
            locators = [sign(f"{n}+{size}") for n in stored]
            warm(url, locators, USER_TOKEN)
            names = base / "signed"
            names.write_text("\n".join(locators) + "\n")
            script, extra = "get.lua", (None, 0)
        pids = [srv.pid, *children(srv.pid)]
        user0, sys0 = process_cpu(pids)
        r = run_wrk(url, script, names, size, 8, duration, USER_TOKEN, pids, *extra)
        user1, sys1 = process_cpu(pids)
        n = max(1.0, r.rps * duration)
        return {
            "rps": r.rps,
            "mbps": r.mbps,
            "cpu_us": 1e6 * ((user1 - user0) + (sys1 - sys0)) / n,
            "busy": r.machine_busy,
        }
    finally:
        srv.stop()


def _fmt(rs: list[dict[str, float]], size: int) -> str:
    """Throughput and CPU cells of one scheme, every round's figure."""
    rate = " / ".join(f"{r['rps']:,.0f}" for r in rs)
    mb = " / ".join(f"{r['mbps']:,.0f}" for r in rs) if size >= 1 << 20 else ""
    cpu = " / ".join(f"{r['cpu_us']:,.0f}" for r in rs)
    return f"{rate} req/s{f' ({mb} MB/s)' if mb else ''} | {cpu} us"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    args = ap.parse_args()
    if args.rounds < 1 or args.duration <= 0:
        ap.error("--rounds and --duration must be positive")
    ensure_tools()
    WORK.mkdir(parents=True, exist_ok=True)
    pki = WORK / f"pki-{time.time_ns()}"
    pki.mkdir()
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.private_key_pem.write_to_path(str(pki / "tls.key"))
    leaf.cert_chain_pems[0].write_to_path(str(pki / "tls.crt"))
    ca.cert_pem.write_to_path(str(pki / "ca.pem"))
    os.environ["SSL_CERT_FILE"] = str(pki / "ca.pem")  # for the seeding and warming requests (urllib)
    results: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        for work, size in CELLS:
            order: list[Path | None] = [None, pki] if rnd % 2 == 0 else [pki, None]
            for tls in order:
                scheme = "https" if tls else "http"
                r = cell(tls, work, size, args.duration)
                results.setdefault((work, size, scheme), []).append(r)
                print(
                    f"round {rnd + 1} {work.upper()} {size} {scheme}: {r['rps']:,.0f} req/s "
                    f"{r['mbps']:,.0f} MB/s, {r['cpu_us']:,.0f} us CPU/req, busy {r['busy']:.2f}",
                    flush=True,
                )
    rows = []
    for work, size in CELLS:
        label = f"{work.upper()} {size // 1024} KiB" if size < 1 << 20 else f"{work.upper()} {size >> 20} MiB"
        plain, tls_ = results[(work, size, "http")], results[(work, size, "https")]

        ratio = statistics.fmean(r["rps"] for r in tls_) / max(1.0, statistics.fmean(r["rps"] for r in plain))
        rows.append(f"| {label} | {_fmt(plain, size)} | {_fmt(tls_, size)} | {ratio:.2f} |")
    body = f"""## TLS (`bench/tls.py`)

{machine()}. keepstore over http and over https (TLS 1.3, ECDSA P-256 certificate), the same cells at 8
connections, {args.rounds} rounds in alternating order, {args.duration:g} s each; a fresh keepstore (its default
worker processes) per cell. CPU is keepstore's own (user + system) per request.

| work | http: throughput | http: CPU per request | https: throughput | https: CPU per request | https / http |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    write_section("tls", body)
    print(f"(files left in {WORK}; delete them when no benchmark runs)")


if __name__ == "__main__":
    main()

"""A/B one benchmark cell between keepstore source trees, in interleaved runs (no nginx, no docs written).

    .venv/bin/python bench/ab.py --src /tmp/old --src . --work put --size 4096 --conc 8 --rounds 3

Each round runs the cell once per tree, in the order given and reversed every other round (ABBA: the position in a
round moved one-order series more than some of the changes measured), each time against a freshly started keepstore
on a fresh directory volume (under bench/.work-ab). The figures of one cell swing with the file system's state and
the neighbours on a shared machine (see docs/benchmarks.md, "The file system"), so only rounds run side by side
compare, and CPU per request (user and system time of the keepstore processes) says more than throughput; the
"stolen" column shows when the hypervisor took the machine away. A tree is a worktree with its C extensions built in
place (``python setup.py build_ext --inplace``), all of them: the editable install's finder fills in a missing one
from this checkout without a word; ``.`` is this one. No cell deletes anything (on ext4 without a
journal, file creation is slow for minutes after a mass deletion, which would penalise the next cell): the files of
the whole run are removed at its end, so give the file system a few minutes before the next run."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.http_bench import USER_TOKEN, Blocks, Keepstore, ensure_tools, run_wrk, seed, sign, warm

ROOT = Path(__file__).resolve().parent.parent


def process_cpu(pids: list[int]) -> tuple[float, float]:
    """User and system seconds of these processes (their threads included)."""
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        user += int(fields[11]) / 100
        system += int(fields[12]) / 100
    return user, system


WORK = ROOT / "bench" / ".work-ab"


def one_cell(src: str, work: str, size: int, conns: int, duration: float, workers: int) -> str:
    base = WORK / f"{time.time_ns()}"
    base.mkdir(parents=True)
    ks = Keepstore(base, 64, workers, src)
    try:
        blocks = Blocks(base, size)
        if work == "put":
            first, names = blocks.names_file(int(duration * conns * 2500) + 100)
            script, extra = "put.lua", (blocks.base_path, first)
        else:
            first, stored = blocks.names(1000 if size <= 1 << 20 else 16)
            seed(ks.url, blocks, first, stored, USER_TOKEN)
            locators = [sign(f"{n}+{size}") for n in stored]
            warm(ks.url, locators, USER_TOKEN)  # direct writes leave fresh blocks out of the page cache
            names = base / "signed"
            names.write_text("\n".join(locators) + "\n")
            script, extra = "get.lua", (None, 0)
        pids = ks.pids
        user0, sys0 = process_cpu(pids)
        r = run_wrk(ks.url, script, names, size, conns, duration, USER_TOKEN, pids, *extra)
        user1, sys1 = process_cpu(pids)
        n = max(1.0, r.rps * duration)
        return (
            f"{r.rps:9,.0f} req/s  p50 {r.p50_ms:7.2f} ms  user/req {1e6 * (user1 - user0) / n:6.0f} us  "
            f"sys/req {1e6 * (sys1 - sys0) / n:6.0f} us  busy {r.machine_busy:.2f}  stolen {r.machine_steal:.2f}"
        )
    finally:
        ks.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append", required=True, help="a keepstore source tree (repeat: A, B, ...)")
    ap.add_argument("--work", choices=["put", "get"], default="put")
    ap.add_argument("--size", type=int, default=4096, help="block size in bytes")
    ap.add_argument("--conc", type=int, default=8, help="connections")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="keepstore worker processes (0: its default)")
    ap.add_argument(
        "--keep-files",
        action="store_true",
        help=f"leave the run's files in {WORK} (deleting them slows file creation for minutes; delete them later)",
    )
    args = ap.parse_args()
    if args.rounds < 1 or args.duration <= 0 or args.conc < 1:
        ap.error("--rounds, --duration and --conc must be positive")
    ensure_tools()
    trees = [str(Path(s).resolve()) for s in args.src]
    try:
        for rnd in range(args.rounds):
            # Every other round in reverse order: in one-order series the tree that ran second in a round won 5
            # of 6 times, whichever it was.
            for tree in trees if rnd % 2 == 0 else trees[::-1]:
                line = one_cell(tree, args.work, args.size, args.conc, args.duration, args.workers)
                print(f"round {rnd + 1}  {tree:<30} {line}", flush=True)
    finally:
        if not args.keep_files:
            print(f"removing {WORK} ...", flush=True)
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()

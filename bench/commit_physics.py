"""What the disk allows a group commit of small blocks: latency and rate by group size and writer count.

    .venv/bin/python bench/commit_physics.py [--dir bench/.work-physics] [--seconds 4]

keepstore commits blocks up to 64 KiB in groups (keepstore/_fileio.c write_group: write the group's temp files,
syncfs, rename them, syncfs), one commit thread per worker process. At 8 connections over 2 workers that makes
groups of 2 committed by 2 processes at once, each request waiting for the group before its own. This measures,
with nothing but the durable writes running (no HTTP, no hashing), what such groups cost on this disk:

* P processes, each committing groups of N unique 4 KiB files in a loop, as keepstore's commit threads do;
* the same while two processes spin on both CPUs (a stand-in for busy event loops: the commit threads and the
  kernel's writeback then wait for a CPU);
* for reference, the bench's file-by-file ceiling (8 threads: write, fsync, rename, fsync the directory);

and reports files/s, the p50 and mean time of one group, and the device's write requests and cache flushes per
syncfs (from /proc/diskstats). Files go to 4,096 subdirectories, as a directory volume spreads blocks over
<hash[0:3]>/ ones, under ``--dir`` on the file system measured. Nothing is deleted (mass deletions slow file
creation on ext4 without a journal for minutes): remove ``--dir`` later. Writes docs/benchmarks.md section
"commit-physics".
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine, write_section

ROOT = Path(__file__).resolve().parent.parent
SIZE = 4096
SUBDIRS = 4096


def _syncfs() -> Any:
    return ctypes.CDLL(None, use_errno=True).syncfs


def make_run_dir(base: Path) -> Path:
    run = base / f"run{time.time_ns()}"
    run.mkdir(parents=True)
    (run / "stage").mkdir()
    for sub in range(SUBDIRS):
        (run / f"{sub:03x}").mkdir()
    os.sync()
    return run


def group_writer(
    run: str, writer: int, group: int, seconds: float, start: float, out: mp.Queue[list[float]], staging: bool
) -> None:
    """Commit groups of ``group`` files until ``seconds`` after ``start``: write all, syncfs, rename all, syncfs.

    With ``staging``, the temp files are written in one directory (``run``/stage) instead of each in its final
    one: a group's new inodes, data blocks and directory entries then share a few metadata blocks."""
    syncfs = _syncfs()
    data = os.urandom(SIZE)
    root = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    n = writer * 100_000_000
    times = []
    while time.time() < start:
        time.sleep(0.001)
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        names = []
        for _ in range(group):
            n += 1
            sub = f"{run}/{(n * 7919) % SUBDIRS:03x}"
            names.append((f"{run}/stage/tmp{n}" if staging else f"{sub}/tmp{n}", f"{sub}/{n}"))
        for tmp, _final in names:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
        if syncfs(root) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
        for tmp, final in names:
            os.rename(tmp, final)
        if syncfs(root) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
        times.append(time.perf_counter() - t0)
    out.put(times)


def file_by_file(run: str, threads: int, seconds: float) -> int:
    data = os.urandom(SIZE)
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        n = (50 + i) * 100_000_000
        while time.monotonic() < stop:
            n += 1
            sub = f"{run}/{(n * 7919) % SUBDIRS:03x}"
            fd = os.open(f"{sub}/tmp{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(f"{sub}/tmp{n}", f"{sub}/{n}")
            dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
            counts[i] += 1

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts)


def spin(stop: float) -> None:
    while time.time() < stop:
        pass


def device_stats(path: Path) -> tuple[int, int]:
    """(write requests, flush requests) completed so far by the block device holding ``path``."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if int(f[0]) == major and int(f[1]) == minor:
            return int(f[7]), int(f[18]) if len(f) > 18 else 0
    return 0, 0


def measure(run: Path, procs: int, group: int, seconds: float, loaded: bool, staging: bool) -> dict[str, float]:
    ctx = mp.get_context("fork")
    out: mp.Queue[list[float]] = ctx.Queue()
    start = time.time() + 0.3
    hogs = [ctx.Process(target=spin, args=(start + seconds + 0.2,)) for _ in range(2 if loaded else 0)]
    for h in hogs:
        h.start()
    writers = [
        ctx.Process(target=group_writer, args=(str(run), w, group, seconds, start, out, staging)) for w in range(procs)
    ]
    w0, f0 = device_stats(run)
    for p in writers:
        p.start()
    times = [t for _ in writers for t in out.get()]
    for p in writers + hogs:
        p.join()
    w1, f1 = device_stats(run)
    groups = len(times)
    return {
        "files": groups * group / seconds,
        "p50": statistics.median(times) * 1e3,
        "mean": statistics.fmean(times) * 1e3,
        "writes": (w1 - w0) / max(1, 2 * groups),
        "flushes": (f1 - f0) / max(1, 2 * groups),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / ".work-physics", help="where to write (kept)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    args = ap.parse_args()
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    run = make_run_dir(args.dir)
    shapes = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4), (4, 2)]
    rows = []
    runs = [(p, g, loaded, False) for loaded in (False, True) for p, g in shapes]
    # Each staging row right after its partner: the file system's state moves these figures between minutes.
    runs += [(p, g, False, staging) for p, g in [(1, 4), (2, 2), (2, 4)] for staging in (False, True)]
    for procs, group, loaded, staging in runs:
        r = measure(run, procs, group, args.seconds, loaded, staging)
        cpus = "both CPUs spinning" if loaded else "idle"
        rows.append(
            f"| {procs} | {group} | {cpus}{', temp files in one directory' if staging else ''} | "
            f"{r['files']:,.0f}/s | {r['p50']:.2f} ms | {r['mean']:.2f} ms | {r['writes']:.1f} | {r['flushes']:.1f} |"
        )
        print(rows[-1], flush=True)
    fbf = []
    for loaded in (False, True):
        ctx = mp.get_context("fork")
        hogs = [ctx.Process(target=spin, args=(time.time() + args.seconds + 0.2,)) for _ in range(2 if loaded else 0)]
        for h in hogs:
            h.start()
        w0, f0 = device_stats(run)
        t0 = time.monotonic()
        files = file_by_file(str(run), 8, args.seconds)
        elapsed = time.monotonic() - t0
        w1, f1 = device_stats(run)
        for h in hogs:
            h.join()
        fbf.append(
            f"| {'both CPUs spinning' if loaded else 'idle'} | {files / elapsed:,.0f}/s | "
            f"{(w1 - w0) / max(1, files):.1f} | {(f1 - f0) / max(1, files):.1f} |"
        )
        print(fbf[-1], flush=True)
    body = f"""## Group commit physics (`bench/commit_physics.py`)

{machine()}. Unique 4 KiB files in 4,096 directories, {args.seconds:g} s per row; "writers" processes at
once, each committing groups of "group" files in a loop (write the group, syncfs, rename it, syncfs), as
keepstore's one commit thread per worker process does; no HTTP, no hashing. "Device writes" and "flushes" are
the block device's completed write and flush requests per syncfs call.

| writers | group | CPUs | files | group p50 | group mean | device writes per syncfs | flushes per syncfs |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

File by file, the bench's ceiling (8 threads: write, fsync, rename, fsync the directory):

| CPUs | files | device writes per file | flushes per file |
|---|---|---|---|
{chr(10).join(fbf)}
"""
    write_section("commit-physics", body)
    print(f"(files left in {run}; delete them when no benchmark runs)")


if __name__ == "__main__":
    main()

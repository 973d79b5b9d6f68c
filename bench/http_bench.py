"""keepstore vs nginx (WebDAV) on the same work, in one run, plus this machine's physical ceilings.

    make bench                                   # everything: 4 KiB / 1 MiB / 64 MiB, PUT and GET, c = 1, 8, 32
    .venv/bin/python bench/http_bench.py --conc 8 --duration 8 --label "uvloop"

What it does, all on 127.0.0.1 and on the disk that holds this repository:

* installs nginx and wrk from Debian if they are missing (needs root) and starts nginx with one worker, WebDAV PUT,
  no checksum, no fsync; starts keepstore with one directory volume (fsync on, every read verified);
* PUT: wrk (4 KiB) or bench/putgen.py (1 MiB and 64 MiB: wrk's Lua would allocate a fresh body per request, and
  the kernel's zeroing of it cost more CPU than the servers) sends *unique* blocks (a 16-hex-digit counter ends
  each body; the URL is the block's md5, computed in advance), so both servers create a new file per request, as
  in real use; GET: a fixed set of stored blocks, read round-robin (page cache warm: each read once first).
  Every run writes blocks no earlier run wrote, so nothing is deleted between runs
  (except the few large files of 64 MiB cells): on ext4 without a journal, creating files is slow for minutes after
  a mass deletion (recently deleted inodes are skipped), which would penalise whichever server runs next. So a run
  leaves its files in place; the next run deletes them first, syncs, and waits ``--settle`` seconds (310) before it
  measures anything. For the same reason, start a run a few minutes after the test suite;
* measures md5 speed (1 and 2 threads) and the durable-write ceiling (8 threads: write, fsync, rename, fsync the
  directory; unique files) in the same run: where nginx is above those, they are the real target. For blocks up to
  1 MiB it also measures the same durable write done by group commit (batches of 8: write, syncfs, rename, syncfs),
  which is how keepstore writes blocks up to 64 KiB (``--group-commit off`` runs keepstore file by file instead),
  and from 1 MiB on the same write with O_DIRECT, which is how keepstore writes larger blocks (``--direct-writes
  off`` runs keepstore with buffered writes instead). The file-by-file ceiling of group-committed sizes (4 KiB) is
  measured once more right after their PUT cells: it swings with the file system's state, and the cells ran between
  the two measurements;
* reports throughput, p50/p99 latency, server and wrk CPU (cores), and the server's peak RSS; keepstore/nginx
  ratios; writes the tables to docs/benchmarks.md (section "http", or "http-<label>" with --label).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from keeptest import (  # noqa: E402
    USER_TOKEN,
    KeepServer,
    cluster_config,
    directory_volume,
    free_port,
    sign,
)

from bench.report import machine, write_section  # noqa: E402

SIZES = {"4 KiB": 4 << 10, "1 MiB": 1 << 20, "64 MiB": 64 << 20}
PUT_RATE_CAP = {4 << 10: 25_000, 1 << 20: 3_000, 64 << 20: 60}  # PUTs/s no server here comes near (name budget)
LARGE = 64 << 20  # PUT cells of this size are deleted after each cell; smaller ones stay until the next run
GROUP_COMMIT_MAX = 1 << 20  # sizes with a group-commit ceiling row (keepstore groups blocks up to 64 KiB)
SMALL_GROUPED = 64 << 10  # sizes keepstore group-commits: their file-by-file ceiling is measured again after the PUTs
GROUP_CEILING_BATCH = 8
DIRECT_MIN = 1 << 20  # sizes with an O_DIRECT ceiling row (keepstore writes blocks above 64 KiB that way)
# ext4 without a journal does not reuse inodes freed in the last 60 s, or 300 s while their inode-table block is
# dirty, which new files in the same block make it again: creating files is slow until then (nginx's 4 KiB PUTs
# fell from ~9k to ~1.4k req/s 65 s after a deletion).
SETTLE_SECONDS = 310.0
LUA = ROOT / "bench" / "lua"
PUTGEN_MIN = int(os.environ.get("KS_BENCH_PUTGEN_MIN", 1 << 20))  # PUTs of this size on go through bench/putgen.py
CLK = os.sysconf("SC_CLK_TCK")


# --- tools -------------------------------------------------------------------------------------------------------


def ensure_tools() -> None:
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench needs {', '.join(missing)}: apt-get install nginx wrk (as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", "nginx", "wrk"], check=True, env=env, stdout=subprocess.DEVNULL)


def machine_cpu() -> tuple[float, float, float]:
    """CPU seconds this machine has spent so far: (busy, idle + iowait, stolen by the hypervisor), all CPUs.

    A server's own CPU (cpu_seconds) leaves out work the kernel does for it in its own threads (file-system
    writeback, block I/O completion, network softirqs): where the cores are saturated, only these figures show it.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLK, (idle + iowait) / CLK, steal / CLK


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
        except (OSError, IndexError):
            pass
    return total / CLK


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def peak_rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def reset_peak_rss(pids: list[int]) -> None:
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


# --- servers -----------------------------------------------------------------------------------------------------


class Nginx:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.root = work / "nginx-data"
        self.port = free_port()
        (work / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        conf = work / "nginx.conf"
        conf.write_text(
            f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  client_body_temp_path {work}/nginx-tmp;
  server {{
    listen 127.0.0.1:{self.port};
    root {self.root};
    client_max_body_size 65m;
    client_body_buffer_size 1m;
    location / {{ dav_methods PUT; create_full_put_path on; dav_access user:rw group:r all:r; }}
  }}
}}
"""
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([nginx, "-c", str(conf), "-g", "daemon off;"], stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def clear(self) -> None:
        shutil.rmtree(self.root)
        self.root.mkdir()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(30)


class Keepstore:
    def __init__(
        self,
        work: Path,
        buffers: int,
        workers: int,
        src: str = "",
        group_commit: bool = True,
        direct_writes: bool = True,
    ) -> None:
        self.work = work / "keepstore"
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        vol = directory_volume(self.work / "vol", 0)
        cfg = cluster_config(
            self.port, [vol], api={"MaxKeepBlobBuffers": buffers, "MaxConcurrentRequests": 2 * buffers + 64}
        )
        cfg["Clusters"]["zzzzz"]["SystemLogs"]["LogLevel"] = "warn"
        cfg["Clusters"]["zzzzz"]["KeepstorePy"] = {"Workers": workers}
        if not group_commit:
            cfg["Clusters"]["zzzzz"]["KeepstorePy"]["GroupCommit"] = False  # (older trees do not know the key)
        if not direct_writes:
            cfg["Clusters"]["zzzzz"]["KeepstorePy"]["DirectWrites"] = False  # (nor this one)
        env = {"PYTHONPATH": str(Path(src).resolve())} if src else {}
        self.server = KeepServer(workdir=self.work, port=self.port, config=cfg, env=env).start()
        self.url = self.server.url

    @property
    def pids(self) -> list[int]:
        return [self.server.pid, *children(self.server.pid)]

    def clear(self) -> None:
        root = self.server.volume_root(0)
        for sub in root.iterdir():
            if sub.is_dir():
                shutil.rmtree(sub)

    def stop(self) -> None:
        self.server.stop()


def _wait_port(port: int) -> None:
    import socket

    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


# --- data --------------------------------------------------------------------------------------------------------


class Blocks:
    """Unique blocks of one size: base[:size-16] + 16 hex digits of a counter; md5s from a shared prefix state.

    Counter values are handed out in disjoint ranges (``names``): the GET seed set and every PUT run get their own,
    so no run ever writes a block that is already stored and nothing has to be deleted between runs (see main).
    """

    def __init__(self, work: Path, size: int) -> None:
        self.work = work
        self.size = size
        self.base_path = work / f"base-{size}"
        base = os.urandom(size)
        self.base_path.write_bytes(base)
        self.prefix = base[: size - 16]
        self._state = hashlib.md5(self.prefix)
        self._next = 0
        self._ranges = 0

    def names(self, count: int) -> tuple[int, list[str]]:
        """The next ``count`` counter values: (first value, md5 of each block)."""
        first = self._next
        self._next += count
        out = []
        for i in range(first, first + count):
            h = self._state.copy()
            h.update(b"%016x" % i)
            out.append(h.hexdigest())
        return first, out

    def names_file(self, count: int) -> tuple[int, Path]:
        """``names`` written one per line for put.lua: (first counter value, file)."""
        first, names = self.names(count)
        self._ranges += 1
        path = self.work / f"names-{self.size}-{self._ranges}"
        path.write_text("\n".join(names) + "\n")
        return first, path

    def body(self, i: int) -> bytes:
        return self.prefix + b"%016x" % i


def room_for(work: Path, size: int) -> int:
    """How many blocks of ``size`` a PUT run may write: 80 % of the free space (at least one). A cell must never
    fill the disk: a volume that runs out of space marks itself full and refuses writes (507) for an hour, as
    Arvados' does. Past this many a run PUTs names again ("reused names" in its row)."""
    st = os.statvfs(work)
    return max(1, int(0.8 * st.f_bavail * st.f_frsize / size))


def seed(url: str, blocks: Blocks, first: int, names: list[str], token: str | None) -> None:
    def put(i: int) -> None:
        req = urllib.request.Request(f"{url}/{names[i]}", data=blocks.body(first + i), method="PUT")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req) as r:
            assert r.status in (200, 201, 204), r.status

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(put, range(len(names))))


def warm(url: str, paths: list[str], token: str | None) -> None:
    """Read every block once, so that GET cells start with the page cache warm for both servers (keepstore's
    direct writes leave a freshly written block out of it; nginx's buffered ones leave it in)."""

    def get(path: str) -> None:
        req = urllib.request.Request(f"{url}/{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req) as r:
            while r.read(1 << 20):
                pass

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(get, paths))


# --- wrk ---------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    rps: float
    mbps: float
    p50_ms: float
    p99_ms: float
    errors: int
    wrapped: int
    server_cpu: float
    wrk_cpu: float
    machine_busy: float  # cores busy on the whole machine (servers, load generator, kernel threads)
    machine_steal: float  # cores taken by the hypervisor
    rss_mib: float


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert m, text
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def run_wrk(
    url: str,
    script: str,
    names: Path,
    size: int,
    conns: int,
    duration: float,
    token: str | None,
    pids: list[int],
    base: Path | None = None,
    first: int = 0,
) -> Result:
    threads = 1 if conns == 1 else 2
    env = dict(
        os.environ,
        KS_BENCH_NAMES=str(names),
        KS_BENCH_THREADS=str(threads),
        KS_BENCH_SIZE=str(size),
        KS_BENCH_TOKEN=token or "",
        KS_BENCH_BASE=str(base or ""),
        KS_BENCH_FIRST=str(first),
    )
    if script == "put.lua" and size >= PUTGEN_MIN:
        # wrk's Lua would allocate (and the kernel zero) a fresh body per request: see bench/putgen.py.
        command = [sys.executable, str(ROOT / "bench" / "putgen.py"), "-c", str(conns), "-d", str(round(duration)), url]
    else:
        command = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{round(duration)}s", "--timeout", "60s"]
        command += ["--latency", "-s", str(LUA / script), url]
    reset_peak_rss(pids)
    cpu0 = cpu_seconds(pids)
    machine0 = machine_cpu()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wrk_cpu = 0.0
    while proc.poll() is None:
        wrk_cpu = max(wrk_cpu, cpu_seconds([proc.pid]))
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    elapsed = time.monotonic() - t0
    server_cpu = (cpu_seconds(pids) - cpu0) / elapsed
    machine1 = machine_cpu()
    busy, steal = ((machine1[i] - machine0[i]) / elapsed for i in (0, 2))
    rss = peak_rss_mib(pids)
    if "Requests/sec:" not in out:
        raise RuntimeError(f"wrk failed:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"wrapped=(\d+)", out)
    return Result(
        rps=rps,
        mbps=rps * size / 1e6,
        p50_ms=p50,
        p99_ms=p99,
        errors=errors,
        wrapped=int(m.group(1)) if m else 0,
        server_cpu=server_cpu,
        wrk_cpu=wrk_cpu / elapsed,
        machine_busy=busy,
        machine_steal=steal,
        rss_mib=rss,
    )


# --- ceilings ----------------------------------------------------------------------------------------------------


def md5_speed(threads: int, seconds: float = 2.0) -> float:
    buf = os.urandom(64 << 20)
    done = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        while time.monotonic() < stop:
            hashlib.md5(buf)
            done[i] += len(buf)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done) / (time.monotonic() - t0) / 1e6


def durable_write_ceiling(
    work: Path,
    size: int,
    seconds: float = 4.0,
    threads: int = 8,
    group: int = 0,
    direct: bool = False,
    tag: str = "",
) -> tuple[float, float, float]:
    """(MB/s, files/s, CPU us per file) for write + fsync + rename + fsync(dir) of unique files, ``threads`` at a time.

    The CPU (user + system, of this process) says how much of the two cores the durable write alone takes: on a
    small block it is mostly the kernel's, and a server that writes durably has only what is left for HTTP.

    With ``group``, each thread writes that many files at a time the way keepstore's group commit does (write them
    all, syncfs, rename them all, syncfs): the same durability per file, fewer flushes. With ``direct``, the data is
    written with O_DIRECT (then fsync, rename, fsync the directory), as keepstore writes larger blocks.

    Files are spread over 256 subdirectories, as a directory volume spreads blocks over <hash[0:3]>/ ones (all
    writers fsyncing one directory would measure that directory's lock, not the disk).
    """
    # left in place unless large (see main: no mass deletions)
    d = work / f"ceiling-{size}{f'-group{group}' if group else ''}{'-direct' if direct else ''}{tag}"
    d.mkdir()
    for sub in range(256):
        (d / f"{sub:03x}").mkdir()
    # A page-aligned copy of the data: O_DIRECT needs aligned buffers (sizes here are multiples of 4 KiB). In
    # transparent huge pages, as keepstore's block buffers are (keepstore.buffers: a direct write from 4 KiB pages
    # is split into more, smaller device requests, which halved this ceiling for 1 MiB files on the AMD EPYC
    # machine), so the mapping is whole huge pages.
    huge = 2 << 20
    data = mmap.mmap(-1, -(-size // huge) * huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        data.madvise(mmap.MADV_HUGEPAGE)
    data[:size] = os.urandom(size)
    counts = [0] * threads
    stop = time.monotonic() + seconds
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0)

    def write_temp(i: int, n: int, fsync: bool) -> tuple[Path, Path, Path]:
        """File ``n`` of thread ``i``, written under its temp name: (directory, temp path, final path)."""
        sub = d / f"{(i * 7919 + n) % 256:03x}"
        tmp, final = sub / f"tmp{i}-{n}", sub / f"f{i}-{n}"
        fd = os.open(tmp, flags, 0o600)
        view = memoryview(data)[:size]
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
        os.close(fd)
        return sub, tmp, final

    def group_(i: int) -> None:
        import ctypes

        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        root = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        n = 0
        while time.monotonic() < stop:
            batch = [write_temp(i, n + k, fsync=False) for k in range(group)]
            n += group
            if syncfs(root) != 0:
                raise OSError(ctypes.get_errno(), "syncfs")
            for _, tmp, final in batch:
                os.rename(tmp, final)
            if syncfs(root) != 0:
                raise OSError(ctypes.get_errno(), "syncfs")
        os.close(root)
        counts[i] = n

    def work_(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            sub, tmp, final = write_temp(i, n, fsync=True)
            os.rename(tmp, final)
            dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=group_ if group else work_, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    cpu0 = os.times()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    cpu1 = os.times()
    elapsed = time.monotonic() - t0
    files = sum(counts) / elapsed
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    if size >= LARGE:
        shutil.rmtree(d)  # a few files, but gigabytes: the PUT cells need the room
    return files * size / 1e6, files, 1e6 * cpu / max(1, sum(counts))


# --- main --------------------------------------------------------------------------------------------------------

RESULT_COLUMNS = [
    *("work", "conns", "server", "throughput", "p50 ms", "p99 ms", "server CPU (cores)", "wrk CPU (cores)"),
    *("machine busy (cores)", "stolen (cores)", "peak RSS MiB"),
]
RESULT_HEAD = "| " + " | ".join(RESULT_COLUMNS) + " |\n" + "|---" * len(RESULT_COLUMNS) + "|"


def fmt_tput(size: int, r: Result) -> str:
    return f"{r.rps:,.0f} req/s" if size < (1 << 20) else f"{r.mbps:,.0f} MB/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, from: " + ", ".join(SIZES))
    ap.add_argument("--conc", default="1,8,32", help="wrk connections, comma-separated (default 1,8,32)")
    ap.add_argument("--ops", default="PUT,GET")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is reported")
    ap.add_argument("--buffers", type=int, default=64, help="keepstore MaxKeepBlobBuffers")
    ap.add_argument("--workers", type=int, default=0, help="keepstore worker processes (0: one per CPU)")
    ap.add_argument("--label", default="", help="write to section http-<label> instead of http")
    ap.add_argument(
        "--src", default="", help="run keepstore from this source tree (e.g. a git worktree of an older commit)"
    )
    ap.add_argument("--work", default=str(ROOT / "bench" / ".work"), help="scratch directory (same disk!)")
    ap.add_argument(
        "--group-commit", choices=("on", "off"), default="on", help="keepstore's KeepstorePy.GroupCommit (default on)"
    )
    ap.add_argument(
        "--direct-writes",
        choices=("on", "off"),
        default="on",
        help="keepstore's KeepstorePy.DirectWrites (default on)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=SETTLE_SECONDS,
        help=f"seconds to wait after deleting an earlier run's files, before measuring (default {SETTLE_SECONDS:.0f})",
    )
    args = ap.parse_args()
    ensure_tools()
    sizes = [s.strip() for s in args.sizes.split(",")]
    concs = [int(c) for c in args.conc.split(",")]
    ops = [o.strip().upper() for o in args.ops.split(",")]
    work = Path(args.work).resolve()  # nginx resolves relative paths against its own prefix
    if work.exists():
        # The files of the previous run are deleted now, not at its end: then let the file system settle (see the
        # module docstring) so that the deletion does not slow this run's creates.
        print(f"deleting the previous run's files in {work} ...", flush=True)
        shutil.rmtree(work, ignore_errors=True)
        os.sync()
        if args.settle > 0:
            print(f"waiting {args.settle:.0f} s for the file system to settle after the deletion ...", flush=True)
            time.sleep(args.settle)
    work.mkdir(parents=True)

    print("measuring ceilings ...", flush=True)
    md5_1, md5_2 = md5_speed(1), md5_speed(2)
    ceilings = {label: durable_write_ceiling(work, size) for label, size in SIZES.items() if label in sizes}
    grouped = {
        label: durable_write_ceiling(work, size, group=GROUP_CEILING_BATCH)
        for label, size in SIZES.items()
        if label in sizes and size <= GROUP_COMMIT_MAX
    }
    direct = {
        label: durable_write_ceiling(work, size, direct=True)
        for label, size in SIZES.items()
        if label in sizes and size >= DIRECT_MIN
    }

    after: dict[str, tuple[float, float, float]] = {}
    nginx = Nginx(work)
    ks = Keepstore(work, args.buffers, args.workers, args.src, args.group_commit == "on", args.direct_writes == "on")
    rows: list[str] = []
    ratios: list[str] = []
    try:
        for label in sizes:
            size = SIZES[label]
            blocks = Blocks(work, size)
            for op in ops:
                if op == "GET":
                    count = {4 << 10: 1000, 1 << 20: 200, 64 << 20: 12}[size]
                    first, names = blocks.names(count)
                    seed(nginx.url, blocks, first, names, None)
                    seed(ks.url, blocks, first, names, USER_TOKEN)
                    plain = work / f"get-nginx-{size}"
                    plain.write_text("\n".join(names) + "\n")
                    signed = work / f"get-ks-{size}"
                    locators = [sign(f"{n}+{size}") for n in names]
                    signed.write_text("\n".join(locators) + "\n")
                    warm(nginx.url, names, None)
                    warm(ks.url, locators, USER_TOKEN)
                slower: float | None = None  # requests/s of the slower server in this work's last cell
                for conns in concs:
                    cell: dict[str, Result] = {}
                    # wrk counts only requests that complete inside the run: give slow cells (32 x 64 MiB) time to
                    # complete a few rounds, or the figure says more about the window than about the server. The
                    # rate of the cell before tells how long that takes (at most a guess of 200 MB/s for the first).
                    rate = slower if slower else 200e6 / size
                    duration = max(args.duration, 3 * conns / rate)
                    # Unique names for one PUT run: more than either server can write in it, at any concurrency
                    # (nginx alone reached ~9k 4 KiB and ~300 1 MiB PUTs/s on one connection here).
                    budget = int(duration * PUT_RATE_CAP[size]) + 100
                    for name, srv in (("nginx", nginx), ("keepstore", ks)):
                        runs = []
                        for _ in range(args.repeat):
                            if op == "PUT":
                                if size >= LARGE:
                                    # Repeats of a 64 MiB cell, and the other server's run of it, would fill the
                                    # disk (a few files each).
                                    nginx.clear()
                                    ks.clear()
                                first, names_path = blocks.names_file(min(budget, room_for(work, size)))
                                os.sync()
                                r = run_wrk(
                                    srv.url,
                                    "put.lua",
                                    names_path,
                                    size,
                                    conns,
                                    duration,
                                    USER_TOKEN if name == "keepstore" else None,
                                    srv.pids,
                                    blocks.base_path,
                                    first,
                                )
                            else:
                                r = run_wrk(
                                    srv.url,
                                    "get.lua",
                                    signed if name == "keepstore" else plain,
                                    size,
                                    conns,
                                    duration,
                                    USER_TOKEN if name == "keepstore" else None,
                                    srv.pids,
                                )
                            runs.append(r)
                        runs.sort(key=lambda r: r.rps)
                        cell[name] = runs[len(runs) // 2]
                        r = cell[name]
                        row = (
                            f"| {op} {label} | {conns} | {name} | {fmt_tput(size, r)} | {r.p50_ms:.2f} | "
                            f"{r.p99_ms:.2f} | {r.server_cpu:.2f} | {r.wrk_cpu:.2f} | {r.machine_busy:.2f} | "
                            f"{r.machine_steal:.2f} | {r.rss_mib:.0f} |"
                            + (f" {r.errors} errors" if r.errors else "")
                            + (f" {r.wrapped} reused names" if r.wrapped else "")
                        )
                        rows.append(row)
                        print(row, flush=True)
                    slower = min(cell["keepstore"].rps, cell["nginx"].rps)
                    ratio = cell["keepstore"].rps / cell["nginx"].rps
                    ratios.append(f"| {op} {label} | {conns} | {ratio:.2f} |")
                    if op == "PUT" and size >= LARGE:
                        # Only large blocks are deleted during the run (to bound the disk space it needs): a few
                        # hundred files. ext4 without a journal skips recently deleted inodes when it allocates
                        # new ones, so mass deletions of small files would slow every create after them for
                        # minutes (nginx's 4 KiB PUTs fell from ~8k to ~1.5k req/s that way).
                        nginx.clear()
                        ks.clear()
                if op == "PUT" and label in ceilings and size <= SMALL_GROUPED:
                    # The file system's state moves this ceiling by up to half between minutes (docs/benchmarks.md,
                    # "The file system"), and where it is the target, the cells are compared with it: measure it
                    # again right after them, on the disk as they left it.
                    after[label] = durable_write_ceiling(work, size, tag="-after")
    finally:
        ks.stop()
        nginx.stop()
        # The blocks stay in ``work`` until the next run deletes them (before it waits for the file system to
        # settle): a deletion here would slow whatever runs next on this disk, the test suite included.

    ceiling_rows = "\n".join(
        f"| {label} | file by file | {mb:,.0f} MB/s | {files:,.0f}/s | {cpu:,.0f} us |"
        for label, (mb, files, cpu) in ceilings.items()
    )
    ceiling_rows += "".join(
        f"\n| {label} | file by file, right after the {label} PUT cells | {mb:,.0f} MB/s | {files:,.0f}/s "
        f"| {cpu:,.0f} us |"
        for label, (mb, files, cpu) in after.items()
    )
    ceiling_rows += "".join(
        f"\n| {label} | group commit, {GROUP_CEILING_BATCH} files per syncfs pair | {mb:,.0f} MB/s | {files:,.0f}/s "
        f"| {cpu:,.0f} us |"
        for label, (mb, files, cpu) in grouped.items()
    )
    ceiling_rows += "".join(
        f"\n| {label} | file by file, O_DIRECT | {mb:,.0f} MB/s | {files:,.0f}/s | {cpu:,.0f} us |"
        for label, (mb, files, cpu) in direct.items()
    )
    median = f", median of {args.repeat}" if args.repeat > 1 else ""
    body = f"""## keepstore vs nginx{f" ({args.label})" if args.label else ""} (`bench/http_bench.py`)

{machine(args.src)}. wrk {args.duration:.0f} s per cell (longer where few requests would complete){median};
keepstore: one directory volume, fsync on, every GET verified, group commit {args.group_commit},
direct writes {args.direct_writes},
MaxKeepBlobBuffers {args.buffers},
{args.workers or os.cpu_count()} worker processes; nginx: one worker,
WebDAV PUT, no checksum, no fsync. PUTs write unique blocks (4 KiB: wrk; 1 MiB and 64 MiB: bench/putgen.py, see
its docstring); GETs read a fixed stored set (page cache warm: each block read once before the clock starts).

Physical ceilings measured in the same run: md5 {md5_1:,.0f} MB/s on one thread, {md5_2:,.0f} MB/s on two;
durable write (8 threads, unique files; file by file: write + fsync + rename + fsync dir, buffered or, as keepstore
writes blocks above 64 KiB, O_DIRECT; group commit, as keepstore does it for blocks up to 64 KiB: write a batch,
syncfs, rename the batch, syncfs):

| block | how | durable write | files | CPU per file (user + system) |
|---|---|---|---|---|
{ceiling_rows}

{RESULT_HEAD}
{chr(10).join(rows)}

"server CPU" is the server's processes' own; "machine busy" is all of this machine's {os.cpu_count()} CPUs (the server,
the load generator ("wrk CPU": wrk, or bench/putgen.py), and kernel threads such as file-system writeback, which
no process is charged for); "stolen" is time the hypervisor gave to other guests. Where busy + stolen is near the
CPU count, the cell is CPU-bound however little "server CPU" says.

keepstore / nginx (requests per second, same run):

| work | conns | ratio |
|---|---|---|
{chr(10).join(ratios)}
"""
    write_section(f"http-{args.label}" if args.label else "http", body)
    print(body)


if __name__ == "__main__":
    main()

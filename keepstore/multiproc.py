"""Several worker processes serving one port.

One Python process runs one event loop and holds one GIL: for small blocks keepstore is CPU-bound on a single core.
With ``KeepstorePy.Workers`` > 1 (the default is one per CPU, at most 8), a supervisor process binds the listening
socket and forks that many workers, which all accept on it. What must stay correct across them:

* **Memory and concurrency bounds** are split: each worker gets its share of ``MaxKeepBlobBuffers``,
  ``MaxConcurrentRequests`` and ``MaxQueuedRequests`` (so the totals still hold), and there are never more workers
  than buffers or request slots.
* **The pull and trash queues** exist once: worker 0 (the primary) owns them, runs the pull/trash workers, the
  trash sweep and the start-up temp-file sweep. Another worker that receives ``PUT /pull`` or ``PUT /trash``
  validates the list and forwards it to the primary.
* **Metrics and status** are totals: the worker answering ``/metrics`` or ``/status.json`` merges every worker's
  state snapshot (``keepstore.state``), fetched over the workers' internal Unix sockets.
* **Connections** go to the worker with the fewest open: all accept on one socket, each only while it is the
  least loaded (keepstore.accept; the kernel's SO_REUSEPORT hashing left a few keep-alive clients badly spread).
* **Life and death**: workers die with the supervisor (``PR_SET_PDEATHSIG``), so a crash of the whole service is
  a crash of every process; the supervisor restarts a worker that dies on its own; SIGTERM is forwarded and each
  worker drains; the supervisor exits 0 once all are done.
* **Stalls**: each worker's event loop records the time once a second in memory shared with the supervisor
  (:class:`Heartbeats`). One that has not run for ``KeepstorePy.WorkerStallTimeout`` (a deadlock, a blocking call
  that never returns) is asked for its threads' stacks (SIGUSR1, faulthandler, to the log) and killed half a
  second later unless it ran again meanwhile; a new worker takes its place and the others go on serving
  (:class:`StallWatch`). Under systemd's watchdog the supervisor sends WATCHDOG=1 while its workers beat
  (keepstore.sdnotify).

The internal sockets live in a private directory (mode 0700) and accept only local connections from the same user.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import faulthandler
import json
import logging
import mmap
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from . import sdnotify
from .accept import Loads
from .config import Config, ConfigError
from .errors import ServiceUnavailable
from .state import State
from .tls import CHECK_INTERVAL, ServerTLS

log = logging.getLogger("keepstore.workers")

MAX_AUTO_WORKERS = 8
# Seconds past DrainTimeout after which the supervisor SIGKILLs workers that have not stopped.
KILL_AFTER_DRAIN = 10
EXIT_CONFIG = 2
_PR_SET_PDEATHSIG = 1
_SUPERVISED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


class Heartbeats:
    """When each worker's event loop last ran (CLOCK_MONOTONIC seconds, the same in every process), in an
    anonymous shared mapping made before fork; 0: not judged. Each worker writes only its own slot (aligned 8-byte
    stores: never torn); the supervisor sets a slot to the time it starts that worker."""

    INTERVAL = 1.0  # seconds between beats

    def __init__(self, count: int) -> None:
        self._map = mmap.mmap(-1, 8 * count)  # MAP_SHARED | MAP_ANONYMOUS, zeroed
        self._slots = memoryview(self._map).cast("d")

    def beat(self, index: int) -> None:
        self._slots[index] = time.monotonic()

    def last(self, index: int) -> float:
        return float(self._slots[index])


@dataclass(frozen=True)
class WorkerInfo:
    index: int
    count: int
    sockets: tuple[str, ...]  # internal socket of every worker, by index
    loads: Loads | None = None  # open connections of every worker (keepstore.accept), shared with the supervisor
    beats: Heartbeats | None = None  # when each worker's event loop last ran, shared with the supervisor
    tls: ServerTLS | None = None  # the supervisor's TLS key pair as it was at fork (reloaded by the worker)

    @property
    def primary(self) -> bool:
        return self.index == 0

    @property
    def own_socket(self) -> str:
        return self.sockets[self.index]

    @property
    def primary_socket(self) -> str:
        return self.sockets[0]

    @property
    def peers(self) -> list[str]:
        return [s for i, s in enumerate(self.sockets) if i != self.index]


def worker_count(config: Config) -> int:
    """How many worker processes: configured, or one per CPU (at most 8); never more than the resources allow."""
    n = config.workers or min(os.cpu_count() or 1, MAX_AUTO_WORKERS)
    n = min(n, config.max_keep_blob_buffers)
    if config.max_concurrent_requests > 0:
        n = min(n, config.max_concurrent_requests)
    return max(1, n)


def _share(total: int, index: int, count: int) -> int:
    return total // count + (1 if index < total % count else 0)


def worker_config(config: Config, index: int, count: int) -> Config:
    """The config one worker runs with: its share of the buffer pool and of the request limits."""
    return dataclasses.replace(
        config,
        max_keep_blob_buffers=_share(config.max_keep_blob_buffers, index, count),
        max_concurrent_requests=_share(config.max_concurrent_requests, index, count),
        max_queued_requests=_share(config.max_queued_requests, index, count),
    )


# --- supervisor ----------------------------------------------------------------------------------------------------


def supervise(config: Config, count: int) -> int:
    """Bind, fork ``count`` workers, keep them running until SIGTERM/SIGINT, then drain them. Returns the exit code."""
    from .server import bind_socket

    # One listening socket for all workers, bound here and kept open here: connections that arrive while workers
    # (re)start wait in its queue. Who accepts each one is decided by the workers' loads (keepstore.accept).
    # Loaded here, before any worker: a pair that does not load is a config error at start-up. Each worker gets
    # this one at fork and reloads it on SIGHUP; so does the supervisor, so that a worker restarted while the
    # files on disk are broken (a renewal half-written) still starts, with the last pair that loaded.
    server_tls = ServerTLS(config) if config.tls else None
    sock = bind_socket(config)
    loads = Loads(count)
    beats = Heartbeats(count)
    stalls = StallWatch(config.worker_stall_timeout)
    watchdog = sdnotify.watchdog_interval()
    # The watchdog is fed while every worker beats: with stall detection on, a stalled worker is the supervisor's
    # to replace first; with it off, systemd's.
    if watchdog is None:
        watchdog_stale = 0.0
    elif config.worker_stall_timeout:
        watchdog_stale = max(2 * watchdog, config.worker_stall_timeout + 5)
    else:
        watchdog_stale = 2 * watchdog
    watchdog_due = 0.0
    tls_due = time.monotonic() + CHECK_INTERVAL
    rundir = tempfile.mkdtemp(prefix="keepstore-", dir=os.environ.get("RUNTIME_DIRECTORY") or None)
    sockets = tuple(f"{rundir}/worker-{i}.sock" for i in range(count))
    ready_r, ready_w = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISED)
    children: dict[int, int] = {}  # pid -> worker index
    started: dict[int, float] = {}  # worker index -> start time

    supervisor = os.getpid()

    def spawn(index: int) -> None:
        from . import logs

        logs.flush()  # else the child would write the parent's pending lines again
        loads.mark_down(index)  # until the new worker accepts: nobody waits for it
        beats.beat(index)  # judged from now: one that hangs before its event loop first runs is seen too
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ready_r)
                _child_setup(supervisor)
                code = _run_worker(config, WorkerInfo(index, count, sockets, loads, beats, server_tls), sock, ready_w)
            except ConfigError as exc:
                print(f"config error: {exc}", file=sys.stderr, flush=True)
                code = EXIT_CONFIG
            except BaseException:
                log.exception("worker crashed", extra={"fields": {"worker": index}})
            finally:
                from . import logs

                logs.flush()
                os._exit(code)
        children[pid] = index
        started[index] = time.monotonic()

    log.info(f"starting {count} worker processes", extra={"fields": {"workers": count}})
    for i in range(count):
        spawn(i)
    stopping = False
    exit_code = 0
    ready = 0
    fast_failures = 0
    deadline: float | None = None
    try:
        while children:
            # Read on every pass: restarted workers write to it too, and a full pipe would block the next one.
            was_ready = ready >= count
            ready += _count_ready(ready_r)
            if not was_ready:
                if ready >= count:
                    log.info("all workers ready", extra={"fields": {"workers": count}})
                    sdnotify.notify(READY=1, STATUS=f"serving {config.internal_url} with {count} worker processes")
            info = signal.sigtimedwait(_SUPERVISED, 0.2 if ready >= count else 0.01)
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    stopping = True
                    # Stop accepting now: the kernel would otherwise keep queueing connections on our copy of the
                    # listening socket, to be reset once the workers have drained.
                    sock.close()
                    deadline = time.monotonic() + config.drain_timeout + KILL_AFTER_DRAIN
                    log.info("stopping workers", extra={"fields": {"signal": signal.Signals(info.si_signo).name}})
                    sdnotify.notify(**sdnotify.stopping(config.drain_timeout))
                    _signal_all(children, signal.SIGTERM)
                elif info.si_signo == signal.SIGHUP:
                    if server_tls is not None:
                        server_tls.reload()
                    _signal_all(children, signal.SIGHUP)
            for pid, status in _reap():
                stalls.forget(pid)
                index = children.pop(pid, None)
                if index is None:
                    continue
                loads.mark_down(index)  # a dead worker's figure must not keep connections waiting for it
                code = os.waitstatus_to_exitcode(status)
                if stopping:
                    continue
                if code == EXIT_CONFIG and ready < count:
                    # At start-up a config error stops the service (exit 2: systemd does not restart it). Once it
                    # has served, a worker that fails so on a restart (a volume gone, say) is restarted like any
                    # other; if it keeps failing, the supervisor gives up below with 1 and systemd starts it all
                    # afresh, and then a lasting config error is reported with 2.
                    stopping = True
                    deadline = time.monotonic() + config.drain_timeout + KILL_AFTER_DRAIN
                    _signal_all(children, signal.SIGTERM)
                    exit_code = EXIT_CONFIG
                    continue
                lived = time.monotonic() - started[index]
                fast_failures = fast_failures + 1 if lived < 5 else 0
                log.error(
                    "worker exited unexpectedly; restarting",
                    extra={"fields": {"worker": index, "exit": code, "seconds": round(lived, 3)}},
                )
                if fast_failures > 5:
                    log.error("workers keep failing at start-up: giving up")
                    stopping = True
                    exit_code = 1
                    deadline = time.monotonic() + config.drain_timeout + KILL_AFTER_DRAIN
                    _signal_all(children, signal.SIGTERM)
                    continue
                time.sleep(min(1.0, 0.1 * fast_failures))
                spawn(index)
            if not stopping:
                stalls.check(children, beats)
            if watchdog is not None and time.monotonic() >= watchdog_due:
                if stopping or stalls.serving(children, beats, watchdog_stale):
                    sdnotify.notify(WATCHDOG=1)
                watchdog_due = time.monotonic() + watchdog
            if server_tls is not None and time.monotonic() >= tls_due:
                server_tls.reload_if_changed()  # what a worker restarted later starts with
                tls_due = time.monotonic() + CHECK_INTERVAL
            if deadline is not None and time.monotonic() > deadline:
                log.error("workers did not stop in time: killing them")
                _signal_all(children, signal.SIGKILL)
                deadline = None
        return exit_code
    finally:
        os.close(ready_r)
        os.close(ready_w)
        sock.close()
        shutil.rmtree(rundir, ignore_errors=True)


class StallWatch:
    """The supervisor's judgement of worker event loops, from their heartbeats (one pass per loop of the supervisor).

    A worker whose last beat is older than ``timeout`` is asked for its threads' stacks (SIGUSR1: faulthandler
    writes them to the log) and, ``KILL_DELAY`` later, killed (the reaper restarts it), unless it beat again
    meanwhile. Nobody is judged right after the supervisor itself has not run for a while (the whole service was
    stopped and continued, frozen, or its VM paused): every beat is old then, and the workers need a moment to
    beat again.
    """

    KILL_DELAY = 0.5  # seconds between the stack dump and the kill
    SELF_GAP = 2.0  # seconds without a pass of its own after which the supervisor gives the workers time

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._stalled: dict[int, float] = {}  # pid -> when it was found stalled
        self._last_pass = 0.0
        self._grace_until = 0.0

    def forget(self, pid: int) -> None:
        self._stalled.pop(pid, None)

    def check(self, children: dict[int, int], beats: Heartbeats) -> None:
        now = time.monotonic()
        if self._last_pass and now - self._last_pass > self.SELF_GAP:
            log.warning(
                "supervisor did not run for a while (stopped, frozen or paused): judging no worker for a moment",
                extra={"fields": {"seconds": round(now - self._last_pass, 1)}},
            )
            self._grace_until = now + 3 * Heartbeats.INTERVAL
            self._stalled.clear()
        self._last_pass = now
        if not self.timeout or now < self._grace_until:
            return
        for pid, index in children.items():
            last = beats.last(index)
            found = self._stalled.get(pid)
            if found is not None:
                if last > found:
                    log.warning("stalled worker recovered: not killed", extra={"fields": {"worker": index, "pid": pid}})
                    del self._stalled[pid]
                elif now - found >= self.KILL_DELAY:
                    _signal_all({pid: index}, signal.SIGKILL)
                continue
            if last and now - last > self.timeout:
                log.error(
                    "worker stalled: its event loop has not run for too long; killing it",
                    extra={"fields": {"worker": index, "pid": pid, "seconds": round(now - last, 1)}},
                )
                self._stalled[pid] = now
                _signal_all({pid: index}, signal.SIGUSR1)

    def serving(self, children: dict[int, int], beats: Heartbeats, within: float) -> bool:
        """Whether every worker has beaten in the last ``within`` seconds (what the systemd watchdog is fed on)."""
        now = time.monotonic()
        return all(not (last := beats.last(i)) or now - last <= within for i in children.values())


def _count_ready(fd: int) -> int:
    os.set_blocking(fd, False)
    try:
        return len(os.read(fd, 64))
    except BlockingIOError:
        return 0


def _reap() -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, status))


def _signal_all(children: dict[int, int], sig: int) -> None:
    for pid in children:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _child_setup(supervisor: int) -> None:
    """In a freshly forked worker: die with the supervisor; take signals normally again."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor:  # the supervisor died between fork and prctl (it may itself be PID 1)
        os._exit(1)
    os.environ.pop("NOTIFY_SOCKET", None)  # the supervisor speaks for the service (keepstore.sdnotify)
    # A stalled worker's threads' stacks, on the supervisor's SIGUSR1 (written without the GIL, so even a loop
    # stuck holding it gets them out): what it was doing is the first thing its log needs.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    for sig in _SUPERVISED:
        # SIGHUP ignored until the worker's event loop takes it over (keepstore.server.serve): a reload forwarded
        # to a worker that is still starting must not kill it.
        signal.signal(sig, signal.SIG_IGN if sig == signal.SIGHUP else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISED)
    from . import logs

    logs.after_fork()


def _run_worker(config: Config, worker: WorkerInfo, sock: socket.socket, ready_w: int) -> int:
    from .server import serve

    def ready() -> None:
        os.write(ready_w, b"r")

    asyncio.run(serve(worker_config(config, worker.index, worker.count), sock=sock, worker=worker, on_ready=ready))
    return 0


# --- internal channel between workers ------------------------------------------------------------------------------


def internal_app(get_state: Any, accept_list: Any) -> web.Application:
    """The primary's and every worker's internal endpoints (Unix socket only)."""

    async def state(request: web.Request) -> web.Response:
        return web.json_response(get_state())

    async def put_list(request: web.Request) -> web.Response:
        body = await request.read()
        await accept_list(request.match_info["kind"], body)
        return web.Response(status=200)

    app = web.Application(client_max_size=256 << 20)
    app.router.add_get("/state", state)
    app.router.add_put("/{kind:pull|trash}", put_list)
    return app


async def gather_states(peers: list[str]) -> list[State]:
    """Every peer's state snapshot; a peer that does not answer within 2 s is left out (and logged)."""

    async def one(path: str) -> State | None:
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=path), timeout=aiohttp.ClientTimeout(total=2)
                ) as s,
                s.get("http://worker/state") as r,
            ):
                data: State = json.loads(await r.read())
                return data
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            log.warning("worker state unavailable", extra={"fields": {"socket": path, "error": str(exc)}})
            return None

    results = await asyncio.gather(*(one(p) for p in peers))
    return [r for r in results if r is not None]


async def forward_list(primary_socket: str, kind: str, body: bytes, patience: float = 10.0) -> None:
    """Hand a validated pull or trash list to the primary worker, which owns the queues.

    The primary may be starting (or restarting): keep trying for ``patience`` seconds, then give up with
    ServiceUnavailable (503, so that the data manager sends the list again later).
    """
    deadline = time.monotonic() + patience
    delay = 0.05
    while True:
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=primary_socket), timeout=aiohttp.ClientTimeout(total=30)
                ) as s,
                s.put(f"http://worker/{kind}", data=body) as r,
            ):
                if r.status == 200:
                    return
                raise ServiceUnavailable(f"primary worker refused the {kind} list: {r.status}")
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionError) as exc:
            if time.monotonic() + delay > deadline:
                raise ServiceUnavailable(f"{kind} queue unavailable: primary worker not responding") from exc
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

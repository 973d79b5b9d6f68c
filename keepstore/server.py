"""Running the HTTP server: listen, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable

from aiohttp import web

from . import hashing, logs, sdnotify
from .accept import BalancedSite, Loads
from .aio import repeat
from .config import Config
from .http.app import KeepHTTP
from .http.protocol import KeepServer
from .multiproc import WorkerInfo, internal_app
from .service import Service
from .state import snapshot
from .tls import CHECK_INTERVAL, ServerTLS

log = logging.getLogger("keepstore")


def bind_socket(config: Config) -> socket.socket:
    """A listening socket for the configured address."""
    try:
        infos = socket.getaddrinfo(config.listen_host, config.listen_port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        address = (infos[0][4][0], config.listen_port)
        return socket.create_server(address, family=family, backlog=1024)
    except OSError as exc:
        raise SystemExit(f"cannot listen on {config.listen_host}:{config.listen_port}: {exc.strerror or exc}") from None


async def serve(
    config: Config,
    on_ready: Callable[[], object] | None = None,
    sock: socket.socket | None = None,
    worker: WorkerInfo | None = None,
    on_drain: Callable[[], object] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, let requests finish (bounded), stop, return.

    ``on_ready`` is called once connections are accepted, ``on_drain`` when the drain starts. ``sock`` and
    ``worker`` are given when this process is one of several workers (keepstore.multiproc).
    """
    # Threads that finish a read, a hash or an fsync must win the GIL back from the event loop before their result
    # is seen; the default 5 ms switch interval makes them wait up to that long. 0.5 ms measured 5-25% faster on
    # verified GETs of 1-64 MiB (bench/http_bench.py).
    sys.setswitchinterval(0.0005)
    hashing.configure(processes=worker.count if worker is not None else 1)
    # Signal handlers before the socket is bound: once it is, a client (or systemd) may connect and signal at once,
    # and a SIGHUP then must not find the default action (terminate) in place.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (systemctl reload) must not kill the server. It reloads the TLS key pair (a renewed certificate);
    # there is nothing else to reload (logs go to stderr). Installed before the pair is loaded: a SIGHUP that
    # comes meanwhile finds nothing to reload, and the load that follows reads the files as they are then.
    server_tls: ServerTLS | None = None

    def hup() -> None:
        if server_tls is not None:
            server_tls.reload()
        else:
            log.info("SIGHUP received: nothing to reload")

    loop.add_signal_handler(signal.SIGHUP, hup)
    if config.tls:
        # A worker takes the supervisor's (the pair it last loaded well: a worker restarted while the files are
        # broken still starts); a single process loads its own, before anything listens: a pair that does not
        # load is a config error (exit 2), not a running server that fails every handshake.
        server_tls = worker.tls if worker is not None and worker.tls is not None else ServerTLS(config)
    try:
        await _serve(config, stop, on_ready, on_drain, sock, worker, server_tls)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _serve(
    config: Config,
    stop: asyncio.Event,
    on_ready: Callable[[], object] | None,
    on_drain: Callable[[], object] | None,
    sock: socket.socket | None,
    worker: WorkerInfo | None,
    server_tls: ServerTLS | None,
) -> None:
    # Liveness, from the event loop itself (a stalled loop stops it), from the start: the supervisor restarts a
    # worker that stalls while it starts (a volume that hangs) as well as later (keepstore.multiproc).
    stop_beating: Callable[[], None] | None = None
    if worker is not None and worker.beats is not None:
        beats, index = worker.beats, worker.index
        stop_beating = repeat(beats.INTERVAL, lambda: beats.beat(index))
    if sock is None:
        sock = bind_socket(config)
    service = Service.build(config)
    if worker is not None:
        service.primary = worker.primary
        service.peers = worker.peers
        service.worker = worker
    await service.start()
    http = KeepHTTP(service)
    service.http = http
    server = KeepServer(http.handle, fast=http.serve_fast, handler_cancellation=True, auto_decompress=False)
    runner = web.ServerRunner(server, shutdown_timeout=config.drain_timeout, handle_signals=False)
    await runner.setup()
    internal: web.AppRunner | None = None
    if worker is not None:
        # The internal socket first: a worker that accepts a pull list may need to reach this one at once.
        internal = web.AppRunner(internal_app(lambda: snapshot(service), service.accept_list))
        await internal.setup()
        await web.UnixSite(internal, worker.own_socket).start()
    site: web.BaseSite
    ssl_context = server_tls.context if server_tls is not None else None
    if worker is not None and worker.loads is not None:
        site = BalancedSite(runner, sock, worker.loads, worker.index, ssl_context)  # one socket for all workers
    elif ssl_context is not None:
        site = BalancedSite(runner, sock, Loads(1), 0, ssl_context)  # (for its TLS handshake timeout)
    else:
        site = web.SockSite(runner, sock)
    await site.start()
    log.info(
        "listening",
        extra={
            "fields": {
                "URL": config.internal_url,
                "Listen": f"{config.listen_host}:{config.listen_port}",
                "Worker": worker.index if worker else 0,
            }
        },
    )
    if on_ready is not None:
        on_ready()
    if worker is None and (interval := sdnotify.watchdog_interval()) is not None:
        # One process: its event loop feeds systemd's watchdog (WatchdogSec) itself; a stalled loop stops it.
        stop_beating = repeat(interval, lambda: sdnotify.notify(WATCHDOG=1))
    # A renewed certificate is taken up within the hour even without a SIGHUP (as Arvados does).
    stop_looking = repeat(CHECK_INTERVAL, server_tls.reload_if_changed) if server_tls is not None else None

    try:
        await stop.wait()
        log.info("shutting down: draining requests", extra={"fields": {"timeout": config.drain_timeout}})
        if on_drain is not None:
            on_drain()
    finally:
        # Stop accepting first: the pull and trash workers may take a moment to stop, and a draining server takes
        # no new connections meanwhile (with several workers, this one counts as down from now on).
        await site.stop()
        await service.stop_workers()
        await runner.cleanup()
        await http.close()
        if internal is not None:
            await internal.cleanup()
        await service.close()
        for stop_repeating in (stop_beating, stop_looking):
            if stop_repeating is not None:
                stop_repeating()
        log.info("stopped")
        logs.flush()

"""Running the HTTP server: listen, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable

from aiohttp import web

from . import hashing, logs, sdnotify, tls
from .accept import BalancedSite
from .aio import repeat
from .config import Config
from .http.app import KeepHTTP
from .http.protocol import KeepServer
from .multiproc import WorkerInfo, internal_app
from .service import Service
from .state import snapshot

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
    # Before anything listens: a key pair that does not load is a config error (exit 2), not a running server
    # that fails every handshake.
    ssl_context = tls.server_context(config) if config.tls else None
    # SIGHUP (systemctl reload) must not kill the server. It reloads the TLS key pair (a renewed certificate);
    # there is nothing else to reload (logs go to stderr).
    if ssl_context is not None:
        loop.add_signal_handler(signal.SIGHUP, tls.reload, ssl_context, config)
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP received: nothing to reload"))
    try:
        await _serve(config, stop, on_ready, on_drain, sock, worker, ssl_context)
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
    ssl_context: ssl.SSLContext | None,
) -> None:
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
    if worker is not None and worker.loads is not None:
        site = BalancedSite(runner, sock, worker.loads, worker.index, ssl_context)  # one socket for all workers
    else:
        site = web.SockSite(runner, sock, ssl_context=ssl_context)
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
    # Liveness, from the event loop itself (a stalled loop stops it): to the supervisor, which restarts a stalled
    # worker (keepstore.multiproc), or with one process to systemd's watchdog, if WatchdogSec is set.
    stop_beating: Callable[[], None] | None = None
    if worker is not None and worker.beats is not None:
        beats, index = worker.beats, worker.index
        stop_beating = repeat(beats.INTERVAL, lambda: beats.beat(index))
    elif worker is None and (interval := sdnotify.watchdog_interval()) is not None:
        stop_beating = repeat(interval, lambda: sdnotify.notify(WATCHDOG=1))

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
        if stop_beating is not None:
            stop_beating()
        log.info("stopped")
        logs.flush()

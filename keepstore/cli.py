"""Command line: ``keepstore [--config PATH]`` serves; ``keepstore check-config`` validates a config."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__, logs, sdnotify
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_file
from .volumes import check_volume_specs

EXIT_CONFIG = 2

DESCRIPTION = """\
keepstore-py: a Keep block server that speaks the Arvados keepstore protocol (3.2.1).

Clients PUT blocks (at most 64 MiB) to /<md5> and GET them back by signed locator; every block is md5-verified on
write and on read, and written durably (temp file, fsync, rename). A data manager such as keep-balance drives
replication and garbage collection through /pull and /trash.

Configuration is an Arvados cluster config file (the same YAML the Go keepstore reads). Without --config,
/etc/arvados/config.yml is used if it exists; otherwise keepstore runs an embedded default: one directory volume
under ./keep-data, listening on 127.0.0.1:25107, with generated tokens printed at start-up.
"""

EPILOG = """\
commands:
  keepstore [serve] [options]           run the server (the default)
  keepstore check-config [--config P]   validate a config file and print the effective settings

exit status: 0 after a clean shutdown (SIGTERM drains in-flight requests first), 2 on a configuration error
(the message names the key, e.g. "config error: Clusters.zzzzz.Volumes.<uuid>.DriverParameters.Root: required"),
1 when worker processes keep failing.

signals: SIGTERM drains and stops; SIGHUP reloads the TLS key pair; SIGUSR1 writes every thread's stack to the log.
Under systemd (systemd/keepstore.service, Type=notify) keepstore sends READY=1 once every worker serves,
STOPPING=1 when a SIGTERM starts the drain, and WATCHDOG=1 while its event loops run (WatchdogSec).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="keepstore", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", nargs="?", default="serve", choices=["serve", "check-config"], help=argparse.SUPPRESS)
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"Arvados cluster config file (default: {DEFAULT_CONFIG_PATH} if it exists, else the embedded default)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default="keep-data",
        help="embedded default only: where blocks and generated secrets live (default: ./keep-data)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default="127.0.0.1:25107",
        help="embedded default only: address to listen on (default: 127.0.0.1:25107)",
    )
    p.add_argument("--version", action="version", version=f"keepstore-py {__version__}")
    return p


def load(path: str) -> Config:
    """Load and fully validate a config file (driver parameters included)."""
    config = load_file(path)
    check_volume_specs(config)
    if config.tls:
        from .tls import check

        check(config)  # the key pair loads (else a ConfigError naming the key)
    return config


_SECRETS = ("system_root_token", "management_token", "blob_signing_key")


def describe(config: Config) -> str:
    """The effective settings, one per line, with tokens and keys masked."""
    lines = []
    for name in config.__dataclass_fields__:
        if name in ("volumes", "warnings", "source", "storage_classes"):
            continue
        value = getattr(config, name)
        if name in _SECRETS:
            value = f"(set, {len(value)} characters)" if value else "(empty)"
        lines.append(f"  {name}: {value}")
    for sc in config.storage_classes.values():
        lines.append(f"  storage class {sc.name}: priority {sc.priority}, default {sc.default}")
    for v in config.volumes:
        lines.append(
            f"  volume {v.uuid}: driver {v.driver}, allow_write {v.allow_write}, allow_trash {v.allow_trash}, "
            f"replication {v.replication}, classes {','.join(v.storage_classes)}, "
            f"parameters {_masked_parameters(v.parameters)}"
        )
    return "\n".join(lines)


def _masked_parameters(params: object) -> dict[str, object]:
    if not isinstance(params, dict):
        return {}
    return {k: ("(set)" if ("Secret" in k or "Key" in k) and v else v) for k, v in params.items()}


def main(argv: Sequence[str] | None = None) -> int:
    # Until the server takes SIGHUP over (a reload), it must not kill the process: systemctl reload may come early.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGUSR1: every thread's stack to stderr (the log), from any keepstore process (the supervisor sends it to a
    # stalled worker; `systemctl kill -s USR1 keepstore` reaches them all), instead of its default: terminate.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = _parser().parse_args(argv)
    path = args.config or (DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None)
    banner = ""
    try:
        if path is not None:
            config = load(path)
        else:
            from .embedded import banner as make_banner
            from .embedded import embedded_config

            config, secrets = embedded_config(args.data_dir, args.listen)
            banner = make_banner(config, secrets, os.path.abspath(args.data_dir))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    if args.command == "check-config":
        print(f"config OK: {config.source}")
        print(describe(config))
        for warning in config.warnings:
            print(f"warning: {warning}")
        return 0

    logs.setup(config.log_format, config.log_level, config.cluster_id)
    log = logging.getLogger("keepstore")
    for warning in config.warnings:
        log.warning(warning)
    if banner:
        print(banner, file=sys.stderr, flush=True)

    from .multiproc import supervise, worker_count
    from .server import serve

    try:
        workers = worker_count(config)
        if workers > 1:
            return supervise(config, workers)
        asyncio.run(
            serve(
                config,
                on_ready=lambda: sdnotify.notify(READY=1, STATUS=f"serving {config.internal_url}"),
                on_drain=lambda: sdnotify.notify(**sdnotify.stopping(config.drain_timeout)),
            )
        )
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return 0

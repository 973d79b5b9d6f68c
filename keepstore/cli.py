"""Command line: ``keepstore [--config PATH]`` serves; ``keepstore check-config`` validates a config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__, logs
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
(the message names the key, e.g. "config error: Clusters.zzzzz.Volumes.<uuid>.DriverParameters.Root: required").
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
    return config


def main(argv: Sequence[str] | None = None) -> int:
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
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return 0

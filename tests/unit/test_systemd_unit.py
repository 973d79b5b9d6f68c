"""systemd/keepstore.service: what the unit promises the daemon, checked against the daemon's own constants."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from keepstore import cli, multiproc, sdnotify
from keepstore.config import Config

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "keepstore.service"


def unit() -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    p.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    p.read_string(UNIT.read_text())
    return p


def seconds(value: str) -> float:
    return float(value[:-1]) if value.endswith("s") else float(value)


def test_type_notify_from_the_main_process() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    # keepstore.sdnotify sends from the main process only (the supervisor); workers do not inherit the socket.
    assert service.get("NotifyAccess", "main") == "main"


def test_exec_start_runs_the_cli_on_the_asserted_config_file() -> None:
    u = unit()
    argv = shlex.split(u["Service"]["ExecStart"])
    assert Path(argv[0]).name == "keepstore"
    args = cli._parser().parse_args(argv[1:])
    assert args.command == "serve"
    # The config file is named, and asserted to exist: the embedded default never runs as a service.
    assert args.config == u["Unit"]["AssertPathExists"] == "/etc/arvados/config.yml"


def test_a_config_error_is_not_restarted() -> None:
    service = unit()["Service"]
    assert service["Restart"] == "always"
    assert str(cli.EXIT_CONFIG) in service["RestartPreventExitStatus"].split()
    assert multiproc.EXIT_CONFIG == cli.EXIT_CONFIG


def test_stop_timeout_covers_the_default_drain() -> None:
    service = unit()["Service"]
    default_drain = Config.__dataclass_fields__["drain_timeout"].default
    assert isinstance(default_drain, float)
    # systemd must not SIGKILL before the supervisor has had its own chance (drain, then its kill).
    assert seconds(service["TimeoutStopSec"]) >= default_drain + multiproc.KILL_AFTER_DRAIN
    # and the stop timeout keepstore asks for when draining covers the supervisor's kill too
    extend = sdnotify.stopping(default_drain)["EXTEND_TIMEOUT_USEC"]
    assert isinstance(extend, int)
    assert extend / 1e6 > default_drain + multiproc.KILL_AFTER_DRAIN
    # SIGTERM to the supervisor alone: it forwards it to the workers and waits for their drain.
    assert service["KillMode"] == "mixed"


def test_runtime_directory_for_the_internal_sockets() -> None:
    service = unit()["Service"]
    assert service["RuntimeDirectory"] == "keepstore"
    assert service["RuntimeDirectoryMode"] == "0700"


def test_reload_is_sighup_to_the_supervisor() -> None:
    # keepstore.server reloads the TLS key pair on SIGHUP; keepstore.multiproc forwards it to every worker.
    assert shlex.split(unit()["Service"]["ExecReload"])[1:] == ["-HUP", "$MAINPID"]


def test_watchdog_leaves_a_stalled_worker_to_the_supervisor() -> None:
    # With several workers the supervisor replaces a stalled one after WorkerStallTimeout, and feeds the watchdog
    # until a worker is that stale and a little more: systemd restarting the whole service for one stalled worker
    # must not come first.
    watchdog = seconds(unit()["Service"]["WatchdogSec"])
    stall = Config.__dataclass_fields__["worker_stall_timeout"].default
    assert isinstance(stall, float)
    assert watchdog >= stall


def test_no_private_tmp() -> None:
    # A Directory volume under /tmp or /var/tmp would get a private copy, deleted whenever the service stops.
    assert unit()["Service"].get("PrivateTmp", "no") == "no"

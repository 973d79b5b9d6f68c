"""Telling systemd how the service is doing: sd_notify(3) without libsystemd.

Under ``Type=notify`` (systemd/keepstore.service) systemd counts the service as started only once it receives
``READY=1``, and shows the last ``STATUS=`` line in ``systemctl status``. keepstore sends READY=1 once it accepts
connections (with several worker processes: once every worker does), and STOPPING=1 when a SIGTERM starts the
drain. Under ``WatchdogSec=`` it sends WATCHDOG=1 at half that period: from the event loop itself with one process,
from the supervisor with several (which restarts a worker whose event loop stalls itself: keepstore.multiproc).
Without ``$NOTIFY_SOCKET`` (not started by systemd) every call does nothing.

Only the main process notifies: under the default ``NotifyAccess=main`` systemd ignores what other processes send,
and a worker that sent READY=1 for itself would say the service was ready before the others are.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("keepstore")

_warned = False


def notify(**fields: str | int) -> bool:
    """Send ``KEY=value`` lines (``notify(READY=1, STATUS="serving")``) to systemd; whether they were sent.

    Best effort: a failure is logged once and never raised (a service manager that went away must not stop the
    server, nor its drain).
    """
    global _warned
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not fields:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    elif not address.startswith("/"):
        # vsock (vsock:CID:PORT) and other forms: not for a service on the host itself
        _warn_once(f"NOTIFY_SOCKET={address!r} is not a Unix socket path: not notifying systemd")
        return False
    payload = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(payload, address)
    except OSError as exc:
        _warn_once(f"cannot notify systemd through {os.environ['NOTIFY_SOCKET']}: {exc.strerror or exc}")
        return False
    return True


# Beyond DrainTimeout: what the supervisor waits before it kills the workers (multiproc.KILL_AFTER_DRAIN, 10 s),
# and time for it to exit after that.
STOP_SLACK = 15.0


def stopping(drain_timeout: float) -> dict[str, str | int]:
    """The fields that announce a drain: STOPPING=1, and a stop timeout that covers it.

    EXTEND_TIMEOUT_USEC makes systemd wait at least that long from now before it kills the service, so a
    DrainTimeout longer than the unit's TimeoutStopSec does not get the drain SIGKILLed half-way.
    """
    return {
        "STOPPING": 1,
        "STATUS": f"draining (at most {drain_timeout:g} s)",
        "EXTEND_TIMEOUT_USEC": int((drain_timeout + STOP_SLACK) * 1_000_000),
    }


def watchdog_interval() -> float | None:
    """How often to send WATCHDOG=1 (half systemd's WatchdogSec), or None when the watchdog is not on for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def _one_line(value: str | int) -> str:
    return str(value).replace("\n", " ")


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(message)

"""keepstore.sdnotify: the datagrams systemd's sd_notify protocol expects, and what it does without systemd."""

from __future__ import annotations

import os
import socket

import pytest

from keepstore import sdnotify


@pytest.fixture(autouse=True)
def fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdnotify, "_warned", False)


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"keepstore-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify(READY=1, STATUS="two\nlines")
        assert s.recv(4096) == b"READY=1\nSTATUS=two lines"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify(READY=1) is False


def test_unusable_socket_warns_once_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", f"{tmp_path}/nobody")
    assert sdnotify.notify(READY=1) is False
    assert sdnotify.notify(STOPPING=1) is False
    assert [r.getMessage() for r in caplog.records].count(
        f"cannot notify systemd through {tmp_path}/nobody: No such file or directory"
    ) == 1


def test_vsock_address_is_not_used(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify(READY=1) is False
    assert "is not a Unix socket path" in caplog.text


def test_stopping_extends_the_stop_timeout_past_the_drain() -> None:
    assert sdnotify.stopping(30.0) == {
        "STOPPING": 1,
        "STATUS": "draining (at most 30 s)",
        "EXTEND_TIMEOUT_USEC": 45_000_000,
    }


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [("", "", None), ("0", "", None), ("30000000", "", 15.0), ("30000000", "self", 15.0), ("30000000", "1", None)],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str, pid: str, expected: float | None) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    # WATCHDOG_PID names the process systemd watches: another one's watchdog is not ours to feed.
    assert sdnotify.watchdog_interval() == expected

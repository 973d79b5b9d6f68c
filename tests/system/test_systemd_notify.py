"""keepstore under systemd's Type=notify (keepstore.sdnotify): READY=1 once it serves, STOPPING=1 when it drains.

A real keepstore process is started with $NOTIFY_SOCKET pointing at a datagram socket this test reads, the way
systemd starts it from systemd/keepstore.service.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from keeptest import USER_TOKEN, KeepServer, ServerFactory, md5, process_tree

DRAIN = 7  # s: KeepstorePy.DrainTimeout in these tests
SLACK = 15  # s: what keepstore.sdnotify.stopping adds to it


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify.sock"))
    s.settimeout(30)
    yield s
    s.close()


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def start(server_factory: ServerFactory, sock: socket.socket, workers: int) -> KeepServer:
    srv = server_factory(
        volumes=1,
        start=False,
        env={"NOTIFY_SOCKET": sock.getsockname()},
        extra={"KeepstorePy": {"Workers": workers, "DrainTimeout": f"{DRAIN}s"}},
    )
    srv.start(wait=False)
    return srv


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_once_serving_and_stopping_at_drain(
    server_factory: ServerFactory, notify_socket: socket.socket, workers: int
) -> None:
    srv = start(server_factory, notify_socket, workers)
    ready = fields(notify_socket.recv(4096))
    assert ready["READY"] == "1"
    # Ready means serving, at once and by every worker: each of `workers` connections held open at the same time
    # is spread over the workers (keepstore.accept), and each gets its PUT answered.
    conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(workers)]
    for i, conn in enumerate(conns):
        data = f"ready {i}".encode()
        conn.sendall(
            f"PUT /{md5(data)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {USER_TOKEN}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
    for conn in conns:
        conn.close()
    assert len(process_tree(srv.pid)) == (1 if workers == 1 else 1 + workers)
    expected_status = f"serving {srv.url}" + (f" with {workers} worker processes" if workers > 1 else "")
    assert ready["STATUS"] == expected_status

    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    stopping = fields(notify_socket.recv(4096))
    assert stopping["STOPPING"] == "1"
    assert stopping["EXTEND_TIMEOUT_USEC"] == str((DRAIN + SLACK) * 1_000_000)
    assert stopping["STATUS"] == f"draining (at most {DRAIN} s)"
    assert srv.stop() == 0
    # Only the main process spoke (workers do not inherit $NOTIFY_SOCKET): nothing else arrived.
    notify_socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)


def test_no_ready_on_a_config_error(
    server_factory: ServerFactory, notify_socket: socket.socket, tmp_path: Path
) -> None:
    srv = server_factory(volumes=1, start=False, env={"NOTIFY_SOCKET": notify_socket.getsockname()})
    srv.config["Clusters"]["zzzzz"]["API"]["MaxKeepBlobBuffers"] = 0
    srv.start(wait=False)
    assert srv.proc is not None
    assert srv.proc.wait(30) == 2
    notify_socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)


def test_a_notify_socket_that_is_gone_does_not_stop_the_server(server_factory: ServerFactory, tmp_path: Path) -> None:
    srv = server_factory(volumes=1, start=False, env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    srv.start()
    data = b"served without systemd"
    assert srv.put(data).status == 200
    assert any("cannot notify systemd" in line.get("msg", "") for line in srv.log_lines()), srv.log_text()
    assert srv.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_watchdog_pings_at_half_the_period(
    server_factory: ServerFactory, notify_socket: socket.socket, workers: int
) -> None:
    srv = server_factory(
        volumes=1,
        start=False,
        env={"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "400000"},
        extra={"KeepstorePy": {"Workers": workers}},
    )
    srv.start(wait=False)
    received: list[dict[str, str]] = []
    while not any(f.get("READY") == "1" for f in received):
        received.append(fields(notify_socket.recv(4096)))
    notify_socket.settimeout(0.5)  # a ping is due every 0.2 s
    pings = 0
    for _ in range(5):
        if fields(notify_socket.recv(4096)).get("WATCHDOG") == "1":
            pings += 1
    assert pings == 5
    assert srv.stop() == 0


def test_watchdog_goes_hungry_while_the_workers_are_stalled(
    server_factory: ServerFactory, notify_socket: socket.socket
) -> None:
    # With stall detection off nothing else replaces a stalled worker: systemd's watchdog must notice.
    srv = server_factory(
        volumes=1,
        start=False,
        env={"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "1000000"},
        extra={"KeepstorePy": {"Workers": 2, "WorkerStallTimeout": "0s"}},
    )
    srv.start(wait=False)
    while fields(notify_socket.recv(4096)).get("READY") != "1":
        pass
    workers = process_tree(srv.pid)[1:]
    notify_socket.settimeout(1.0)  # pings are due every 0.5 s
    assert fields(notify_socket.recv(4096)) == {"WATCHDOG": "1"}
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2.5)  # their beats are more than 1 s (the watchdog period) old by now
        while True:  # what was sent before that
            try:
                notify_socket.settimeout(0.01)
                notify_socket.recv(4096)
            except TimeoutError:
                break
        notify_socket.settimeout(1.5)
        with pytest.raises(TimeoutError):
            notify_socket.recv(4096)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    notify_socket.settimeout(3)
    assert fields(notify_socket.recv(4096)) == {"WATCHDOG": "1"}  # fed again once they run
    assert srv.stop() == 0

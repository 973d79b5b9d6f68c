"""keepstore serving https (keepstore.tls): real processes, real TLS handshakes, a test CA made by trustme.

An ``https://`` InternalURL makes keepstore serve TLS with the key pair of ``TLS.Certificate`` / ``TLS.Key``
(file:// URLs), reloaded on SIGHUP; pull workers fetch from https peers, trusting the system's CAs (here
$SSL_CERT_FILE) unless ``TLS.Insecure``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from keeptest import (
    MGMT_TOKEN,
    ROOT_TOKEN,
    USER_TOKEN,
    KeepServer,
    ServerFactory,
    md5,
    process_tree,
    sign,
    stored_files,
    wait_for,
)


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def issue(self, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> int:
        """Write a new server certificate (and key) for 127.0.0.1 over the files; its serial number."""
        leaf = self.ca.issue_cert("127.0.0.1", key_type=key_type)
        leaf.private_key_pem.write_to_path(str(self.key_file))
        leaf.cert_chain_pems[0].write_to_path(str(self.cert_file))
        return _serial(leaf.cert_chain_pems[0].bytes())

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx


def _serial(pem: bytes) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).serial_number


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    p = Pki(ca, tmp_path / "ca.pem", tmp_path / "tls.crt", tmp_path / "tls.key")
    ca.cert_pem.write_to_path(str(p.ca_file))
    p.issue(trustme.KeyType.RSA)
    return p


def tls_server(
    server_factory: ServerFactory,
    pki: Pki,
    name: str = "keepstore",
    workers: int = 1,
    env: dict[str, str] | None = None,
    insecure: bool | None = None,
    start: bool = True,
) -> KeepServer:
    srv = server_factory(volumes=1, name=name, start=False, env=env, extra={"KeepstorePy": {"Workers": workers}})
    cluster = srv.config["Clusters"]["zzzzz"]
    cluster["Services"]["Keepstore"]["InternalURLs"] = {f"https://127.0.0.1:{srv.port}": {}}
    cluster["TLS"] = {"Certificate": f"file://{pki.cert_file}", "Key": f"file://{pki.key_file}"}
    if insecure is not None:
        cluster["TLS"]["Insecure"] = insecure
    if start:
        srv.start()
    return srv


def https(
    srv: KeepServer,
    pki: Pki,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = USER_TOKEN,
) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=pki.client_context(), timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def served_serial(srv: KeepServer, pki: Pki, ctx: ssl.SSLContext | None = None) -> int:
    with (
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw,
        (ctx or pki.client_context()).wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.parametrize("workers", [1, 2])
def test_put_get_head_touch_over_tls(server_factory: ServerFactory, pki: Pki, workers: int) -> None:
    srv = tls_server(server_factory, pki, workers=workers)
    small, large, streamed = b"tls small block", os.urandom(1 << 20), os.urandom(9 << 20)
    for data in (small, large, streamed):  # the fast path, a buffered body, a body streamed to disk
        status, body = https(srv, pki, "PUT", f"/{md5(data)}", data)
        assert status == 200, body
        locator = body.decode().strip()
        assert locator.startswith(f"{md5(data)}+{len(data)}+A")
        # GET: a small block on the fast path, larger ones sent from the request's buffer (no sendfile(2) into TLS)
        assert https(srv, pki, "GET", f"/{locator}") == (200, data)
        assert https(srv, pki, "HEAD", f"/{locator}")[0] == 200
        assert https(srv, pki, "TOUCH", f"/{md5(data)}+{len(data)}", token=ROOT_TOKEN)[0] == 200


def test_plain_http_to_the_tls_port_gets_no_answer_and_stores_nothing(server_factory: ServerFactory, pki: Pki) -> None:
    srv = tls_server(server_factory, pki)
    data = b"sent in the clear"
    request = (
        f"PUT /{md5(data)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {USER_TOKEN}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(request)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    assert not reply.startswith(b"HTTP/")
    assert stored_files(srv.volume_root(0)) == {}
    # and the server still serves TLS
    assert https(srv, pki, "PUT", f"/{md5(data)}", data)[0] == 200


def rsa_only(pki: Pki) -> ssl.SSLContext:
    """A client that takes RSA certificates only (TLS 1.2 with RSA-authenticated suites)."""
    ctx = pki.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
    return ctx


def reloads(srv: KeepServer, message: str) -> set[int]:
    """PIDs of the processes that logged ``message``."""
    return {int(ln["PID"]) for ln in srv.log_lines() if ln.get("msg") == message}


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_replaces_the_certificate_in_every_worker(server_factory: ServerFactory, pki: Pki, workers: int) -> None:
    srv = tls_server(server_factory, pki, workers=workers)
    first = served_serial(srv, pki, rsa_only(pki))  # an RSA pair to begin with
    kept = http.client.HTTPSConnection("127.0.0.1", srv.port, context=pki.client_context(), timeout=30)
    kept.request("GET", "/index", headers={"Authorization": f"Bearer {ROOT_TOKEN}"})
    assert kept.getresponse().read() == b"\n"
    servers = set(process_tree(srv.pid)[1:] or [srv.pid])

    second = pki.issue(trustme.KeyType.ECDSA)
    os.kill(srv.pid, signal.SIGHUP)  # with workers, the supervisor reloads and forwards it to each
    wait_for(lambda: servers <= reloads(srv, "TLS certificate reloaded"), what="every worker reloading")
    for _ in range(6):  # new connections, spread over the workers
        assert served_serial(srv, pki) == second
    # Replaced, not added to: the RSA certificate is not offered any more, even to a client that takes nothing else.
    with pytest.raises(ssl.SSLError):
        served_serial(srv, pki, rsa_only(pki))
    assert first != second
    # A connection made before the reload goes on with the session it has.
    kept.request("GET", "/index", headers={"Authorization": f"Bearer {ROOT_TOKEN}"})
    assert kept.getresponse().read() == b"\n"
    kept.close()

    # A broken renewal is refused: the pair in use stays, and the server keeps serving.
    pki.key_file.write_text("not a key\n")
    os.kill(srv.pid, signal.SIGHUP)
    wait_for(lambda: servers <= reloads(srv, "TLS certificate not reloaded: keeping the one in use"), what="refusals")
    assert served_serial(srv, pki) == second
    data = b"after a failed reload"
    assert https(srv, pki, "PUT", f"/{md5(data)}", data)[0] == 200


def test_a_worker_restarted_while_the_files_are_broken_serves_the_last_good_pair(
    server_factory: ServerFactory, pki: Pki
) -> None:
    srv = tls_server(server_factory, pki, workers=2)
    serial = served_serial(srv, pki)
    pki.key_file.write_text("a renewal half-written\n")
    victim = process_tree(srv.pid)[2]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = process_tree(srv.pid)[1:]
        return len(now) == 2 and victim not in now

    wait_for(replaced, what="a replacement worker")
    assert srv.proc is not None and srv.proc.poll() is None
    for i in range(6):  # over both workers
        assert served_serial(srv, pki) == serial
        data = f"served by a restarted worker {i}".encode()
        assert https(srv, pki, "PUT", f"/{md5(data)}", data)[0] == 200


def pull(src: KeepServer, dst: KeepServer, pki: Pki, data: bytes) -> None:
    item = {"locator": f"{md5(data)}+{len(data)}", "servers": [f"https://127.0.0.1:{src.port}"], "mount_uuid": ""}
    assert https(dst, pki, "PUT", "/pull", json.dumps([item]).encode(), token=ROOT_TOKEN)[0] == 200


def pull_done(dst: KeepServer, pki: Pki) -> bool:
    status = json.loads(https(dst, pki, "GET", "/status.json", token=MGMT_TOKEN)[1])
    queue: dict[str, Any] = status["PullQueue"]
    return queue == {"Queued": 0, "InProgress": 0}


@pytest.mark.parametrize("trust", ["ca", "insecure", "none"])
def test_pull_from_an_https_peer(server_factory: ServerFactory, pki: Pki, trust: str) -> None:
    src = tls_server(server_factory, pki, name="src")
    env = {"SSL_CERT_FILE": str(pki.ca_file)} if trust == "ca" else {}
    dst = tls_server(server_factory, pki, name="dst", env=env, insecure=trust == "insecure")
    data = f"pulled over tls ({trust})".encode()
    assert https(src, pki, "PUT", f"/{md5(data)}", data)[0] == 200
    pull(src, dst, pki, data)
    wait_for(lambda: pull_done(dst, pki), what="the pull queue to drain")
    locator = sign(f"{md5(data)}+{len(data)}")
    if trust == "none":
        # The peer's certificate is signed by a CA this keepstore does not trust: nothing is pulled.
        assert https(dst, pki, "GET", f"/{locator}")[0] == 404
        assert stored_files(dst.volume_root(0)) == {}
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in dst.log_text(), what="the reason in the log")
    else:
        wait_for(lambda: https(dst, pki, "GET", f"/{locator}") == (200, data), what="the pulled block")


def test_a_key_pair_that_does_not_load_stops_the_start_with_exit_2(
    server_factory: ServerFactory, pki: Pki, tmp_path: Path
) -> None:
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_key = tmp_path / "wrong.key"
    other.private_key_pem.write_to_path(str(wrong_key))
    srv = tls_server(server_factory, pki, start=False)
    srv.config["Clusters"]["zzzzz"]["TLS"]["Key"] = f"file://{wrong_key}"
    srv.start(wait=False)
    assert srv.proc is not None
    assert srv.proc.wait(30) == 2
    assert f"config error: Clusters.zzzzz.TLS.Key: {wrong_key} is not the private key of {pki.cert_file}" in (
        srv.log_text()
    )


@pytest.fixture(autouse=True)
def _no_ambient_ca(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The servers' trust comes from each test's env alone.
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    yield


@pytest.mark.parametrize("workers", [1, 2])
def test_a_handshake_that_never_comes_is_dropped_and_does_not_hold_up_the_drain(
    server_factory: ServerFactory, pki: Pki, workers: int
) -> None:
    srv = tls_server(server_factory, pki, workers=workers)
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=30)  # connects, never sends a ClientHello
    started = time.monotonic()
    assert silent.recv(1) == b""  # closed by the server (accept.TLS_HANDSHAKE_TIMEOUT)
    assert 9 <= time.monotonic() - started < 20
    silent.close()
    # One still waiting when the drain starts does not keep the server up.
    waiting = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    time.sleep(0.2)
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < 5
    waiting.close()

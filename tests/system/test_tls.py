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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from keeptest import MGMT_TOKEN, ROOT_TOKEN, USER_TOKEN, KeepServer, ServerFactory, md5, sign, stored_files, wait_for


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def issue(self) -> int:
        """Write a new server certificate (and key) for 127.0.0.1 over the files; its serial number."""
        leaf = self.ca.issue_cert("127.0.0.1")
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
    p.issue()
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


def served_serial(srv: KeepServer, pki: Pki) -> int:
    with (
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw,
        pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.parametrize("workers", [1, 2])
def test_put_get_head_touch_over_tls(server_factory: ServerFactory, pki: Pki, workers: int) -> None:
    srv = tls_server(server_factory, pki, workers=workers)
    small, large = b"tls small block", os.urandom(1 << 20)
    for data in (small, large):
        status, body = https(srv, pki, "PUT", f"/{md5(data)}", data)
        assert status == 200, body
        locator = body.decode().strip()
        assert locator.startswith(f"{md5(data)}+{len(data)}+A")
        # GET: a small block on the fast path, a large one through sendfile's fallback (no sendfile(2) into TLS)
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


def test_sighup_reloads_the_certificate(server_factory: ServerFactory, pki: Pki) -> None:
    srv = tls_server(server_factory, pki, workers=2)
    first = served_serial(srv, pki)
    kept = http.client.HTTPSConnection("127.0.0.1", srv.port, context=pki.client_context(), timeout=30)
    kept.request("GET", "/index", headers={"Authorization": f"Bearer {ROOT_TOKEN}"})
    assert kept.getresponse().read() == b"\n"

    second = pki.issue()
    assert second != first
    os.kill(srv.pid, signal.SIGHUP)  # the supervisor forwards it to every worker
    # Every worker: new connections are spread over both, so all of them must show the new certificate.
    wait_for(lambda: all(served_serial(srv, pki) == second for _ in range(6)), what="the renewed certificate")
    # A connection made before the reload goes on with the session it has.
    kept.request("GET", "/index", headers={"Authorization": f"Bearer {ROOT_TOKEN}"})
    assert kept.getresponse().read() == b"\n"
    kept.close()

    # A broken renewal is refused: the pair in use stays, and the server keeps serving.
    pki.key_file.write_text("not a key\n")
    os.kill(srv.pid, signal.SIGHUP)
    wait_for(
        lambda: sum("TLS certificate not reloaded" in ln.get("msg", "") for ln in srv.log_lines()) >= 2,
        what="both workers refusing the broken key",
    )
    assert served_serial(srv, pki) == second
    data = b"after a failed reload"
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

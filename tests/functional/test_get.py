"""GET/HEAD of blocks, routing, CORS, health: SPEC §2.5, §11 items 23–47, against a real keepstore process."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest
from keeptest import (
    MGMT_TOKEN,
    ROOT_TOKEN,
    USER_TOKEN,
    KeepServer,
    ServerFactory,
    directory_volume,
    md5,
    sign,
    stored_files,
)

CORS = {
    "Access-Control-Allow-Methods": "GET, HEAD, PUT, OPTIONS",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Authorization, Content-Length, Content-Type, X-Keep-Desired-Replicas, "
    "X-Keep-Signature, X-Keep-Storage-Classes",
    "Access-Control-Expose-Headers": "X-Keep-Locator, X-Keep-Replicas-Stored, X-Keep-Storage-Classes-Confirmed",
    "Access-Control-Max-Age": "86486400",
}
FOO = md5(b"foo")


def put_foo(srv: KeepServer) -> str:
    r = srv.put(b"foo")
    assert r.status == 200
    return r.text.strip()


def block_path(srv: KeepServer, h: str) -> Path:
    return next(p for i in range(2) for hh, p in stored_files(srv.volume_root(i)).items() if hh == h)


def test_get_signed(server: KeepServer) -> None:  # items 23, 24, 25
    loc = put_foo(server)
    r = server.get(loc)
    assert (r.status, r.body, r.header("Content-Length")) == (200, b"foo", "3")
    r = server.req("GET", f"//{loc}", token=USER_TOKEN)
    assert (r.status, r.body) == (200, b"foo")
    r = server.head(loc)
    assert (r.status, r.body, r.header("Content-Length")) == (200, b"", "3")


def test_get_without_token(server: KeepServer) -> None:  # item 26
    loc = put_foo(server)
    r = server.get(loc, token=None)
    assert (r.status, r.text) == (401, "no token provided in Authorization header\n")


def test_get_wrong_token(server: KeepServer) -> None:  # item 27
    loc = put_foo(server)
    r = server.get(loc, token="someoneelse")
    assert (r.status, r.text) == (400, "invalid signature\n")


def test_get_expired(server: KeepServer) -> None:  # item 28
    put_foo(server)
    loc = sign(f"{FOO}+3", expiry=int(time.time()) - 10)
    r = server.get(loc)
    assert (r.status, r.text) == (401, "expired signature\n")
    # An expired forgery is also "expired" (the expiry is checked first).
    r = server.get(f"{FOO}+3+A{'0' * 40}@{int(time.time()) - 10:08x}")
    assert r.status == 401


def test_get_unsigned_with_token(server: KeepServer) -> None:  # item 29
    put_foo(server)
    r = server.get(f"{FOO}+3")
    assert (r.status, r.text) == (400, "invalid signature\n")


def test_get_signed_with_other_key(server: KeepServer) -> None:  # item 30
    put_foo(server)
    r = server.get(sign(f"{FOO}+3", key="anotherkey"))
    assert (r.status, r.text) == (400, "invalid signature\n")


def test_token_forms(server: KeepServer) -> None:  # item 31, SPEC §2.2
    loc = put_foo(server)
    assert server.get(loc, token=None, headers={"Authorization": f"OAuth2 {USER_TOKEN}"}).status == 200
    assert server.req("GET", f"/{loc}?api_token={USER_TOKEN}").status == 200
    basic = base64.b64encode(f"user:{USER_TOKEN}".encode()).decode()
    assert server.get(loc, token=None, headers={"Authorization": f"Basic {basic}"}).status == 200
    cookie = base64.urlsafe_b64encode(USER_TOKEN.encode()).decode().rstrip("=")
    assert server.get(loc, token=None, headers={"Cookie": f"arvados_api_token={cookie}"}).status == 200


def test_extra_hints(server: KeepServer) -> None:  # item 32
    put_foo(server)
    signed = sign(f"{FOO}+3+K@xyzzy")
    assert server.get(signed).status == 200
    assert server.get(signed + "+Zfoo").status == 200


def test_wrong_size_hint(server: KeepServer) -> None:  # item 33 (deliberate difference: 502 for GET too)
    put_foo(server)
    loc = sign(f"{FOO}+999999")
    r = server.head(loc)
    assert (r.status, r.text) == (502, "")
    r = server.get(loc)
    assert (r.status, r.text) == (502, "checksum mismatch in stored data\n")
    assert block_path(server, FOO).read_bytes() == b"foo"  # a wrong hint is not corruption: nothing quarantined


def test_get_without_size_hint(server: KeepServer) -> None:  # item 34
    put_foo(server)
    r = server.get(sign(FOO))
    assert (r.status, r.text) == (405, "method not allowed\n")


def test_head_without_size_hint(server_factory: ServerFactory) -> None:  # item 35
    srv = server_factory(collections={"BlobSigning": False})
    put_foo(srv)
    r = srv.head(FOO, token=None)
    assert (r.status, r.header("Content-Length")) == (200, "3")


def test_get_absent(server: KeepServer) -> None:  # item 36
    r = server.get(sign(f"{md5(b'absent')}+6"))
    assert (r.status, r.text) == (404, "file does not exist\n")
    assert r.header("Vary") == "X-Keep-Signature"  # item 43: on errors too


def test_corrupt_large_block_other_mount_serves(server: KeepServer) -> None:  # item 37, deliberate difference 3
    data = os.urandom(200_000)
    h = md5(data)
    loc = server.put(data).text.strip()
    p = block_path(server, h)
    other = server.volume_root(1 if p.parent.parent == server.volume_root(0) else 0)
    (other / h[:3]).mkdir()
    (other / h[:3] / h).write_bytes(data)  # a good copy on the other mount
    p.write_bytes(b"x" + data[1:])  # same length, corrupt
    r = server.get(loc)
    assert (r.status, r.body == data) == (200, True)
    # The corrupt copy was moved aside, not deleted.
    deadline = time.monotonic() + 5
    while p.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not p.exists()
    quarantined = list((p.parent.parent / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(h)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_corrupt_only_copy(server: KeepServer, method: str) -> None:  # item 37: nothing of a corrupt copy is sent
    data = os.urandom(200_000)
    loc = server.put(data).text.strip()
    block_path(server, md5(data)).write_bytes(b"x" + data[1:])
    r = server.req(method, f"/{loc}", token=USER_TOKEN)
    assert r.status == 502
    assert r.text == ("checksum mismatch in stored data\n" if method == "GET" else "")
    # Once quarantined, the block is simply absent.
    deadline = time.monotonic() + 5
    while server.head(loc).status != 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.head(loc).status == 404


def test_corrupt_small_block(server: KeepServer) -> None:  # item 37, "bar" stored under md5("foo")
    put_foo(server)
    block_path(server, FOO).write_bytes(b"bar")
    r = server.get(sign(f"{FOO}+3"))
    assert (r.status, r.text) == (502, "checksum mismatch in stored data\n")


@pytest.mark.parametrize(
    "path,body",
    [
        (f"/{'a' * 32}g", "invalid locator\n"),
        (f"/{FOO}++3", "invalid locator\n"),
        (f"/{FOO}+3+", "invalid locator\n"),
        (f"/{FOO}+3+4", "invalid locator\n"),
        (f"/{FOO}x", "invalid locator\n"),
        (f"/{FOO[:31]}", "Bad Request\n"),
        (f"/{FOO.upper()}+3", "Bad Request\n"),
        (f"/{FOO}0+3", "invalid locator\n"),
        (f"/{FOO}/../../etc/passwd", "invalid locator\n"),
        ("/../etc/passwd", "Bad Request\n"),
        ("/%2e%2e/%2e%2e/etc/passwd", "Bad Request\n"),
        (f"/{FOO[:3]}/{FOO}", "Bad Request\n"),
    ],
)
def test_bad_locators(server: KeepServer, path: str, body: str) -> None:  # items 38, 39 + traversal
    put_foo(server)
    r = server.req("GET", path, token=USER_TOKEN)
    assert (r.status, r.text) == (400, body)


def test_signing_disabled(server_factory: ServerFactory) -> None:  # item 40
    srv = server_factory(collections={"BlobSigning": False})
    put_foo(srv)
    assert srv.get(f"{FOO}+3", token=None).status == 200
    assert srv.get(f"{FOO}+3+A{'0' * 40}@7fffffff", token="random").status == 200


def test_read_only_volume_readable(server_factory: ServerFactory, tmp_path: Path) -> None:  # item 41
    ro = directory_volume(tmp_path / "ro", 0, ReadOnly=True)
    (tmp_path / "ro" / FOO[:3]).mkdir()
    (tmp_path / "ro" / FOO[:3] / FOO).write_bytes(b"foo")
    srv = server_factory(volumes=[ro, directory_volume(tmp_path / "rw", 1)])
    assert srv.get(sign(f"{FOO}+3")).body == b"foo"


def test_read_survives_failing_volume(server: KeepServer) -> None:  # item 42
    data = b"replicated"
    h = md5(data)
    loc = server.put(data).text.strip()
    for i in range(2):
        d = server.volume_root(i) / h[:3]
        d.mkdir(exist_ok=True)
        (d / h).write_bytes(data)
    # Make the copy on V0 unreadable: a directory where the file should be gives EISDIR on read.
    p0 = server.volume_root(0) / h[:3] / h
    p0.unlink()
    p0.mkdir()
    assert server.get(loc).body == data


def test_cors_on_every_response(server: KeepServer) -> None:  # item 44
    loc = put_foo(server)
    responses = [
        server.get(loc),
        server.get(loc, token=None),
        server.get(sign(f"{md5(b'x')}+1")),
        server.req("GET", "/"),
        server.req("GET", "/index", token=ROOT_TOKEN),
        server.put(b"foo"),
    ]
    for r in responses:
        for k, v in CORS.items():
            assert r.header(k) == v, (r.status, k)


def test_options(server: KeepServer) -> None:  # item 45
    r = server.req("OPTIONS", "/anything/at/all")
    assert (r.status, r.body) == (200, b"")
    assert r.header("Access-Control-Allow-Origin") == "*"


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/"),
        ("POST", f"/{FOO}"),
        ("PROPFIND", "/"),
        ("GET", "/debug.json"),
        ("GET", "/xyz"),
        ("GET", "/index/xyz"),
        ("GET", "//index"),
        ("GET", "/mounts/"),
        ("PATCH", f"/{FOO}+3"),
    ],
)
def test_bad_routes(server: KeepServer, method: str, path: str) -> None:  # item 46
    r = server.req(method, path, token=ROOT_TOKEN)
    assert (r.status, r.text) == (400, "Bad Request\n")
    assert r.header("X-Content-Type-Options") == "nosniff"


def test_empty_block_not_synthesized(server: KeepServer) -> None:  # item 47
    r = server.get(sign("d41d8cd98f00b204e9800998ecf8427e+0"))
    assert r.status == 404


def test_health(server_factory: ServerFactory) -> None:  # item 72 (part of the core issue: /_health/ping)
    srv = server_factory()
    r = srv.req("GET", "/_health/ping", headers={"Authorization": f"Bearer {MGMT_TOKEN}"})
    assert (r.status, r.body, r.header("Content-Type")) == (200, b'{"health":"OK"}\n', "application/json")
    assert r.header("Access-Control-Allow-Origin") is None  # outside the router: no CORS
    assert srv.req("GET", "/_health/ping").status == 401
    assert srv.req("GET", "/_health/ping", headers={"Authorization": "Bearer wrong"}).status == 403
    assert srv.req("GET", "/_health/ping", headers={"Authorization": f"OAuth2 {MGMT_TOKEN}"}).status == 403
    srv2 = server_factory(name="nomgmt", extra={"ManagementToken": ""})
    r = srv2.req("GET", "/_health/ping", headers={"Authorization": "Bearer x"})
    assert (r.status, r.text) == (404, "disabled\n")


def test_touch_method_reaches_router(server: KeepServer) -> None:
    # llhttp rejects TOUCH; the connection falls back to the Python parser, on a fresh and on a reused connection.
    loc = put_foo(server)
    r = server.req("TOUCH", f"/{FOO}+3")
    assert (r.status, r.text) == (401, "Unauthorized\n")
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for method, path in [("GET", f"/{loc}"), ("TOUCH", f"/{FOO}+3"), ("GET", f"/{loc}"), ("TOUCH", f"/{FOO}+3")]:
            token = ROOT_TOKEN if method == "TOUCH" else USER_TOKEN
            conn.request(method, path, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (method, resp.status, body)
    finally:
        conn.close()


def test_volume_without_rwf_nowait(server_factory: ServerFactory, tmp_path: Path) -> None:
    # tmpfs (like some network file systems) refuses RWF_NOWAIT reads: the cached-read fast path must step aside.
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("/dev/shm is not available to host a tmpfs volume on this machine")
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="keepstore-test-", dir=shm))
    try:
        srv = server_factory(volumes=[directory_volume(root, 0)])
        for data in (b"foo", os.urandom(70_000), os.urandom(3 << 20)):
            loc = srv.put(data).text.strip()
            assert srv.get(loc).body == data
            assert srv.head(loc).status == 200
        srv.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

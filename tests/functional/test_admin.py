"""Admin routes: SPEC §2.7–2.13, §11 items 48–60, against a real keepstore process."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from keeptest import ROOT_TOKEN, TTL, USER_TOKEN, KeepServer, ServerFactory, md5, sign, stored_files, vol_uuid

FOO = md5(b"foo")
ADMIN_ROUTES = [
    ("GET", "/index"),
    ("GET", "/index/"),
    ("GET", "/index/12"),
    ("GET", "/mounts"),
    ("GET", f"/mounts/{vol_uuid(0)}/blocks"),
    ("PUT", "/untrash/" + FOO + "+3"),
    ("TOUCH", "/" + FOO + "+3"),
    ("DELETE", "/" + FOO + "+3"),
]


def where(srv: KeepServer, h: str) -> list[int]:
    return [i for i in range(2) if h in stored_files(srv.volume_root(i))]


def backdate(srv: KeepServer, h: str, seconds: float) -> int:
    """Make every copy of ``h`` older by ``seconds``; return the new mtime (ns)."""
    t = time.time_ns() - int(seconds * 1e9)
    for i in where(srv, h):
        os.utime(stored_files(srv.volume_root(i))[h], ns=(t, t))
    return t


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_auth(server: KeepServer, method: str, path: str) -> None:  # item 48
    r = server.req(method, path)
    assert (r.status, r.text) == (401, "Unauthorized\n")
    r = server.req(method, path, token=USER_TOKEN)
    assert (r.status, r.text) == (403, "Forbidden\n")


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_closed_without_root_token(server_factory: ServerFactory, method: str, path: str) -> None:
    # Deliberate difference 8: an empty SystemRootToken closes the admin routes instead of opening them.
    srv = server_factory(extra={"SystemRootToken": ""})
    assert srv.req(method, path).status == 403
    assert srv.req(method, path, token="anything").status == 403
    assert "SystemRootToken is empty" in srv.log_text()


def test_admin_check_precedes_locator_validation(server: KeepServer) -> None:
    assert server.req("TOUCH", "/" + "a" * 32 + "++", token=USER_TOKEN).status == 403
    assert server.req("TOUCH", "/" + "a" * 32 + "++", token=ROOT_TOKEN).status == 400


def test_index_empty(server: KeepServer) -> None:  # item 49
    r = server.index()
    assert (r.status, r.body) == (200, b"\n")


def test_index_line_format(server: KeepServer) -> None:  # item 50
    assert server.put(b"foo").status == 200
    r = server.index()
    m = re.fullmatch(rf"{FOO}\+3 (\d{{19}})\n\n", r.text)
    assert m, r.text
    (i,) = where(server, FOO)
    assert int(m.group(1)) == stored_files(server.volume_root(i))[FOO].stat().st_mtime_ns


def test_index_prefix(server: KeepServer) -> None:  # item 51
    server.put(b"foo")
    server.put(b"bar")
    for path in ["/index/acb", "/index?prefix=acb", "/index/?prefix=acb", "/index/37?prefix=acb"]:
        r = server.index(path)
        assert r.status == 200
        assert [line.split()[0] for line in r.text.splitlines() if line] == [f"{FOO}+3"], path
    assert server.index("/index/fff").body == b"\n"


def test_index_per_mount(server: KeepServer) -> None:  # items 52, 53
    server.put(b"foo")
    (i,) = where(server, FOO)
    other = 1 - i
    d = server.volume_root(other) / FOO[:3]
    d.mkdir()
    (d / FOO).write_bytes(b"foo")
    assert server.index_hashes() == [FOO, FOO]
    for n in range(2):
        for suffix in ["", "/", "/acb", "?prefix=acb"]:
            assert server.index_hashes(f"/mounts/{vol_uuid(n)}/blocks{suffix}") == [FOO]
    r = server.index(f"/mounts/{vol_uuid(7)}/blocks")
    assert (r.status, r.text) == (404, "file does not exist\n")


def test_index_bad_prefix(server: KeepServer) -> None:  # item 54
    r = server.index("/index/xyz")
    assert (r.status, r.text) == (400, "Bad Request\n")


def test_index_skips_junk_and_trash(server: KeepServer) -> None:
    server.put(b"foo")
    root = server.volume_root(0)
    (root / "acb").mkdir(exist_ok=True)
    (root / "acb" / "notablock").write_bytes(b"x")
    (root / "acb" / (FOO[:31] + "g")).write_bytes(b"x")
    (root / "acb" / f"{'acb' + 'f' * 29}.trash.{int(time.time()) + 100}").write_bytes(b"x")
    (root / "quarantine").mkdir()
    (root / "quarantine" / md5(b"q")).write_bytes(b"q")
    assert server.index_hashes() == [FOO]


def test_mounts(server: KeepServer) -> None:  # item 55
    r = server.req("GET", "/mounts", token=ROOT_TOKEN)
    assert r.status == 200
    mounts = json.loads(r.body)
    assert [m["uuid"] for m in mounts] == [vol_uuid(0), vol_uuid(1)]
    for m in mounts:
        assert set(m) == {"uuid", "device_id", "allow_write", "allow_trash", "replication", "storage_classes"}
        assert isinstance(m["device_id"], str) and m["device_id"]
        assert m["allow_write"] is True and m["allow_trash"] is True
        assert m["replication"] == 1
        assert m["storage_classes"] == {"default": True}


def test_touch(server: KeepServer) -> None:  # item 56
    server.put(b"foo")
    for i in range(2):
        d = server.volume_root(i) / FOO[:3]
        d.mkdir(exist_ok=True)
        (d / FOO).write_bytes(b"foo")
    old = backdate(server, FOO, 1000)
    r = server.req("TOUCH", f"/{FOO}+3", token=ROOT_TOKEN)
    assert (r.status, r.body) == (200, b"")
    mtimes = [stored_files(server.volume_root(i))[FOO].stat().st_mtime_ns for i in range(2)]
    assert mtimes[0] > old and mtimes[1] == old  # only the first writable mount by UUID
    r = server.req("TOUCH", f"/{md5(b'absent')}+6", token=ROOT_TOKEN)
    assert (r.status, r.text) == (404, "file does not exist\n")


def test_delete_and_untrash(server: KeepServer) -> None:  # item 57
    loc = server.put(b"foo").text.strip()
    backdate(server, FOO, TTL + 10)
    r = server.req("DELETE", f"/{FOO}+3", token=ROOT_TOKEN)
    assert (r.status, r.body) == (200, b"")
    assert server.get(loc).status == 404
    assert server.index_hashes() == []
    (i,) = [n for n in range(2) if list(server.volume_root(n).glob(f"*/{FOO}.trash.*"))]
    trashed = list(server.volume_root(i).glob(f"*/{FOO}.trash.*"))
    assert len(trashed) == 1
    deadline = int(trashed[0].name.rsplit(".", 1)[1])
    assert abs(deadline - (time.time() + 336 * 3600)) < 60  # BlobTrashLifetime default 336h
    r = server.req("PUT", f"/untrash/{FOO}+3", token=ROOT_TOKEN)
    assert (r.status, r.body) == (200, b"")
    assert server.get(loc).body == b"foo"


def test_delete_young_block_is_kept(server: KeepServer) -> None:  # item 58
    loc = server.put(b"foo").text.strip()
    assert server.req("DELETE", f"/{FOO}+3", token=ROOT_TOKEN).status == 200
    assert server.get(loc).status == 200


def test_delete_absent_and_disabled(server_factory: ServerFactory) -> None:  # item 59
    srv = server_factory()
    r = srv.req("DELETE", f"/{FOO}+3", token=ROOT_TOKEN)
    assert (r.status, r.text) == (404, "file does not exist\n")
    srv2 = server_factory(name="notrash", collections={"BlobTrash": False})
    r = srv2.req("DELETE", f"/{FOO}+3", token=ROOT_TOKEN)
    assert (r.status, r.text) == (405, "method not allowed\n")
    assert srv2.req("DELETE", f"/{FOO}+3", token=USER_TOKEN).status == 403  # auth first


def test_untrash_nothing(server: KeepServer) -> None:  # item 60
    server.put(b"foo")
    r = server.req("PUT", f"/untrash/{FOO}+3", token=ROOT_TOKEN)
    assert (r.status, r.text) == (404, "file does not exist\n")


def test_delete_with_zero_lifetime(server_factory: ServerFactory) -> None:  # item 70 (directory volume part)
    srv = server_factory(collections={"BlobTrashLifetime": "0s"})
    srv.put(b"foo")
    backdate(srv, FOO, TTL + 10)
    assert srv.req("DELETE", f"/{FOO}+3", token=ROOT_TOKEN).status == 200
    assert all(not list(srv.volume_root(i).glob(f"*/{FOO}*")) for i in range(2))
    assert srv.req("PUT", f"/untrash/{FOO}+3", token=ROOT_TOKEN).status == 404


def test_admin_bad_locators(server: KeepServer) -> None:
    for method, path in [("TOUCH", f"/{FOO}++3"), ("DELETE", f"/{FOO}+3+4"), ("PUT", f"/untrash/{FOO}x")]:
        r = server.req(method, path, token=ROOT_TOKEN)
        assert (r.status, r.text) == (400, "invalid locator\n"), (method, path)


def test_touch_then_get_still_signed(server: KeepServer, tmp_path: Path) -> None:
    loc = server.put(b"foo").text.strip()
    assert server.req("TOUCH", f"/{FOO}", token=ROOT_TOKEN).status == 200
    assert server.get(loc).body == b"foo"
    assert server.get(sign(f"{FOO}+3")).body == b"foo"

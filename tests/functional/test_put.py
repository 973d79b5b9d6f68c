"""PUT /<hash>: SPEC §2.6 and §11 items 1–12, 20–22, against a real keepstore process."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest
from keeptest import (
    ROOT_TOKEN,
    SIGNING_KEY,
    TTL,
    USER_TOKEN,
    KeepServer,
    ServerFactory,
    build_shim,
    md5,
    page_cache_residency,
    page_cache_skip_reason,
    process_tree,
    raw_exchange,
    sign,
    stored_files,
    temp_files,
    vol_uuid,
)

from keepstore.signing import Signer

LOC_RE = re.compile(r"([0-9a-f]{32})\+(\d+)\+A([0-9a-f]{40})@([0-9a-f]{8})\n")


def nothing_stored(srv: KeepServer) -> bool:
    return all(not stored_files(srv.volume_root(i)) and not temp_files(srv.volume_root(i)) for i in range(2))


def test_put_returns_signed_locator(server: KeepServer) -> None:  # item 1
    r = server.put(b"foo")
    assert r.status == 200
    m = LOC_RE.fullmatch(r.text)
    assert m, r.text
    assert m.group(1) == md5(b"foo") and m.group(2) == "3"
    expiry = int(m.group(4), 16)
    assert abs(expiry - (time.time() + TTL)) < 60
    Signer(SIGNING_KEY.encode(), TTL).verify(r.text.strip(), USER_TOKEN)


def test_put_without_token_is_unsigned(server: KeepServer) -> None:  # item 2
    r = server.put(b"foo", token=None)
    assert r.status == 200
    assert r.text == f"{md5(b'foo')}+3\n"


def test_put_hash_mismatch(server: KeepServer) -> None:  # item 3
    r = server.put(b"foo", path=f"/{md5(b'bar')}")
    assert r.status == 400
    assert r.text == f"content hash {md5(b'foo')} did not match specified locator {md5(b'bar')}\n"
    assert nothing_stored(server)
    assert server.index_hashes() == []


def test_put_with_size_hint_in_path(server: KeepServer) -> None:  # item 4 (and Q3: the path is a prefix match)
    assert server.put(b"foo", path=f"/{md5(b'foo')}+3").status == 200
    assert server.put(b"bar", path=f"/{md5(b'bar')}+3+Zxyz").status == 200


def test_put_replica_headers(server: KeepServer) -> None:  # items 5, 6
    r = server.put(b"foo", headers={"X-Keep-Desired-Replicas": "2"})
    assert r.status == 200
    assert r.header("X-Keep-Replicas-Stored") == "1"
    assert r.header("X-Keep-Storage-Classes-Confirmed") == "default=1"


def test_put_empty_block(server: KeepServer) -> None:  # item 7
    r = server.put(b"")
    assert r.status == 200
    assert r.text.startswith("d41d8cd98f00b204e9800998ecf8427e+0+A")
    r = server.get(r.text.strip())
    assert r.status == 200 and r.body == b""


def test_put_64mib_limit(server: KeepServer) -> None:  # item 8, deliberate difference 1
    big = os.urandom(1 << 20) * 64
    assert len(big) == 67108864
    r = server.put(big)
    assert r.status == 200, r.text
    assert server.get(r.text.strip()).body == big
    too_big = big + b"x"
    r = server.put(too_big)
    assert r.status == 413
    assert r.text == "request entity too large\n"
    assert md5(too_big) not in server.index_hashes()


def test_put_oversize_rejected_before_body(server: KeepServer) -> None:
    # Content-Length above 64 MiB is refused at once: the server answers without waiting for the body.
    head = (f"PUT /{md5(b'x')} HTTP/1.1\r\nHost: x\r\nContent-Length: {67108865}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(head + b"x" * 1000)
        out = s.recv(4096)  # arrives although the body is far from complete
    assert out.startswith(b"HTTP/1.1 413 "), out[:200]
    assert out.endswith(b"request entity too large\n")
    assert nothing_stored(server)


def test_put_chunked_oversize(server: KeepServer) -> None:
    chunk = b"y" * (1 << 20)

    def body():  # chunked: no Content-Length, 65 MiB in total
        for _ in range(65):
            yield chunk

    r = server.req("PUT", f"/{md5(chunk * 65)}", body=body())
    assert r.status == 413
    assert nothing_stored(server)


def test_put_chunked(server: KeepServer) -> None:  # item 9
    data = os.urandom(300_000)

    def body():
        for i in range(0, len(data), 70_000):
            yield data[i : i + 70_000]

    r = server.req("PUT", f"/{md5(data)}", body=body(), token=USER_TOKEN)
    assert r.status == 200, r.text
    assert server.get(r.text.strip()).body == data


def test_put_expect_100_continue(server: KeepServer) -> None:  # item 10
    data = os.urandom(2 << 20)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            f"PUT /{md5(data)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            f"Expect: 100-continue\r\nAuthorization: Bearer {USER_TOKEN}\r\n\r\n".encode()
        )
        interim = s.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out or not out.endswith(b"\n"):
            out += s.recv(4096)
    assert out.startswith(b"HTTP/1.1 200 OK")


# One writable volume takes keepstore.store.Store._write_one (create unless present, then compare and touch); two
# take the general path (compare every mount first). Small blocks go by group commit, 1 MiB ones file by file.
VOLUME_COUNTS = pytest.mark.parametrize("volumes", [1, 2], ids=["one-volume", "two-volumes"])
SIZES = pytest.mark.parametrize("size", [3, 1 << 20], ids=["small", "1MiB"])


def _block(size: int, seed: bytes) -> bytes:
    return (seed * (size // len(seed) + 1))[:size]


@VOLUME_COUNTS
@SIZES
def test_put_twice_touches(server_factory: ServerFactory, volumes: int, size: int) -> None:  # item 11
    server = server_factory(volumes=volumes)
    data = _block(size, b"foo")
    assert server.put(data).status == 200
    line1 = server.index().text.splitlines()[0]
    time.sleep(0.01)
    r = server.put(data)
    assert r.status == 200
    assert r.header("X-Keep-Replicas-Stored") == "1"
    lines = [line for line in server.index().text.splitlines() if line]
    assert len(lines) == 1  # stored once
    assert int(lines[0].split()[1]) > int(line1.split()[1])
    assert not [p for i in range(volumes) for p in server.volume_root(i).rglob("tmp*")]  # no temp file left


@VOLUME_COUNTS
@SIZES
def test_put_hash_collision(server_factory: ServerFactory, volumes: int, size: int) -> None:  # item 12
    server = server_factory(volumes=volumes)
    data = _block(size, b"foo")
    h = md5(data)
    assert server.put(data).status == 200
    path = next(p for i in range(volumes) for hh, p in stored_files(server.volume_root(i)).items() if hh == h)
    path.write_bytes(_block(size, b"bar"))
    mtime = path.stat().st_mtime_ns
    r = server.put(data)
    assert r.status == 500
    assert r.text == "hash collision\n"
    assert path.read_bytes() == _block(size, b"bar")  # nothing overwritten
    assert path.stat().st_mtime_ns == mtime  # nor touched
    assert not [p for i in range(volumes) for p in server.volume_root(i).rglob("tmp*")]


def test_put_double_slash_is_bad_request(server: KeepServer) -> None:  # item 20
    r = server.put(b"foo", path=f"//{md5(b'foo')}")
    assert r.status == 400
    assert r.text == "Bad Request\n"
    assert nothing_stored(server)


def test_put_lands_on_first_rendezvous_volume(server: KeepServer) -> None:  # item 21
    assert server.put(b"bar").status == 200
    assert server.index_hashes(f"/mounts/{vol_uuid(0)}/blocks") == [md5(b"bar")]
    assert server.index_hashes(f"/mounts/{vol_uuid(1)}/blocks") == []


def test_request_id(server: KeepServer) -> None:  # item 22
    assert server.put(b"foo", headers={"X-Request-Id": "abc"}).header("X-Request-Id") == "abc"
    rid = server.put(b"foo").header("X-Request-Id")
    assert rid is not None and re.fullmatch(r"req-[0-9a-z]{20}", rid)


def test_wrong_content_length_short(server: KeepServer) -> None:
    # Declared length shorter than the body: the server hashes what was declared, which does not match.
    data = b"hello world"
    r = server.req("PUT", f"/{md5(data)}", body=data[:5], headers={"Content-Length": "5"})
    assert r.status == 400
    assert r.text.startswith("content hash ")
    assert nothing_stored(server)


def test_wrong_content_length_long_then_close(server: KeepServer) -> None:
    # Declared length longer than what arrives before the client closes: nothing is stored.
    data = b"hello world"
    head = f"PUT /{md5(data)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data) + 10}\r\n\r\n".encode()
    raw_exchange(server.port, head + data, timeout=3, shutdown=True)
    time.sleep(0.3)
    assert nothing_stored(server)


def test_put_bad_chunked_encoding(server: KeepServer) -> None:
    head = f"PUT /{md5(b'abc')} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    out = raw_exchange(server.port, head + b"zz\r\nabc\r\n0\r\n\r\n", timeout=5)
    # Broken framing is rejected by the HTTP parser itself (it answers 400 and closes).
    assert re.match(rb"HTTP/1\.[01] 400 ", out), out[:200]
    assert nothing_stored(server)


def test_put_bad_locators(server: KeepServer) -> None:
    for path in ["/" + md5(b"foo")[:31], "/" + md5(b"foo").upper(), "/xyz", "/"]:
        r = server.put(b"foo", path=path)
        assert r.status == 400, path
        assert r.text == "Bad Request\n"
    assert nothing_stored(server)


def test_admin_root_token_is_not_needed_for_put(server: KeepServer) -> None:
    assert server.put(b"foo", token=ROOT_TOKEN).status == 200


# --- large bodies are written to disk while they arrive (committed only once verified) --------------------------

BIG = 6 * 1024 * 1024


def test_big_put_wrong_hash_leaves_nothing(server: KeepServer) -> None:
    data = os.urandom(BIG)
    r = server.put(data, path=f"/{md5(b'something else')}")
    assert r.status == 400 and r.text.startswith("content hash ")
    assert nothing_stored(server)


def test_big_put_client_vanishes_midway(server: KeepServer) -> None:
    data = os.urandom(BIG)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"PUT /{md5(data)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        s.sendall(data[: 4 * BIG // 5])  # enough for a segment to be on disk already
        time.sleep(0.5)
    deadline = time.monotonic() + 5
    while not nothing_stored(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nothing_stored(server)
    assert server.put(data).status == 200  # and the block can be stored afterwards


def test_big_put_duplicate_touches(server: KeepServer) -> None:
    data = os.urandom(BIG)
    assert server.put(data).status == 200
    first = server.index().text.split()[1]
    time.sleep(0.01)
    assert server.put(data).status == 200
    lines = [line for line in server.index().text.splitlines() if line]
    assert len(lines) == 1 and int(lines[0].split()[1]) > int(first)


def test_big_put_goes_elsewhere_when_first_volume_full(server: KeepServer) -> None:
    data = os.urandom(BIG)
    h = md5(data)
    first = 0 if md5((h + "0" * 15).encode()) < md5((h + "1" * 15).encode()) else 1
    os.symlink(str(int(time.time())), server.volume_root(first) / "full")
    r = server.put(data)
    assert r.status == 200
    assert h in stored_files(server.volume_root(1 - first))
    assert h not in stored_files(server.volume_root(first))
    assert server.get(r.text.strip(), timeout=60).body == data


@pytest.mark.parametrize("mode", ["journal", "syncfs", "off"])
def test_small_blocks_are_group_committed_unless_turned_off(server_factory: ServerFactory, mode: str) -> None:
    # By default a group commit is made durable by the volume's journal (one fdatasync); with Journal off by two
    # syncfs calls; with GroupCommit off file by file.
    own = {"GroupCommit": mode != "off", "Journal": mode == "journal"}
    srv = server_factory(volumes=1, extra={"KeepstorePy": own})
    blocks = [os.urandom(4096) for _ in range(4)]
    assert [srv.put(b).status for b in blocks] == [200] * 4
    metrics = srv.metrics()
    syncfs = re.findall(r'arvados_keepstore_volume_operations\{[^}]*operation="syncfs"[^}]*\} (\d+)', metrics)
    journal = re.findall(r'operation="journal_fdatasync"[^}]*\} (\d+)', metrics)
    fsync_path = re.findall(r'operation="create"[^}]*\} (\d+)', metrics)
    assert fsync_path and int(fsync_path[0]) >= 4
    if mode == "journal":
        assert journal and 1 <= int(journal[0]) <= 4 and not syncfs
    elif mode == "syncfs":
        assert syncfs and 2 <= int(syncfs[0]) <= 8 and not journal  # two syncfs calls per group of one or more
    else:
        assert not syncfs and not journal
    for b in blocks:
        assert srv.get(sign(f"{md5(b)}+{len(b)}")).body == b


def failing_shims(tmp_path: Path, shims: dict[str, list[str]]) -> dict[str, Path]:
    """LD_PRELOAD libraries, one per name, in which each listed system call fails with EIO."""
    failing = "#include <errno.h>\nint %s(int fd) { (void)fd; errno = EIO; return -1; }\n"
    return {name: build_shim(tmp_path, "".join(failing % c for c in calls), name) for name, calls in shims.items()}


def test_group_commit_falls_back_to_fsync_when_syncfs_fails(server_factory: ServerFactory, tmp_path: Path) -> None:
    # A syncfs(2) that reports an error (a writeback failure somewhere on the file system) must not fail blocks that
    # are fine: the group's files are fsynced one by one, then its directories. An LD_PRELOAD shim makes every
    # syncfs fail with EIO, so both fallbacks run; the blocks must still be stored and readable.
    shims = failing_shims(tmp_path, {"syncfs": ["syncfs"], "all": ["syncfs", "fsync"]})

    no_journal = {"KeepstorePy": {"Journal": False}}  # (the journal's own failures: the test below)
    srv = server_factory(volumes=1, name="syncfs-fails", env={"LD_PRELOAD": str(shims["syncfs"])}, extra=no_journal)
    blocks = [os.urandom(4096) for _ in range(6)]
    assert [srv.put(b).status for b in blocks] == [200] * 6
    for b in blocks:
        assert srv.get(sign(f"{md5(b)}+{len(b)}")).body == b
    assert not temp_files(srv.volume_root(0))

    # The contrast: when the fsyncs fail too, the disk really is failing: the PUT fails and nothing is left behind.
    bad = server_factory(volumes=1, name="fsync-fails", env={"LD_PRELOAD": str(shims["all"])}, extra=no_journal)
    assert bad.put(b"y" * 4096).status == 503
    assert bad.index_hashes() == []
    assert not temp_files(bad.volume_root(0))


def test_journal_failures_lose_no_block(server_factory: ServerFactory, tmp_path: Path) -> None:
    # A journal whose fdatasync fails: the group is committed with two syncfs calls instead, and the journal is
    # used no more. A checkpoint whose syncfs fails (some block file's writeback failed): its records' blocks are
    # written again file by file, and the journal goes on.
    shims = failing_shims(tmp_path, {"fdatasync": ["fdatasync"], "syncfs": ["syncfs"]})

    def counter(srv: KeepServer, family: str, label: str) -> int:
        found = re.findall(rf'{family}\{{[^}}]*"{label}"[^}}]*\}} (\d+)', srv.metrics())
        return int(found[0]) if found else 0

    ops, errors = "arvados_keepstore_volume_operations", "arvados_keepstore_volume_errors"
    srv = server_factory(volumes=1, name="fdatasync-fails", env={"LD_PRELOAD": str(shims["fdatasync"])})
    blocks = [os.urandom(4096) for _ in range(4)]
    assert [srv.put(b).status for b in blocks] == [200] * 4
    assert 1 <= counter(srv, errors, "journal_write") <= 2  # once per worker process that took a PUT (its journal)
    assert counter(srv, ops, "journal_fdatasync") == 0 and counter(srv, ops, "syncfs") == 2 * 4
    for b in blocks:
        assert srv.get(sign(f"{md5(b)}+{len(b)}")).body == b

    srv = server_factory(volumes=1, name="checkpoint-fails", env={"LD_PRELOAD": str(shims["syncfs"])})
    assert [srv.put(b).status for b in blocks] == [200] * 4
    deadline = time.monotonic() + 10
    while counter(srv, errors, "journal_syncfs") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # the checkpoint comes within a second
    assert counter(srv, errors, "journal_syncfs") >= 1
    rewritten = counter(srv, ops, "create")
    assert rewritten >= 2 * 4  # each block once by the journal, once again by the checkpoint
    later = os.urandom(4096)
    assert srv.put(later).status == 200
    assert counter(srv, ops, "journal_fdatasync") >= 2  # still in use
    for b in [*blocks, later]:
        assert srv.get(sign(f"{md5(b)}+{len(b)}")).body == b
    assert not temp_files(srv.volume_root(0))


@pytest.mark.parametrize("direct", [True, False])
def test_direct_writes_unless_turned_off(server_factory: ServerFactory, direct: bool) -> None:
    # KeepstorePy.DirectWrites reaches the volume: a PUT's data goes straight to the device (none of the stored
    # file is left in the page cache), or, turned off, through the page cache. Both ways the block is durable and
    # reads back intact: 1 MiB is written whole, 5 MiB streamed as it arrives.
    srv = server_factory(volumes=1, extra={"KeepstorePy": {"DirectWrites": direct}})
    reason = page_cache_skip_reason(srv.volume_root(0))
    if reason is not None:
        pytest.skip(reason)
    blocks = [os.urandom(1 << 20), os.urandom(5 << 20)]
    for b in blocks:
        r = srv.put(b)
        assert r.status == 200
        resident = page_cache_residency(stored_files(srv.volume_root(0))[md5(b)])
        assert resident == 0.0 if direct else resident > 0.9
        assert srv.get(r.text.strip()).body == b


def anon_huge_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


@pytest.mark.parametrize("huge", [True, False])
def test_block_buffers_in_huge_pages_unless_turned_off(server_factory: ServerFactory, huge: bool) -> None:
    # KeepstorePy.HugePageBuffers reaches the buffer pool: a PUT's body lands in transparent huge pages (which the
    # direct write then hands to the device in fewer, larger requests), or, turned off, in small pages only (nothing
    # else in the process asks for huge pages: THP in "madvise" mode grants them only where asked).
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages are not available on this machine")
    srv = server_factory(volumes=1, extra={"KeepstorePy": {"HugePageBuffers": huge, "Workers": 1}})
    data = os.urandom(8 << 20)
    r = srv.put(data)
    assert r.status == 200
    assert srv.get(r.text.strip()).body == data
    kib = anon_huge_kib(process_tree(srv.pid))
    if huge:
        assert kib >= 2048
    elif "[always]" not in mode.read_text():
        assert kib == 0

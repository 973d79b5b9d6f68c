"""Pull and trash lists across real keepstore processes sharing one signing key: SPEC §4, §11 items 61–71."""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from keeptest import (
    ROOT_TOKEN,
    TTL,
    USER_TOKEN,
    KeepServer,
    ServerFactory,
    StubPeer,
    free_port,
    md5,
    sign,
    stored_files,
    vol_uuid,
    wait_for,
)


def put_list(srv: KeepServer, kind: str, items: list[dict[str, Any]] | Any, raw: bytes | None = None) -> Any:
    body = raw if raw is not None else json.dumps(items).encode()
    return srv.req("PUT", f"/{kind}", body=body, token=ROOT_TOKEN)


def on_mount(srv: KeepServer, n: int, h: str) -> bool:
    return h in srv.index_hashes(f"/mounts/{vol_uuid(n)}/blocks")


def pull_item(data: bytes, *servers: KeepServer | StubPeer | str, mount: str = "") -> dict[str, Any]:
    urls = [s if isinstance(s, str) else s.url for s in servers]
    return {"locator": f"{md5(data)}+{len(data)}", "servers": urls, "mount_uuid": mount}


def queues_idle(srv: KeepServer, kind: str = "PullQueue") -> bool:
    st = srv.status_json()[kind]
    return bool(st == {"Queued": 0, "InProgress": 0})


def index_mtime(srv: KeepServer, h: str, mount: int) -> int:
    for line in srv.index(f"/mounts/{vol_uuid(mount)}/blocks").text.splitlines():
        if line.startswith(h):
            return int(line.split()[1])
    raise AssertionError(f"{h} not on mount {mount}")


def backdate(srv: KeepServer, h: str, mount: int, seconds: float) -> int:
    path = stored_files(srv.volume_root(mount))[h]
    t = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(t, t))
    return t


@pytest.fixture
def pair(server_factory: ServerFactory) -> tuple[KeepServer, KeepServer]:
    return server_factory(name="src"), server_factory(name="dst")


# --- pull lists ------------------------------------------------------------------------------------------------


def test_pull(pair: tuple[KeepServer, KeepServer]) -> None:  # item 61
    src, dst = pair
    data = os.urandom(100_000)
    assert src.put(data).status == 200
    r = put_list(dst, "pull", [pull_item(data, src)])
    assert (r.status, r.body) == (200, b"")
    wait_for(lambda: md5(data) in dst.index_hashes(), what="pulled block in index")
    assert dst.get(sign(f"{md5(data)}+{len(data)}")).body == data
    assert wait_for(lambda: queues_idle(dst))
    assert 'arvados_keepstore_pull_results{outcome="pulled"} 1' in dst.metrics()


def test_pull_to_given_mount(pair: tuple[KeepServer, KeepServer]) -> None:  # item 62
    src, dst = pair
    for i in range(6):  # whatever rendezvous says, every block lands on V1
        data = f"mount test {i}".encode()
        src.put(data)
        put_list(dst, "pull", [pull_item(data, src, mount=vol_uuid(1))])
        wait_for(lambda: on_mount(dst, 1, md5(data)), what="block on V1")  # noqa: B023
        assert not on_mount(dst, 0, md5(data))


def test_pull_list_validation(pair: tuple[KeepServer, KeepServer]) -> None:  # item 63, difference 6
    src, dst = pair
    good = pull_item(b"foo", src)
    long_list = [pull_item(f"never {i}".encode(), "http://127.0.0.1:9") for i in range(3)]
    dst_stalled = put_list(dst, "pull", long_list)
    assert dst_stalled.status == 200
    cases: list[tuple[bytes, str]] = [
        (json.dumps([{"locator": md5(b"foo"), "servers": [src.url]}]).encode(), "item 0: locator "),
        (b"", "invalid JSON"),
        (b"{not json", "invalid JSON"),
        (b'{"locator": "x"}', "expected a JSON array"),
        (json.dumps([good, "string"]).encode(), "item 1: expected an object"),
        (json.dumps([good, {"locator": "xyz+3", "servers": [src.url]}]).encode(), "item 1: invalid locator"),
        (json.dumps([good, {"locator": f"{md5(b'a')}+1", "servers": "x"}]).encode(), 'item 1: "servers"'),
        (json.dumps([good, {"locator": f"{md5(b'a')}+1", "servers": ["ftp://x"]}]).encode(), "item 1: server"),
        (json.dumps([good, {**good, "mount_uuid": 5}]).encode(), 'item 1: "mount_uuid"'),
    ]
    before = dst.status_json()["PullQueue"]
    for body, message in cases:
        r = put_list(dst, "pull", None, raw=body)
        assert r.status == 400, body
        assert message in r.text, (body, r.text)
        assert dst.status_json()["PullQueue"] == before  # the queue is unchanged


def test_pull_from_server_without_block(pair: tuple[KeepServer, KeepServer]) -> None:  # item 64
    src, dst = pair
    data = b"nowhere to be found"
    dead = f"http://127.0.0.1:{free_port()}"
    r = put_list(dst, "pull", [pull_item(data, src), pull_item(data + b"2", dead)])
    assert r.status == 200
    wait_for(lambda: queues_idle(dst))
    assert dst.index_hashes() == []
    m = dst.metrics()
    assert 'arvados_keepstore_pull_results{outcome="not_found"} 1' in m
    assert 'arvados_keepstore_pull_results{outcome="error"} 1' in m


@pytest.mark.parametrize("first", ["down", "lacks", "corrupt", "wrong_size"])
def test_pull_falls_back_to_second_server(server_factory: ServerFactory, first: str) -> None:
    data = os.urandom(70_000)
    good = server_factory(name="good")
    dst = server_factory(name="dst")
    assert good.put(data).status == 200
    stub = None
    if first == "down":
        first_url = f"http://127.0.0.1:{free_port()}"
    elif first == "lacks":
        first_url = server_factory(name="empty").url
    else:
        body = (b"X" + data[1:]) if first == "corrupt" else data[:-1]
        stub = StubPeer(lambda path: (200, body))
        first_url = stub.url
    try:
        assert put_list(dst, "pull", [pull_item(data, first_url, good)]).status == 200
        wait_for(lambda: md5(data) in dst.index_hashes(), what="pulled block")
        assert dst.get(sign(f"{md5(data)}+{len(data)}")).body == data
        if stub is not None:
            # Difference 4: a fresh random token and a signature that expires within a minute.
            ((path, headers),) = stub.requests
            token = headers["Authorization"].removeprefix("Bearer ")
            assert token != USER_TOKEN and len(token) >= 32
            expiry = int(path.rsplit("@", 1)[1], 16)
            assert time.time() < expiry <= time.time() + 61
            from keeptest import SIGNING_KEY

            from keepstore.signing import Signer

            Signer(SIGNING_KEY.encode(), TTL).verify(path.lstrip("/"), token)
    finally:
        if stub is not None:
            stub.close()


def test_pull_with_no_good_server_stores_nothing(server_factory: ServerFactory) -> None:
    data = os.urandom(50_000)
    dst = server_factory(name="dst")
    corrupt = StubPeer(lambda path: (200, b"Y" + data[1:]))
    too_long = StubPeer(lambda path: (200, data + b"extra"))
    try:
        item = pull_item(data, corrupt.url, too_long.url, f"http://127.0.0.1:{free_port()}")
        assert put_list(dst, "pull", [item]).status == 200
        wait_for(lambda: queues_idle(dst))
        assert dst.index_hashes() == []
        assert 'arvados_keepstore_pull_results{outcome="bad_checksum"} 1' in dst.metrics()
        assert all(not list(dst.volume_root(i).rglob("tmp*")) for i in range(2))
    finally:
        corrupt.close()
        too_long.close()


def test_pull_touches_existing_copy(pair: tuple[KeepServer, KeepServer]) -> None:
    _src, dst = pair
    data = b"already here"
    assert dst.put(data).status == 200
    (n,) = [i for i in range(2) if on_mount(dst, i, md5(data))]
    old = backdate(dst, md5(data), n, 5000)
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert put_list(dst, "pull", [pull_item(data, unreachable, mount=vol_uuid(n))]).status == 200
    wait_for(lambda: index_mtime(dst, md5(data), n) > old, what="touched copy")
    # The worker counts the outcome just after the touch it waited for: a moment later than the index shows it.
    outcome = 'arvados_keepstore_pull_results{outcome="already_present"} 1'
    wait_for(lambda: outcome in dst.metrics(), what="already_present counted")


def test_new_pull_list_replaces_old(server_factory: ServerFactory) -> None:
    # A slow peer keeps the single worker busy while a long list queues behind it.
    slow = StubPeer(lambda path: (time.sleep(0.3), (404, b""))[1])
    dst = server_factory(name="dst", collections={"BlobReplicateConcurrency": 1})
    try:
        long_list = [pull_item(f"item {i}".encode(), slow.url) for i in range(500)]
        assert put_list(dst, "pull", long_list).status == 200
        wait_for(lambda: dst.status_json()["PullQueue"]["InProgress"] == 1)
        assert dst.status_json()["PullQueue"]["Queued"] > 400
        assert put_list(dst, "pull", long_list[:7]).status == 200
        st = dst.status_json()["PullQueue"]
        assert st["Queued"] == 7 and st["InProgress"] == 1
        assert "arvados_keepstore_pull_queue_pending_entries 7" in dst.metrics()
        assert put_list(dst, "pull", []).status == 200
        assert dst.status_json()["PullQueue"]["Queued"] == 0
    finally:
        slow.close()


def test_pull_2000_blocks_from_two_servers(server_factory: ServerFactory) -> None:
    a, b = server_factory(name="a"), server_factory(name="b")
    c = server_factory(name="c")
    rng = random.Random(7)
    sizes = rng.choices([64 << 10, 256 << 10, 1 << 20, 4 << 20], weights=[80, 10, 7, 3], k=2000)
    base = os.urandom(4 << 20)
    blocks = [f"{i:08d}".encode() + base[: size - 8] for i, size in enumerate(sizes)]

    def seed(i: int) -> int:
        return (a if i % 2 else b).put(blocks[i], token=None).status

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(seed, range(len(blocks)))) == {200}
    items = [pull_item(blk, a if i % 2 else b) for i, blk in enumerate(blocks)]
    t0 = time.monotonic()
    assert put_list(c, "pull", items).status == 200
    progress = []
    while True:
        st = c.status_json()["PullQueue"]
        progress.append(st["Queued"])
        if st == {"Queued": 0, "InProgress": 0}:
            break
        assert time.monotonic() - t0 < 240, f"pull too slow: {st}"
        time.sleep(0.2)
    assert len(set(progress)) > 2  # progress was visible while it ran
    assert sorted(c.index_hashes()) == sorted(md5(blk) for blk in blocks)
    assert f'arvados_keepstore_pull_results{{outcome="pulled"}} {len(blocks)}' in c.metrics()


def test_pull_buffers_count_against_pool(server_factory: ServerFactory) -> None:
    src = server_factory(name="src")
    dst = server_factory(name="dst", api={"MaxKeepBlobBuffers": 1})
    pulled = [os.urandom(200_000) for _ in range(30)]
    for blk in pulled:
        assert src.put(blk).status == 200
    client = [os.urandom(150_000) for _ in range(20)]
    assert put_list(dst, "pull", [pull_item(blk, src) for blk in pulled]).status == 200
    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda blk: dst.put(blk).status, client))
    assert statuses == [200] * 20
    wait_for(lambda: queues_idle(dst), timeout=60)
    assert sorted(dst.index_hashes()) == sorted(md5(b) for b in pulled + client)
    assert dst.status_json()["BufferPool"]["BuffersInUse"] == 0


# --- trash lists ------------------------------------------------------------------------------------------------


def old_block(srv: KeepServer, data: bytes, mount: int, age: float = TTL + 100) -> int:
    """Put ``data`` on ``mount`` (only), made ``age`` seconds old; return its index mtime."""
    h = md5(data)
    d = srv.volume_root(mount) / h[:3]
    d.mkdir(exist_ok=True)
    (d / h).write_bytes(data)
    backdate(srv, h, mount, age)
    return index_mtime(srv, h, mount)


def trash_item(data: bytes, mtime: int, mount: str = "") -> dict[str, Any]:
    return {"locator": f"{md5(data)}+{len(data)}", "block_mtime": mtime, "mount_uuid": mount}


def test_trash(server: KeepServer) -> None:  # item 65
    data = b"trash me"
    mtime = old_block(server, data, 0)
    assert (put_list(server, "trash", [trash_item(data, mtime)]).status) == 200
    wait_for(lambda: md5(data) not in server.index_hashes(), what="trashed")
    assert server.get(sign(f"{md5(data)}+{len(data)}")).status == 404
    assert list(server.volume_root(0).glob(f"*/{md5(data)}.trash.*"))


def test_trash_mtime_off_by_one(server: KeepServer) -> None:  # item 66
    data = b"almost"
    mtime = old_block(server, data, 0)
    put_list(server, "trash", [trash_item(data, mtime + 1)])
    wait_for(lambda: queues_idle(server, "TrashQueue"))
    time.sleep(0.1)
    assert md5(data) in server.index_hashes()
    assert 'arvados_keepstore_trash_results{outcome="mtime_mismatch"} 1' in server.metrics()


def test_trash_young_block(server: KeepServer) -> None:  # item 67
    data = b"young"
    mtime = old_block(server, data, 0, age=10)
    put_list(server, "trash", [trash_item(data, mtime)])
    wait_for(lambda: queues_idle(server, "TrashQueue"))
    assert md5(data) in server.index_hashes()
    assert 'arvados_keepstore_trash_results{outcome="too_young"} 1' in server.metrics()


def test_trash_wrong_mount(server: KeepServer) -> None:  # item 68
    data = b"on V0"
    mtime = old_block(server, data, 0)
    put_list(server, "trash", [trash_item(data, mtime, vol_uuid(1))])
    wait_for(lambda: queues_idle(server, "TrashQueue"))
    assert md5(data) in server.index_hashes()


def test_trash_empty_list(server: KeepServer) -> None:  # item 69
    assert put_list(server, "trash", []).status == 200
    assert "arvados_keepstore_trash_queue_pending_entries 0" in server.metrics()


def test_trash_list_validation(server: KeepServer) -> None:
    for body, message in [
        (b"[1]", "item 0: expected an object"),
        (json.dumps([{"locator": f"{md5(b'x')}+1", "block_mtime": "123"}]).encode(), 'item 0: "block_mtime"'),
        (json.dumps([{"locator": f"{md5(b'x')}+1", "block_mtime": 1.5e18}]).encode(), 'item 0: "block_mtime"'),
        (json.dumps([{"locator": "bad", "block_mtime": 1}]).encode(), "item 0: invalid locator"),
        (b"null", "expected a JSON array"),
    ]:
        r = put_list(server, "trash", None, raw=body)
        assert r.status == 400 and message in r.text, (body, r.text)


@pytest.mark.parametrize(
    "case",
    [
        # SPEC §4.4 upstream scenario table: (where the replica is, mount named in the list, mtime relation, age,
        # read-only flags) -> trashed?
        dict(mount=0, target="", match=True, old=True, expect=True),
        dict(mount=0, target="", match=True, old=False, expect=False),
        dict(mount=0, target="", match=False, old=True, expect=False),
        dict(mount=0, target="V0", match=True, old=True, expect=True),
        dict(mount=0, target="V1", match=True, old=True, expect=False),
        dict(mount=0, target="V0", match=False, old=True, expect=False),
        dict(mount=0, target="", match=True, old=True, readonly="plain", expect=False),
        dict(mount=0, target="", match=True, old=True, readonly="allow_trash", expect=True),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_trash_scenarios(server_factory: ServerFactory, tmp_path: Any, case: dict[str, Any]) -> None:
    from keeptest import directory_volume

    ro: dict[str, Any] = {}
    if case.get("readonly") == "plain":
        ro = {"ReadOnly": True}
    elif case.get("readonly") == "allow_trash":
        ro = {"ReadOnly": True, "AllowTrashWhenReadOnly": True}
    srv = server_factory(volumes=[directory_volume(tmp_path / "v0", 0, **ro), directory_volume(tmp_path / "v1", 1)])
    data = b"scenario block"
    mtime = old_block(srv, data, case["mount"], age=TTL + 100 if case["old"] else 60)
    target = {"": "", "V0": vol_uuid(0), "V1": vol_uuid(1)}[case["target"]]
    put_list(srv, "trash", [trash_item(data, mtime if case["match"] else mtime - 1, target)])
    wait_for(lambda: queues_idle(srv, "TrashQueue"))
    time.sleep(0.05)
    still = md5(data) in srv.index_hashes()
    assert still is not case["expect"]


def test_trash_disabled_accepts_list_but_does_nothing(server_factory: ServerFactory) -> None:
    srv = server_factory(collections={"BlobTrash": False})
    data = b"keep me"
    mtime = old_block(srv, data, 0)
    assert put_list(srv, "trash", [trash_item(data, mtime)]).status == 200
    time.sleep(0.3)
    assert srv.status_json()["TrashQueue"]["Queued"] == 1
    assert md5(data) in srv.index_hashes()


def test_trash_lifetime_zero_deletes(server_factory: ServerFactory) -> None:  # item 70
    srv = server_factory(collections={"BlobTrashLifetime": "0s"})
    data = b"gone at once"
    mtime = old_block(srv, data, 0)
    put_list(srv, "trash", [trash_item(data, mtime)])
    wait_for(lambda: not list(srv.volume_root(0).glob(f"*/{md5(data)}*")), what="file deleted")
    assert srv.req("PUT", f"/untrash/{md5(data)}+{len(data)}", token=ROOT_TOKEN).status == 404


def test_trash_sweep(server_factory: ServerFactory) -> None:  # item 71
    srv = server_factory(collections={"BlobTrashLifetime": "2s", "BlobTrashCheckInterval": "1s"})
    data = b"swept later"
    mtime = old_block(srv, data, 0)
    put_list(srv, "trash", [trash_item(data, mtime)])
    trashed = wait_for(lambda: list(srv.volume_root(0).glob(f"*/{md5(data)}.trash.*")), what="trash file")
    deadline = int(trashed[0].name.rsplit(".", 1)[1])
    assert abs(deadline - (time.time() + 2)) <= 2
    assert srv.req("PUT", f"/untrash/{md5(data)}+{len(data)}", token=ROOT_TOKEN).status == 200  # recoverable...
    assert md5(data) in srv.index_hashes()
    backdate(srv, md5(data), 0, TTL + 100)
    put_list(srv, "trash", [trash_item(data, index_mtime(srv, md5(data), 0))])
    wait_for(lambda: not list(srv.volume_root(0).glob(f"*/{md5(data)}*")), timeout=15, what="sweep")
    assert srv.req("PUT", f"/untrash/{md5(data)}+{len(data)}", token=ROOT_TOKEN).status == 404  # ...until swept
    assert "EmptyTrash stats" in srv.log_text()
    assert "arvados_keepstore_emptytrash_deleted_blocks 1" in srv.metrics()


def test_sigterm_stops_workers_cleanly(server_factory: ServerFactory) -> None:
    src = server_factory(name="src")
    dst = server_factory(name="dst")
    blocks = [os.urandom(2 << 20) for _ in range(40)]
    for blk in blocks:
        src.put(blk)
    put_list(dst, "pull", [pull_item(blk, src) for blk in blocks])
    wait_for(lambda: dst.status_json()["PullQueue"]["InProgress"] > 0)
    assert dst.stop() == 0
    for i in range(2):
        assert not list(dst.volume_root(i).rglob("tmp*"))
        for h, path in stored_files(dst.volume_root(i)).items():
            assert md5(path.read_bytes()) == h

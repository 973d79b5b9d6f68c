"""MD5 checkpoints end to end, against a real keepstore process: a PUT stores them in the block file's xattr, a GET
verifies from them (and still catches corruption), and a GET of a block without them (as the Go keepstore writes
blocks) adds them."""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from keeptest import USER_TOKEN, KeepServer, ServerFactory, md5, sign

from keepstore.hashing import Checkpoints, new_md5, segment_length
from keepstore.volumes.directory import CHECKPOINT_XATTR

MiB = 1 << 20


def stored_checkpoints(path: Path) -> bytes | None:
    """The block file's checkpoint xattr, None if it has none. No xattr support at all raises: the test fails."""
    try:
        return os.getxattr(path, CHECKPOINT_XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def recorded(data: bytes) -> bytes:
    """The encoded checkpoints a PUT of ``data`` (with its Content-Length) records."""
    interval = segment_length(len(data))
    state = new_md5(interval)
    state.update(data)
    found = Checkpoints.of(state, interval, len(data))
    assert found is not None
    return found.encode()


def mismatches(srv: KeepServer) -> int:
    pattern = r'^arvados_keepstore_volume_operations\{device_id="[^"]+",operation="checkpoint_mismatch"\} (\d+)$'
    return sum(int(n) for n in re.findall(pattern, srv.metrics(), re.M))


@pytest.fixture
def one_volume(server_factory: ServerFactory) -> KeepServer:
    return server_factory(volumes=1)


def block_file(srv: KeepServer, h: str) -> Path:
    return srv.volume_root(0) / h[:3] / h


@pytest.mark.parametrize("size", [1 * MiB, 5 * MiB])  # 5 MiB: streamed to disk while it arrives
def test_put_stores_checkpoints_and_get_catches_corruption(one_volume: KeepServer, size: int) -> None:
    srv = one_volume
    data = os.urandom(size)
    h = md5(data)
    r = srv.put(data)
    assert r.status == 200, r.text
    loc = r.text.strip()
    path = block_file(srv, h)
    assert stored_checkpoints(path) == recorded(data)

    r = srv.get(loc)
    assert (r.status, r.body == data) == (200, True)
    assert mismatches(srv) == 0

    with open(path, "r+b") as f:  # in place: the file keeps its xattr
        f.seek(size // 2)
        f.write(bytes([data[size // 2] ^ 0x01]))
    bad = path.read_bytes()
    assert stored_checkpoints(path) == recorded(data)
    r = srv.get(loc)
    assert (r.status, r.text) == (502, "checksum mismatch in stored data\n")
    assert mismatches(srv) == 1  # the parallel check failed, the sequential one confirmed
    deadline = time.monotonic() + 5
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not path.exists()
    (moved,) = (srv.volume_root(0) / "quarantine").iterdir()
    assert moved.name.startswith(f"{h}.")
    assert moved.read_bytes() == bad
    assert srv.get(loc).status == 404


def test_block_without_checkpoints_gets_them_on_first_get(one_volume: KeepServer) -> None:
    srv = one_volume
    data = os.urandom(1 * MiB)
    h = md5(data)
    path = block_file(srv, h)
    path.parent.mkdir()
    path.write_bytes(data)  # as the Go keepstore writes a block: no xattr
    assert stored_checkpoints(path) is None
    loc = sign(f"{h}+{len(data)}", USER_TOKEN)
    r = srv.get(loc)
    assert (r.status, r.body == data) == (200, True)
    assert stored_checkpoints(path) == recorded(data)
    r = srv.get(loc)
    assert (r.status, r.body == data) == (200, True)
    assert mismatches(srv) == 0


def test_chunked_put_of_a_small_block_learns_its_checkpoints_later(one_volume: KeepServer) -> None:
    # Without a Content-Length the checkpoint interval is that of the largest block: a 1 MiB body has one segment
    # at that interval, so it is stored without checkpoints, and the first verified read records them.
    srv = one_volume
    data = os.urandom(1 * MiB)
    h = md5(data)

    def body() -> Iterator[bytes]:
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    r = srv.req("PUT", f"/{h}", body=body(), token=USER_TOKEN)
    assert r.status == 200, r.text
    path = block_file(srv, h)
    assert stored_checkpoints(path) is None
    r = srv.get(r.text.strip())
    assert (r.status, r.body == data) == (200, True)
    assert stored_checkpoints(path) == recorded(data)

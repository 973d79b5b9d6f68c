"""Crash safety: SIGKILL with PUTs in flight loses nothing acknowledged and never exposes a partial block."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from keeptest import KeepServer, ServerFactory, md5, request, sign, stored_files, temp_files

WRITERS = 20


def test_sigkill_during_puts(server_factory: ServerFactory) -> None:
    srv = server_factory()
    acked: dict[str, bytes] = {}
    attempted: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    base = os.urandom(8 << 20)

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set() and i < 200:
            # Sizes from 4 KiB to 8 MiB so that kills land in every phase of a write, group commits (up to 64 KiB)
            # and streamed writes (4 MiB and up) included.
            size = (4 << 10) << ((n + i) % 12)
            data = f"{n}:{i}:".encode() + base[: size - 16] + os.urandom(8)
            h = md5(data)
            with lock:
                attempted[h] = data
            try:
                r = request(srv.port, "PUT", f"/{h}", body=data, timeout=10)
            except OSError:
                return
            if r.status == 200:
                with lock:
                    acked[h] = data
            i += 1

    with ThreadPoolExecutor(WRITERS) as pool:
        futures = [pool.submit(writer, n) for n in range(WRITERS)]
        deadline = time.monotonic() + 20
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        srv.kill()  # SIGKILL with ~20 PUTs in flight
        stop.set()
        for f in futures:
            f.result()
    assert len(acked) >= 40

    # On disk, before restart: every block file is complete and correct (only temp files can be partial).
    for i in range(2):
        for h, path in stored_files(srv.volume_root(i)).items():
            assert hashlib.md5(path.read_bytes()).hexdigest() == h, f"partial or corrupt block visible: {path}"

    srv.start()
    for h, data in acked.items():
        r = srv.get(sign(f"{h}+{len(data)}"))
        assert r.status == 200 and r.body == data, h
    for h, data in attempted.items():
        if h not in acked:
            r = srv.get(sign(f"{h}+{len(data)}"))
            assert r.status in (200, 404), (h, r.status)
            assert r.status == 404 or r.body == data

    # The killed processes' journals were recovered at the restart: every journal file left is a live worker's
    # (flock()ed).
    for i in range(2):
        for path in (srv.volume_root(i) / "journal").glob("*.jnl"):
            fd = os.open(path, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)

    # Temp files left by the killed process are swept after the restart.
    deadline = time.monotonic() + 10
    while any(temp_files(srv.volume_root(i)) for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(temp_files(srv.volume_root(i)) for i in range(2))


def test_stale_temp_file_owned_by_live_writer_is_kept(server_factory: ServerFactory) -> None:
    # A temp file flock()ed by another live process is not swept, even if it is older than our start.
    import fcntl

    srv: KeepServer = server_factory(start=False)
    d = srv.volume_root(0) / "abc"
    d.mkdir(parents=True)
    live = d / f"tmp{'a' * 32}live"
    dead = d / f"tmp{'b' * 32}dead"
    live.write_bytes(b"partial")
    dead.write_bytes(b"partial")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        srv.start()
        deadline = time.monotonic() + 10
        while dead.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not dead.exists()
        assert live.exists()
    finally:
        os.close(fd)

"""Directory-volume specifics (SPEC §5.5): the on-disk layout shared with the Go keepstore, trash file names,
EmptyTrash, the temp-file sweep, the ``full`` marker and the quarantine directory."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from keeptest import file_system_type, page_cache_residency

from keepstore.config import ConfigError, VolumeSpec
from keepstore.errors import BlockNotFound, TooLarge, VolumeError, VolumeFull
from keepstore.hashing import PARALLEL_MIN, Checkpoints, digest_file, new_md5, segment_length
from keepstore.locator import BLOCK_SIZE
from keepstore.volumes import IndexEntry, directory
from keepstore.volumes.directory import CHECKPOINT_XATTR, FULL_MARKER_TTL, DirectoryParameters, DirectoryVolume

UUID = "zzzzz-nyw5e-000000000000000"
HOUR = 3600.0


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_spec(root: Path, read_only: bool = False) -> VolumeSpec:
    return VolumeSpec(
        uuid=UUID,
        driver="Directory",
        parameters={"Root": str(root)},
        key_path=f"Clusters.zzzzz.Volumes.{UUID}",
        read_only=read_only,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "vol"
    r.mkdir()
    return r


def run(
    root: Path,
    body: Callable[[DirectoryVolume], Awaitable[None]],
    serialize: bool = False,
    read_only: bool = False,
    group_commit: bool = False,
    direct_writes: bool = False,
) -> None:
    async def main() -> None:
        params = DirectoryParameters(
            root=str(root), serialize=serialize, group_commit=group_commit, direct_writes=direct_writes
        )
        vol = DirectoryVolume(make_spec(root, read_only), params)
        assert vol.group_commit == group_commit
        try:
            await vol.start()
            await body(vol)
        finally:
            await vol.close()

    asyncio.run(main())


async def read(vol: DirectoryVolume, h: str, size: int = 1 << 20) -> bytes:
    buf = bytearray(size)
    n = await vol.block_read(h, memoryview(buf))
    return bytes(buf[:n])


async def put(vol: DirectoryVolume, data: bytes) -> str:
    h = md5(data)
    await vol.block_write(h, memoryview(data))
    return h


async def index(vol: DirectoryVolume, prefix: str = "") -> dict[str, IndexEntry]:
    return {e.hash: e async for e in vol.index(prefix)}


def place(root: Path, data: bytes, name: str | None = None) -> Path:
    """Store a file the way the Go keepstore would have: ``<root>/<name[:3]>/<name>``, name defaulting to md5(data)."""
    h = name or md5(data)
    d = root / h[:3]
    d.mkdir(exist_ok=True)
    p = d / (name or h)
    p.write_bytes(data)
    return p


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- layout ------------------------------------------------------------------------------------------------------


def test_layout(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"foo")
        assert listing(root) == {h[:3], f"{h[:3]}/{h}"}  # no temp file left behind
        assert (root / h[:3] / h).read_bytes() == b"foo"  # raw bytes, no header
        assert (root / h[:3]).is_dir()
        assert (root / h[:3] / h).stat().st_mtime_ns == await vol.mtime(h)

    run(root, body)


def test_go_written_blocks_are_served(root: Path) -> None:
    data = b"written by the Go keepstore"
    path = place(root, data)
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    h = md5(data)

    async def body(vol: DirectoryVolume) -> None:
        assert await read(vol, h) == data
        assert await vol.mtime(h) == 1_600_000_000_123_456_789  # full nanosecond precision
        assert await index(vol) == {h: IndexEntry(h, len(data), 1_600_000_000_123_456_789)}
        await vol.block_trash(h, HOUR, HOUR)  # old enough
        (only,) = (root / h[:3]).iterdir()
        assert only.name.startswith(f"{h}.trash.")

    run(root, body)


def test_index_skips_junk(root: Path) -> None:
    good = place(root, b"good")
    h = md5(b"good")
    sub = root / h[:3]
    junk_names = [
        "xyz",
        h.upper(),
        h + "0",
        h[:31],
        f"{h}.trash.123",
        f"tmp{h}abcdef",
        f"{md5(b'x')[:3]}z{md5(b'x')[4:]}",
    ]
    for name in junk_names:
        (sub / name).write_bytes(b"junk")
    os.mkdir(sub / md5(b"a directory"))  # a directory named like a hash
    os.symlink(good, sub / md5(b"a symlink"))  # a symlink named like a hash
    for d in ("zzz", ".aaa", "quarantine", "ABC"):
        (root / d).mkdir()
        (root / d / md5(d.encode())).write_bytes(b"hidden")
    (root / "abcd.txt").write_bytes(b"junk")
    os.symlink(str(int(time.time()) - 2 * 3600), root / "full")

    async def body(vol: DirectoryVolume) -> None:
        assert set(await index(vol)) == {h}
        assert set(await index(vol, h[:1])) == {h}
        assert set(await index(vol, h[:5])) == {h}
        assert await index(vol, "z") == {}

    run(root, body)


def test_index_with_prefix_longer_and_shorter_than_subdir(root: Path) -> None:
    hashes = [md5(str(i).encode()) for i in range(50)]
    for i in range(50):
        place(root, str(i).encode())

    async def body(vol: DirectoryVolume) -> None:
        for prefix in ("", "a", hashes[0][:2], hashes[0][:3], hashes[0][:4], hashes[0]):
            assert set(await index(vol, prefix)) == {h for h in hashes if h.startswith(prefix)}

    run(root, body)


def test_hash_dir_that_is_a_file(root: Path) -> None:
    h = md5(b"blocked")
    (root / h[:3]).write_bytes(b"not a directory")

    async def body(vol: DirectoryVolume) -> None:
        with pytest.raises(BlockNotFound):
            await read(vol, h)
        with pytest.raises(BlockNotFound):
            await vol.mtime(h)
        with pytest.raises(BlockNotFound):
            await vol.block_touch(h)
        with pytest.raises(BlockNotFound):
            await vol.block_trash(h, 0, HOUR)
        with pytest.raises(BlockNotFound):
            await vol.block_untrash(h)
        with pytest.raises(VolumeError):
            await vol.block_write(h, memoryview(b"blocked"))
        assert await index(vol) == {}

    run(root, body)


def test_stored_file_larger_than_a_block_is_too_large(root: Path) -> None:
    h = md5(b"huge")
    (root / h[:3]).mkdir()
    with open(root / h[:3] / h, "wb") as f:
        f.truncate(BLOCK_SIZE + 1)  # sparse

    async def body(vol: DirectoryVolume) -> None:
        with pytest.raises(TooLarge):
            await vol.block_read(h, memoryview(bytearray(BLOCK_SIZE + 16)))

    run(root, body)


# --- trash files -------------------------------------------------------------------------------------------------


def trash_files(root: Path, h: str) -> list[Path]:
    d = root / h[:3]
    return sorted(d.glob(f"{h}.trash.*")) if d.is_dir() else []


def test_trash_file_name_has_the_deadline(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"to the trash")
        before = time.time()
        await vol.block_trash(h, 0, 7200)
        after = time.time()
        (trashed,) = trash_files(root, h)
        deadline = int(trashed.name.rsplit(".", 1)[1])
        assert int(before + 7200) <= deadline <= int(after + 7200)
        assert trashed.name == f"{h}.trash.{deadline}"
        assert trashed.read_bytes() == b"to the trash"
        assert not (root / h[:3] / h).exists()

    run(root, body)


def test_trash_of_young_block_leaves_file_alone(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"young")
        await vol.block_trash(h, HOUR, HOUR)
        assert (root / h[:3] / h).exists()
        assert trash_files(root, h) == []

    run(root, body)


def test_trash_with_lifetime_zero_unlinks(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"gone")
        await vol.block_trash(h, 0, 0)
        assert listing(root) == {h[:3]}

    run(root, body)


def test_touch_does_not_touch_trash(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"trashed")
        await vol.block_trash(h, 0, HOUR)
        (trashed,) = trash_files(root, h)
        mtime = trashed.stat().st_mtime_ns
        with pytest.raises(BlockNotFound):
            await vol.block_touch(h)
        assert trashed.stat().st_mtime_ns == mtime

    run(root, body)


def test_untrash_takes_the_first_trash_file_by_name(root: Path) -> None:
    h = md5(b"first")
    place(root, b"first", f"{h}.trash.1000000000")
    place(root, b"second", f"{h}.trash.2000000000")

    async def body(vol: DirectoryVolume) -> None:
        await vol.block_untrash(h)
        assert await read(vol, h) == b"first"
        assert [p.name for p in trash_files(root, h)] == [f"{h}.trash.2000000000"]
        await vol.block_untrash(h)
        assert await read(vol, h) == b"second"
        with pytest.raises(BlockNotFound):
            await vol.block_untrash(h)

    run(root, body)


def test_empty_trash_after_renaming_deadline(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        doomed = await put(vol, b"doomed!")
        kept = await put(vol, b"kept")
        await vol.block_trash(doomed, 0, HOUR)
        await vol.block_trash(kept, 0, HOUR)
        (trashed,) = trash_files(root, doomed)
        trashed.rename(trashed.with_name(f"{doomed}.trash.{int(time.time()) - 1}"))
        stats = await vol.empty_trash(4)
        assert (stats.deleted_blocks, stats.deleted_bytes) == (1, len(b"doomed!"))
        assert (stats.remaining_blocks, stats.remaining_bytes) == (1, len(b"kept"))
        assert trash_files(root, doomed) == []
        assert len(trash_files(root, kept)) == 1
        with pytest.raises(BlockNotFound):
            await vol.block_untrash(doomed)
        await vol.block_untrash(kept)

    run(root, body)


def test_empty_trash_deadline_equal_to_now_is_deleted(root: Path) -> None:
    h = md5(b"now")
    place(root, b"now", f"{h}.trash.{int(time.time())}")

    async def body(vol: DirectoryVolume) -> None:
        assert (await vol.empty_trash(1)).deleted_blocks == 1
        assert trash_files(root, h) == []

    run(root, body)


def test_empty_trash_only_walks_hex_dirs_and_trash_names(root: Path) -> None:
    past = int(time.time()) - 10
    h = md5(b"x")
    place(root, b"x", f"{h}.trash.{past}")  # deleted
    odd = [
        place(root, b"y", f"{md5(b'y')}.trash.abc"),
        place(root, b"z", f"{md5(b'z')}.trash."),
        place(root, b"w", f"{md5(b'w')[:31]}.trash.{past}"),
    ]
    tmp_like = root / h[:3] / f"tmp{md5(b'v')}.trash.{past}"
    tmp_like.write_bytes(b"v")
    odd.append(tmp_like)
    for d in (".aaa", "zzz", "quarantine"):
        (root / d).mkdir()
        (root / d / f"{md5(d.encode())}.trash.{past}").write_bytes(b"elsewhere")
        odd.append(root / d / f"{md5(d.encode())}.trash.{past}")

    async def body(vol: DirectoryVolume) -> None:
        stats = await vol.empty_trash(2)
        assert stats.deleted_blocks == 1
        assert trash_files(root, h) == []
        for p in odd:
            assert p.exists(), p

    run(root, body)


# --- temp files --------------------------------------------------------------------------------------------------


def test_sweep_temporary(root: Path) -> None:
    h = md5(b"interrupted")
    d = root / h[:3]
    d.mkdir()
    stale = d / f"tmp{h}0123456789ab"
    locked = d / f"tmp{h}ba9876543210"
    fresh_name = d / f"tmp{h}ffffffffffff"
    other = d / "tmpnothash"
    elsewhere = root / "zzz"
    elsewhere.mkdir()
    hidden = elsewhere / f"tmp{h}000000000000"
    for p in (stale, locked, other, hidden):
        p.write_bytes(b"partial")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    holder = os.open(locked, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a live writer (another process, say) owns it

        async def body(vol: DirectoryVolume) -> None:
            fresh_name.write_bytes(b"being written right now")  # newer than the volume: never swept
            now = time.time_ns()  # (the kernel stamps files from a coarse clock; be explicit)
            os.utime(fresh_name, ns=(now, now))
            assert await vol.sweep_temporary() == 1
            assert not stale.exists()
            assert locked.exists() and fresh_name.exists() and other.exists() and hidden.exists()
            fcntl.flock(holder, fcntl.LOCK_UN)
            assert await vol.sweep_temporary() == 1  # the writer died: now it goes
            assert not locked.exists()
            assert fresh_name.exists()

        run(root, body)
    finally:
        os.close(holder)


def python_write_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Volumes made from now on write through the Python steps (keepstore/_fileio.c has the same contract), so that a
    test can inject faults into them with monkeypatch."""
    monkeypatch.setattr(directory, "_native_write_block", None)


def test_write_holds_flock_on_its_temp_file(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # While a write is in progress (up to its commit), its temp file is flock()ed, so a concurrent sweep leaves it
    # alone. The Python path, observed at the commit step:
    seen: list[bool] = []
    real_finish = directory._finish_block

    def spying_finish(fd: int, dir_path: str, tmp_path: str, final_path: str) -> None:
        seen.append(_locked(tmp_path))
        real_finish(fd, dir_path, tmp_path, final_path)

    monkeypatch.setattr(directory, "_finish_block", spying_finish)

    python_write_path(monkeypatch)

    async def body(vol: DirectoryVolume) -> None:
        await put(vol, b"locked while written")

    run(root, body)
    assert seen == [True]


def test_native_write_holds_flock_on_its_temp_file(root: Path) -> None:
    # The native write (keepstore/_fileio.c) cannot be intercepted: watch a large write from outside instead.
    data = os.urandom(64 << 20)
    probes: list[bool] = []
    done = False

    def watch() -> None:
        # A temp file is locked from just after its creation (the instant between open and flock has nothing in
        # it yet) until it is renamed into place: every probe of one that holds data must find it locked.
        while not done:
            for tmp in root.glob("*/tmp*"):
                try:
                    if tmp.stat().st_size > 0:
                        probes.append(_locked(str(tmp)))
                except FileNotFoundError:
                    pass  # renamed into place meanwhile
            time.sleep(0.0005)

    async def body(vol: DirectoryVolume) -> None:
        nonlocal done
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for _ in range(3):
                await put(vol, data + os.urandom(8))
        finally:
            done = True
            watcher.join()

    run(root, body)
    assert probes, "no temp file with data was ever seen: the write was too fast to observe"
    assert all(probes)


def _locked(path: str) -> bool:
    probe = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(probe)


@pytest.mark.parametrize("native", [True, False])
def test_a_root_that_cannot_be_synced_fails_writes_not_the_start(
    root: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    # The start syncs the root (the block directories there then are durable from then on); if that fails, the
    # volume still starts, and each first write into a directory syncs the root itself: here the Python steps
    # fail like the start did (a VolumeError, nothing left behind), the native ones, whose fsync the fault does
    # not reach, store the block.
    if not native:
        python_write_path(monkeypatch)
    real_fsync = os.fsync
    resolved = str(root.resolve())

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == resolved:
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    data = b"written after a failed start-up sync"

    async def body(vol: DirectoryVolume) -> None:
        assert vol.stats.errors.get("OSError") == 1
        if native:
            await put(vol, data)
            assert await vol.block_read(md5(data), memoryview(bytearray(len(data)))) == len(data)
        else:
            with pytest.raises(VolumeError):
                await put(vol, data)

    run(root, body)
    assert [p for p in root.rglob("tmp*")] == []
    assert (root / md5(data)[:3] / md5(data)).exists() == native


@pytest.mark.parametrize("step", ["fsync", "rename", "fsync_dir"])
def test_commit_failure_closes_the_file_and_removes_the_temp(
    root: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    python_write_path(monkeypatch)
    # The Python fallback of finish_block has the C version's contract: fd closed and temp removed on any failure.
    monkeypatch.setattr(directory, "_finish_block", directory._finish_block_py)
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        is_dir = os.path.isdir(path)
        # (The block's directory: the root's fsyncs, at start and for a new directory, are not the commit's.)
        if (step == "fsync" and not is_dir) or (step == "fsync_dir" and is_dir and path != str(root.resolve())):
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        if step == "rename":
            raise OSError(errno.EIO, "injected")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    before = set(os.listdir("/proc/self/fd"))

    async def body(vol: DirectoryVolume) -> None:
        with pytest.raises(VolumeError):
            await put(vol, b"cannot be committed")

    run(root, body)
    assert [p for p in root.rglob("tmp*")] == []
    assert set(os.listdir("/proc/self/fd")) <= before  # no descriptor leaked


def test_native_commit_failure_closes_the_file(root: Path) -> None:
    from keepstore import _fileio

    (root / "abc").mkdir()
    tmp, final = root / "abc" / "tmpx", root / "abc" / "final"
    final.mkdir()  # renaming a file onto a directory fails: EISDIR
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
    with pytest.raises(IsADirectoryError) as info:
        _fileio.finish_block(fd, str(root / "abc"), str(tmp), str(final))
    assert info.value.filename == str(tmp)
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    assert tmp.exists()  # the caller removes it


def test_commit_onto_a_directory_fails_cleanly(root: Path) -> None:
    data = b"a directory sits where this block goes"
    (root / md5(data)[:3] / md5(data)).mkdir(parents=True)

    async def body(vol: DirectoryVolume) -> None:
        with pytest.raises(VolumeError):
            await vol.block_write(md5(data), memoryview(data))

    run(root, body)
    assert [p.name for p in (root / md5(data)[:3]).iterdir()] == [md5(data)]  # no temp file left


def test_failed_write_leaves_no_temp_file_and_keeps_old_copy(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python_write_path(monkeypatch)
    real_write = os.write
    data = b"x" * 100

    def failing_write(fd: int, buf: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
            raise OSError(errno.EIO, "I/O error")
        return real_write(fd, buf)

    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, data)
        monkeypatch.setattr(os, "write", failing_write)
        with pytest.raises(VolumeError):
            await vol.block_write(h, memoryview(b"y" * 100))
        monkeypatch.setattr(os, "write", real_write)
        assert listing(root) == {h[:3], f"{h[:3]}/{h}"}
        assert await read(vol, h) == data

    run(root, body)


# --- full --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_commit", [False, True])
def test_recent_full_symlink_refuses_writes(root: Path, group_commit: bool) -> None:
    os.symlink(str(int(time.time())), root / "full")

    async def body(vol: DirectoryVolume) -> None:
        with pytest.raises(VolumeFull):
            await put(vol, b"no room")
        assert listing(root) == {"full"}

    run(root, body, group_commit=group_commit)


@pytest.mark.parametrize("group_commit", [False, True])
def test_full_volume_still_finds_blocks_it_holds(root: Path, group_commit: bool) -> None:
    """A PUT of a block the full volume already holds touches it (the caller does, on False): not 507."""

    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"stored before it filled up")
        os.symlink(str(int(time.time())), root / "full")
        assert await vol.block_create(h, memoryview(b"stored before it filled up")) is False
        with pytest.raises(VolumeFull):
            await vol.block_create(md5(b"new"), memoryview(b"new"))
        await vol.block_touch(h)
        assert await read(vol, h) == b"stored before it filled up"

    run(root, body, group_commit=group_commit)


def test_old_or_bogus_full_symlink_is_ignored(root: Path) -> None:
    os.symlink(str(int(time.time() - FULL_MARKER_TTL - 60)), root / "full")

    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"room enough")
        assert await read(vol, h) == b"room enough"
        (root / "full").unlink()
        os.symlink("not a time", root / "full")
        await put(vol, b"still room")

    run(root, body)


def test_reads_still_work_when_full(root: Path) -> None:
    h = md5(b"readable")
    place(root, b"readable")
    os.symlink(str(int(time.time())), root / "full")

    async def body(vol: DirectoryVolume) -> None:
        assert await read(vol, h) == b"readable"
        await vol.block_touch(h)

    run(root, body)


def test_low_free_space_means_full_and_sets_marker(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_statvfs = os.statvfs

    def tiny(path: Any) -> Any:
        st = real_statvfs(path)
        return SimpleNamespace(f_bavail=1, f_frsize=st.f_frsize, f_blocks=st.f_blocks, f_bfree=1)

    async def body(vol: DirectoryVolume) -> None:
        monkeypatch.setattr(os, "statvfs", tiny)
        before = int(time.time())
        with pytest.raises(VolumeFull):
            await put(vol, b"no room")
        monkeypatch.setattr(os, "statvfs", real_statvfs)
        marker = root / "full"
        assert marker.is_symlink()
        assert before <= int(os.readlink(marker)) <= int(time.time())
        with pytest.raises(VolumeFull):  # the marker is trusted for an hour, whatever statfs says now
            await put(vol, b"no room")

    run(root, body)


def test_enospc_while_writing_is_full(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python_write_path(monkeypatch)
    real_write = os.write

    def enospc(fd: int, buf: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, buf)

    async def body(vol: DirectoryVolume) -> None:
        monkeypatch.setattr(os, "write", enospc)
        with pytest.raises(VolumeFull):
            await put(vol, b"no room")
        monkeypatch.setattr(os, "write", real_write)
        assert (root / "full").is_symlink()
        assert not [p for p in listing(root) if "tmp" in p]

    run(root, body)


# --- quarantine --------------------------------------------------------------------------------------------------


def test_quarantine_moves_corrupt_copy_aside(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"pristine data")
        path = root / h[:3] / h
        path.write_bytes(b"corrupt  data")
        before = time.time_ns()
        assert await vol.block_quarantine(h) is True
        assert not path.exists()
        (moved,) = (root / "quarantine").iterdir()
        name, ns = moved.name.split(".")
        assert name == h
        assert before <= int(ns) <= time.time_ns()
        assert moved.read_bytes() == b"corrupt  data"  # kept for inspection
        assert await index(vol) == {}
        assert (await vol.empty_trash(1)).deleted_blocks == 0
        assert moved.exists()

    run(root, body)


def test_quarantine_leaves_good_copy(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"fine")
        assert await vol.block_quarantine(h) is False
        assert (root / h[:3] / h).read_bytes() == b"fine"
        assert not (root / "quarantine").exists()

    run(root, body)


def test_quarantine_fsyncs_its_directory_through_a_descriptor_opened_before_the_rename(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writeback error is reported only to descriptors open when it happens: one opened after the rename could
    miss an error on the very directory block the rename changed."""
    calls: list[tuple[str, object]] = []
    real_open, real_rename, real_fsync = os.open, os.rename, os.fsync
    qdir = str(root / "quarantine")

    def logged_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if str(path) == qdir:
            calls.append(("open", fd))
        return fd

    def logged_rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if str(dst).startswith(qdir + "/"):
            calls.append(("rename", str(dst)))
        real_rename(src, dst, *args, **kwargs)

    def logged_fsync(fd: int) -> None:
        if any(c == ("open", fd) for c in calls):
            calls.append(("fsync", fd))
        real_fsync(fd)

    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"pristine data")
        (root / h[:3] / h).write_bytes(b"corrupt  data")
        monkeypatch.setattr(os, "open", logged_open)
        monkeypatch.setattr(os, "rename", logged_rename)
        monkeypatch.setattr(os, "fsync", logged_fsync)
        assert await vol.block_quarantine(h) is True
        monkeypatch.undo()

    run(root, body)
    kinds = [kind for kind, _ in calls]
    assert kinds == ["open", "rename", "fsync"]
    assert calls[0][1] == calls[2][1]  # the descriptor fsynced is the one opened before the rename


def test_quarantine_refuses_when_its_directory_is_not_one(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"pristine data")
        (root / h[:3] / h).write_bytes(b"corrupt  data")
        (root / "quarantine").write_bytes(b"")  # an operator's mistake
        with pytest.raises(VolumeError):
            await vol.block_quarantine(h)
        assert (root / h[:3] / h).read_bytes() == b"corrupt  data"  # left where it was

    run(root, body)


# --- MD5 checkpoints (keepstore.hashing): kept in an xattr, checked on reads, learned by verified reads --------------


def stored_checkpoints(path: Path) -> bytes | None:
    """The block file's checkpoint xattr, None if it has none. No xattr support at all raises: the test fails."""
    try:
        return os.getxattr(path, CHECKPOINT_XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def recorded(data: bytes) -> Checkpoints:
    """The checkpoints a PUT of ``data`` records while it hashes the body."""
    interval = segment_length(len(data))
    state = new_md5(interval)
    state.update(data)
    found = Checkpoints.of(state, interval, len(data))
    assert found is not None
    return found


def flip_byte(path: Path, pos: int) -> bytes:
    """Corrupt one byte of the file in place (same inode: its xattrs stay); return the new contents."""
    with open(path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ 0x20]))
    return path.read_bytes()


async def digest(vol: DirectoryVolume, h: str, keep: bool = False, scratch: memoryview | None = None) -> str:
    local = await vol.block_open(h)
    try:
        return await local.digest(scratch if scratch is not None else memoryview(bytearray(4 << 20)), keep)
    finally:
        local.close()


def mismatches(vol: DirectoryVolume) -> int:
    return vol.stats.ops.get("checkpoint_mismatch", 0)


@pytest.fixture
def parallel(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """What each parallel verification (digest_file from checkpoints) returned, in order."""
    results: list[str | None] = []
    real = digest_file

    def spy(*args: Any) -> str | None:
        result = real(*args)
        results.append(result)
        return result

    monkeypatch.setattr(directory, "digest_file", spy)
    return results


def test_block_write_keeps_checkpoints_and_reads_use_them(root: Path, parallel: list[str | None]) -> None:
    data = os.urandom(1 << 20)
    h = md5(data)
    checkpoints = recorded(data)

    async def body(vol: DirectoryVolume) -> None:
        await vol.block_write(h, memoryview(data), checkpoints)
        assert stored_checkpoints(root / h[:3] / h) == checkpoints.encode()
        assert listing(root) == {h[:3], f"{h[:3]}/{h}"}
        assert await digest(vol, h) == h
        assert parallel == [h]  # verified from the checkpoints, all segments at once
        assert mismatches(vol) == 0
        assert await read(vol, h) == data

    run(root, body)


@pytest.mark.parametrize("where", ["first segment", "middle", "last segment"])
def test_corrupt_data_with_checkpoints_is_detected(root: Path, parallel: list[str | None], where: str) -> None:
    data = os.urandom(1 << 20)
    h = md5(data)
    checkpoints = recorded(data)
    pos = {"first segment": 5, "middle": len(data) // 2, "last segment": len(data) - 1}[where]

    async def body(vol: DirectoryVolume) -> None:
        await vol.block_write(h, memoryview(data), checkpoints)
        path = root / h[:3] / h
        bad = flip_byte(path, pos)
        assert stored_checkpoints(path) == checkpoints.encode()  # the hint survived the corruption
        got = await digest(vol, h)
        assert got != h
        assert got == md5(bad)
        if where == "last segment":
            # No checkpoint follows the last segment: every chain matches and the final digest itself is wrong,
            # so there is nothing to fall back on.
            assert (parallel, mismatches(vol)) == ([md5(bad)], 0)
        else:
            # A segment ends off its checkpoint: hashed again from the start, which gives the (wrong) real digest.
            assert (parallel, mismatches(vol)) == ([None], 1)
        assert stored_checkpoints(path) == checkpoints.encode()  # nothing learned from data that did not verify
        assert await vol.block_quarantine(h) is True

    run(root, body)


def test_checkpoints_of_another_block_cost_only_speed(root: Path, parallel: list[str | None]) -> None:
    data, other = os.urandom(1 << 20), os.urandom(1 << 20)
    h = md5(data)

    async def body(vol: DirectoryVolume) -> None:
        await vol.block_write(h, memoryview(data), recorded(other))  # well-formed, but wrong for this block
        path = root / h[:3] / h
        assert await digest(vol, h) == h
        assert (parallel, mismatches(vol)) == ([None], 1)
        assert stored_checkpoints(path) == recorded(data).encode()  # corrected by the read that verified
        assert await digest(vol, h) == h
        assert (parallel, mismatches(vol)) == ([None, h], 1)

    run(root, body)


@pytest.mark.parametrize(
    "garbage",
    [b"garbage", b"", b"\x01", b"\x02" + bytes(4 + 7 * 16), b"\x01" + (100).to_bytes(4, "little") + bytes(7 * 16)],
    ids=["text", "empty", "version only", "other version", "bad interval"],
)
def test_garbage_checkpoints_are_ignored_and_replaced(root: Path, parallel: list[str | None], garbage: bytes) -> None:
    data = os.urandom(1 << 20)
    h = md5(data)

    async def body(vol: DirectoryVolume) -> None:
        await vol.block_write(h, memoryview(data), recorded(data))
        path = root / h[:3] / h
        os.setxattr(path, CHECKPOINT_XATTR, garbage)
        assert await digest(vol, h) == h
        assert (parallel, mismatches(vol)) == ([], 0)  # not even tried: it does not decode
        assert stored_checkpoints(path) == recorded(data).encode()
        assert await digest(vol, h) == h
        assert parallel == [h]

    run(root, body)


@pytest.mark.parametrize("how", ["block_write", "placed by hand"])
def test_checkpoints_are_learned_by_a_verified_read(root: Path, parallel: list[str | None], how: str) -> None:
    data = os.urandom(3 << 20)
    h = md5(data)
    if how == "placed by hand":
        place(root, data)  # as the Go keepstore writes it: no xattr

    async def body(vol: DirectoryVolume) -> None:
        if how == "block_write":
            await vol.block_write(h, memoryview(data))
        path = root / h[:3] / h
        assert stored_checkpoints(path) is None
        assert await digest(vol, h) == h
        assert parallel == []  # nothing to verify in parallel from yet
        assert stored_checkpoints(path) == recorded(data).encode()
        assert await digest(vol, h) == h
        assert parallel == [h]
        assert mismatches(vol) == 0

    run(root, body)


def test_checkpoints_are_learned_when_the_block_is_kept_in_scratch(root: Path, parallel: list[str | None]) -> None:
    data = os.urandom(1 << 20)
    h = md5(data)
    place(root, data)
    scratch = memoryview(bytearray(2 << 20))

    async def body(vol: DirectoryVolume) -> None:
        assert await digest(vol, h, keep=True, scratch=scratch) == h
        assert bytes(scratch[: len(data)]) == data
        assert parallel == []  # keeping the block means reading it in order
        assert stored_checkpoints(root / h[:3] / h) == recorded(data).encode()

    run(root, body)


def test_no_learning_on_a_read_only_volume(root: Path, parallel: list[str | None]) -> None:
    data = os.urandom(1 << 20)
    h = md5(data)
    path = place(root, data)

    async def body(vol: DirectoryVolume) -> None:
        assert not vol.spec.allow_write
        assert await digest(vol, h) == h
        assert await digest(vol, h) == h
        assert parallel == []
        assert stored_checkpoints(path) is None

    run(root, body, read_only=True)


def test_read_only_volume_still_uses_stored_checkpoints(root: Path, parallel: list[str | None]) -> None:
    data = os.urandom(1 << 20)
    h = md5(data)
    path = place(root, data)
    os.setxattr(path, CHECKPOINT_XATTR, recorded(data).encode())

    async def body(vol: DirectoryVolume) -> None:
        assert await digest(vol, h) == h
        assert parallel == [h]

    run(root, body, read_only=True)


def test_no_learning_from_corrupt_data(root: Path) -> None:
    good = os.urandom(1 << 20)
    bad = bytearray(good)
    bad[12345] ^= 1
    h = md5(good)
    path = place(root, bytes(bad), h)

    async def body(vol: DirectoryVolume) -> None:
        assert await digest(vol, h) == md5(bytes(bad))
        assert stored_checkpoints(path) is None

    run(root, body)


def test_small_blocks_have_no_checkpoints(root: Path) -> None:
    data = os.urandom(PARALLEL_MIN - 1)
    h = md5(data)

    async def body(vol: DirectoryVolume) -> None:
        await vol.block_write(h, memoryview(data))
        assert await digest(vol, h) == h
        assert stored_checkpoints(root / h[:3] / h) is None

    run(root, body)


def test_streaming_writer_commit_keeps_checkpoints(root: Path, parallel: list[str | None]) -> None:
    data = os.urandom(5 << 20)
    h = md5(data)
    checkpoints = recorded(data)

    async def body(vol: DirectoryVolume) -> None:
        writer = await vol.block_writer(h)
        for start in range(0, len(data), 2 << 20):
            await writer.write(memoryview(data)[start : start + (2 << 20)])
        await writer.commit(checkpoints)
        assert stored_checkpoints(root / h[:3] / h) == checkpoints.encode()
        assert listing(root) == {h[:3], f"{h[:3]}/{h}"}
        assert await digest(vol, h) == h
        assert parallel == [h]
        assert await read(vol, h, len(data)) == data

    run(root, body)


@pytest.mark.parametrize("err", [errno.ENOTSUP, errno.EPERM, errno.ENOSPC])
def test_file_system_refusing_xattrs_does_not_fail_writes(
    root: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    python_write_path(monkeypatch)
    calls: list[str] = []

    def refuse(path: Any, name: str, value: bytes, *args: Any) -> None:
        calls.append(name)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "setxattr", refuse)
    blocks = [os.urandom(1 << 20) for _ in range(2)]

    async def body(vol: DirectoryVolume) -> None:
        for data in blocks:
            await vol.block_write(md5(data), memoryview(data), recorded(data))
        for data in blocks:
            assert await digest(vol, md5(data)) == md5(data)
            assert await read(vol, md5(data)) == data
            assert stored_checkpoints(root / md5(data)[:3] / md5(data)) is None

    run(root, body)
    if err == errno.ENOTSUP:
        assert calls == [CHECKPOINT_XATTR]  # no xattrs on this file system: stop trying
    else:
        # EPERM (a file owned by someone else) or ENOSPC: this block goes without; the next ones still try
        assert calls == [CHECKPOINT_XATTR] * 4


# --- construction and parameters ---------------------------------------------------------------------------------


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        DirectoryVolume(make_spec(tmp_path / "nope"), DirectoryParameters(root=str(tmp_path / "nope")))
    assert (
        str(info.value)
        == f"Clusters.zzzzz.Volumes.{UUID}.DriverParameters.Root: {tmp_path / 'nope'} is not a directory"
    )


def test_parameters_strip_trailing_slash() -> None:
    assert DirectoryParameters.parse({"Root": "/srv/keep/"}, "X").root == "/srv/keep"
    assert DirectoryParameters.parse({"Root": "/"}, "X").root == "/"
    assert DirectoryParameters.parse({"Root": "/srv", "Serialize": True}, "X").serialize is True


def test_device_id(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        dev = vol.device_id
        if dev.startswith(f"{socket.gethostname()}:"):
            assert dev == f"{socket.gethostname()}:{root}"
        else:  # <filesystem UUID><path inside the filesystem>
            assert dev.endswith(root.name)

    run(root, body)


def test_serialize(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        blocks = [os.urandom(1000) for _ in range(10)]
        await asyncio.gather(*(put(vol, b) for b in blocks))
        results = await asyncio.gather(*(read(vol, md5(b)) for b in blocks))
        assert results == blocks

    run(root, body, serialize=True)


def test_streaming_write_temp_file_is_owned_and_cleaned(tmp_path: Path) -> None:
    """While a streamed write is open its temp file is flock()ed (the sweep leaves it alone); abort removes it."""
    import asyncio
    import fcntl

    from keepstore.config import VolumeSpec
    from keepstore.volumes.directory import DirectoryParameters, DirectoryVolume

    root = tmp_path / "root"
    root.mkdir()
    spec = VolumeSpec(
        uuid="zzzzz-nyw5e-000000000000000",
        driver="Directory",
        parameters={"Root": str(root)},
        key_path="Clusters.zzzzz.Volumes.zzzzz-nyw5e-000000000000000",
    )

    async def body() -> None:
        vol = DirectoryVolume(spec, DirectoryParameters(root=str(root)))
        try:
            h = "a" * 32
            writer = await vol.block_writer(h)
            await writer.write(memoryview(b"some bytes"))
            (tmp,) = list(root.glob(f"{h[:3]}/tmp{h}*"))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
            await writer.abort()
            assert not list(root.glob(f"{h[:3]}/tmp*"))
        finally:
            await vol.close()

    asyncio.run(body())


# --- group commit (keepstore/_fileio.c write_group) ---------------------------------------------------------------


def test_group_commit_writes_concurrent_blocks_and_leaves_no_temp_file(root: Path) -> None:
    blocks = [os.urandom(size - 1) + bytes([i]) for i, size in enumerate([1, 4096, 65536, 1 << 20] * 16)]

    async def body(vol: DirectoryVolume) -> None:
        await asyncio.gather(*(vol.block_write(md5(b), memoryview(b)) for b in blocks))
        for b in blocks:
            assert await read(vol, md5(b)) == b
        assert vol.stats.ops["syncfs"] >= 2  # the commits went this way, not file by file

    run(root, body, group_commit=True)
    assert not [p for p in listing(root) if "tmp" in p]
    assert len([p for p in listing(root) if "/" in p]) == len(blocks)


def test_group_commit_creates_a_block_once_and_refuses_to_replace_it(root: Path) -> None:
    """block_create under group commit: the rename itself is the existence check (RENAME_NOREPLACE), so of the
    creates of one new block exactly one writes it; the others find it there, and leave no temp file behind."""
    data = os.urandom(4000)
    h = md5(data)

    async def body(vol: DirectoryVolume) -> None:
        results = await asyncio.gather(*(vol.block_create(h, memoryview(data)) for _ in range(6)))
        assert sorted(results) == [False] * 5 + [True]
        first = await vol.mtime(h)
        assert await vol.block_create(h, memoryview(os.urandom(4000))) is False
        assert await read(vol, h) == data and await vol.mtime(h) == first
        # A group of blocks that are all there writes nothing and syncs nothing.
        syncs = vol.stats.ops.get("syncfs", 0)
        assert await asyncio.gather(*(vol.block_create(h, memoryview(data)) for _ in range(3))) == [False] * 3
        assert vol.stats.ops.get("syncfs", 0) == syncs
        # block_write in the same kind of group still replaces the copy (rewritten one by one: a new mtime).
        await asyncio.sleep(0.002)
        await vol.block_write(h, memoryview(data))
        assert await vol.mtime(h) > first

    run(root, body, group_commit=True)
    assert not [p for p in listing(root) if "tmp" in p]
    assert [p for p in listing(root) if "/" in p] == [f"{h[:3]}/{h}"]


def test_creates_of_one_new_block_in_one_group_write_it_once(root: Path) -> None:
    """Blocks absent when the group starts are staged; a second copy of one is refused at the rename
    (RENAME_NOREPLACE) and its temp file removed. The group function is called directly: which submissions share a
    group is up to timing."""
    data = os.urandom(4000)
    h = md5(data)

    async def body(vol: DirectoryVolume) -> None:
        job = (h, memoryview(data), None, True)
        assert await asyncio.to_thread(vol._write_group, [job, job, job]) == [True, False, False]
        assert await read(vol, h) == data

    run(root, body, group_commit=True)
    assert not [p for p in listing(root) if "tmp" in p]


@pytest.mark.parametrize("size", [4000, 1 << 20], ids=["group-commit", "file-by-file"])
def test_create_looks_for_the_block_off_the_event_loop(root: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """For a new block the lookup of its name searches the directory, from disk if its blocks are not cached: that
    must not stall the event loop (a stat there did, for every PUT)."""
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    real_stat = os.stat

    def watched_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if threading.get_ident() == loop_thread and str(path).startswith(str(root)):
            on_loop.append(str(path))
        return real_stat(path, *args, **kwargs)

    data = os.urandom(size)

    async def body(vol: DirectoryVolume) -> None:
        monkeypatch.setattr(os, "stat", watched_stat)
        assert await vol.block_create(md5(data), memoryview(data)) is True
        assert await vol.block_create(md5(data), memoryview(data)) is False
        monkeypatch.undo()

    run(root, body, group_commit=True)
    assert on_loop == []


def test_compare_looks_for_the_block_off_the_event_loop(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The multi-volume PUT path compares on every volume first: "absent" too must come from a thread."""
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    real_stat, real_open = os.stat, os.open

    def watched(real: Any) -> Any:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == loop_thread and str(path).startswith(str(root)):
                on_loop.append(str(path))
            return real(path, *args, **kwargs)

        return call

    data = os.urandom(4000)

    async def body(vol: DirectoryVolume) -> None:
        monkeypatch.setattr(os, "stat", watched(real_stat))
        monkeypatch.setattr(os, "open", watched(real_open))
        with pytest.raises(BlockNotFound):
            await vol.block_compare(md5(data), memoryview(data))
        monkeypatch.undo()
        await vol.block_write(md5(data), memoryview(data))
        monkeypatch.setattr(os, "stat", watched(real_stat))
        monkeypatch.setattr(os, "open", watched(real_open))
        assert await vol.block_compare(md5(data), memoryview(data)) is True
        assert await vol.block_compare(md5(data), memoryview(bytes(4000))) is False
        monkeypatch.undo()

    run(root, body, group_commit=True)
    assert on_loop == []


def test_group_commit_failure_lands_on_its_own_block_only(root: Path) -> None:
    # RLIMIT_FSIZE makes write(2) of a file past the limit fail (EFBIG) inside the native call: the large block
    # fails, the small ones written with it in the same group commit do not.
    import resource
    import signal

    small = [os.urandom(4096) for _ in range(7)]
    large = os.urandom(48 << 10)  # still a group-commit size (directory.GROUP_COMMIT_MAX)
    assert len(large) <= directory.GROUP_COMMIT_MAX

    async def body(vol: DirectoryVolume) -> None:
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (24 << 10, old_limit[1]))
        try:
            results = await asyncio.gather(
                *(vol.block_write(md5(b), memoryview(b)) for b in [*small[:4], large, *small[4:]]),
                return_exceptions=True,
            )
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
        assert [type(r).__name__ for r in results] == ["NoneType"] * 4 + ["VolumeError"] + ["NoneType"] * 3
        assert isinstance(results[4].__cause__, OSError) and results[4].__cause__.errno == errno.EFBIG
        for b in small:
            assert await read(vol, md5(b)) == b
        with pytest.raises(BlockNotFound):
            await read(vol, md5(large))

    run(root, body, group_commit=True)
    assert not [p for p in listing(root) if "tmp" in p]


def test_group_commit_on_a_file_system_that_fills_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = os.system(f"mount -t tmpfs -o size=2m keep-test {small} 2>/dev/null") == 0
    if not mounted:
        pytest.skip("needs permission to mount a 2 MiB tmpfs (root with CAP_SYS_ADMIN)")
    # Free space is checked (64 MiB minimum) before a write; this file system has less than that from the start.
    monkeypatch.setattr(directory, "MIN_FREE_BYTES", 0)
    monkeypatch.setattr(directory, "FULL_CHECK_INTERVAL", 0.0)
    blocks = [os.urandom(60 << 10) for _ in range(48)]  # 2.8 MiB of group-commit sizes for 2 MiB

    async def body(vol: DirectoryVolume) -> None:
        results = await asyncio.gather(
            *(vol.block_write(md5(b), memoryview(b)) for b in blocks), return_exceptions=True
        )
        assert {type(r).__name__ for r in results} == {"NoneType", "VolumeFull"}
        for b, r in zip(blocks, results, strict=True):
            if r is None:
                assert await read(vol, md5(b)) == b
            else:
                with pytest.raises(BlockNotFound):
                    await read(vol, md5(b))
        assert not [p for p in listing(small) if "tmp" in p]

    try:
        run(small, body, group_commit=True)
    finally:
        os.system(f"umount {small}")


def test_group_commit_needs_syncfs_that_reports_errors(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before Linux 5.8 syncfs(2) returned 0 even when writeback failed: no group commit there.
    real = os.uname()
    monkeypatch.setattr(os, "uname", lambda: os.uname_result((*real[:2], "5.4.0-150-generic", *real[3:])))
    assert not directory.group_commit_supported()

    async def body(vol: DirectoryVolume) -> None:
        assert not vol.group_commit
        assert await read(vol, await put(vol, b"written file by file")) == b"written file by file"

    run(root, body, group_commit=False)
    vol = DirectoryVolume(make_spec(root), DirectoryParameters(root=str(root), group_commit=True))
    assert not vol.group_commit
    asyncio.run(vol.close())


def test_group_commit_is_off_for_a_serialized_volume(root: Path) -> None:
    vol = DirectoryVolume(make_spec(root), DirectoryParameters(root=str(root), serialize=True, group_commit=True))
    assert not vol.group_commit  # Serialize: one file operation at a time, as configured
    asyncio.run(vol.close())


# --- direct writes (keepstore/_fileio.c write_data) ----------------------------------------------------------------


def _needs_page_cache(root: Path) -> None:
    from keeptest import page_cache_skip_reason

    reason = page_cache_skip_reason(root)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_writes_bypass_the_page_cache(root: Path, direct: bool) -> None:
    """With direct writes a block's data goes from the buffer to the device: none of it stays in the page cache
    (which a buffered write fills, and which fsync then has to write out); the block reads back intact."""
    from keeptest import page_cache_residency

    _needs_page_cache(root)
    whole = os.urandom(1 << 20)  # block_write: the whole block in one native call
    streamed = os.urandom(9 << 20)  # block_writer: pieces, as a large PUT body arrives

    async def body(vol: DirectoryVolume) -> None:
        buf = mmap_buffer(len(streamed))  # pool buffers are page-aligned mmaps: so is this
        buf[: len(whole)] = whole
        h = md5(whole)
        await vol.block_write(h, buf[: len(whole)])
        buf[:] = streamed
        hs = md5(streamed)
        writer = await vol.block_writer(hs)
        await writer.write(buf[: 8 << 20])
        await writer.write(buf[8 << 20 :])
        await writer.commit()
        for digest, data in ((h, whole), (hs, streamed)):
            resident = page_cache_residency(root / digest[:3] / digest)
            if direct:
                assert resident == 0.0
            else:
                assert resident > 0.9
            assert await read(vol, digest, len(data)) == data

    run(root, body, direct_writes=direct)


def mmap_buffer(size: int) -> memoryview:
    import mmap

    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 65536 + 7, (1 << 20) + 4095])
def test_direct_writes_store_every_size_exactly(root: Path, size: int) -> None:
    """Only whole aligned blocks can go O_DIRECT: the tail and unaligned pieces are written buffered, in order."""
    data = os.urandom(size)

    async def body(vol: DirectoryVolume) -> None:
        buf = mmap_buffer(size + 1)
        buf[:size] = data
        h = md5(data)
        await vol.block_write(h, buf[:size])
        assert (root / h[:3] / h).read_bytes() == data
        # Streamed in pieces that start off alignment (from byte 1 of a buffer) and end at odd offsets.
        shifted = mmap_buffer(size + 1)
        shifted[1:] = data
        (root / h[:3] / h).unlink()
        writer = await vol.block_writer(h)
        cut = size // 3
        await writer.write(shifted[1 : 1 + cut])
        await writer.write(shifted[1 + cut :])
        await writer.commit()
        assert (root / h[:3] / h).read_bytes() == data

    run(root, body, direct_writes=True)


@pytest.mark.parametrize("refused", [False, True], ids=["direct", "o-direct-refused"])
def test_streamed_pieces_that_went_through_the_page_cache_get_their_writeback_started(
    root: Path, monkeypatch: pytest.MonkeyPatch, refused: bool
) -> None:
    """sync_file_range starts the writeback of what a streamed piece left in the page cache, so that the final fsync
    has little left to do: all of each piece where the file system refuses O_DIRECT (the native append then writes
    it buffered, as it does here with direct=False), only the unaligned tail where it takes it."""
    if not refused:
        _needs_page_cache(root)  # the same file systems refuse O_DIRECT
    real_append = directory._native_append
    assert real_append is not None
    hints: list[tuple[int, int]] = []
    monkeypatch.setattr(directory, "_sync_file_range", lambda fd, offset, n: hints.append((offset, n)))
    if refused:
        monkeypatch.setattr(directory, "_native_append", lambda fd, data, direct: real_append(fd, data, False))
    first, second = 4 << 20, (1 << 20) + 100
    data = os.urandom(first + second)

    async def body(vol: DirectoryVolume) -> None:
        buf = mmap_buffer(len(data))
        buf[:] = data
        h = md5(data)
        writer = await vol.block_writer(h)
        await writer.write(buf[:first])
        await writer.write(buf[first:])
        await writer.commit()
        assert (root / h[:3] / h).read_bytes() == data

    run(root, body, direct_writes=True)
    assert hints == ([(0, first), (first, second)] if refused else [(first + second - 100, 100)])


def test_touch_makes_the_copy_durable_file_and_directory(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUT that finds a copy is acknowledged on the strength of block_touch, and a young copy may have been
    renamed into place a moment ago by another process that has not fsynced it yet: the touch fsyncs the file (data
    and new mtime) and then its directory (the name)."""
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def logged_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_mtime_ns))
        real_fsync(fd)

    data = b"a copy another writer left"
    h = md5(data)
    (root / h[:3]).mkdir()
    (root / h[:3] / h).write_bytes(data)  # as a writer that renamed it and has not fsynced yet leaves it

    async def body(vol: DirectoryVolume) -> None:
        monkeypatch.setattr(os, "fsync", logged_fsync)
        await vol.block_touch(h)
        monkeypatch.undo()
        mtime = await vol.mtime(h)
        assert synced == [(str(root / h[:3] / h), mtime), (str(root / h[:3]), synced[1][1])]

    run(root, body)


def test_touch_of_a_copy_born_long_ago_syncs_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy created more than a minute ago was synced by its writer or written back by the kernel since: re-PUTs
    of stored data cost no flush, even of a block touched a moment ago (young by birth, not by mtime)."""
    synced: list[int] = []
    real_fsync = os.fsync

    def logged_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    data = b"stored long ago"
    h = md5(data)
    (root / h[:3]).mkdir()
    (root / h[:3] / h).write_bytes(data)  # its mtime is now, as after a touch
    hour_ago = time.time_ns() - 3600 * 10**9
    # The file system records when a file was created, and it cannot be set: this one was created just now.
    monkeypatch.setattr(directory, "_birth_ns", lambda fd: hour_ago)

    async def body(vol: DirectoryVolume) -> None:
        before = await vol.mtime(h)
        monkeypatch.setattr(os, "fsync", logged_fsync)
        await vol.block_touch(h)
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert await vol.mtime(h) >= before  # touched all the same

    run(root, body)
    assert synced == []


def test_touch_that_cannot_make_the_copy_durable_fails(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if not os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    async def body(vol: DirectoryVolume) -> None:
        h = await put(vol, b"stored")
        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(VolumeError):
            await vol.block_touch(h)
        monkeypatch.undo()
        assert await read(vol, h) == b"stored"

    run(root, body)


def test_read_cached_serves_small_blocks_from_the_page_cache(root: Path) -> None:
    data = os.urandom(4096)
    h = md5(data)

    async def body(vol: DirectoryVolume) -> None:
        await put(vol, data)  # a buffered write: its pages stay cached
        buf = bytearray(1 << 20)
        opens = vol.stats.ops.get("open", 0)
        assert vol.read_cached(h, memoryview(buf), 1 << 20) == (4096, h)
        assert bytes(buf[:4096]) == data
        assert vol.stats.ops["open"] == opens + 1  # counted like any other open
        place(root, b"written by Go")  # a file the volume did not write itself
        assert vol.read_cached(md5(b"written by Go"), memoryview(buf), 1 << 20) == (13, md5(b"written by Go"))
        big = os.urandom(directory.INLINE_READ_MAX + 1)
        await put(vol, big)
        assert vol.read_cached(md5(big), memoryview(buf), 1 << 20) is None  # above the inline limit: the thread path

    run(root, body)


def test_read_cached_leaves_uncached_data_to_the_threads(root: Path) -> None:
    data = os.urandom(8192)
    h = md5(data)

    async def body(vol: DirectoryVolume) -> None:
        await put(vol, data)
        path = root / h[:3] / h
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if page_cache_residency(path) > 0:
            pytest.skip(f"the kernel kept {path} cached after POSIX_FADV_DONTNEED ({file_system_type(path)})")
        assert vol.read_cached(h, memoryview(bytearray(1 << 20)), 1 << 20) is None  # it would have to wait
        assert await read(vol, h) == data  # the general path reads it from the disk

    run(root, body)


def test_read_cached_of_odd_paths(root: Path) -> None:
    async def body(vol: DirectoryVolume) -> None:
        buf = memoryview(bytearray(1 << 20))
        with pytest.raises(BlockNotFound):
            vol.read_cached(md5(b"absent"), buf, 1 << 20)
        h = md5(b"a directory where the block would be")
        (root / h[:3] / h).mkdir(parents=True)
        assert vol.read_cached(h, buf, 1 << 20) is None  # not a block: the general path says what it is
        with pytest.raises(VolumeError):
            await vol.block_read(h, buf)
        f = md5(b"hash dir is a file")
        (root / f[:3]).write_bytes(b"junk")
        with pytest.raises(BlockNotFound):
            vol.read_cached(f, buf, 1 << 20)

    run(root, body)

"""The write-ahead journal of Directory-volume group commits (keepstore/volumes/journal.py): what a crash leaves
and what the next start makes of it.

A power cut is simulated by a writer process that dies without closing its volume (``os._exit``) and by then
damaging the block files it wrote behind its back: truncated, emptied, overwritten or gone, which is what a machine
that lost its page cache may show for files that were renamed into place but not yet synced. Recovery must bring
back every block whose record was not yet retired by a checkpoint, and only those.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from keepstore.config import VolumeSpec
from keepstore.volumes import journal
from keepstore.volumes.directory import DirectoryParameters, DirectoryVolume, group_commit_supported

UUID = "zzzzz-nyw5e-000000000000000"

pytestmark = pytest.mark.skipif(not group_commit_supported(), reason="group commit needs Linux 5.8+ and the extension")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def volume(root: Path) -> DirectoryVolume:
    spec = VolumeSpec(uuid=UUID, driver="Directory", parameters={"Root": str(root)}, key_path="Volumes.x")
    params = DirectoryParameters(root=str(root), group_commit=True, direct_writes=True, journal=True)
    return DirectoryVolume(spec, params)


def run(root: Path, body: Callable[[DirectoryVolume], Awaitable[None]]) -> DirectoryVolume:
    vol = volume(root)

    async def main() -> None:
        await vol.start()
        try:
            await body(vol)
        finally:
            await vol.close()

    asyncio.run(main())
    return vol


def crash_after_writing(
    root: Path, blocks: list[bytes], wait_checkpoint: bool = False, then: list[list[bytes]] | None = None
) -> None:
    """Write ``blocks`` (all acknowledged) in a child process that then dies without closing its volume; with
    ``then``, after them each list of blocks in turn (so each forms groups of its own)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            vol = volume(root)

            async def main() -> None:
                await vol.start()
                assert vol._journal is not None
                await asyncio.gather(*(vol.block_create(md5(b), memoryview(b)) for b in blocks))
                if wait_checkpoint:
                    start = vol._journal.checkpoints
                    while vol._journal.checkpoints == start:
                        await asyncio.sleep(0.05)
                for later in then or []:
                    await asyncio.gather(*(vol.block_create(md5(b), memoryview(b)) for b in later))

            asyncio.run(main())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def journals(root: Path) -> list[Path]:
    return sorted((root / journal.DIRNAME).glob("*" + journal.SUFFIX))


def block_path(root: Path, data: bytes) -> Path:
    h = md5(data)
    return root / h[:3] / h


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "vol"
    r.mkdir()
    return r


@pytest.fixture
def no_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """No checkpoint runs by time (only at close): what a crash right after the writes would find."""
    monkeypatch.setattr(journal, "CHECKPOINT_INTERVAL", 3600.0)


def damage(root: Path, blocks: list[bytes]) -> None:
    """What a power cut can leave of files whose writeback had not happened: one of each kind of damage."""
    block_path(root, blocks[0]).unlink()  # the rename reached the disk, or not even that
    block_path(root, blocks[1]).write_bytes(b"")  # the inode did, its data not
    with open(block_path(root, blocks[2]), "r+b") as f:
        f.truncate(100)
    with open(block_path(root, blocks[3]), "r+b") as f:
        f.write(b"\0" * 512)  # stale blocks instead of the data


def test_writes_go_through_the_journal_and_close_removes_it(root: Path) -> None:
    blocks = [os.urandom(4096) + bytes([i]) for i in range(20)]

    async def body(vol: DirectoryVolume) -> None:
        assert vol._journal is not None
        assert len(journals(root)) == 1
        await asyncio.gather(*(vol.block_create(md5(b), memoryview(b)) for b in blocks))
        assert vol.stats.ops.get("journal_fdatasync", 0) >= 1
        assert "syncfs" not in vol.stats.ops  # no group took the two-syncfs way

    run(root, body)
    assert journals(root) == []  # a clean close checkpoints everything and removes the file
    for b in blocks:
        assert block_path(root, b).read_bytes() == b


def test_recovery_repairs_every_block_a_power_cut_damaged(root: Path, no_checkpoints: None) -> None:
    blocks = [os.urandom(5000) + bytes([i]) for i in range(12)]
    crash_after_writing(root, blocks)
    assert len(journals(root)) == 1  # the dead writer's journal, unlocked
    damage(root, blocks)

    async def body(vol: DirectoryVolume) -> None:
        for b in blocks:
            into = memoryview(bytearray(len(b) + 1))
            n = await vol.block_read(md5(b), into)
            assert bytes(into[:n]) == b

    vol = run(root, body)
    assert vol.stats.errors == {}
    for b in blocks:
        assert block_path(root, b).read_bytes() == b
    assert journals(root) == []


def test_recovery_leaves_blocks_trashed_since_and_reuses_the_orphan(root: Path, no_checkpoints: None) -> None:
    blocks = [os.urandom(4096) + bytes([i]) for i in range(4)]
    crash_after_writing(root, blocks)
    [orphan] = journals(root)
    inode = orphan.stat().st_ino
    trashed = block_path(root, blocks[0])
    trashed.rename(trashed.with_name(f"{trashed.name}.trash.{int(time.time()) + 3600}"))
    block_path(root, blocks[1]).unlink()

    async def body(vol: DirectoryVolume) -> None:
        [own] = journals(root)
        assert own != orphan and own.stat().st_ino == inode  # already written in full: taken over, not rewritten

    run(root, body)
    assert not trashed.exists()  # not brought back: the trash came after the write
    for b in blocks[1:]:
        assert block_path(root, b).read_bytes() == b


def test_records_retired_by_a_checkpoint_are_not_replayed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "CHECKPOINT_INTERVAL", 0.05)
    blocks = [os.urandom(4096) + bytes([i]) for i in range(4)]
    crash_after_writing(root, blocks, wait_checkpoint=True)
    # After the checkpoint the files were on disk (its syncfs): damage now is not a crash's, and the journal
    # no longer speaks for these blocks.
    block_path(root, blocks[0]).unlink()
    vol = run(root, lambda vol: asyncio.sleep(0))
    assert not block_path(root, blocks[0]).exists()
    assert vol.stats.errors == {}


def test_a_live_writers_journal_is_left_alone(root: Path, no_checkpoints: None) -> None:
    blocks = [os.urandom(4096) + bytes([i]) for i in range(3)]

    async def body(first: DirectoryVolume) -> None:
        await asyncio.gather(*(first.block_create(md5(b), memoryview(b)) for b in blocks))
        [mine] = journals(root)
        before = mine.read_bytes()
        second = volume(root)  # another process on the same volume (flock conflicts between open files too)
        await second.start()
        try:
            assert len(journals(root)) == 2
            assert mine.read_bytes() == before
        finally:
            await second.close()

    run(root, body)
    assert journals(root) == []


def test_torn_record_ends_the_scan(root: Path, no_checkpoints: None) -> None:
    blocks = [os.urandom(4096) + bytes([i]) for i in range(3)]
    crash_after_writing(root, blocks[:1])
    [orphan] = journals(root)
    fd = os.open(orphan, os.O_RDWR)
    try:
        assert [h for h, _ in journal.scan(fd)] == [md5(blocks[0])]
        # Append two records by hand the way the native write does, then tear the first of them.
        offset = journal.HEADER_SIZE + journal.record_size(len(blocks[0]))
        generation = journal._read_half_generation(fd, 0)
        assert generation is not None
        for b in blocks[1:]:
            os.pwrite(fd, journal.record_header(generation, md5(b), len(b)) + b, offset)
            offset += journal.record_size(len(b))
        assert [h for h, _ in journal.scan(fd)] == [md5(b) for b in blocks]
        torn = journal.HEADER_SIZE + journal.record_size(len(blocks[0])) + journal.REC_HEADER + 7
        os.pwrite(fd, bytes([os.pread(fd, 1, torn)[0] ^ 0xFF]), torn)  # (a changed byte, whatever it was)
        assert [h for h, _ in journal.scan(fd)] == [md5(blocks[0])]
    finally:
        os.close(fd)


def test_full_journal_falls_back_to_two_syncfs_and_loses_nothing(
    root: Path, no_checkpoints: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "HALF_SIZE", journal.HEADER_SIZE + 4 * journal.record_size(4097))
    release = threading.Event()
    real_syncfs = journal._syncfs

    def slow_syncfs(fd: int) -> None:
        release.wait(30)  # the checkpoint of the first half is still running when the second fills
        real_syncfs(fd)

    monkeypatch.setattr(journal, "_syncfs", slow_syncfs)
    blocks = [os.urandom(4096) + bytes([i]) for i in range(12)]

    async def body(vol: DirectoryVolume) -> None:
        try:
            for b in blocks:  # one at a time: each its own group of one record
                assert await vol.block_create(md5(b), memoryview(b))
            jnl = vol._journal
            assert jnl is not None and jnl.fallbacks >= 1  # (when the checkpoint switches halves is its own affair)
            assert vol.stats.ops.get("syncfs") == 2 * jnl.fallbacks
            assert vol.stats.ops.get("journal_fdatasync") == len(blocks) - jnl.fallbacks
        finally:
            release.set()

    run(root, body)
    for b in blocks:
        assert block_path(root, b).read_bytes() == b
    assert journals(root) == []


def test_a_group_of_stored_blocks_leaves_no_gap_before_later_records(root: Path, no_checkpoints: None) -> None:
    # A re-PUT of a stored block writes no block file, but its group had reserved room for a record: a gap there
    # would end the recovery scan, hiding the records of every block written after it.
    stored = os.urandom(4096)
    new = [os.urandom(4096) + bytes([i]) for i in range(4)]
    crash_after_writing(root, [stored], then=[[stored], [stored, new[0]], [new[1]], [new[2], new[3]]])
    [orphan] = journals(root)
    fd = os.open(orphan, os.O_RDONLY)
    try:
        assert {h for h, _ in journal.scan(fd)} == {md5(b) for b in [stored, *new]}
    finally:
        os.close(fd)
    damage(root, new)
    vol = run(root, lambda vol: asyncio.sleep(0))
    assert vol.stats.errors == {}
    for b in [stored, *new]:
        assert block_path(root, b).read_bytes() == b


def test_a_syncfs_error_rewrites_the_blocks_of_both_halves(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # syncfs reports a writeback error once, whichever file it hit: the checkpoint that gets it rewrites its own
    # half's blocks, and the other half's next checkpoint rewrites that half's even though its syncfs succeeds.
    monkeypatch.setattr(journal, "CHECKPOINT_INTERVAL", 0.05)
    real_syncfs, calls = journal._syncfs, []

    def syncfs_failing_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "syncfs: Input/output error")
        real_syncfs(fd)

    monkeypatch.setattr(journal, "_syncfs", syncfs_failing_once)
    first = [os.urandom(4096) + bytes([i]) for i in range(3)]
    second = [os.urandom(4096) + bytes([10 + i]) for i in range(3)]
    rewritten: list[str] = []

    async def checkpointed(vol: DirectoryVolume, blocks: list[bytes]) -> None:
        # All of ``blocks`` into the active half first (no checkpoint by time meanwhile), then its checkpoint.
        jnl = vol._journal
        assert jnl is not None
        start = jnl.checkpoints
        monkeypatch.setattr(journal, "CHECKPOINT_INTERVAL", 3600.0)
        await asyncio.gather(*(vol.block_create(md5(b), memoryview(b)) for b in blocks))
        monkeypatch.setattr(journal, "CHECKPOINT_INTERVAL", 0.0)
        with jnl._cond:
            jnl._cond.notify()
        deadline = time.monotonic() + 10
        while jnl.checkpoints == start and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert jnl.checkpoints > start

    async def body(vol: DirectoryVolume) -> None:
        real_rewrite = vol._journal._rewrite  # type: ignore[union-attr]

        def rewrite(hash: str, data: bytes) -> None:
            rewritten.append(hash)
            real_rewrite(hash, data)

        vol._journal._rewrite = rewrite  # type: ignore[union-attr]
        await checkpointed(vol, first)
        assert sorted(rewritten) == sorted(md5(b) for b in first)
        await checkpointed(vol, second)
        assert sorted(rewritten) == sorted(md5(b) for b in first + second)
        await checkpointed(vol, [os.urandom(4096)])  # suspicion lifted: the next checkpoints rewrite nothing
        assert len(rewritten) == len(first + second)

    vol = run(root, body)
    assert vol.stats.errors == {"journal_syncfs": 1}
    for b in first + second:
        assert block_path(root, b).read_bytes() == b


def test_a_torn_half_header_does_not_bring_back_old_records(root: Path, no_checkpoints: None) -> None:
    # A header torn by a power cut leaves no generation to count on: the reused orphan's new generation must still
    # differ from every earlier one, or the records of the file's earlier life would be valid again.
    blocks = [os.urandom(4096) + bytes([i]) for i in range(3)]
    crash_after_writing(root, blocks)
    [orphan] = journals(root)
    with open(orphan, "r+b") as f:
        f.write(b"\0" * 16)  # half 0's header: magic and generation gone

    async def body(vol: DirectoryVolume) -> None:
        [own] = journals(root)
        fd = os.open(own, os.O_RDONLY)
        try:
            assert list(journal.scan(fd)) == []
        finally:
            os.close(fd)

    vol = run(root, body)
    assert vol.stats.errors == {}


def test_a_group_that_fails_before_writing_its_records_stops_the_journal(
    root: Path, no_checkpoints: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A group that reserved room and then failed before writing (here: building its record headers) leaves a gap
    # that would end a recovery scan: the journal is used no more, and later groups take the two-syncfs way.
    real_header, failures = journal.record_header, []

    def header_failing_once(generation: int, hash: str, length: int) -> bytes:
        if not failures:
            failures.append(hash)
            raise MemoryError("no memory for a header")
        return real_header(generation, hash, length)

    monkeypatch.setattr(journal, "record_header", header_failing_once)
    first, later = os.urandom(4096), os.urandom(4096)

    async def body(vol: DirectoryVolume) -> None:
        with pytest.raises(MemoryError):
            await vol.block_create(md5(first), memoryview(first))
        assert await vol.block_create(md5(later), memoryview(later))
        assert vol.stats.ops.get("syncfs") == 2 and "journal_fdatasync" not in vol.stats.ops
        assert vol.stats.errors == {"journal_write": 1}

    run(root, body)
    assert not block_path(root, first).exists()
    assert block_path(root, later).read_bytes() == later


def test_a_checkpoint_rewrite_leaves_a_block_trashed_since_alone(root: Path, no_checkpoints: None) -> None:
    # After a syncfs error a checkpoint writes its records' blocks again; one trashed since its record was written
    # stays trashed (the trash is not undone), one that is there is written again.
    kept, trashed = os.urandom(4096), os.urandom(4096)

    async def body(vol: DirectoryVolume) -> None:
        for b in (kept, trashed):
            assert await vol.block_create(md5(b), memoryview(b))
        path = block_path(root, trashed)
        path.rename(path.with_name(f"{path.name}.trash.{int(time.time()) + 3600}"))
        before = vol.stats.ops.get("create", 0)
        vol._rewrite_record(md5(trashed), trashed)
        vol._rewrite_record(md5(kept), kept)
        assert vol.stats.ops.get("create", 0) == before + 1

    run(root, body)
    assert not block_path(root, trashed).exists()
    assert block_path(root, kept).read_bytes() == kept

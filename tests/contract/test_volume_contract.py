"""The driver contract (keepstore/volumes/base.py; SPEC §5.1), run against every driver through ``volume_factory``.

Only the abstract ``Volume`` interface and the factory hooks are used here; backend-specific checks live in
``test_<driver>_volume.py``. Blocks are made "old" with ``ttl=0`` rather than by changing timestamps.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from contract_support import DRIVERS, VolumeFactory, make_factory

from keepstore.errors import BlockNotFound, TooLarge
from keepstore.locator import BLOCK_SIZE
from keepstore.volumes import EmptyTrashStats, IndexEntry, Volume, VolumeUsage

HOUR = 3600.0


# Defined here rather than in a tests/contract/conftest.py: a second module named "conftest" would shadow
# tests/conftest.py for the suites that do `from conftest import ...`.
@pytest.fixture(params=DRIVERS)
def volume_factory(request: pytest.FixtureRequest, tmp_path: Path) -> VolumeFactory:
    return make_factory(request.param, tmp_path)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


async def read(vol: Volume, hash: str, size: int = 1 << 20) -> bytes:
    buf = bytearray(size)
    n = await vol.block_read(hash, memoryview(buf))
    return bytes(buf[:n])


async def put(vol: Volume, data: bytes) -> str:
    h = md5(data)
    await vol.block_write(h, memoryview(data))
    return h


async def index(vol: Volume, prefix: str = "") -> dict[str, IndexEntry]:
    out: dict[str, IndexEntry] = {}
    async for entry in vol.index(prefix):
        assert entry.hash not in out, f"{entry.hash} listed twice"
        out[entry.hash] = entry
    return out


def cached(vol: Volume, hash: str, size: int = 1 << 20, max_size: int = 1 << 20) -> tuple[int, str, bytes] | None:
    """``read_cached`` with a fresh buffer: (size, digest, what the buffer then holds of the block), or None."""
    buf = bytearray(size)
    hit = vol.read_cached(hash, memoryview(buf), max_size)
    return None if hit is None else (hit[0], hit[1], bytes(buf[: hit[0]]))


async def assert_gone(vol: Volume, h: str) -> None:
    """Absent or trashed: every per-block operation says BlockNotFound, and the index does not list it."""
    with pytest.raises(BlockNotFound):
        await read(vol, h)
    try:
        assert vol.read_cached(h, memoryview(bytearray(1 << 20)), 1 << 20) is None  # no hit, at most "ask again"
    except BlockNotFound:
        pass
    with pytest.raises(BlockNotFound):
        await vol.mtime(h)
    with pytest.raises(BlockNotFound):
        await vol.block_touch(h)
    with pytest.raises(BlockNotFound):
        await vol.block_compare(h, memoryview(b"x"))
    assert h not in await index(vol)
    assert h not in await index(vol, h[:3])


# --- read and write ----------------------------------------------------------------------------------------------


def test_put_get(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        data = b"foo"
        h = await put(vol, data)
        assert await read(vol, h) == data
        assert await read(vol, h) == data  # reads do not consume

    volume_factory.run(body)


def test_put_get_several_sizes(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        blocks = [payload(n, n) for n in (1, 4095, 4096, 65536, 65537, 3 * 1024 * 1024 + 5)]
        hashes = [await put(vol, d) for d in blocks]
        for h, d in zip(hashes, blocks, strict=True):
            assert await read(vol, h, 4 << 20) == d

    volume_factory.run(body)


def test_put_get_empty_block(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"")
        assert h == "d41d8cd98f00b204e9800998ecf8427e"
        assert await vol.block_read(h, memoryview(bytearray(0))) == 0
        assert await read(vol, h) == b""
        assert (await index(vol))[h].size == 0
        assert await vol.block_compare(h, memoryview(b""))

    volume_factory.run(body)


def test_get_missing(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        with pytest.raises(BlockNotFound):
            await read(vol, md5(b"missing"))
        await put(vol, b"another")
        with pytest.raises(BlockNotFound):
            await read(vol, md5(b"missing"))

    volume_factory.run(body)


def test_put_same_content_twice(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"twice")
        assert await put(vol, b"twice") == h
        assert await read(vol, h) == b"twice"
        assert list(await index(vol)) == [h]

    volume_factory.run(body)


def test_overwrite_with_different_content(volume_factory: VolumeFactory) -> None:
    # Drivers do not verify; overwriting is allowed and ends with one complete copy.
    async def body(vol: Volume) -> None:
        old, new = payload(1000, 1), payload(2000, 2)
        h = md5(old)
        await vol.block_write(h, memoryview(old))
        await vol.block_write(h, memoryview(new))
        assert await read(vol, h) in (old, new)
        assert (await index(vol))[h].size in (len(old), len(new))

    volume_factory.run(body)


def test_concurrent_overwrites_never_show_a_mix(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        size = 2 << 20
        versions = [bytes([i]) * size for i in range(1, 5)] + [b"short"]
        h = md5(versions[0])
        await vol.block_write(h, memoryview(versions[0]))
        seen: list[bytes] = []

        async def reader() -> None:
            for _ in range(5):
                seen.append(await read(vol, h, 4 << 20))

        writes = [vol.block_write(h, memoryview(versions[i % len(versions)])) for i in range(10)]
        await asyncio.gather(*writes, *(reader() for _ in range(4)))
        assert seen
        for data in seen:
            assert data in versions, "a read returned a mix or a prefix of two writes"
        assert await read(vol, h, 4 << 20) in versions

    volume_factory.run(body)


def test_cancelled_write_leaves_old_copy_or_new_never_partial(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        old, new = b"a" * (8 << 20), b"b" * (8 << 20)
        h = md5(old)
        await vol.block_write(h, memoryview(old))
        for delay in (0, 0.001, 0.005):
            task = asyncio.ensure_future(vol.block_write(h, memoryview(new)))
            await asyncio.sleep(delay)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            assert await read(vol, h, 16 << 20) in (old, new)
        other = md5(b"never finished")
        task = asyncio.ensure_future(vol.block_write(other, memoryview(new)))
        await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        try:
            assert await read(vol, other, 16 << 20) == new
        except BlockNotFound:
            pass

    volume_factory.run(body)


def test_read_into_too_small_buffer(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        data = payload(100)
        h = await put(vol, data)
        with pytest.raises(TooLarge):
            await vol.block_read(h, memoryview(bytearray(99)))
        buf = bytearray(100)
        assert await vol.block_read(h, memoryview(buf)) == 100
        assert bytes(buf) == data

    volume_factory.run(body)


def test_full_size_block(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        data = payload(BLOCK_SIZE, 7)
        h = await put(vol, data)
        buf = bytearray(BLOCK_SIZE)
        assert await vol.block_read(h, memoryview(buf)) == BLOCK_SIZE
        assert buf == data
        del buf
        assert (await index(vol))[h].size == BLOCK_SIZE
        assert await vol.block_compare(h, memoryview(data))

    volume_factory.run(body)


def test_block_compare(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        data = payload(70000, 3)
        h = await put(vol, data)
        assert await vol.block_compare(h, memoryview(data)) is True
        changed = bytearray(data)
        changed[-1] ^= 1
        assert await vol.block_compare(h, memoryview(changed)) is False
        changed = bytearray(data)
        changed[0] ^= 1
        assert await vol.block_compare(h, memoryview(changed)) is False
        assert await vol.block_compare(h, memoryview(data[:-1])) is False
        assert await vol.block_compare(h, memoryview(data + b"x")) is False
        assert await vol.block_compare(h, memoryview(b"")) is False
        with pytest.raises(BlockNotFound):
            await vol.block_compare(md5(b"missing"), memoryview(b"missing"))

    volume_factory.run(body)


# --- mtime and touch ---------------------------------------------------------------------------------------------


def test_put_again_updates_mtime(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"again")
        first = await vol.mtime(h)
        await volume_factory.mtime_tick()
        await put(vol, b"again")
        assert await vol.mtime(h) > first

    volume_factory.run(body)


@pytest.mark.parametrize("size", [5000, 1 << 20], ids=["small", "1MiB"])
def test_create_writes_an_absent_block_and_leaves_a_present_one(volume_factory: VolumeFactory, size: int) -> None:
    async def body(vol: Volume) -> None:
        data = payload(size, 3)
        h = md5(data)
        assert await vol.block_create(h, memoryview(data)) is True
        assert await read(vol, h, 2 << 20) == data
        first = await vol.mtime(h)
        await volume_factory.mtime_tick()
        # Other bytes under the same hash: not written, not touched (the caller compares, and may touch).
        assert await vol.block_create(h, memoryview(payload(size, 4))) is False
        assert await read(vol, h, 2 << 20) == data
        assert await vol.mtime(h) == first
        assert list(await index(vol)) == [h]

    volume_factory.run(body)


def test_create_does_not_count_a_trashed_copy(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"trashed, then stored again")
        await vol.block_trash(h, 0, HOUR)
        assert await vol.block_create(h, memoryview(b"trashed, then stored again")) is True
        assert await read(vol, h) == b"trashed, then stored again"
        assert list(await index(vol)) == [h]

    volume_factory.run(body)


def test_concurrent_creates_of_one_block_store_one_copy(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        data = payload(3000, 5)
        h = md5(data)
        results = await asyncio.gather(*(vol.block_create(h, memoryview(data)) for _ in range(6)))
        assert True in results  # some wrote it; others may have found it there
        assert await read(vol, h) == data
        assert list(await index(vol)) == [h]

    volume_factory.run(body)


def test_touch_updates_mtime(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"touch me")
        first = await vol.mtime(h)
        await volume_factory.mtime_tick()
        await vol.block_touch(h)
        second = await vol.mtime(h)
        assert second > first
        assert await read(vol, h) == b"touch me"

    volume_factory.run(body)


def test_mtime_is_now_in_nanoseconds(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        import time

        before = time.time_ns()
        h = await put(vol, b"when")
        after = time.time_ns()
        slack = int(max(volume_factory.mtime_resolution, 0.01) * 1e9)
        assert before - slack <= await vol.mtime(h) <= after + slack

    volume_factory.run(body)


def test_touch_and_mtime_missing(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        await assert_gone(vol, md5(b"missing"))
        await put(vol, b"something else")
        await assert_gone(vol, md5(b"missing"))

    volume_factory.run(body)


def test_mtime_equals_index_mtime(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        hashes = [await put(vol, payload(10, i)) for i in range(5)]
        await vol.block_touch(hashes[0])
        listed = await index(vol)
        for h in hashes:
            assert listed[h].mtime_ns == await vol.mtime(h)
            assert listed[h].size == 10

    volume_factory.run(body)


# --- index -------------------------------------------------------------------------------------------------------


def test_index(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        blocks = {md5(d): d for d in (payload(i + 1, i) for i in range(40))}
        for h, d in blocks.items():
            await vol.block_write(h, memoryview(d))
        everything = await index(vol)
        assert set(everything) == set(blocks)
        for h, entry in everything.items():
            assert entry == IndexEntry(h, len(blocks[h]), await vol.mtime(h))

        some = next(iter(blocks))
        for n in (1, 2, 3, 4, 31, 32):
            prefix = some[:n]
            assert set(await index(vol, prefix)) == {h for h in blocks if h.startswith(prefix)}
        for c in "0123456789abcdef":
            assert set(await index(vol, c)) == {h for h in blocks if h.startswith(c)}
        missing = next(
            p
            for p in (f"{a}{b}{c}" for a in "0123456789abcdef" for b in "0123456789abcdef" for c in "0123456789abcdef")
            if not any(h.startswith(p) for h in blocks)
        )
        assert await index(vol, missing) == {}
        assert await index(vol, missing + "0") == {}
        assert await index(vol, some + "0") == {}  # longer than a hash

    volume_factory.run(body)


def test_index_of_empty_volume(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        assert await index(vol) == {}
        assert await index(vol, "abc") == {}

    volume_factory.run(body)


def test_index_can_be_abandoned(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        for i in range(20):
            await put(vol, payload(5, i))
        it = vol.index("")
        first = await it.__anext__()
        assert isinstance(first, IndexEntry)
        await it.aclose()  # type: ignore[attr-defined]
        assert len(await index(vol)) == 20

    volume_factory.run(body)


# --- trash, untrash, empty_trash ---------------------------------------------------------------------------------


def test_trash_new_block_is_a_noop(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"new")
        mtime = await vol.mtime(h)
        await vol.block_trash(h, HOUR, HOUR)
        await vol.block_trash(h, HOUR, 0)  # not even with lifetime 0
        assert await read(vol, h) == b"new"
        assert await vol.mtime(h) == mtime
        assert h in await index(vol)
        with pytest.raises(BlockNotFound):
            await vol.block_untrash(h)  # nothing went to the trash

    volume_factory.run(body)


def test_trash_old_block(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"old")
        keep = await put(vol, b"bystander")
        await vol.block_trash(h, 0, HOUR)
        await assert_gone(vol, h)
        with pytest.raises(BlockNotFound):
            await vol.block_trash(h, 0, HOUR)  # already trashed
        assert await read(vol, keep) == b"bystander"
        assert set(await index(vol)) == {keep}

    volume_factory.run(body)


def test_trash_missing(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        with pytest.raises(BlockNotFound):
            await vol.block_trash(md5(b"missing"), 0, HOUR)
        with pytest.raises(BlockNotFound):
            await vol.block_trash(md5(b"missing"), HOUR, HOUR)

    volume_factory.run(body)


def test_untrash_restores(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        data = payload(5000, 9)
        h = await put(vol, data)
        await vol.block_trash(h, 0, HOUR)
        await assert_gone(vol, h)
        await vol.block_untrash(h)
        assert await read(vol, h) == data
        listed = await index(vol)
        assert listed[h].size == len(data)
        assert listed[h].mtime_ns == await vol.mtime(h)
        await vol.block_touch(h)

    volume_factory.run(body)


def test_untrash_with_nothing_in_trash(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        with pytest.raises(BlockNotFound):
            await vol.block_untrash(md5(b"never stored"))
        h = await put(vol, b"live, not trashed")
        with pytest.raises(BlockNotFound):
            await vol.block_untrash(h)
        assert await read(vol, h) == b"live, not trashed"

    volume_factory.run(body)


def test_second_untrash_does_not_damage_the_restored_copy(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        data = payload(3000, 4)
        h = await put(vol, data)
        await vol.block_trash(h, 0, HOUR)
        await vol.block_untrash(h)
        try:
            await vol.block_untrash(h)  # may succeed or say not found
        except BlockNotFound:
            pass
        assert await read(vol, h) == data
        assert h in await index(vol)

    volume_factory.run(body)


def test_untrash_replaces_a_live_copy(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        trashed, live = b"1" * 100, b"2" * 100
        h = md5(trashed)
        await vol.block_write(h, memoryview(trashed))
        await vol.block_trash(h, 0, HOUR)
        await vol.block_write(h, memoryview(live))
        await vol.block_untrash(h)
        assert await read(vol, h) == trashed
        assert list(await index(vol)) == [h]

    volume_factory.run(body)


def test_trash_with_lifetime_zero_deletes(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"delete me now")
        await vol.block_trash(h, 0, 0)
        await assert_gone(vol, h)
        with pytest.raises(BlockNotFound):
            await vol.block_untrash(h)
        await vol.empty_trash(1)
        await assert_gone(vol, h)

    volume_factory.run(body)


def test_empty_trash_before_deadline_keeps_trash(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"recoverable")
        await vol.block_trash(h, 0, HOUR)
        stats = await vol.empty_trash(4)
        assert isinstance(stats, EmptyTrashStats)
        assert stats.deleted_blocks == 0
        await assert_gone(vol, h)
        await vol.block_untrash(h)
        assert await read(vol, h) == b"recoverable"

    volume_factory.run(body)


async def past_deadline() -> None:
    """Trash deadlines may be kept in whole seconds: wait until a deadline of now + 0.1 s has surely passed."""
    await asyncio.sleep(1.15)


def test_empty_trash_after_deadline_deletes(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        doomed = await put(vol, b"doomed")
        kept = await put(vol, b"kept in trash")
        live = await put(vol, b"live")
        await vol.block_trash(doomed, 0, 0.1)
        await vol.block_trash(kept, 0, HOUR)
        await past_deadline()
        stats = await vol.empty_trash(2)
        assert stats.deleted_blocks >= 1
        with pytest.raises(BlockNotFound):
            await vol.block_untrash(doomed)
        await assert_gone(vol, doomed)
        await vol.block_untrash(kept)
        assert await read(vol, kept) == b"kept in trash"
        assert await read(vol, live) == b"live"

    volume_factory.run(body)


def test_rewritten_after_trash_survives_empty_trash(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"phoenix")
        await vol.block_trash(h, 0, 0.1)
        await put(vol, b"phoenix")  # a client PUTs it again
        await past_deadline()
        await vol.empty_trash(1)
        assert await read(vol, h) == b"phoenix"
        assert h in await index(vol)
        await vol.mtime(h)

    volume_factory.run(body)


def test_trashed_twice_still_untrashable_after_first_deadline(volume_factory: VolumeFactory) -> None:
    # Trashed with deadlines A < C, emptied at B (A < B < C): the copy with deadline C is still untrashable.
    async def body(vol: Volume) -> None:
        h = await put(vol, b"twice trashed")
        await vol.block_trash(h, 0, 0.1)  # deadline A
        await put(vol, b"twice trashed")
        await vol.block_trash(h, 0, HOUR)  # deadline C
        await past_deadline()
        await vol.empty_trash(1)  # at B
        await assert_gone(vol, h)
        await vol.block_untrash(h)
        assert await read(vol, h) == b"twice trashed"

    volume_factory.run(body)


# --- quarantine --------------------------------------------------------------------------------------------------


def test_quarantine(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        good = await put(vol, payload(1000, 1))
        bad_data = payload(1000, 2)
        bad = await put(vol, bad_data)
        assert await vol.block_quarantine(good) is False
        assert await read(vol, good) == payload(1000, 1)

        await volume_factory.corrupt(vol, bad)
        assert md5(await read(vol, bad)) != bad
        assert await vol.block_quarantine(bad) is True
        await assert_gone(vol, bad)
        with pytest.raises(BlockNotFound):
            await vol.block_untrash(bad)  # quarantine is not the trash
        assert await vol.block_quarantine(bad) is False  # nothing left to move
        assert await vol.block_quarantine(md5(b"missing")) is False

        await vol.block_write(bad, memoryview(bad_data))  # a good copy can be stored again
        assert await read(vol, bad) == bad_data
        assert await vol.block_quarantine(bad) is False

    volume_factory.run(body)


# --- concurrency, identity, usage --------------------------------------------------------------------------------


def test_concurrent_mixed_operations(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        blocks = [payload(100_000 + i, i) for i in range(5)]
        hashes = [md5(b) for b in blocks]
        for h, d in zip(hashes[:3], blocks[:3], strict=True):
            await vol.block_write(h, memoryview(d))

        async def check_read(i: int) -> None:
            assert await read(vol, hashes[i]) == blocks[i]

        async def check_compare(i: int) -> None:
            assert await vol.block_compare(hashes[i], memoryview(blocks[i]))

        async def check_index() -> None:
            assert set(hashes[:3]) <= set(await index(vol))

        ops: list[Coroutine[Any, Any, object]] = []
        for i in range(20):
            k = i % 3
            match i % 6:
                case 0:
                    ops.append(check_read(k))
                case 1:
                    ops.append(vol.block_write(hashes[3 + (i // 6) % 2], memoryview(blocks[3 + (i // 6) % 2])))
                case 2:
                    ops.append(vol.block_touch(hashes[k]))
                case 3:
                    ops.append(vol.mtime(hashes[k]))
                case 4:
                    ops.append(check_compare(k))
                case _:
                    ops.append(check_index())
        results = await asyncio.gather(*ops, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        for h, d in zip(hashes, blocks, strict=True):
            assert await read(vol, h) == d
        assert set(await index(vol)) == set(hashes)

    volume_factory.run(body)


def test_another_instance_sees_the_same_blocks(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"shared")
        other = volume_factory.new_volume()
        try:
            await other.start()
            assert other.device_id == vol.device_id
            assert await read(other, h) == b"shared"
            assert await other.mtime(h) == await vol.mtime(h)
        finally:
            await other.close()

    volume_factory.run(body)


def test_device_id_and_usage(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        assert isinstance(vol.device_id, str) and vol.device_id
        usage = await vol.usage()
        assert isinstance(usage, VolumeUsage)
        for value in (usage.bytes_free, usage.bytes_used):
            assert value is None or (isinstance(value, int) and value >= 0)

    volume_factory.run(body)


def test_stats_count_operations(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        h = await put(vol, b"counted")
        await read(vol, h)
        assert vol.stats.in_bytes >= len(b"counted")
        assert vol.stats.out_bytes >= len(b"counted")
        assert sum(vol.stats.ops.values()) > 0

    volume_factory.run(body)


# --- optional capabilities: local files (block_open) and streaming writes (block_writer) ---------------------------
# A driver may return None for either; when it returns an object, these invariants hold.


def test_read_cached_gives_the_block_and_its_digest_or_nothing(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        for n in (0, 1, 100, 4096, 65536):
            data = payload(n, n)
            h = await put(vol, data)
            hit = cached(vol, h)
            assert hit is None or hit == (n, h, data), n
            if n:
                assert cached(vol, h, max_size=n - 1) is None  # larger than asked for
                assert cached(vol, h, size=n - 1) is None  # larger than the buffer
        bad = await put(vol, payload(1000, 3))
        await volume_factory.corrupt(vol, bad)
        hit = cached(vol, bad)
        # The digest is the stored data's, not the name's: the caller is the one who compares them.
        assert hit is None or (hit[1] == md5(hit[2]) != bad)

    volume_factory.run(body)


def test_block_open_digest_and_stability(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        old = payload(3 * 1024 * 1024 + 7, 1)
        h = md5(old)
        with pytest.raises(BlockNotFound):
            await vol.block_open(h)
        await vol.block_write(h, memoryview(old))
        local = await vol.block_open(h)
        if local is None:
            return  # the driver does not keep blocks in local files
        try:
            assert local.size == len(old)
            scratch = memoryview(bytearray(4 << 20))
            assert await local.digest(scratch, keep=True) == h
            assert bytes(scratch[: local.size]) == old  # kept: the block is in the scratch buffer
            # The open file keeps the copy that was opened, even if the block is replaced or trashed meanwhile.
            await vol.block_write(h, memoryview(payload(10, 2)))
            await vol.block_trash(h, ttl=0, lifetime=HOUR)
            small = memoryview(bytearray(1 << 20))
            assert await local.digest(small, keep=False) == h  # streamed through a scratch smaller than the block
            with open(local.fileno(), "rb", closefd=False) as f:
                assert f.read() == old
        finally:
            local.close()

    volume_factory.run(body)


def test_block_writer_commit(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        data = payload(5 * 1024 * 1024 + 3, 3)
        h = md5(data)
        writer = await vol.block_writer(h)
        if writer is None:
            return  # the driver cannot stream
        view = memoryview(data)
        for pos in range(0, len(data), 1 << 20):
            await writer.write(view[pos : pos + (1 << 20)])
            assert_absent = h not in await index(vol)
            assert assert_absent, "a block being written must not be visible"
            with pytest.raises(BlockNotFound):
                await vol.mtime(h)
        before = await _now_ns()
        await writer.commit()
        assert await read(vol, h, 8 << 20) == data
        assert await vol.mtime(h) >= before - 2_000_000_000
        assert (await index(vol))[h].size == len(data)

    volume_factory.run(body)


def test_block_writer_abort_leaves_nothing(volume_factory: VolumeFactory) -> None:
    async def body(vol: Volume) -> None:
        data = payload(2 * 1024 * 1024, 4)
        h = md5(data)
        writer = await vol.block_writer(h)
        if writer is None:
            return
        await writer.write(memoryview(data)[: 1 << 20])
        await writer.abort()
        await writer.abort()  # idempotent
        await assert_gone(vol, h)
        # Aborting a writer never disturbs an existing copy of the same block.
        await vol.block_write(h, memoryview(data))
        writer = await vol.block_writer(h)
        assert writer is not None
        await writer.write(memoryview(b"partial"))
        await writer.abort()
        assert await read(vol, h, 4 << 20) == data

    volume_factory.run(body)


async def _now_ns() -> int:
    import time

    return time.time_ns()

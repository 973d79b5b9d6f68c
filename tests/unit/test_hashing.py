"""keepstore.hashing: checkpoint intervals and their encoding, parallel verification of one block from its
checkpoints, the hash engine (including cancellation), and the stream hasher of request bodies."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from keepstore import hashing
from keepstore._md5mb import Md5
from keepstore.hashing import (
    CHECKPOINT_LANES,
    INLINE_LIMIT,
    PARALLEL_MIN,
    SEGMENT_QUANTUM,
    STRIPE,
    Checkpoints,
    HashEngine,
    ShortRead,
    StreamHasher,
    digest_file,
    digest_segments,
    hash_into,
    md5_hex,
    new_md5,
    segment_length,
)

KiB, MiB = 1024, 1024 * 1024


def md5(data: bytes | bytearray | memoryview) -> str:
    return hashlib.md5(data).hexdigest()


def checkpoints_of(data: bytes, interval: int | None = None) -> Checkpoints:
    """What a writer records for ``data``: its hasher's checkpoints, trimmed to the block."""
    interval = interval or segment_length(len(data))
    state = new_md5(interval)
    state.update(data)
    found = Checkpoints.of(state, interval, len(data))
    assert found is not None
    return found


def reader(data: bytes | bytearray) -> Callable[[memoryview, int], int]:
    """A ``read(view, offset)`` over bytes, as digest_segments wants it (returns what it copied)."""

    def read(view: memoryview, offset: int) -> int:
        n = max(0, min(len(view), len(data) - offset))
        view[:n] = data[offset : offset + n]
        return n

    return read


def scratch(size: int = 4 * MiB) -> memoryview:
    return memoryview(bytearray(size))


@pytest.fixture
def engine() -> Iterator[HashEngine]:
    """An engine of this test's own, installed as the process-wide one (hash_into, submit, StreamHasher use it)."""
    saved = hashing._engine
    eng = HashEngine(threads=2, lanes=hashing.SIMD_LANES)
    hashing._engine = eng
    try:
        yield eng
    finally:
        hashing._engine = saved
        eng.close()


class RecordingEngine(HashEngine):
    """A real engine that remembers the jobs handed to it."""

    def __init__(self, threads: int, lanes: int) -> None:
        super().__init__(threads, lanes)
        self.jobs: list[hashing._Job] = []

    def submit(self, state: hashing.Md5State, data: memoryview) -> hashing._Job:
        job = super().submit(state, data)
        self.jobs.append(job)
        return job


@pytest.fixture
def recording() -> Iterator[RecordingEngine]:
    """One thread with one lane: jobs run strictly one after another, so a big job holds back the next."""
    saved = hashing._engine
    eng = RecordingEngine(threads=1, lanes=1)
    hashing._engine = eng
    try:
        yield eng
    finally:
        hashing._engine = saved
        eng.close()


# --- segment_length -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,interval",
    [
        (0, 64 * KiB),
        (1, 64 * KiB),
        (PARALLEL_MIN, 64 * KiB),
        (512 * KiB, 64 * KiB),
        (512 * KiB + 1, 128 * KiB),
        (1 * MiB, 128 * KiB),
        (1 * MiB + 1, 192 * KiB),
        (10 * MiB, 1280 * KiB),
        (64 * MiB, 8 * MiB),
    ],
)
def test_segment_length_examples(size: int, interval: int) -> None:
    assert segment_length(size) == interval


def test_segment_length_is_about_an_eighth() -> None:
    rng = random.Random(0)
    for size in [rng.randint(1, 64 * MiB) for _ in range(2000)]:
        interval = segment_length(size)
        assert interval % SEGMENT_QUANTUM == 0
        assert -(-size // interval) <= CHECKPOINT_LANES  # never more segments than lanes
        assert interval == SEGMENT_QUANTUM or interval - SEGMENT_QUANTUM < size / CHECKPOINT_LANES


# --- Checkpoints: of, encode, decode ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [PARALLEL_MIN, PARALLEL_MIN + 1, 1 * MiB, 1 * MiB + 12345, 3 * MiB - 64])
def test_checkpoints_round_trip(size: int) -> None:
    data = random.Random(size).randbytes(size)
    found = checkpoints_of(data)
    interval = segment_length(size)
    assert found.interval == interval
    assert found.segments == -(-size // interval)
    for i in range(1, found.segments):  # checkpoint i is the chain after i intervals
        state = Md5()
        state.update(data[: i * interval])
        assert found.chain(i) == state.chain()
    encoded = found.encode()
    assert encoded[0] == 1 and int.from_bytes(encoded[1:5], "little") == interval
    assert Checkpoints.decode(encoded, size) == found


def test_checkpoints_of_rejects_what_a_block_does_not_need() -> None:
    data = os.urandom(PARALLEL_MIN)
    state = new_md5(64 * KiB)
    state.update(data)
    assert Checkpoints.of(state, 64 * KiB, PARALLEL_MIN) is not None
    assert Checkpoints.of(state, 64 * KiB, PARALLEL_MIN - 1) is None  # too small to split
    assert Checkpoints.of(state, 0, PARALLEL_MIN) is None  # recorded nothing
    assert Checkpoints.of(state, 64 * KiB, PARALLEL_MIN + 2 * 64 * KiB + 1) is None  # more than was recorded
    unrecorded = new_md5(8 * MiB)
    unrecorded.update(data)
    assert Checkpoints.of(unrecorded, 8 * MiB, PARALLEL_MIN) is None  # one segment: nothing to check in parallel


def test_checkpoints_decode_rejections() -> None:
    size = 1 * MiB + 100
    good = checkpoints_of(os.urandom(size))
    assert good.segments == 6  # interval 192 KiB
    value = good.encode()
    assert Checkpoints.decode(value, size) == good

    def with_interval(interval: int) -> bytes:
        return value[:1] + interval.to_bytes(4, "little") + value[5:]

    rejected = {
        "version 0": b"\x00" + value[1:],
        "version 2": b"\x02" + value[1:],
        "empty": b"",
        "header only, short": value[:4],
        "header only": value[:5],
        "interval 0": with_interval(0),
        "interval not a multiple of 64": with_interval(good.interval + 1),
        "interval 100": with_interval(100),
        "one chain too few": value[:-16],
        "one chain too many": value + value[-16:],
        "a partial chain": value[:-1],
        "chains of another interval": with_interval(good.interval * 2),
    }
    for what, bad in rejected.items():
        assert Checkpoints.decode(bad, size) is None, what
    assert Checkpoints.decode(value, size + 192 * KiB) is None  # a block one segment longer needs one more chain
    assert Checkpoints.decode(value, 5 * 192 * KiB) is None  # exactly five segments need one chain fewer


def test_checkpoints_decode_size_below_parallel_min() -> None:
    # 64 KiB segments: a block of PARALLEL_MIN - 64 bytes has four segments (three chains), as one of PARALLEL_MIN.
    chains = os.urandom(3 * 16)
    value = Checkpoints(64 * KiB, chains).encode()
    assert Checkpoints.decode(value, PARALLEL_MIN) == Checkpoints(64 * KiB, chains)
    assert Checkpoints.decode(value, PARALLEL_MIN - 64) is None
    assert Checkpoints.decode(value, 3 * 64 * KiB + 1) is None


# --- digest_segments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,interval",
    [
        (1 * MiB, None),  # a multiple of the interval: eight full segments
        (1 * MiB + 12345, None),  # a short last segment
        (PARALLEL_MIN, None),
        (PARALLEL_MIN + 64 * KiB + 1, None),  # a 1-byte last segment
        (3 * MiB - 64, None),
        (1 * MiB, 64 * KiB),  # 16 segments (15 checkpoints, as many as a state records): two rounds of lanes
        (1 * MiB - 1, 512 * KiB),  # two segments
    ],
)
def test_digest_segments(engine: HashEngine, size: int, interval: int | None) -> None:
    data = random.Random(size).randbytes(size)
    found = checkpoints_of(data, interval)
    assert digest_segments(reader(data), size, found, scratch()) == md5(data)


@pytest.mark.parametrize("size", [PARALLEL_MIN, 1 * MiB + 12345, 9 * MiB + 64])
def test_digest_segments_keeping_the_block(engine: HashEngine, size: int) -> None:
    # With keep, the scratch holds the block afterwards (a TLS GET is sent from it), at the same speed of hashing.
    data = random.Random(size).randbytes(size)
    found = checkpoints_of(data)
    buf = bytearray(size + 100)
    assert digest_segments(reader(data), size, found, memoryview(buf), keep=True) == md5(data)
    assert buf[:size] == data
    # a scratch too small to hold the block: hashed as without keep
    small = scratch()
    if len(small) < size:
        assert digest_segments(reader(data), size, found, small, keep=True) == md5(data)


def test_digest_segments_with_a_tampered_checkpoint(engine: HashEngine) -> None:
    data = os.urandom(1 * MiB + 5000)
    found = checkpoints_of(data)
    for i in range(1, found.segments):
        for bit in (0x01, 0x80):
            chains = bytearray(found.chains)
            chains[16 * (i - 1) + 7] ^= bit
            tampered = Checkpoints(found.interval, bytes(chains))
            assert digest_segments(reader(data), len(data), tampered, scratch()) is None, (i, bit)
    assert digest_segments(reader(data), len(data), found, scratch()) == md5(data)


def test_digest_segments_with_a_flipped_data_byte(engine: HashEngine) -> None:
    data = os.urandom(1 * MiB + 5000)
    found = checkpoints_of(data)
    interval = found.interval
    positions = [0, 1, interval - 1, interval, 3 * interval + 777, len(data) - 1 - (len(data) - 1) % interval - 1]
    positions += [random.randrange(i * interval, min(len(data), (i + 1) * interval)) for i in range(found.segments)]
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x40
        result = digest_segments(reader(bad), len(data), found, scratch())
        assert result != md5(data), pos
        if pos < (found.segments - 1) * interval:
            assert result is None, pos  # a segment no longer ends on its checkpoint
        else:
            # The last segment has no checkpoint after it: the chain checks pass and the digest, that of the bad
            # data, is what tells.
            assert result == md5(bad), pos


def test_digest_segments_short_read(engine: HashEngine) -> None:
    data = os.urandom(1 * MiB)
    found = checkpoints_of(data)
    for cut in (1, 64 * KiB, 600 * KiB):
        with pytest.raises(ShortRead):
            digest_segments(reader(data[:-cut]), len(data), found, scratch())


# --- digest_file: the same from an open file (natively with the vector code, else through digest_segments) -------


@pytest.fixture(params=["native", "engine"])
def file_path(request: pytest.FixtureRequest, engine: HashEngine, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way digest_file goes: the native call (where the CPU has the vector code) or the engine's threads."""
    if request.param == "native":
        if hashing.SIMD_LANES == 1:
            pytest.skip("this CPU has no AVX2: digest_file always takes the engine's way here")
    else:
        monkeypatch.setattr(hashing, "SIMD_LANES", 1)
    return str(request.param)


def stored(tmp_path: Path, data: bytes | bytearray) -> int:
    """An open descriptor on a file holding ``data`` (closed when the test's tmp_path goes)."""
    path = tmp_path / f"block{len(data)}-{md5(data)[:8]}"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return fd


@pytest.mark.parametrize(
    "size,interval",
    [
        (1 * MiB, None),
        (1 * MiB + 12345, None),
        (PARALLEL_MIN, None),
        (PARALLEL_MIN + 64 * KiB + 1, None),
        (1 * MiB, 64 * KiB),  # 16 segments: more than the lanes
        (1 * MiB - 1, 512 * KiB),
        (64 * MiB, None),
    ],
)
def test_digest_file(tmp_path: Path, file_path: str, size: int, interval: int | None) -> None:
    data = random.Random(size).randbytes(size)
    fd = stored(tmp_path, data)
    try:
        found = checkpoints_of(data, interval)
        assert digest_file(fd, size, found, scratch()) == md5(data)
        # room for 4 KiB of each segment per round only: more rounds, the same digest
        assert digest_file(fd, size, found, scratch(found.segments * 4 * KiB)) == md5(data)
        # a scratch with room for less than one 64-byte stripe per segment: None (the caller hashes from the start)
        assert digest_file(fd, size, found, scratch(64 * found.segments - 1)) is None
        # with keep and room for the block, the scratch holds it afterwards
        buf = bytearray(size + 100)
        assert digest_file(fd, size, found, memoryview(buf), keep=True) == md5(data)
        assert buf[:size] == data
        # with keep and no room for it: hashed as without keep
        assert digest_file(fd, size, found, scratch(1 * MiB // 2), keep=True) == md5(data)
    finally:
        os.close(fd)


def test_digest_file_with_a_tampered_checkpoint_or_byte(tmp_path: Path, file_path: str) -> None:
    data = os.urandom(1 * MiB + 5000)
    found = checkpoints_of(data)
    fd = stored(tmp_path, data)
    try:
        for i in range(1, found.segments):
            chains = bytearray(found.chains)
            chains[16 * (i - 1) + 3] ^= 0x10
            assert digest_file(fd, len(data), Checkpoints(found.interval, bytes(chains)), scratch()) is None, i
    finally:
        os.close(fd)
    for pos in (0, found.interval - 1, found.interval, 5 * found.interval + 99, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        fd = stored(tmp_path, bad)
        try:
            result = digest_file(fd, len(data), found, scratch())
        finally:
            os.close(fd)
        if pos < (found.segments - 1) * found.interval:
            assert result is None, pos
        else:
            assert result == md5(bad) != md5(data), pos


def test_digest_file_short_file_and_read_errors(tmp_path: Path, file_path: str) -> None:
    data = os.urandom(1 * MiB)
    found = checkpoints_of(data)
    for cut in (1, 64 * KiB, 600 * KiB):
        fd = stored(tmp_path, data[:-cut])
        try:
            with pytest.raises(ShortRead):
                digest_file(fd, len(data), found, scratch())
        finally:
            os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # read(2) of a directory: EISDIR
    try:
        with pytest.raises(IsADirectoryError):
            digest_file(fd, len(data), found, scratch())
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        digest_file(999_999, len(data), found, scratch())
    assert info.value.errno == 9  # EBADF


def test_digest_file_with_more_segments_than_the_native_call_takes(tmp_path: Path, file_path: str) -> None:
    # Checkpoints are hints read from an xattr: one that splits a block into more segments than the native call
    # takes (here 256 of 4 KiB) must still verify the block, not fail the read.
    data = os.urandom(1 * MiB)
    interval = 4 * KiB
    state, chains = new_md5(), b""
    for start in range(0, len(data) - interval, interval):
        state.update(data[start : start + interval])
        chains += state.chain()  # type: ignore[attr-defined]
    many = Checkpoints(interval, chains)
    assert many.segments == 256 > hashing.FILE_SEGMENTS_MAX
    fd = stored(tmp_path, data)
    try:
        assert digest_file(fd, len(data), many, scratch()) == md5(data)
    finally:
        os.close(fd)


def test_digest_file_refuses_checkpoints_that_do_not_fit_the_size(tmp_path: Path) -> None:
    """The native call checks what the Python side guarantees (Checkpoints.decode): a mismatch is a ValueError."""
    if hashing.SIMD_LANES == 1:
        pytest.skip("this CPU has no AVX2: the native call is not used here")
    from keepstore import _md5mb

    data = os.urandom(1 * MiB)
    found = checkpoints_of(data)
    fd = stored(tmp_path, data)
    try:
        for size, interval, chains in [
            (len(data) + found.interval, found.interval, found.chains),  # more segments than checkpoints
            (len(data), found.interval, found.chains[:-1]),  # not whole chaining values
            (len(data), found.interval + 1, found.chains),  # not a multiple of 64
            (len(data), 0, found.chains),
        ]:
            with pytest.raises(ValueError):
                _md5mb.digest_file(fd, size, interval, chains, scratch(), False)
        with pytest.raises(ValueError):
            _md5mb.digest_file(fd, len(data), found.interval, found.chains, scratch(len(data) - 1), True)
    finally:
        os.close(fd)


def test_digest_segments_waits_for_the_engine_before_raising(engine: HashEngine) -> None:
    """A read that fails in a later round: the scratch is not handed back while the engine still hashes it."""
    data = os.urandom(3 * MiB)
    found = checkpoints_of(data)
    read = reader(data)
    submitted: list[concurrent.futures.Future[None]] = []
    real_submit_many = engine.submit_many

    def spy(jobs: Sequence[tuple[hashing.Md5State, memoryview]]) -> list[concurrent.futures.Future[None]]:
        futures = real_submit_many(jobs)
        submitted.extend(futures)
        return futures

    engine.submit_many = spy  # type: ignore[method-assign]
    calls = 0

    def failing_read(view: memoryview, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 2 * found.segments:  # the third round
            raise OSError(5, "I/O error")
        return read(view, offset)

    with pytest.raises(OSError):
        digest_segments(failing_read, len(data), found, scratch(1 * MiB))
    assert submitted and all(f.done() for f in submitted)


@pytest.mark.parametrize(
    "size,scratch_size",
    [
        (PARALLEL_MIN, 2 * 4 * 64),  # the least that works: one 64-byte stripe per segment and round
        (PARALLEL_MIN, 2 * 4 * 64 + 100),
        (2 * MiB - 1000, 2 * 8 * 4096),
        (2 * MiB - 1000, 1 * MiB),
        (2 * MiB - 1000, 2 * 8 * STRIPE - 64),
    ],
)
def test_digest_segments_small_scratch(engine: HashEngine, size: int, scratch_size: int) -> None:
    data = os.urandom(size)
    found = checkpoints_of(data)
    assert found.segments == (4 if size == PARALLEL_MIN else 8)
    assert 2 * found.segments * STRIPE > scratch_size
    assert digest_segments(reader(data), len(data), found, scratch(scratch_size)) == md5(data)


# --- the engine ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads,lanes", [(2, hashing.SIMD_LANES), (2, 1), (1, 8)])
def test_engine_many_concurrent_jobs(threads: int, lanes: int) -> None:
    rng = random.Random(threads * 10 + lanes)
    eng = HashEngine(threads=threads, lanes=lanes)
    try:
        streams = [[rng.randbytes(rng.choice([0, 1, 100, 70_000, 1 * MiB + 3, 3 * MiB])) for _ in range(3)]]
        streams += [[rng.randbytes(rng.randint(0, 300_000)) for _ in range(rng.randint(1, 4))] for _ in range(30)]

        def one_stream(pieces: list[bytes]) -> str:
            state = new_md5()
            for piece in pieces:  # one job in flight per state
                eng.submit(state, memoryview(piece)).future.result(timeout=30)
            return state.hexdigest()

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            digests = list(pool.map(one_stream, streams))
        assert digests == [md5(b"".join(pieces)) for pieces in streams]

        states = [new_md5() for _ in range(11)]
        datas = [rng.randbytes(rng.randint(0, 2 * MiB)) for _ in states]
        futures = eng.submit_many([(s, memoryview(d)) for s, d in zip(states, datas, strict=True)])
        concurrent.futures.wait(futures, timeout=30)
        assert [f.result() for f in futures] == [None] * len(states)
        assert [s.hexdigest() for s in states] == [md5(d) for d in datas]
    finally:
        eng.close()


def test_engine_fails_a_bad_job_and_keeps_serving() -> None:
    eng = HashEngine(threads=1, lanes=8)
    try:
        bad = eng.submit(hashlib.md5(), memoryview(b"x" * 100))  # not a state the extension can advance
        assert isinstance(bad.future.exception(timeout=10), TypeError)
        assert len(bad.data) == 0  # no reference to the buffer is kept, even for a failed job
        state = new_md5()
        data = os.urandom(3 * MiB)
        eng.submit(state, memoryview(data)).future.result(timeout=10)
        assert state.hexdigest() == md5(data)
    finally:
        eng.close()


def test_engine_close_stops_its_threads() -> None:
    eng = HashEngine(threads=3, lanes=1)
    state = new_md5()
    eng.submit(state, memoryview(b"abc" * 1000)).future.result(timeout=10)
    eng.close()
    for lane in eng._threads:
        lane.thread.join(timeout=10)
        assert not lane.thread.is_alive()
    assert state.hexdigest() == md5(b"abc" * 1000)


def test_engine_finished_job_drops_the_buffer() -> None:
    eng = HashEngine(threads=1, lanes=8)
    try:
        job = eng.submit(new_md5(), memoryview(os.urandom(2 * MiB)))
        job.future.result(timeout=10)
        assert len(job.data) == 0
    finally:
        eng.close()


@pytest.mark.parametrize("size", [100_000, 1 * MiB, 2 * MiB + 1])
def test_engine_keeps_no_export_of_the_buffer_after_the_job(size: int) -> None:
    """Once a job's future is done, nothing in the engine holds a view of the caller's buffer (it may be reused)."""
    eng = HashEngine(threads=1, lanes=8)
    try:
        buf = bytearray(size)
        with memoryview(buf) as view:
            eng.submit(new_md5(), view).future.result(timeout=10)
        buf.extend(b"x")  # BufferError while any memoryview of buf is alive
        assert len(buf) == size + 1
    finally:
        eng.close()


def test_submit_and_hash_into_inline_and_through_the_engine(recording: RecordingEngine) -> None:
    small, large = os.urandom(INLINE_LIMIT), os.urandom(INLINE_LIMIT + 1)
    state = new_md5()
    future = hashing.submit(state, memoryview(small))
    assert future.done()  # hashed inline
    assert recording.jobs == []
    future = hashing.submit(state, memoryview(large))
    future.result(timeout=10)
    assert len(recording.jobs) == 1
    assert state.hexdigest() == md5(small + large)

    async def main() -> None:
        for size in (0, 1, INLINE_LIMIT, INLINE_LIMIT + 1, 5 * MiB + 7):
            data = os.urandom(size)
            assert await md5_hex(memoryview(data)) == md5(data)
        state = new_md5()
        await hash_into(state, memoryview(small))
        await hash_into(state, memoryview(large))
        assert state.hexdigest() == md5(small + large)

    asyncio.run(main())
    assert len(recording.jobs) == 4  # INLINE_LIMIT + 1, 5 MiB + 7, and large once more


def test_hash_into_cancelled_while_queued_returns_once_dropped(recording: RecordingEngine) -> None:
    """Cancelled while its job waits behind another: returns only after the engine has let go of the job."""
    blocker_state = new_md5()
    blocker = recording.submit(blocker_state, memoryview(bytes(64 * MiB)))

    async def main() -> None:
        state = Md5()
        data = memoryview(os.urandom(1 * MiB))
        task = asyncio.create_task(hash_into(state, data))
        while len(recording.jobs) < 2:
            await asyncio.sleep(0)
        job = recording.jobs[1]
        assert not blocker.future.done(), "the blocking job finished too soon for this test"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert blocker.future.done()  # the queued job could only be dropped after the one before it
        assert job.future.done() and job.abandoned
        assert len(job.data) == 0
        assert state.length == 0  # dropped, not hashed

    asyncio.run(main())
    assert blocker_state.hexdigest() == md5(bytes(64 * MiB))


def test_hash_into_cancelled_while_running(recording: RecordingEngine) -> None:
    """Cancelled while the engine hashes its job: returns once the job is done, never with the engine mid-read."""
    data = bytearray(os.urandom(48 * MiB))

    async def main() -> None:
        state = Md5()
        view = memoryview(data)
        task = asyncio.create_task(hash_into(state, view))
        while not recording.jobs:
            await asyncio.sleep(0)
        job = recording.jobs[0]
        await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert job.future.done()
        assert len(job.data) == 0
        length = state.length
        assert length % hashing.ROUND == 0 or length == len(data)  # stopped between rounds, or finished
        view.release()  # (the cancelled task's traceback still refers to this view: release it)
        data.extend(b"x")  # the engine holds no other view of the buffer (BufferError otherwise)
        await asyncio.sleep(0.05)
        assert state.length == length  # nothing touches the state afterwards

    asyncio.run(main())


def test_hash_into_cancelled_repeatedly_still_waits(recording: RecordingEngine) -> None:
    blocker = recording.submit(new_md5(), memoryview(bytes(64 * MiB)))

    async def main() -> None:
        task = asyncio.create_task(hash_into(new_md5(), memoryview(os.urandom(1 * MiB))))
        while len(recording.jobs) < 2:
            await asyncio.sleep(0)
        for _ in range(5):
            task.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert blocker.future.done() and recording.jobs[1].future.done()

    asyncio.run(main())


# --- StreamHasher -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,hint", [(11 * MiB + 333, "exact"), (1 * MiB, "exact"), (20 * MiB + 1, "none")])
def test_stream_hasher_random_increments(engine: HashEngine, size: int, hint: str) -> None:
    rng = random.Random(size)
    data = rng.randbytes(size)
    buf = bytearray(64 * MiB if hint == "none" else size)
    view = memoryview(buf)

    async def main() -> tuple[str, Checkpoints | None]:
        hasher = StreamHasher(view, size if hint == "exact" else None)
        filled = 0
        while filled < size:
            step = rng.choice([1, 100, 64 * KiB, rng.randint(1, 3 * MiB), 5 * MiB])
            end = min(size, filled + step)
            view[filled:end] = data[filled:end]  # the body arrives
            filled = end
            hasher.advance(filled)
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        digest = await hasher.finish(filled)
        return digest, hasher.checkpoints(filled)

    digest, found = asyncio.run(main())
    assert digest == md5(data)
    assert found is not None
    interval = segment_length(size if hint == "exact" else len(buf))
    assert found.interval == interval
    assert found.segments == -(-size // interval)
    assert digest_segments(reader(data), size, found, scratch()) == md5(data)
    assert Checkpoints.decode(found.encode(), size) == found


def test_stream_hasher_small_body_of_a_large_buffer_has_no_checkpoints(engine: HashEngine) -> None:
    # A chunked body (no size announced) gets the interval of the largest block: a small one has one segment.
    data = os.urandom(1 * MiB)
    buf = bytearray(64 * MiB)
    buf[: len(data)] = data

    async def main() -> tuple[str, Checkpoints | None]:
        hasher = StreamHasher(memoryview(buf))
        hasher.advance(len(data))
        return await hasher.finish(len(data)), hasher.checkpoints(len(data))

    assert asyncio.run(main()) == (md5(data), None)


def test_stream_hasher_aclose_waits_for_the_engine(recording: RecordingEngine) -> None:
    data = os.urandom(8 * MiB)

    async def main() -> None:
        hasher = StreamHasher(memoryview(data))
        hasher.advance(len(data))  # one segment handed to the engine
        (job,) = recording.jobs
        await hasher.aclose()
        assert job.future.done()

    asyncio.run(main())

"""keepstore._md5mb, the multi-buffer MD5 extension, against hashlib: vector (AVX2) and scalar code alike."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepstore import _md5mb
from keepstore._md5mb import Md5, update_many

EMPTY = "d41d8cd98f00b204e9800998ecf8427e"
FOO = "acbd18db4cc2f85cedef654fccc4a4d8"
INITIAL_CHAIN = bytes.fromhex("0123456789abcdeffedcba9876543210")  # MD5's initial state, little-endian words
MAX_CHECKPOINTS = 15


def cpu_has_avx2() -> bool:
    text = Path("/proc/cpuinfo").read_text()
    return any(line.startswith("flags") and " avx2" in line for line in text.splitlines())


@pytest.fixture(params=[True, False], ids=["simd", "scalar"])
def simd(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run the test with the vector code (if the CPU has it) and with the scalar code; restore the default after."""
    on: bool = request.param
    _md5mb.set_simd(on)
    try:
        if not on:
            assert _md5mb.simd_lanes() == 1
        elif cpu_has_avx2():
            assert _md5mb.simd_lanes() == 8  # the "simd" runs must really exercise the vector code here
        yield on
    finally:
        _md5mb.set_simd(True)


def chain_after(data: bytes) -> bytes:
    """The chaining value after ``data`` (a multiple of 64 bytes), computed by the scalar path of one state."""
    state = Md5()
    state.update(data)
    return state.chain()


def random_pieces(rng: random.Random, data: bytes) -> list[bytes | bytearray | memoryview]:
    """Split ``data`` at random points: many empty and 1-byte pieces, pieces around 64-byte boundaries, big ones."""
    pieces: list[bytes | bytearray | memoryview] = []
    pos = 0
    while pos < len(data):
        kind = rng.random()
        if kind < 0.15:
            n = 0
        elif kind < 0.3:
            n = 1
        elif kind < 0.6:
            n = 64 * rng.randint(0, 3) + rng.choice([-1, 0, 1, 63])  # ends just before/on/after a block boundary
        elif kind < 0.85:
            n = rng.randint(2, 300)
        else:
            n = rng.randint(300, 20_000)
        n = max(0, min(n, len(data) - pos))
        piece = data[pos : pos + n]
        pos += n
        wrap = rng.randrange(3)
        pieces.append(piece if wrap == 0 else bytearray(piece) if wrap == 1 else memoryview(piece))
    pieces.append(b"")
    return pieces


# --- known values and single streams ----------------------------------------------------------------------------


def test_known_vectors(simd: bool) -> None:
    assert Md5().hexdigest() == EMPTY
    assert Md5().digest() == bytes.fromhex(EMPTY)
    state = Md5()
    state.update(b"foo")
    assert state.hexdigest() == FOO
    assert state.digest() == bytes.fromhex(FOO)
    assert state.length == 3
    assert Md5().chain() == INITIAL_CHAIN
    states = [Md5(), Md5()]
    update_many(states, [b"foo", b""])
    assert [s.hexdigest() for s in states] == [FOO, EMPTY]


@pytest.mark.parametrize("size", [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4096, 4097, 100_000])
def test_lengths_around_padding_boundaries(simd: bool, size: int) -> None:
    data = random.Random(size).randbytes(size)
    state = Md5()
    state.update(data)
    assert state.hexdigest() == hashlib.md5(data).hexdigest()
    assert state.length == size


def test_digest_does_not_finish_the_state(simd: bool) -> None:
    data = random.Random(1).randbytes(5000)
    state = Md5()
    for cut in (0, 1, 63, 64, 65, 1000, 4999, 5000):
        state.update(data[state.length : cut])
        assert state.hexdigest() == hashlib.md5(data[:cut]).hexdigest()
        assert state.digest() == hashlib.md5(data[:cut]).digest()
        assert state.hexdigest() == hashlib.md5(data[:cut]).hexdigest()  # asking twice changes nothing
    state.update(b"more")
    assert state.hexdigest() == hashlib.md5(data + b"more").hexdigest()


def test_copy_is_independent(simd: bool) -> None:
    data = random.Random(2).randbytes(3000)
    original = Md5(checkpoint=64)
    original.update(data[:100])  # a partial block in the tail
    clone = original.copy()
    assert clone.hexdigest() == original.hexdigest()
    assert (clone.length, clone.checkpoints()) == (original.length, original.checkpoints())
    original.update(data[100:])
    assert clone.hexdigest() == hashlib.md5(data[:100]).hexdigest()
    assert clone.length == 100
    update_many([clone], [b"other"])
    assert clone.hexdigest() == hashlib.md5(data[:100] + b"other").hexdigest()
    assert original.hexdigest() == hashlib.md5(data).hexdigest()
    # The clone kept recording checkpoints on its own: one at 64 bytes only, while the original has all of its own.
    assert clone.checkpoints() == chain_after(data[:64])
    assert original.checkpoints() == b"".join(chain_after(data[: 64 * k]) for k in range(1, MAX_CHECKPOINTS + 1))


# --- many streams at once -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_streams_and_splits(simd: bool, seed: int) -> None:
    """1..20 states, each fed its own data in random pieces, by update and update_many calls mixed at random."""
    rng = random.Random(seed)
    n = rng.randint(1, 20)
    datas = [
        rng.randbytes(rng.choice([0, 1, 63, 64, 65, rng.randint(0, 5000), rng.randint(0, 70_000)])) for _ in range(n)
    ]
    intervals = [rng.choice([0, 0, 64, 128, 192, 4096]) for _ in range(n)]
    states = [Md5(checkpoint=interval) for interval in intervals]
    queues = [random_pieces(rng, data) for data in datas]
    while any(queues):
        if rng.random() < 0.25:
            i = rng.choice([i for i in range(n) if queues[i]])
            states[i].update(queues[i].pop(0))
        else:
            chosen = [i for i in range(n) if queues[i] and rng.random() < 0.7]
            rng.shuffle(chosen)
            update_many([states[i] for i in chosen], [queues[i].pop(0) for i in chosen])
    for state, data, interval in zip(states, datas, intervals, strict=True):
        assert state.hexdigest() == hashlib.md5(data).hexdigest()
        assert state.length == len(data)
        marks = min(MAX_CHECKPOINTS, len(data) // interval) if interval else 0
        expected = b"".join(chain_after(data[: k * interval]) for k in range(1, marks + 1))
        assert state.checkpoints() == expected


def test_update_many_accepts_any_sequence_and_buffer_type(simd: bool) -> None:
    data = [os.urandom(1000 + i) for i in range(9)]
    states = [Md5() for _ in data]
    buffers: tuple[bytes | bytearray | memoryview, ...] = (
        data[0],
        bytearray(data[1]),
        memoryview(data[2]),
        memoryview(bytearray(data[3])),
        *data[4:],
    )
    update_many(tuple(states), buffers)
    assert [s.hexdigest() for s in states] == [hashlib.md5(d).hexdigest() for d in data]
    update_many([], [])  # nothing to do is fine


def test_large_inputs(simd: bool) -> None:
    """8 x 3 MiB in one update_many call (GIL released), while another thread hashes another 8 streams."""
    ours = [os.urandom(3 << 20) for _ in range(8)]
    theirs = [d[::-1] for d in ours]
    their_states = [Md5() for _ in theirs]
    other = threading.Thread(target=update_many, args=(their_states, theirs))
    other.start()
    states = [Md5(checkpoint=1 << 20) for _ in ours]
    update_many(states, [memoryview(d) for d in ours])
    other.join()
    assert [s.hexdigest() for s in states] == [hashlib.md5(d).hexdigest() for d in ours]
    assert [s.hexdigest() for s in their_states] == [hashlib.md5(d).hexdigest() for d in theirs]
    assert states[0].checkpoints() == b"".join(chain_after(ours[0][: k << 20]) for k in (1, 2, 3))
    single = Md5()
    single.update(ours[0])  # update() of one large buffer releases the GIL too
    assert single.hexdigest() == hashlib.md5(ours[0]).hexdigest()


@pytest.mark.parametrize("call", ["update_many", "update"])
def test_hashing_lets_other_threads_run(simd: bool, call: str) -> None:
    """While one thread hashes a large input, this one keeps running: the extension does not hold the GIL."""
    data = bytes((8 if call == "update_many" else 16) << 20)
    states = [Md5() for _ in range(8 if call == "update_many" else 1)]
    done = threading.Event()

    def work() -> None:
        if call == "update_many":
            update_many(states, [data] * len(states))
        else:
            states[0].update(data)
        done.set()

    ticks = [time.perf_counter()]
    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    worker.join()
    elapsed = ticks[-1] - ticks[0]
    longest_stall = max(b - a for a, b in itertools.pairwise(ticks))
    # Holding the GIL would stall this loop for the whole call; switch intervals and scheduling stay far below.
    assert longest_stall < max(0.02, elapsed / 2), (longest_stall, elapsed)
    assert [s.hexdigest() for s in states] == [hashlib.md5(data).hexdigest()] * len(states)


# --- checkpoints and resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "interval,size",
    [(64, 64 * 15), (64, 64 * 15 + 1), (128, 1000), (4096, 3 * 4096), (4096, 3 * 4096 - 1), (65536, 200_000)],
)
def test_checkpoints_resume_round_trip(simd: bool, interval: int, size: int) -> None:
    rng = random.Random(size)
    data = rng.randbytes(size)
    writer = Md5(checkpoint=interval)
    for piece in random_pieces(rng, data):
        writer.update(piece)
    chains = writer.checkpoints()
    count = len(chains) // 16
    assert len(chains) == 16 * count and count == min(MAX_CHECKPOINTS, size // interval)
    checkpoint = [INITIAL_CHAIN] + [chains[16 * k : 16 * (k + 1)] for k in range(count)]
    segments = -(-size // interval)
    for i in range(min(count, segments - 1) + 1):
        state = Md5.resume(checkpoint[i], i * interval)
        assert state.length == i * interval
        if i == segments - 1:  # the last segment: its digest is the whole stream's
            state.update(data[i * interval :])
            assert state.hexdigest() == hashlib.md5(data).hexdigest()
        else:
            state.update(data[i * interval : (i + 1) * interval])
            assert state.chain() == checkpoint[i + 1]


def test_resumed_states_advance_together(simd: bool) -> None:
    """All segments of one stream hashed at once, each lane resumed from its checkpoint (what a verified read does)."""
    interval, data = 4096, os.urandom(8 * 4096 - 100)
    writer = Md5(checkpoint=interval)
    writer.update(data)
    chains = writer.checkpoints()
    assert len(chains) == 7 * 16
    states = [Md5()] + [Md5.resume(chains[16 * (i - 1) : 16 * i], i * interval) for i in range(1, 8)]
    update_many(states, [data[i * interval : (i + 1) * interval] for i in range(8)])
    assert [s.chain() for s in states[:-1]] == [chains[16 * i : 16 * (i + 1)] for i in range(7)]
    assert states[-1].hexdigest() == hashlib.md5(data).hexdigest()


def test_at_most_fifteen_checkpoints(simd: bool) -> None:
    data = os.urandom(64 * 40)
    state = Md5(checkpoint=64)
    update_many([state], [data])
    assert state.checkpoints() == b"".join(chain_after(data[: 64 * k]) for k in range(1, 16))
    assert state.hexdigest() == hashlib.md5(data).hexdigest()


def test_no_checkpoints_by_default_or_before_the_first(simd: bool) -> None:
    state = Md5()
    state.update(os.urandom(10_000))
    assert state.checkpoints() == b""
    state = Md5(checkpoint=4096)
    state.update(os.urandom(4095))
    assert state.checkpoints() == b""
    state.update(b"x")  # the 4096th byte completes the block and the interval
    assert len(state.checkpoints()) == 16


def test_chain_at_block_boundaries(simd: bool) -> None:
    data = os.urandom(256)
    state = Md5()
    state.update(data[:64])
    assert state.chain() == chain_after(data[:64])
    resumed = Md5.resume(state.chain(), 64)
    resumed.update(data[64:])
    assert resumed.hexdigest() == hashlib.md5(data).hexdigest()
    assert Md5.resume(INITIAL_CHAIN, 0).hexdigest() == EMPTY


# --- errors leave every state as it was --------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", [1, 63, 65, 100, 4095, 2**32])
def test_checkpoint_must_be_a_multiple_of_64(checkpoint: int) -> None:
    with pytest.raises(ValueError):
        Md5(checkpoint=checkpoint)


@pytest.mark.parametrize("chain,length", [(b"", 0), (bytes(15), 64), (bytes(17), 64), (bytes(16), 1), (bytes(16), 100)])
def test_resume_rejects_bad_chain_or_length(chain: bytes, length: int) -> None:
    with pytest.raises(ValueError):
        Md5.resume(chain, length)


def test_chain_off_a_block_boundary() -> None:
    state = Md5()
    state.update(b"x" * 65)
    before = state.hexdigest()
    with pytest.raises(ValueError):
        state.chain()
    assert state.hexdigest() == before
    state.update(b"x" * 63)
    assert state.chain() == chain_after(b"x" * 128)


def test_update_many_errors_change_nothing(simd: bool) -> None:
    a, b = Md5(), Md5(checkpoint=64)
    a.update(b"partial")
    b.update(os.urandom(70))
    before = [(s.hexdigest(), s.length, s.checkpoints()) for s in (a, b)]
    big = os.urandom(100_000)

    def unchanged() -> None:
        assert [(s.hexdigest(), s.length, s.checkpoints()) for s in (a, b)] == before

    with pytest.raises(ValueError):
        update_many([a, b], [big])  # different lengths
    unchanged()
    with pytest.raises(ValueError):
        update_many([a], [big, big])
    unchanged()
    with pytest.raises(TypeError):
        update_many([a, hashlib.md5(), b], [big, big, big])  # not an Md5
    unchanged()
    with pytest.raises(TypeError):
        update_many([a, b, "state"], [big, big, big])
    unchanged()
    with pytest.raises(ValueError):
        update_many([a, b, a], [big, big, big])  # the same state twice
    unchanged()
    with pytest.raises(TypeError):
        update_many([a, b], [big, "not a buffer"])  # type: ignore[list-item]
    unchanged()
    with pytest.raises(BufferError):
        update_many([a, b], [big, memoryview(big)[::2]])  # not contiguous
    unchanged()
    with pytest.raises(TypeError):
        update_many(a, [big])  # type: ignore[arg-type]  # not a sequence
    unchanged()
    with pytest.raises(TypeError):
        a.update("text")  # type: ignore[arg-type]
    unchanged()
    update_many([a, b], [big, big])  # and they still work
    assert a.hexdigest() == hashlib.md5(b"partial" + big).hexdigest()


def test_set_simd_toggles_lanes() -> None:
    try:
        _md5mb.set_simd(False)
        assert _md5mb.simd_lanes() == 1
        _md5mb.set_simd(True)
        assert _md5mb.simd_lanes() == (8 if cpu_has_avx2() else 1)
    finally:
        _md5mb.set_simd(True)

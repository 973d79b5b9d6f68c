"""The bounded buffer pool (SPEC §6.2)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keepstore.buffers import HUGE_PAGE, KEEP_RESIDENT, KEEP_RESIDENT_SMALL_PAGES, Buffer, BufferPool
from keepstore.locator import BLOCK_SIZE

SMALL = 4096


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_rejects_non_positive_size() -> None:
    with pytest.raises(ValueError):
        BufferPool(0)
    with pytest.raises(ValueError):
        BufferPool(-1)


def test_default_buffers_are_64_mib() -> None:
    async def main() -> None:
        pool = BufferPool(2)
        assert pool.buffer_size == BLOCK_SIZE
        async with pool.buffer() as buf:
            assert isinstance(buf, Buffer)
            assert buf.capacity == BLOCK_SIZE
            assert len(buf.view) == BLOCK_SIZE
            assert not buf.view.readonly
            buf.view[BLOCK_SIZE - 3 :] = b"end"
            assert bytes(buf.view[BLOCK_SIZE - 3 :]) == b"end"
            st = pool.status()
            assert (st.max_buffers, st.in_use, st.allocated, st.waiting) == (2, 1, 1, 0)
            assert st.bytes_allocated == BLOCK_SIZE
        assert pool.status().in_use == 0

    asyncio.run(main())


def test_buffers_are_allocated_lazily_and_reused() -> None:
    async def main() -> None:
        pool = BufferPool(3, SMALL)
        assert pool.status().allocated == 0
        a = await pool.acquire()
        pool.release(a)
        b = await pool.acquire()
        assert b is a
        assert pool.status().allocated == 1
        pool.release(b)

    asyncio.run(main())


def test_never_more_than_max_allocated() -> None:
    async def main() -> None:
        pool = BufferPool(3, SMALL)
        holding = 0
        peak = 0
        seen: set[int] = set()

        async def user(i: int) -> None:
            nonlocal holding, peak
            async with pool.buffer() as buf:
                seen.add(id(buf))
                holding += 1
                peak = max(peak, holding)
                assert pool.status().allocated <= 3
                await asyncio.sleep(0.001 * (i % 3))
                holding -= 1

        await asyncio.gather(*(user(i) for i in range(30)))
        st = pool.status()
        assert peak == 3
        assert st.allocated == 3
        assert len(seen) == 3
        assert (st.in_use, st.waiting) == (0, 0)
        assert pool.wait_seconds_total > 0

    asyncio.run(main())


def test_fifo_hand_off() -> None:
    async def main() -> None:
        pool = BufferPool(1, SMALL)
        held = await pool.acquire()
        order: list[int] = []

        async def waiter(i: int) -> None:
            buf = await pool.acquire()
            order.append(i)
            await asyncio.sleep(0)
            pool.release(buf)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(waiter(i)))
            await settle()  # queue them in a known order
        assert pool.status().waiting == 5
        pool.release(held)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]
        assert pool.status().in_use == 0

    asyncio.run(main())


def test_newcomer_does_not_overtake_queued_waiters() -> None:
    async def main() -> None:
        pool = BufferPool(1, SMALL)
        held = await pool.acquire()
        first = asyncio.create_task(pool.acquire())
        await settle()
        pool.release(held)  # handed to `first`, which has not run yet
        late = asyncio.create_task(pool.acquire())
        await settle()
        assert first.done() and not late.done()
        pool.release(first.result())
        buf = await late
        pool.release(buf)
        assert pool.status().in_use == 0

    asyncio.run(main())


def test_release_hands_buffer_straight_to_waiter() -> None:
    async def main() -> None:
        pool = BufferPool(1, SMALL)
        held = await pool.acquire()
        task = asyncio.create_task(pool.acquire())
        await settle()
        assert not task.done()
        pool.release(held)
        st = pool.status()
        assert (st.in_use, st.allocated, st.waiting) == (1, 1, 0)  # never went back to the free list
        got = await task
        assert got is held
        pool.release(got)
        assert pool.status().in_use == 0

    asyncio.run(main())


def test_cancelled_waiter_takes_nothing() -> None:
    async def main() -> None:
        pool = BufferPool(1, SMALL)
        held = await pool.acquire()
        task = asyncio.create_task(pool.acquire())
        await settle()
        assert pool.status().waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        st = pool.status()
        assert (st.in_use, st.waiting) == (1, 0)
        pool.release(held)
        st = pool.status()
        assert (st.in_use, st.allocated, st.waiting) == (0, 1, 0)
        # the pool still works
        async with pool.buffer() as buf:
            assert buf is held

    asyncio.run(main())


def test_waiter_cancelled_by_timeout_takes_nothing() -> None:
    async def main() -> None:
        pool = BufferPool(1, SMALL)
        held = await pool.acquire()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.acquire(), 0.01)
        pool.release(held)
        assert pool.status().in_use == 0
        assert pool.status().waiting == 0

    asyncio.run(main())


def test_waiter_cancelled_in_the_same_tick_it_was_handed_a_buffer() -> None:
    async def main() -> None:
        pool = BufferPool(1, SMALL)
        held = await pool.acquire()
        cancelled = asyncio.create_task(pool.acquire())
        await settle()
        nxt = asyncio.create_task(pool.acquire())
        await settle()
        pool.release(held)  # hands the buffer to `cancelled`...
        cancelled.cancel()  # ...which is cancelled before it runs: it must pass the buffer on
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        got = await nxt
        assert got is held
        assert pool.status().in_use == 1
        pool.release(got)
        st = pool.status()
        assert (st.in_use, st.allocated, st.waiting) == (0, 1, 0)

    asyncio.run(main())


def test_same_tick_cancel_with_no_other_waiter_returns_buffer_to_pool() -> None:
    async def main() -> None:
        pool = BufferPool(1, SMALL)
        held = await pool.acquire()
        task = asyncio.create_task(pool.acquire())
        await settle()
        pool.release(held)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        st = pool.status()
        assert (st.in_use, st.allocated, st.waiting) == (0, 1, 0)

    asyncio.run(main())


def test_waiter_cancelled_then_buffer_released_before_it_runs() -> None:
    # A client hangs up while waiting (its task is cancelled), and in the same tick another request releases a
    # buffer. The cancelled waiter must end with CancelledError, taking nothing.
    async def main() -> None:
        pool = BufferPool(1, SMALL)
        held = await pool.acquire()
        task = asyncio.create_task(pool.acquire())
        await settle()
        task.cancel()  # cancels the waiter's future; the task has not resumed yet
        pool.release(held)  # finds the cancelled future first in the queue and skips it
        with pytest.raises(asyncio.CancelledError):
            await task
        st = pool.status()
        assert (st.in_use, st.allocated, st.waiting) == (0, 1, 0)

    asyncio.run(main())


def test_no_leak_under_mixed_load_with_cancellations() -> None:
    async def main() -> None:
        pool = BufferPool(2, SMALL)

        async def user(i: int) -> None:
            async with pool.buffer():
                await asyncio.sleep(0.001 * (i % 4))

        tasks = [asyncio.create_task(user(i)) for i in range(40)]
        await asyncio.sleep(0.003)
        for t in tasks[::3]:
            t.cancel()
        # Only the pool's bookkeeping is checked here. (Which exception a cancelled waiter ends with is checked by
        # test_waiter_cancelled_then_buffer_released_before_it_runs; under this load the bug it documents shows up
        # as ValueErrors among the results.)
        await asyncio.gather(*tasks, return_exceptions=True)
        st = pool.status()
        assert (st.in_use, st.waiting) == (0, 0)
        assert st.allocated <= 2
        # full capacity is still available
        a, b = await pool.acquire(), await pool.acquire()
        assert a is not b
        pool.release(a)
        pool.release(b)

    asyncio.run(main())


# --- huge pages and trimming (KeepstorePy.HugePageBuffers) --------------------------------------------------------


def thp_skip_reason() -> str | None:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "this kernel has no transparent huge pages"
    if "[never]" in mode:
        return "transparent huge pages are turned off on this machine (enabled = never)"
    return None


def mapping_kib(buf: Buffer) -> dict[str, int]:
    """The kernel's accounting (/proc/self/smaps) of the mapping that holds ``buf``: Rss, AnonHugePages, ... in KiB."""
    import ctypes

    anchor = ctypes.c_char.from_buffer(buf._mmap)
    address = ctypes.addressof(anchor)
    del anchor  # (an exported buffer would keep the mmap from closing)
    fields: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.split()[-1] == "kB":
                fields[head.rstrip(":")] = int(line.split()[1])
    assert fields, "mapping not found"
    return fields


def thp_fallbacks() -> int:
    """How many times the kernel could not give a huge page where one was asked for (/proc/vmstat)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "thp_fault_fallback":
            return int(value)
    return 0


def fill(buf: Buffer, byte: bytes) -> None:
    """Touch every page of ``buf``, as a 64 MiB PUT does; skip the test where the kernel refused huge pages (free
    ones are short on a fragmented or memory-limited host): what is tested is keepstore's asking, not the kernel."""
    before = thp_fallbacks()
    buf.view[:] = byte * buf.capacity
    if thp_fallbacks() > before and buf.keep_resident == KEEP_RESIDENT:
        pytest.skip("the kernel fell back to small pages for some of the buffer (thp_fault_fallback rose)")


def view_address(buf: Buffer) -> int:
    import ctypes

    anchor = ctypes.c_char.from_buffer(buf.view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def test_buffers_use_huge_pages_unless_turned_off() -> None:
    reason = thp_skip_reason()
    if reason:
        pytest.skip(reason)
    huge, small = Buffer(BLOCK_SIZE, huge_pages=True), Buffer(BLOCK_SIZE, huge_pages=False)
    fill(huge, b"\x01")
    fill(small, b"\x01")
    assert mapping_kib(huge)["AnonHugePages"] == BLOCK_SIZE // 1024  # all of it: it starts on a huge page
    assert mapping_kib(small)["AnonHugePages"] == 0  # opted out, even where the kernel gives them to everyone
    assert bytes(huge.view[BLOCK_SIZE - 3 :]) == b"\x01" * 3
    assert view_address(huge) % HUGE_PAGE == 0


@pytest.mark.parametrize("huge_pages", [True, False])
def test_trim_keeps_the_start_resident_and_returns_the_rest(huge_pages: bool) -> None:
    buf = Buffer(BLOCK_SIZE, huge_pages=huge_pages)
    fill(buf, b"\x02")
    assert mapping_kib(buf)["Rss"] == BLOCK_SIZE // 1024  # (the mapping's slack, if any, untouched)
    huge_before = mapping_kib(buf)["AnonHugePages"]
    buf.trim()
    assert buf.trimmed
    keep = buf.keep_resident
    assert keep == (KEEP_RESIDENT if huge_pages else KEEP_RESIDENT_SMALL_PAGES)
    kib = mapping_kib(buf)
    assert kib["Rss"] == keep // 1024  # nothing beyond the start
    if huge_before:
        assert kib["AnonHugePages"] == keep // 1024  # the first huge page whole, not split
    assert bytes(buf.view[:keep]) == b"\x02" * keep  # small blocks' part left as it was
    assert bytes(buf.view[keep : keep + 4096]) == bytes(4096)  # the rest reads as zeros


def test_pool_hands_out_buffers_as_configured() -> None:
    async def main() -> None:
        for huge_pages in (True, False):
            pool = BufferPool(1, huge_pages=huge_pages)
            async with pool.buffer() as buf:
                fill(buf, b"\x03")
                assert (mapping_kib(buf)["AnonHugePages"] > 0) == (huge_pages and thp_skip_reason() is None)

    asyncio.run(main())

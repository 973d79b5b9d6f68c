"""Placement: rendezvous order (SPEC §5.3) and the storage-class PUT progress rules (SPEC §5.4)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import cast

import pytest

from keepstore.config import Config, VolumeSpec
from keepstore.errors import BlockNotFound, HashCollision, KeepError, VolumeError, VolumeFull, VolumeUnavailable
from keepstore.store import Mount, PutProgress, Store
from keepstore.volumes import EmptyTrashStats, IndexEntry, Volume, VolumeStats, VolumeUsage


def uuid(digit: str) -> str:
    return f"zzzzz-nyw5e-{digit * 15}" if len(digit) == 1 else f"zzzzz-nyw5e-{(digit * 15)[:15]}"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def spec(
    u: str, classes: Sequence[str] = ("default",), read_only: bool = False, replication: int = 1, priority: int = 0
) -> VolumeSpec:
    return VolumeSpec(
        uuid=u,
        driver="stub",
        parameters={},
        key_path=f"Clusters.zzzzz.Volumes.{u}",
        read_only=read_only,
        replication=replication,
        storage_classes=tuple(classes),
        priority=priority,
    )


def bare_mount(s: VolumeSpec) -> Mount:
    return Mount(s, cast(Volume, None))


class StubVolume(Volume):
    """In-memory volume that records calls; ``fail`` makes writes raise; ``gate`` holds writes until set."""

    def __init__(
        self, name: str, calls: list[tuple[str, str]], fail: KeepError | None = None, gate: asyncio.Event | None = None
    ) -> None:
        self.name = name
        self.calls = calls
        self.fail = fail
        self.gate = gate
        self.blocks: dict[str, bytes] = {}
        self.stats = VolumeStats()
        self.in_flight = 0
        self.peak_in_flight: list[int] = [0]

    @property
    def device_id(self) -> str:
        return f"stub:{self.name}"

    async def block_read(self, hash: str, into: memoryview) -> int:
        self.calls.append(("read", self.name))
        if hash not in self.blocks:
            raise BlockNotFound()
        data = self.blocks[hash]
        into[: len(data)] = data
        return len(data)

    async def block_write(self, hash: str, data: memoryview, checkpoints: object = None) -> None:
        self.calls.append(("write", self.name))
        self.in_flight += 1
        self.peak_in_flight[0] = max(self.peak_in_flight[0], self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            if self.fail is not None:
                raise self.fail
            self.blocks[hash] = bytes(data)
        finally:
            self.in_flight -= 1

    async def block_compare(self, hash: str, data: memoryview) -> bool:
        self.calls.append(("compare", self.name))
        if hash not in self.blocks:
            raise BlockNotFound()
        return self.blocks[hash] == bytes(data)

    async def block_touch(self, hash: str) -> None:
        self.calls.append(("touch", self.name))
        if hash not in self.blocks:
            raise BlockNotFound()

    async def mtime(self, hash: str) -> int:
        raise BlockNotFound()

    async def block_trash(self, hash: str, ttl: float, lifetime: float) -> None:
        raise BlockNotFound()

    async def block_untrash(self, hash: str) -> None:
        raise BlockNotFound()

    async def block_quarantine(self, hash: str) -> bool:
        return False

    async def empty_trash(self, delete_concurrency: int) -> EmptyTrashStats:
        return EmptyTrashStats()

    async def index(self, prefix: str) -> AsyncIterator[IndexEntry]:
        for h, data in self.blocks.items():
            if h.startswith(prefix):
                yield IndexEntry(h, len(data), 0)

    async def usage(self) -> VolumeUsage:
        return VolumeUsage(None, None)


def config() -> Config:
    return Config(
        cluster_id="zzzzz",
        internal_url="http://127.0.0.1:25107",
        listen_host="127.0.0.1",
        listen_port=25107,
        volumes=(),
        blob_signing_key="k",
    )


FOO = b"foo"
FOO_HASH = md5(FOO)  # acbd18db4cc2f85cedef654fccc4a4d8

# The SPEC §5.4 upstream fixture: 000 implicit default; 111 {special, extra}; 222 {readonly}, ReadOnly.
UPSTREAM_SPECS = [
    spec(uuid("0")),
    spec(uuid("1"), classes=("extra", "special")),
    spec(uuid("2"), classes=("readonly",), read_only=True),
]


# --- Store.rendezvous against the §5.3 vectors -------------------------------------------------------------------


def names(mounts: Sequence[Mount]) -> list[str]:
    return [m.uuid[-3:] for m in mounts]


def test_weights_use_the_15_character_tail() -> None:
    m = bare_mount(spec(uuid("0")))
    assert m.weight(FOO_HASH).startswith("7dbe5843")
    assert m.weight(FOO_HASH) == md5(f"{FOO_HASH}{'0' * 15}".encode())
    short = bare_mount(spec("short-uuid"))
    assert short.weight(FOO_HASH) == md5(f"{FOO_HASH}short-uuid".encode())


def test_rendezvous_bar() -> None:
    h = md5(b"bar")
    assert h == "37b51d194a7513e45b56f6524f2d51f2"
    mounts = [bare_mount(spec(uuid("1"))), bare_mount(spec(uuid("0")))]
    assert mounts[1].weight(h).startswith("620ac78f") and mounts[0].weight(h).startswith("b13f1d02")
    assert names(Store.rendezvous(h, mounts)) == ["000", "111"]


def test_rendezvous_qux() -> None:
    h = md5(b"qux")
    assert h == "d85b1213473c2fd7c2045020a6b9c62b"
    mounts = [bare_mount(spec(uuid(d))) for d in ("2", "12", "1")]
    assert names(Store.rendezvous(h, mounts)) == ["111", "121", "222"]
    assert [m.weight(h)[:8] for m in Store.rendezvous(h, mounts)] == ["19440bd0", "343933e0", "87602b6c"]


def test_rendezvous_foobar_priorities() -> None:
    h = md5(b"foobar")
    assert h == "3858f62230ac3c915f300c664312c63f"
    plain = [bare_mount(spec(uuid("2"))), bare_mount(spec(uuid("1")))]
    assert names(Store.rendezvous(h, plain)) == ["111", "222"]  # a83734df < b3cea240
    # class1 (66) on 111; class2/class3 (99/33) on 222: the mount priority is the highest, 99
    prio = [
        bare_mount(spec(uuid("1"), ("class1",), priority=66)),
        bare_mount(spec(uuid("2"), ("class2", "class3"), priority=99)),
    ]
    assert names(Store.rendezvous(h, prio)) == ["222", "111"]


def test_rendezvous_uses_only_the_hash_part() -> None:
    mounts = [bare_mount(spec(uuid("1"))), bare_mount(spec(uuid("0")))]
    bar = md5(b"bar")
    assert names(Store.rendezvous(f"{bar}+3+Afoo@bar", mounts)) == names(Store.rendezvous(bar, mounts))


def test_foo_order() -> None:
    mounts = [bare_mount(s) for s in UPSTREAM_SPECS]
    # md5("foo") weights: 000 = 7dbe5843 < 111 = 95326b7d; 222 = 69178a67
    assert names(Store.rendezvous(FOO_HASH, mounts)) == ["222", "000", "111"]
    writable = [m for m in mounts if m.allow_write]
    assert names(Store.rendezvous(FOO_HASH, writable)) == ["000", "111"]


# --- PutProgress on its own --------------------------------------------------------------------------------------


def greedy(classes: Sequence[str], specs: Sequence[VolumeSpec], hash: str = FOO_HASH) -> PutProgress:
    """Sequential placement: each writable mount in rendezvous order is written if still wanted."""
    mounts = [bare_mount(s) for s in specs]
    progress = PutProgress(classes)
    for m in Store.rendezvous(hash, [m for m in mounts if m.allow_write]):
        if progress.want(m):
            progress.add(m)
    return progress


UPSTREAM = [
    # (requested classes, replicas, confirmed classes, mounts used)
    (None, 1, {"default": 1}, ["000"]),
    ([], 1, {"default": 1}, ["000"]),
    (["default"], 1, {"default": 1}, ["000"]),
    (["default", "default"], 1, {"default": 1}, ["000"]),
    (["special"], 1, {"extra": 1, "special": 1}, ["111"]),
    (["special", "readonly"], 1, {"extra": 1, "special": 1}, ["111"]),
    (["special", "nonexistent"], 1, {"extra": 1, "special": 1}, ["111"]),
    (["extra", "special"], 1, {"extra": 1, "special": 1}, ["111"]),
    (["default", "special"], 2, {"default": 1, "extra": 1, "special": 1}, ["000", "111"]),
    # 507: nothing wanted
    (["doesnotexist"], 0, {}, []),
    (["doesnotexist", "readonly"], 0, {}, []),
    (["readonly"], 0, {}, []),
]


@pytest.mark.parametrize(("classes", "replicas", "confirmed", "used"), UPSTREAM)
def test_upstream_expectations_progress(
    classes: list[str] | None, replicas: int, confirmed: dict[str, int], used: list[str]
) -> None:
    p = greedy(classes or (), UPSTREAM_SPECS)
    assert p.total == replicas
    assert {c: n for c, n in p.done_by_class.items() if n > 0} == confirmed
    assert sorted(m.uuid[-3:] for m in p.used) == used


def test_nothing_wanted_for_unknown_class() -> None:
    p = PutProgress(["doesnotexist"])
    for s in UPSTREAM_SPECS:
        assert not p.want(bare_mount(s))
    assert not p.done()


def test_no_classes_any_single_mount() -> None:
    p = PutProgress([])
    a, b = bare_mount(spec(uuid("0"))), bare_mount(spec(uuid("1"), ("other",)))
    assert not p.done()  # nothing stored yet
    assert p.want(a) and p.want(b)
    p.add(b)
    assert p.done()
    assert not p.want(a)


def test_empty_class_names_are_dropped() -> None:
    p = PutProgress(["", "default", ""])
    assert p.needed == {"default"}
    assert p.todo == {"default"}


def test_add_counts_replication_and_is_idempotent() -> None:
    p = PutProgress(["a", "b"])
    m = bare_mount(spec(uuid("0"), ("a", "c"), replication=3))
    p.add(m)
    p.add(m)
    assert p.total == 3
    assert p.done_by_class == {"a": 3, "c": 3}
    assert p.todo == {"b"}
    assert not p.want(m)  # already used
    assert not p.done()


def test_sub_undoes_add() -> None:
    p = PutProgress(["a", "b"])
    m1 = bare_mount(spec(uuid("0"), ("a",)))
    m2 = bare_mount(spec(uuid("1"), ("a", "b")))
    p.add(m1)
    p.add(m2)
    assert p.done()
    p.sub(m2)
    assert p.todo == {"b"}  # a is still covered by m1
    assert p.total == 1
    assert p.want(m2)
    p.sub(m1)
    assert p.todo == {"a", "b"}
    assert p.total == 0
    p.sub(m1)  # not used: no-op
    assert p.total == 0


def test_copy_is_independent() -> None:
    p = PutProgress(["a"])
    c = p.copy()
    c.add(bare_mount(spec(uuid("0"), ("a",))))
    assert c.done() and not p.done()
    assert p.total == 0 and p.used == set()


# --- Store.write end to end with stub volumes --------------------------------------------------------------------


def make_store(
    specs: Sequence[VolumeSpec],
    calls: list[tuple[str, str]],
    fail: dict[str, KeepError] | None = None,
    gate: asyncio.Event | None = None,
) -> Store:
    fail = fail or {}
    mounts = [Mount(s, StubVolume(s.uuid[-3:], calls, fail.get(s.uuid[-3:]), gate)) for s in specs]
    return Store(config(), mounts)


def written(store: Store) -> list[str]:
    return sorted(m.uuid[-3:] for m in store.mounts if FOO_HASH in cast(StubVolume, m.volume).blocks)


@pytest.mark.parametrize(("classes", "replicas", "confirmed", "used"), UPSTREAM)
def test_upstream_expectations_store_write(
    classes: list[str] | None, replicas: int, confirmed: dict[str, int], used: list[str]
) -> None:
    async def main() -> None:
        calls: list[tuple[str, str]] = []
        store = make_store(UPSTREAM_SPECS, calls)
        try:
            if replicas == 0:
                with pytest.raises(VolumeFull):  # 507: no write was attempted
                    await store.write(FOO_HASH, memoryview(FOO), classes or ())
                assert not any(op == "write" for op, _ in calls)
            else:
                result = await store.write(FOO_HASH, memoryview(FOO), classes or ())
                assert result.replicas == replicas
                assert result.classes == confirmed
                assert result.size == 3
            assert written(store) == used
            assert ("write", "222") not in calls  # read-only
        finally:
            await store.close()

    asyncio.run(main())


def test_second_put_touches_instead_of_writing() -> None:
    async def main() -> None:
        calls: list[tuple[str, str]] = []
        store = make_store(UPSTREAM_SPECS, calls)
        await store.write(FOO_HASH, memoryview(FOO), ["default", "special"])
        calls.clear()
        result = await store.write(FOO_HASH, memoryview(FOO), ["default", "special"])
        assert result.replicas == 2
        assert calls == [("compare", "000"), ("touch", "000"), ("compare", "111"), ("touch", "111")]
        await store.close()

    asyncio.run(main())


def test_hash_collision() -> None:
    async def main() -> None:
        calls: list[tuple[str, str]] = []
        store = make_store(UPSTREAM_SPECS, calls)
        cast(StubVolume, store.by_uuid[uuid("0")].volume).blocks[FOO_HASH] = b"bar"
        with pytest.raises(HashCollision):
            await store.write(FOO_HASH, memoryview(FOO))
        assert not any(op == "write" for op, _ in calls)
        await store.close()

    asyncio.run(main())


THREE = [spec(uuid("1"), ("class1",)), spec(uuid("12"), ("class1", "class2")), spec(uuid("2"), ("class2",))]
QUX = b"qux"
QUX_HASH = md5(QUX)


def test_three_mounts_concurrent_writes_then_touches() -> None:
    async def main() -> None:
        calls: list[tuple[str, str]] = []
        gate = asyncio.Event()
        store = make_store(THREE, calls, gate=gate)
        task = asyncio.create_task(store.write(QUX_HASH, memoryview(QUX), ["class1", "class2"]))
        for _ in range(20):
            await asyncio.sleep(0)
        # both writes are in flight before either finishes
        assert [c for c in calls if c[0] == "write"] == [("write", "111"), ("write", "121")]
        gate.set()
        result = await task
        assert result.replicas == 2
        assert result.classes == {"class1": 2, "class2": 1}
        assert [c for c in calls if c[0] == "compare"] == [("compare", "111"), ("compare", "121"), ("compare", "222")]
        assert ("write", "222") not in calls

        calls.clear()
        result = await store.write(QUX_HASH, memoryview(QUX), ["class1", "class2"])
        assert calls == [("compare", "111"), ("touch", "111"), ("compare", "121"), ("touch", "121")]
        assert result.replicas == 2
        await store.close()

    asyncio.run(main())


def test_failed_write_moves_on_to_next_candidate() -> None:
    async def main() -> None:
        calls: list[tuple[str, str]] = []
        specs = [spec(uuid("0")), spec(uuid("1"))]
        store = make_store(specs, calls, fail={"000": VolumeError("disk on fire")})
        result = await store.write(FOO_HASH, memoryview(FOO))
        assert result.replicas == 1
        assert [c for c in calls if c[0] == "write"] == [("write", "000"), ("write", "111")]
        assert written(store) == ["111"]
        await store.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        ({"000": VolumeFull(), "111": VolumeFull()}, VolumeFull),
        ({"000": VolumeFull(), "111": VolumeError("x")}, VolumeUnavailable),
        ({"000": VolumeError("x"), "111": VolumeError("y")}, VolumeUnavailable),
    ],
)
def test_all_writes_fail(failures: dict[str, KeepError], expected: type[KeepError]) -> None:
    async def main() -> None:
        calls: list[tuple[str, str]] = []
        store = make_store([spec(uuid("0")), spec(uuid("1"))], calls, fail=failures)
        with pytest.raises(expected):
            await store.write(FOO_HASH, memoryview(FOO))
        assert sorted(c for c in calls if c[0] == "write") == [("write", "000"), ("write", "111")]
        await store.close()

    asyncio.run(main())


def test_no_writable_mounts_is_full() -> None:
    async def main() -> None:
        store = make_store([spec(uuid("0"), read_only=True)], [])
        with pytest.raises(VolumeFull):
            await store.write(FOO_HASH, memoryview(FOO))
        await store.close()

    asyncio.run(main())


def test_replication_is_summed() -> None:
    async def main() -> None:
        store = make_store([spec(uuid("0"), replication=2), spec(uuid("1"), ("special",), replication=3)], [])
        result = await store.write(FOO_HASH, memoryview(FOO), ["default", "special"])
        assert result.replicas == 5
        assert result.classes == {"default": 2, "special": 3}
        await store.close()

    asyncio.run(main())

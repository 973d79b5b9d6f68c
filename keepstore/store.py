"""Placement over volumes: what HTTP handlers and workers call; nothing else reaches into a driver.

It orders mounts (priority, then rendezvous weight), reads with verification and fail-over, writes with the
storage-class progress rules, and maps per-volume outcomes onto one answer (SPEC §2.5–2.13, §5.3–5.4).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import Config, VolumeSpec
from .errors import (
    BlockNotFound,
    ChecksumMismatch,
    HashCollision,
    KeepError,
    VolumeFull,
    VolumeUnavailable,
)
from .hashing import Checkpoints, md5_hex
from .volumes import BlockWriter, IndexEntry, LocalBlock, Volume

log = logging.getLogger("keepstore.store")


@dataclass(eq=False)
class Mount:
    """A volume as this server uses it: the driver plus its place in the config."""

    spec: VolumeSpec
    volume: Volume

    @property
    def priority(self) -> int:
        return self.spec.priority

    @property
    def uuid(self) -> str:
        return self.spec.uuid

    @property
    def allow_write(self) -> bool:
        return self.spec.allow_write

    @property
    def allow_trash(self) -> bool:
        return self.spec.allow_trash

    @property
    def replication(self) -> int:
        return self.spec.replication

    @property
    def storage_classes(self) -> tuple[str, ...]:
        return self.spec.storage_classes

    def weight(self, hash: str) -> str:
        # 27-character UUIDs are weighed by their last 15 characters, as Arvados does.
        tail = self.uuid[12:] if len(self.uuid) == 27 else self.uuid
        return hashlib.md5(f"{hash}{tail}".encode()).hexdigest()


@dataclass
class WriteResult:
    hash: str
    size: int
    replicas: int
    classes: dict[str, int]


@dataclass
class BlockData:
    """A verified block: in the caller's buffer (``file`` None), or in an open local file to be sent from there,
    and then in the buffer too if ``in_buffer`` (see Store.read's ``keep_max``)."""

    size: int
    file: LocalBlock | None = None
    in_buffer: bool = True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclass
class StoreCounters:
    quarantined: int = 0
    checksum_errors: int = 0


class PutProgress:
    """How far a write is from satisfying the requested storage classes (SPEC §5.4)."""

    def __init__(self, classes: Iterable[str]) -> None:
        self.needed = {c for c in classes if c}
        self.todo = set(self.needed)
        self.used: set[Mount] = set()
        self.total = 0
        self.done_by_class: dict[str, int] = {}

    def copy(self) -> PutProgress:
        other = PutProgress(())
        other.needed = self.needed
        other.todo = set(self.todo)
        other.used = set(self.used)
        other.total = self.total
        other.done_by_class = dict(self.done_by_class)
        return other

    def add(self, mnt: Mount) -> None:
        if mnt in self.used:
            return
        self.used.add(mnt)
        self.total += mnt.replication
        for c in mnt.storage_classes:
            self.done_by_class[c] = self.done_by_class.get(c, 0) + mnt.replication
            self.todo.discard(c)

    def sub(self, mnt: Mount) -> None:
        if mnt not in self.used:
            return
        self.used.discard(mnt)
        self.total -= mnt.replication
        for c in mnt.storage_classes:
            self.done_by_class[c] -= mnt.replication
            if c in self.needed and self.done_by_class[c] <= 0:
                self.todo.add(c)

    def done(self) -> bool:
        return not self.todo and self.total > 0

    def want(self, mnt: Mount) -> bool:
        if self.done() or mnt in self.used:
            return False
        if not self.todo:
            return True  # no classes requested: any mount will do
        return any(c in self.todo for c in mnt.storage_classes)


@dataclass
class Store:
    config: Config
    mounts: Sequence[Mount]
    counters: StoreCounters = field(default_factory=StoreCounters)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.mounts = sorted(self.mounts, key=lambda m: m.uuid)
        self.by_uuid = {m.uuid: m for m in self.mounts}
        self.readable = list(self.mounts)
        self.writable = [m for m in self.mounts if m.allow_write]
        self.trashable = [m for m in self.mounts if m.allow_trash]

    # --- ordering --------------------------------------------------------------------------------------------

    @staticmethod
    def rendezvous(hash: str, mounts: Iterable[Mount]) -> list[Mount]:
        """Priority descending, then rendezvous weight ascending (the server-side order of SPEC §5.3)."""
        if isinstance(mounts, list) and len(mounts) == 1:
            return mounts  # one mount: nothing to order (the common single-volume case, on every request)
        return sorted(mounts, key=lambda m: (-m.priority, m.weight(hash[:32])))

    # --- reads -----------------------------------------------------------------------------------------------

    async def read(self, hash: str, size_hint: int | None, into: memoryview, keep_max: int = 1 << 62) -> BlockData:
        """Find a verified copy of the block.

        Mounts are tried in read order. A copy that fails its MD5 is quarantined and the next mount tried, so a
        corrupt copy is never served while a good one exists (deliberate difference 3). A copy whose MD5 is right
        but whose size differs from the hint means the *locator* is wrong: ChecksumMismatch, nothing quarantined.

        From a driver that keeps blocks in local files the result is the open, verified file (``into`` is used as
        scratch space, and holds the block too if it is at most ``keep_max`` bytes); otherwise the block is in
        ``into``. A block of at most ``keep_max`` bytes that the driver has at hand (``Volume.read_cached``: a
        small block in the page cache) is read and hashed in one step, into ``into``. The caller closes the result.
        """
        failure: KeepError | None = None
        corrupt = False
        try_cached = keep_max > 0 and (size_hint is None or size_hint <= keep_max)
        for mnt in self.rendezvous(hash, self.readable):
            try:
                hit = mnt.volume.read_cached(hash, into, keep_max) if try_cached else None
                local = None
                kept = True  # the block ends up in ``into``
                if hit is not None:
                    size, digest = hit
                elif (local := await mnt.volume.block_open(hash)) is None:
                    size = await mnt.volume.block_read(hash, into)
                    digest = await md5_hex(into[:size])
                else:
                    size = local.size
                    kept = size <= keep_max and size <= len(into)  # (what LocalBlock.digest keeps)
                    try:
                        digest = await local.digest(into, kept)
                    except BaseException:
                        local.close()
                        raise
            except BlockNotFound:
                continue
            except KeepError as exc:
                failure = failure or exc
                continue
            result = BlockData(size, local, kept)
            if digest != hash:
                result.close()
                corrupt = True
                self.counters.checksum_errors += 1
                log.error("checksum mismatch in stored data", extra={"fields": {"hash": hash, "mount": mnt.uuid}})
                self._spawn(self._quarantine(mnt, hash))
                continue
            if size_hint is not None and size != size_hint:
                result.close()
                raise ChecksumMismatch()
            return result
        if corrupt:
            raise ChecksumMismatch()
        raise failure or BlockNotFound()

    async def verified_on(self, mnt: Mount, hash: str, size: int, scratch: memoryview) -> bool:
        """Whether ``mnt`` holds a good copy of the block (right size, right md5). BlockNotFound if absent."""
        local = await mnt.volume.block_open(hash)
        if local is None:
            n = await mnt.volume.block_read(hash, scratch)
            return n == size and await md5_hex(scratch[:n]) == hash
        try:
            return local.size == size and await local.digest(scratch, keep=False) == hash
        finally:
            local.close()

    async def _quarantine(self, mnt: Mount, hash: str) -> None:
        try:
            if await mnt.volume.block_quarantine(hash):
                self.counters.quarantined += 1
                log.warning("quarantined corrupt block", extra={"fields": {"hash": hash, "mount": mnt.uuid}})
        except KeepError as exc:
            log.error("quarantine failed", extra={"fields": {"hash": hash, "mount": mnt.uuid, "error": str(exc)}})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for mnt in self.mounts:
            await mnt.volume.close()

    # --- writes ----------------------------------------------------------------------------------------------

    async def open_stream(self, hash: str, classes: Sequence[str]) -> tuple[Mount, BlockWriter] | None:
        """For a large PUT: a writer on the mount the block will go to first, if it is absent there.

        The body can then be written to disk while it is still arriving; the caller commits the writer only once
        the whole body hashes to ``hash`` (aborts it otherwise) and passes the mount to ``write`` as done. None
        when the block may exist there already (``write`` compares and touches it) or the driver cannot stream.
        """
        progress = PutProgress(classes)
        for mnt in self.rendezvous(hash, self.writable):
            if not progress.want(mnt):
                continue
            try:
                await mnt.volume.mtime(hash)
                return None  # present: the normal path will compare it and touch it
            except BlockNotFound:
                pass
            except KeepError:
                return None
            try:
                writer = await mnt.volume.block_writer(hash)
            except KeepError:
                return None  # full or failing: the normal path will try the next mount
            return (mnt, writer) if writer is not None else None
        return None

    async def write(
        self,
        hash: str,
        data: memoryview,
        classes: Sequence[str] = (),
        done: Sequence[Mount] = (),
        checkpoints: Checkpoints | None = None,
    ) -> WriteResult:
        """Store ``data`` (already verified to hash to ``hash``) on as many writable mounts as the classes need.

        A mount that already holds identical bytes is touched instead of rewritten; different bytes under the same
        hash are a HashCollision. ``done`` are mounts the caller already wrote the block to (a streamed PUT).
        ``checkpoints`` (recorded while the data was hashed) go to the volumes with it, for faster verified reads.
        Returns once every started write has finished, even if cancelled meanwhile.
        """
        order = self.rendezvous(hash, self.writable)
        result = PutProgress(classes)
        for mnt in done:
            result.add(mnt)
        if len(order) == 1:
            return await self._write_one(hash, data, order[0], result, checkpoints)
        for mnt in order:
            if not result.want(mnt):
                continue
            try:
                same = await mnt.volume.block_compare(hash, data)
            except KeepError:
                continue  # absent, or unreadable: the write pass decides
            if not same:
                raise HashCollision()
            try:
                await mnt.volume.block_touch(hash)
                result.add(mnt)
            except KeepError:
                pass

        all_full = True
        pending = result.copy()  # what result will be if every running write succeeds
        running: dict[asyncio.Task[None], Mount] = {}

        async def settle(wait_for_one: bool) -> None:
            nonlocal all_full
            if not running:
                return
            done, _ = await asyncio.wait(
                list(running), return_when=asyncio.FIRST_COMPLETED if wait_for_one else asyncio.ALL_COMPLETED
            )
            for task in done:
                mnt = running.pop(task)
                exc = task.exception()
                if exc is None:
                    result.add(mnt)
                else:
                    pending.sub(mnt)
                    if not isinstance(exc, VolumeFull):
                        all_full = False
                    log.warning("write failed", extra={"fields": {"hash": hash, "mount": mnt.uuid, "error": str(exc)}})

        try:
            for mnt in order:
                while not result.done() and result.want(mnt) and not pending.want(mnt) and running:
                    await settle(wait_for_one=True)
                if result.done():
                    break
                if not result.want(mnt) or not pending.want(mnt):
                    continue
                pending.add(mnt)
                running[asyncio.ensure_future(mnt.volume.block_write(hash, data, checkpoints))] = mnt
            await settle(wait_for_one=False)
        finally:
            if running:
                # Cancelled: the writes still read ``data``; wait for them before the caller frees the buffer.
                await _wait_uncancellable(list(running))
        return self._written(hash, data, result, all_full)

    async def _write_one(
        self, hash: str, data: memoryview, mnt: Mount, result: PutProgress, checkpoints: Checkpoints | None
    ) -> WriteResult:
        """``write`` to the only writable mount, the common case: no writes side by side, so no task and no wait set
        (the driver returns, even when cancelled, only once it no longer reads ``data``: see volumes.base).

        The same rules as with several mounts, in the order that suits a new block: write it unless a copy is there
        (one call, ``block_create``); only then compare that copy (different bytes: HashCollision) and touch it.
        """
        if not result.want(mnt):
            return self._written(hash, data, result, True)
        try:
            created = await mnt.volume.block_create(hash, data, checkpoints)
        except Exception as exc:
            return self._write_failed(hash, data, mnt, result, exc)
        if created:
            result.add(mnt)
            return self._written(hash, data, result, True)
        same: bool | None = None
        try:
            same = await mnt.volume.block_compare(hash, data)
        except KeepError:
            pass  # gone again, or unreadable: written below
        if same is False:
            raise HashCollision()
        if same:
            try:
                await mnt.volume.block_touch(hash)
                result.add(mnt)
                return self._written(hash, data, result, True)
            except KeepError:
                pass  # rewritten below
        try:
            await mnt.volume.block_write(hash, data, checkpoints)
        except Exception as exc:
            return self._write_failed(hash, data, mnt, result, exc)
        result.add(mnt)
        return self._written(hash, data, result, True)

    def _write_failed(
        self, hash: str, data: memoryview, mnt: Mount, result: PutProgress, exc: Exception
    ) -> WriteResult:
        log.warning("write failed", extra={"fields": {"hash": hash, "mount": mnt.uuid, "error": str(exc)}})
        return self._written(hash, data, result, isinstance(exc, VolumeFull))

    @staticmethod
    def _written(hash: str, data: memoryview, result: PutProgress, all_full: bool) -> WriteResult:
        if result.total > 0:
            return WriteResult(hash, len(data), result.total, {c: n for c, n in result.done_by_class.items() if n > 0})
        if all_full:
            raise VolumeFull()
        raise VolumeUnavailable()

    # --- admin operations --------------------------------------------------------------------------------------

    async def touch(self, hash: str) -> None:
        """Touch the block on the first writable mount (by UUID) that has it."""
        failure: KeepError | None = None
        for mnt in self.writable:
            try:
                await mnt.volume.block_touch(hash)
                return
            except BlockNotFound:
                continue
            except KeepError as exc:
                failure = failure or exc
        raise failure or BlockNotFound()

    async def mtime(self, mnt: Mount, hash: str) -> int:
        return await mnt.volume.mtime(hash)

    async def trash(self, hash: str) -> None:
        """Trash the block on every trashable mount where it is older than the signing TTL (DELETE /{locator})."""
        ttl = self.config.blob_signing_ttl
        found = False
        failure: KeepError | None = None
        for mnt in self.trashable:
            try:
                mtime = await mnt.volume.mtime(hash)
                found = True
                if time.time_ns() - mtime > ttl * 1_000_000_000:
                    await mnt.volume.block_trash(hash, ttl, self.config.blob_trash_lifetime)
            except BlockNotFound:
                continue
            except KeepError as exc:
                found = True
                failure = failure or exc
        if failure is not None:
            raise failure
        if not found:
            raise BlockNotFound()

    async def untrash(self, hash: str) -> None:
        """Untrash on every writable mount; success if any had a trashed copy."""
        ok = False
        failure: KeepError | None = None
        for mnt in self.writable:
            try:
                await mnt.volume.block_untrash(hash)
                ok = True
            except BlockNotFound:
                continue
            except KeepError as exc:
                failure = failure or exc
        if ok:
            return
        raise failure or BlockNotFound()

    async def index(self, prefix: str, mount_uuid: str | None = None) -> AsyncIterator[IndexEntry]:
        """Every block on every readable mount (UUID order), or on one mount; BlockNotFound for an unknown UUID."""
        if mount_uuid is not None:
            mnt = self.by_uuid.get(mount_uuid)
            if mnt is None:
                raise BlockNotFound()
            mounts: list[Mount] = [mnt]
        else:
            mounts = self.readable
        for mnt in mounts:
            async for entry in mnt.volume.index(prefix):
                yield entry


async def _wait_uncancellable(tasks: list[asyncio.Task[None]]) -> None:
    cancelled = False
    while not all(t.done() for t in tasks):
        try:
            await asyncio.wait([t for t in tasks if not t.done()])
        except asyncio.CancelledError:
            cancelled = True
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieved: the error was already logged or is moot
    if cancelled:
        raise asyncio.CancelledError()

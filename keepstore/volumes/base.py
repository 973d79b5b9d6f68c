"""The storage driver interface.

A volume stores blocks by hash and knows nothing of HTTP, signatures, placement or verification: those belong to
``keepstore.store``. Every method is a coroutine but ``read_cached``, which must not block; drivers with blocking
I/O run it in their own executor so that one slow disk cannot stall the event loop or the other volumes.

Invariants every driver must keep (``tests/contract`` checks them against each driver):

* **Atomic visibility.** ``block_write`` never leaves a partial block visible: after any failure, including a crash
  or kill at any instant, a read returns the previous complete copy or :class:`BlockNotFound`, never a mix or a
  prefix. When ``block_write`` returns, the block is durable (fsynced or syncfs'd, or acknowledged by the object store),
  and so is a copy when ``block_touch`` returns (a PUT that finds a copy is acknowledged through it).
* **Not found is an exception.** Reading, touching, asking the mtime of, or trashing an absent block raises
  :class:`BlockNotFound`; so does any of these on a *trashed* block. Trashed blocks are not listed by ``index``.
* **Time is nanoseconds.** ``mtime`` and ``index`` give nanoseconds since the epoch, and the two agree exactly for
  the same copy (trash lists match on equality).
* **Trash is conservative.** ``block_trash`` is a successful no-op for a block younger than the signing TTL; a
  trashed block can be untrashed until ``empty_trash`` runs after its deadline.
* **Errors are domain errors.** Drivers raise :class:`BlockNotFound`, :class:`VolumeFull`, :class:`TooLarge` or
  :class:`VolumeError` (with the cause chained), nothing backend-specific.
* **Checkpoints are hints.** A driver may keep a block's MD5 checkpoints beside it to verify reads faster; they are
  checked, never trusted (a wrong or missing one costs speed, not correctness), and losing them is harmless.
* **Buffers are borrowed.** ``block_read`` fills the caller's buffer and ``block_write`` reads the caller's data; a
  driver keeps no reference to either after the call returns (or is cancelled).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..errors import BlockNotFound
from ..hashing import Checkpoints


@dataclass(frozen=True)
class IndexEntry:
    hash: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class EmptyTrashStats:
    deleted_blocks: int = 0
    deleted_bytes: int = 0
    remaining_blocks: int = 0
    remaining_bytes: int = 0
    errors: int = 0  # directories or files that could not be swept (the volume's error counters say why)


class VolumeStats:
    """Counters a volume keeps for metrics and status. Updated from driver threads, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ops: dict[str, int] = {}  # operation name -> count
        self.errors: dict[str, int] = {}  # error type -> count
        self.in_bytes = 0  # read from the backend
        self.out_bytes = 0  # written to the backend

    def op(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.ops[name] = self.ops.get(name, 0) + n

    def read_done(self, ops: tuple[str, ...], read: int) -> None:
        """Count several operations and bytes read at once (one lock round trip on the hot read path)."""
        with self._lock:
            for name in ops:
                self.ops[name] = self.ops.get(name, 0) + 1
            self.in_bytes += read

    def write_done(self, ops: tuple[str, ...], written: int) -> None:
        with self._lock:
            for name in ops:
                self.ops[name] = self.ops.get(name, 0) + 1
            self.out_bytes += written

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def io(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.in_bytes += read
            self.out_bytes += written


class LocalBlock(ABC):
    """A block held in a local file, opened for reading: it can be hashed and then sent with sendfile(2).

    The open file keeps the copy that was opened: a later write or trash of the same block (a rename) does not
    change what this file reads, so what is verified is exactly what is sent.
    """

    size: int

    @abstractmethod
    def fileno(self) -> int:
        """The open file descriptor (for sendfile)."""

    @abstractmethod
    async def digest(self, scratch: memoryview, keep: bool) -> str:
        """MD5 hex of the whole file, read through ``scratch``.

        With ``keep`` and a block that fits, ``scratch[:size]`` holds the block afterwards; otherwise the file is
        streamed through the start of ``scratch`` in chunks (so a large block costs little memory).
        """

    @abstractmethod
    def close(self) -> None:
        """Close the file. Must not be called while ``digest`` runs."""


class BlockWriter(ABC):
    """A block written as its data arrives (a large PUT streams to disk while it is received).

    Nothing is visible until ``commit``, which makes the whole block durable and visible at once (the same
    guarantee as ``Volume.block_write``); ``abort`` discards everything. ``write`` calls are sequential: the caller
    awaits one before the next, and appends in order.
    """

    @abstractmethod
    async def write(self, data: memoryview) -> None:
        """Append ``data``. VolumeFull / VolumeError on failure (the caller then aborts)."""

    @abstractmethod
    async def commit(self, checkpoints: Checkpoints | None = None) -> None:
        """Make the block durable and visible under its hash (mtime = now), with its checkpoints if given."""

    @abstractmethod
    async def abort(self) -> None:
        """Discard what was written. Safe to call after a failed write or commit, and more than once."""


@dataclass(frozen=True)
class VolumeUsage:
    bytes_free: int | None
    bytes_used: int | None


class Volume(ABC):
    """One storage backend holding blocks. See the module docstring for the invariants."""

    stats: VolumeStats

    @property
    @abstractmethod
    def device_id(self) -> str:
        """Identifies the backing store: equal across keepstore servers that share it (keep-balance dedupes on it)."""

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Prepare for service (e.g. start background housekeeping). Called once before any other method."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources. Waits for in-flight operations to finish."""

    @abstractmethod
    async def block_read(self, hash: str, into: memoryview) -> int:
        """Copy the stored block into ``into`` and return its size.

        Raises BlockNotFound if absent or trashed, TooLarge if the stored object exceeds ``len(into)``.
        No integrity check: the caller verifies.
        """

    def read_cached(self, hash: str, into: memoryview, max_size: int) -> tuple[int, str] | None:
        """The block in ``into`` and its MD5 hex, as ``(size, digest)``, if the driver has it at hand: it must not
        block (the event loop calls it), so None whenever the answer would need a wait (data not in memory), the
        block is larger than ``max_size`` or ``len(into)``, or anything else goes wrong (the caller then takes
        ``block_open`` / ``block_read``, which report errors). Raises BlockNotFound if the block is certainly absent
        or trashed. The digest is the data's, not a verdict: the caller compares it. This default never has it.
        """
        return None

    async def block_open(self, hash: str) -> LocalBlock | None:
        """Open the block as a local file if this driver stores blocks in local files, else return None.

        Raises BlockNotFound (absent or trashed) and TooLarge like ``block_read``.
        """
        return None

    async def block_writer(self, hash: str) -> BlockWriter | None:
        """Start writing a block whose data will arrive in pieces, if this driver can; else None."""
        return None

    @abstractmethod
    async def block_write(self, hash: str, data: memoryview, checkpoints: Checkpoints | None = None) -> None:
        """Store ``data`` under ``hash`` durably and atomically, replacing any existing copy; mtime becomes now.

        ``checkpoints`` are the block's MD5 checkpoints (keepstore.hashing): a driver that can keep them beside the
        block does, and uses them to verify reads in parallel; one that cannot ignores them.
        Raises VolumeFull when the backend is out of space, VolumeError on other failures.
        """

    async def block_create(self, hash: str, data: memoryview, checkpoints: Checkpoints | None = None) -> bool:
        """Store ``data`` under ``hash`` as ``block_write`` does unless a copy is already there (trashed copies do
        not count); return whether it was written. False leaves the existing copy as it is: the caller compares
        and touches it. Errors as ``block_write``.

        This default looks first, then writes. A driver that can let the write itself find the existing copy (an
        atomic create-if-absent, like the directory driver's rename that refuses to replace) overrides it.
        """
        try:
            await self.mtime(hash)
            return False
        except BlockNotFound:
            pass
        await self.block_write(hash, data, checkpoints)
        return True

    @abstractmethod
    async def block_compare(self, hash: str, data: memoryview) -> bool:
        """True if the stored copy holds exactly ``data``, False if it differs. BlockNotFound if absent."""

    @abstractmethod
    async def block_touch(self, hash: str) -> None:
        """Set the block's mtime to now. BlockNotFound if absent or trashed.

        When it returns the block is durable, as after block_write: a PUT that finds a copy is acknowledged on the
        strength of this call, and the copy may have been put there a moment ago by another process that has not
        made it durable yet. (A driver may tell such a copy by its age: see the directory volume's ``_touch``.)"""

    @abstractmethod
    async def mtime(self, hash: str) -> int:
        """The block's mtime in nanoseconds. BlockNotFound if absent or trashed."""

    @abstractmethod
    async def block_trash(self, hash: str, ttl: float, lifetime: float) -> None:
        """Trash the block unless it is younger than ``ttl`` seconds (then: success, no change).

        With ``lifetime`` 0 the block is deleted at once (if the driver allows it), else it is kept recoverable
        until now + ``lifetime``. BlockNotFound if absent.
        """

    @abstractmethod
    async def block_untrash(self, hash: str) -> None:
        """Restore a trashed copy (replacing any live one). BlockNotFound if nothing is in the trash."""

    @abstractmethod
    async def block_quarantine(self, hash: str) -> bool:
        """Move the stored copy out of the way if it does not hash to ``hash``; keep it for inspection.

        The check is repeated here, under the same lock that writes take, so a good copy written since the caller's
        read is never moved. Returns whether a copy was quarantined.
        """

    @abstractmethod
    async def empty_trash(self, delete_concurrency: int) -> EmptyTrashStats:
        """Permanently delete trashed copies whose deadline has passed."""

    @abstractmethod
    def index(self, prefix: str) -> AsyncIterator[IndexEntry]:
        """Yield the non-trashed blocks whose hash starts with ``prefix``, in backend order, in bounded memory."""

    @abstractmethod
    async def usage(self) -> VolumeUsage:
        """Free and used bytes, where the backend can tell."""

    async def sweep_temporary(self) -> int:
        """Remove leftovers of writes interrupted by a crash; return how many. Safe while writes are running."""
        return 0

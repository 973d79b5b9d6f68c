"""The write-ahead journal of a Directory volume's group commits.

A group of small blocks becomes durable with one sequential write and one fdatasync of this file instead of two
syncfs calls (keepstore/_fileio.c write_group): on ext4 those write every new file's inode, bitmaps and directory
blocks before a client may be answered, 8-10 device writes per file, where the journal writes the data once. The
block files are then written and renamed into place without a flush, and made durable in the background by a
checkpoint (one syncfs for everything written since the last); only then is their part of the journal reused.

Layout: ``<Root>/journal/<pid>-<random>.jnl`` per writing process (``journal`` is not hex: Go keepstore and the
index ignore it), two halves of HALF_SIZE bytes, each a 4 KiB header (magic, generation, CRC) and then records::

    record = 64-byte header (magic, generation, MD5 of the data, length, CRC of those) + data, padded to 64 bytes

Records are appended to the active half; a checkpoint switches to the other half, waits for the groups still
writing into the old one, syncfs-es, and then bumps the old half's generation in its header, which invalidates
every record in it at once. A record is valid when its magic, generation (its half's current one) and CRC match
and its data has the MD5 it names: a torn write fails one of these, and since groups are written one after the
other, back to back (a record for every block of a group, stored ones too), and a group is acknowledged only after
an fdatasync that covers every record before it, scanning stops at the first invalid record without losing an
acknowledged one.

Invariants:
* a block file renamed by a group commit through the journal has a valid record in some journal file until a
  syncfs that began after the rename has succeeded;
* a journal file is flock()ed by its live owner for as long as it writes records; one that nobody holds is an
  orphan (its owner died or stopped) and is recovered at the next start: every valid record's block file is
  checked and rewritten durably from the record where missing or wrong, then one syncfs, then the orphan is
  reused or removed. So a crash (of the process or the machine) never loses an acknowledged block, and a block
  file a power cut left incomplete is repaired before this process serves (every read is verified meanwhile).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("keepstore.volume")

DIRNAME = "journal"
SUFFIX = ".jnl"
HALF_SIZE = 8 << 20  # bytes per half: at 10 MB/s of 4 KiB blocks, a checkpoint at half full every ~0.4 s
HEADER_SIZE = 4096  # a half's header block (only its first bytes are used)
ALIGN = 64  # records start on 64-byte boundaries (the C side pads the same way)
CHECKPOINT_INTERVAL = 1.0  # seconds: a half with records is checkpointed at least this often
RECORD_MAX = 64 << 20  # a record's data length is never more than a block

_HALF = struct.Struct("<8sQI")
_HALF_MAGIC = b"KSJHALF1"
_REC = struct.Struct("<8sQ16sII")  # magic, generation, md5, length, crc32 of the fields before it
_REC_MAGIC = b"KSJREC01"
REC_HEADER = 64

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def record_size(length: int) -> int:
    """Bytes a record of ``length`` bytes of data takes in the journal."""
    return REC_HEADER + (length + ALIGN - 1) // ALIGN * ALIGN


def record_header(generation: int, hash: str, length: int) -> bytes:
    fields = _REC.pack(_REC_MAGIC, generation, bytes.fromhex(hash), length, 0)[:-4]
    return (fields + struct.pack("<I", zlib.crc32(fields))).ljust(REC_HEADER, b"\0")


def _half_header(generation: int) -> bytes:
    fields = _HALF.pack(_HALF_MAGIC, generation, 0)[:-4]
    return (fields + struct.pack("<I", zlib.crc32(fields))).ljust(HEADER_SIZE, b"\0")


def _read_half_generation(fd: int, start: int) -> int | None:
    raw = os.pread(fd, _HALF.size, start)
    if len(raw) < _HALF.size:
        return None
    magic, generation, crc = _HALF.unpack(raw)
    if magic != _HALF_MAGIC or crc != zlib.crc32(raw[:-4]):
        return None
    return int(generation)


def scan(fd: int) -> Iterator[tuple[str, bytes]]:
    """The valid records of a journal file, as (hash, data), half by half."""
    if os.fstat(fd).st_size >= 2 * HALF_SIZE:
        yield from scan_half(fd, 0)
        yield from scan_half(fd, 1)


def scan_half(fd: int, half: int) -> Iterator[tuple[str, bytes]]:
    """The valid records of one half of a journal file, in the order they were written."""
    start = half * HALF_SIZE
    generation = _read_half_generation(fd, start)
    if generation is None:
        return  # a torn header write: it came after a syncfs that covered every record of the half
    pos, end = start + HEADER_SIZE, start + HALF_SIZE
    while pos + REC_HEADER <= end:
        raw = os.pread(fd, _REC.size, pos)
        if len(raw) < _REC.size:
            return
        magic, gen, md5, length, crc = _REC.unpack(raw)
        if magic != _REC_MAGIC or gen != generation or crc != zlib.crc32(raw[:-4]) or length > RECORD_MAX:
            return
        if pos + record_size(length) > end:
            return
        data = os.pread(fd, length, pos + REC_HEADER)
        if len(data) != length or hashlib.md5(data).digest() != md5:
            return
        yield md5.hex(), data
        pos += record_size(length)


@dataclass
class RecoveryStats:
    journals: int = 0  # orphaned journal files recovered
    records: int = 0  # valid records found in them
    repaired: int = 0  # block files rewritten from a record (missing or not matching it)


def recover(
    root: str, root_fd: int, repair: Callable[[str, bytes], bool], create: bool
) -> tuple[RecoveryStats, int | None]:
    """Recover the orphaned journals under ``root``; with ``create``, also return a journal file of this process's
    own (a descriptor, flock()ed and ready for Journal), else None.

    ``repair(hash, data)`` makes a record's block durable: the file as it is where it holds the record's data
    (an fsync, which reports a writeback error nobody has seen), else rewritten from the record; True if it was
    rewritten. Raises OSError (or what ``repair`` raises) when recovery cannot finish; the orphans are then left
    for the next start.
    """
    directory = f"{root}/{DIRNAME}"
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    orphans: list[tuple[str, int]] = []
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)  # one recovering or creating process at a time per volume
        stats = RecoveryStats()
        records: list[tuple[str, bytes]] = []
        for name in sorted(os.listdir(directory)):
            if not name.endswith(SUFFIX):
                continue
            path = f"{directory}/{name}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a live process's journal
                continue
            orphans.append((path, fd))
            records.extend(scan(fd))
        stats.journals, stats.records = len(orphans), len(records)
        if records:
            # The records' block files may be in the page cache only (their writer was killed before its
            # checkpoint): one syncfs writes them all back, so that the per-file fsyncs of repair find little left.
            _syncfs(root_fd)
        for hash, data in records:
            if repair(hash, data):
                stats.repaired += 1
        reuse = -1
        while orphans:
            path, fd = orphans[-1]
            try:
                if create and reuse < 0 and os.fstat(fd).st_size == 2 * HALF_SIZE:
                    os.rename(path, _new_name(directory))
                    reuse = fd  # already zero-filled and allocated: saves writing a new one
                    orphans.pop()
                    continue
                os.unlink(path)
            except FileNotFoundError:
                pass  # its owner closed it cleanly (unlinked it) between our listing and our lock
            orphans.pop()
            os.close(fd)
        own: int | None = None
        try:
            if create:
                own, reuse = (reuse if reuse >= 0 else _create(directory)), -1
                _reset(own)
            os.fsync(dfd)
            if create:
                # The journal directory's own entry: without it a power cut could take the directory away, and
                # with it the only durable copy of the blocks acknowledged through its records.
                os.fsync(root_fd)
        except BaseException:
            # (a renamed orphan left behind is unlocked once closed: the next start recovers it again, harmlessly)
            for leftover in (own, reuse):
                if leftover is not None and leftover >= 0:
                    os.close(leftover)
            raise
        if reuse >= 0:
            os.close(reuse)
        return stats, own
    finally:
        for _, fd in orphans:
            os.close(fd)
        os.close(dfd)


def _new_name(directory: str) -> str:
    return f"{directory}/{os.getpid()}-{os.urandom(4).hex()}{SUFFIX}"


def _create(directory: str) -> int:
    """A new journal file, flock()ed, both halves written in full (so that writing records into it later changes
    no file metadata and fdatasync writes the data alone)."""
    path = _new_name(directory)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        zeros = bytes(1 << 20)
        for offset in range(0, 2 * HALF_SIZE, len(zeros)):
            os.pwrite(fd, zeros, offset)
        return fd
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise


def _reset(fd: int) -> None:
    """Invalidate every record in both halves: new generations in both headers, durable.

    A new generation is never below the clock in nanoseconds: a checkpoint adds one, so a half's generations grow
    far slower than the clock and one chosen now is above every one this file held, even where a torn header
    left nothing to count on (restarting at 1 would make a first life's records valid again)."""
    floor = time.time_ns()
    for half in (0, 1):
        old = _read_half_generation(fd, half * HALF_SIZE) or 0
        os.pwrite(fd, _half_header(max(old + 1, floor + half)), half * HALF_SIZE)
    os.fsync(fd)


# What each failure reported to ``on_error`` means for the service (the volume logs it).
CONSEQUENCES = {
    "write": "small writes go on with two syncfs calls per group, without the journal",
    "syncfs": "the blocks of the records it would have retired were written again file by file",
    "checkpoint": "its records are kept for the next start's recovery; small writes go on without the journal",
}


@dataclass
class Reservation:
    half: int
    offset: int  # absolute, in the journal file
    generation: int


class Journal:
    """The records of one process's group commits on one volume, and the checkpoints that retire them.

    ``reserve``/``release`` are called by the commit thread around each group's native write; a thread of the
    journal's own runs the checkpoints. ``close`` checkpoints what is left and removes the file.
    """

    def __init__(
        self,
        fd: int,
        sync_fd: int,
        rewrite: Callable[[str, bytes], None],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self.fd = fd
        self._rewrite = rewrite  # a block's durable write the file-by-file way (fsync reports errors per file)
        # syncfs reports a writeback error once per open file description: this one is the checkpoints' alone and
        # open from before the first record, so every error on a block file written through the journal reaches
        # the checkpoint that would otherwise retire its record.
        self._sync_fd = sync_fd
        self._on_error = on_error
        self._cond = threading.Condition()
        self._offset = [HEADER_SIZE, HEADER_SIZE]  # next free byte of each half, relative to the half
        self._generation = [_read_half_generation(fd, 0) or 1, _read_half_generation(fd, HALF_SIZE) or 1]
        self._inflight = [0, 0]
        self._dirty_since = [0.0, 0.0]  # when each half got its first record since its last checkpoint
        self._draining: int | None = None  # the half whose last groups the checkpoint thread waits for
        self._active = 0
        self._broken = False
        self._stuck = [False, False]  # a half whose records could not be made durable otherwise: kept for recovery
        # A half whose next checkpoint rewrites its blocks whatever its syncfs says: a syncfs error reported to the
        # other half's checkpoint may have hit one of this half's files (syncfs reports each error once, for every
        # file of the file system), and its own syncfs would then succeed.
        self._suspect = [False, False]
        self._closing = False
        self.checkpoints = 0
        self.fallbacks = 0  # groups committed the two-syncfs way because neither half had room
        self._thread = threading.Thread(target=self._run, name="journal-checkpoint", daemon=True)
        self._thread.start()

    def reserve(self, nbytes: int) -> Reservation | None:
        """Room for ``nbytes`` of records in the active half, or None (commit this group without the journal)."""
        with self._cond:
            if self._broken or self._closing or nbytes > HALF_SIZE - HEADER_SIZE:
                return None
            half = self._active
            if self._offset[half] + nbytes > HALF_SIZE:
                other = 1 - half
                self._cond.notify()  # (the checkpoint thread is the only waiter)
                if self._offset[other] != HEADER_SIZE:
                    self.fallbacks += 1
                    return None  # the other half is still being checkpointed
                self._active = half = other
            offset = self._offset[half]
            if offset == HEADER_SIZE:
                self._dirty_since[half] = time.monotonic()
                self._cond.notify()  # its checkpoint is due in CHECKPOINT_INTERVAL
            self._offset[half] = offset + nbytes
            self._inflight[half] += 1
            if offset <= HALF_SIZE // 2 < offset + nbytes:
                self._cond.notify()  # half full: checkpoint early
            return Reservation(half, half * HALF_SIZE + offset, self._generation[half])

    def release(self, reservation: Reservation) -> None:
        with self._cond:
            self._inflight[reservation.half] -= 1
            if self._draining == reservation.half and not self._inflight[reservation.half]:
                self._cond.notify()

    def failed(self, err: int) -> None:
        """A journal write or fdatasync failed (the group was committed without the journal), or a group that had
        a reservation wrote nothing into it (its bytes stay a gap, which would end a recovery scan there): stop
        using it."""
        with self._cond:
            self._broken = True
        self._on_error("write", OSError(err, os.strerror(err)))

    def close(self) -> None:
        """Checkpoint every record, stop the checkpoint thread and remove the journal file (no group may be
        committing any more)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        clean = all(off == HEADER_SIZE for off in self._offset)
        try:
            path = self._path()
            if clean and path is not None:
                # Unlinked before the lock goes with the descriptor: a recovering process never sees it unlocked.
                os.unlink(path)
        finally:
            os.close(self.fd)
            os.close(self._sync_fd)  # (the journal owns it from its construction)

    def _path(self) -> str | None:
        try:
            target = os.readlink(f"/proc/self/fd/{self.fd}")
        except OSError:
            return None
        return None if target.endswith(" (deleted)") else target

    def _due(self) -> tuple[int | None, float | None]:
        """(the half to checkpoint now, or None and how long to wait at most before asking again); called holding
        the lock."""
        other, active = 1 - self._active, self._active
        if self._offset[other] != HEADER_SIZE and not self._stuck[other]:
            return other, None
        if self._offset[active] == HEADER_SIZE or self._stuck[active] or self._offset[other] != HEADER_SIZE:
            return None, None  # nothing to do until a reservation says so
        wait = self._dirty_since[active] + CHECKPOINT_INTERVAL - time.monotonic()
        if wait <= 0 or self._closing or self._offset[active] > HALF_SIZE // 2:
            self._active = other  # new groups go to the other half (empty) from now on
            return active, None
        return None, wait

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    half, wait = self._due()
                    if half is not None:
                        break
                    if self._closing:
                        return
                    self._cond.wait(wait)
                self._draining = half
                while self._inflight[half]:
                    self._cond.wait()
                self._draining = None
            try:
                self._checkpoint(half)
            except Exception as exc:
                # The half keeps its records for the next start's recovery; the journal takes no more groups.
                with self._cond:
                    self._broken = self._stuck[half] = True
                self._on_error("checkpoint", exc)

    def _checkpoint(self, half: int) -> None:
        rewrite = self._suspect[half]
        try:
            _syncfs(self._sync_fd)
        except OSError as exc:
            # Some file's writeback failed since the last checkpoint; which one, syncfs does not say, and a retry
            # would succeed (the error is reported once). So every block of this half is written again the
            # file-by-file way, whose fsync reports an error on the block it hits, before its records may go; and
            # so are the other half's at its next checkpoint (the failed file may be one of them).
            self._on_error("syncfs", exc)
            rewrite = self._suspect[1 - half] = True
        if rewrite:
            for hash, data in scan_half(self.fd, half):
                self._rewrite(hash, data)
            self._suspect[half] = False
        generation = self._generation[half] + 1
        os.pwrite(self.fd, _half_header(generation), half * HALF_SIZE)
        os.fdatasync(self.fd)
        with self._cond:
            self._generation[half] = generation
            self._offset[half] = HEADER_SIZE
            self.checkpoints += 1

"""The Directory volume: blocks as files under a root directory, laid out exactly as Arvados does.

    <Root>/<hash[0:3]>/<hash>                   a block (raw bytes, no header)
    <Root>/<hash[0:3]>/tmp<hash><random>        a write in progress
    <Root>/<hash[0:3]>/<hash>.trash.<deadline>  a trashed block (deadline: Unix seconds)
    <Root>/full                                 symlink to a Unix time: "full since then" (trusted for an hour)
    <Root>/quarantine/<hash>.<unix ns>          keepstore-py only: a copy that failed verification
    <Root>/journal/<pid>-<random>.jnl           keepstore-py only: a worker's write-ahead journal (journal.py)

so a Go keepstore's volume directory is served by this driver and the reverse (Go ignores ``quarantine/`` and
``journal/``: their names are not hex).

Deliberate differences from the Go driver, all for durability or safety:

* writes fsync the file before the rename and the directory after it (Go does neither); blocks up to 64 KiB are
  committed in groups instead (``KeepstorePy.GroupCommit``): appended to a write-ahead journal with one fdatasync,
  then renamed into place and made durable in bulk by the journal's checkpoint (``KeepstorePy.Journal``, see
  journal.py), or without the journal with one syncfs(2) before the renames and one after;
  larger ones are written with O_DIRECT where the file system allows it (``KeepstorePy.DirectWrites``, see
  keepstore/_fileio.c write_data), still fsynced before the rename;
* the temp file is flock()ed while it is written, so the start-up sweep removes only temp files no live process
  owns;
* renames into place, trash, untrash, touch and quarantine take an flock on the block's 3-character directory, which
  serialises them (Go locks the block file for touch/trash only, leaving write-vs-trash to callers);
* ENOSPC while writing counts as "full" (507), not as a generic failure (503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..aio import BatchingThreadPool, ThreadPool
from ..config import ConfigError, VolumeSpec
from ..errors import BlockNotFound, KeepError, TooLarge, VolumeError, VolumeFull
from ..hashing import PARALLEL_MIN, Checkpoints, Md5State, ShortRead, digest_file, new_md5, segment_length
from ..hashing import submit as hash_submit
from ..locator import BLOCK_SIZE
from . import journal
from .base import BlockWriter, EmptyTrashStats, IndexEntry, LocalBlock, Volume, VolumeStats, VolumeUsage

T = TypeVar("T")
log = logging.getLogger("keepstore.volume")

_HEX_DIR_RE = re.compile(r"[0-9a-f]+")
_BLOCK_RE = re.compile(r"[0-9a-f]{32}")
_TRASH_RE = re.compile(r"([0-9a-f]{32})\.trash\.([0-9]+)")
_TEMP_RE = re.compile(r"tmp[0-9a-f]{32}.*")

FULL_MARKER_TTL = 3600.0  # seconds a "full" symlink is trusted before statfs is asked again
FULL_CHECK_INTERVAL = 1.0  # seconds a statfs that found room enough is trusted (see _is_full)
MIN_FREE_BYTES = BLOCK_SIZE  # less free space than one block means full
# A copy created less than this ago may not be durable yet when a PUT finds it (its writer's fsyncs still running,
# or a writer that never fsyncs: Go keepstore), so touching it fsyncs it (see _touch). The kernel writes dirty data
# back within 30 s (vm.dirty_expire_centisecs); twice that leaves a margin. Where the file system does not record
# creation times, the mtime stands in (a copy touched in the last minute counts as young).
YOUNG_COPY_NS = 60 * 10**9
_COPY_CHUNK = 1 << 20
INLINE_READ_MAX = 64 * 1024  # blocks up to this size are read on the event loop when cached (see block_read)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_STREAM_SEGMENT = 4 * 1024 * 1024
CHECKPOINT_XATTR = "user.keepstore.md5"  # a block's MD5 checkpoints (keepstore.hashing.Checkpoints.encode)


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: None
    write_flag = 2  # SYNC_FILE_RANGE_WRITE: start writeback of dirty pages in the range, do not wait

    def call(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, write_flag)  # advisory: a failure here is reported by the final fsync

    return call


_sync_file_range = _load_sync_file_range()


def _finish_block_py(fd: int, dir_path: str, tmp_path: str, final_path: str) -> None:
    """keepstore._fileio.finish_block in Python (where the extension is not built): the same steps, same contract."""
    try:
        now = time.time_ns()
        os.utime(fd, ns=(now, now))
        os.fsync(fd)
        # fd (and its flock: a live writer's mark for the start-up sweep) is held until the rename is done.
        dfd = os.open(dir_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    try:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            try:
                os.rename(tmp_path, final_path)
            finally:
                fcntl.flock(dfd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        os.fsync(dfd)
    finally:
        os.close(dfd)


_native_write_block: Callable[[str, str, str, memoryview, str, bytes | None, bool, bool], int] | None
_birth_ns: Callable[[int], int | None] | None
_native_append: Callable[[int, memoryview, bool], int] | None
_GroupItem = tuple[str, str, str, bytes | memoryview, str, bytes | None]  # write_group's (see keepstore/_fileio.c)
_GroupResult = list[int | OSError | None]
_native_write_group: Callable[[int, list[_GroupItem], bool], _GroupResult] | None
# write_group with a journal (fd, offset, record headers): (results, errno of a failed journal write, or 0)
_native_write_group_journal: (
    Callable[[int, list[_GroupItem], bool, tuple[int, int, list[bytes]]], tuple[_GroupResult, int]] | None
)
try:
    from .._fileio import append as _native_append
    from .._fileio import birth_ns as _birth_ns
    from .._fileio import finish_block as _finish_block
    from .._fileio import write_block as _native_write_block
    from .._fileio import write_group as _native_write_group
    from .._fileio import write_group as _native_write_group_journal
except ImportError:  # pragma: no cover - built by every supported install path
    _finish_block = _finish_block_py
    _birth_ns = None
    _native_append = None
    _native_write_block = None
    _native_write_group = None
    _native_write_group_journal = None
_native_read_cached: Callable[[str, memoryview, int], tuple[int, str] | None] | None
try:
    from .._md5mb import read_cached as _native_read_cached
except ImportError:  # pragma: no cover - built by every supported install path
    _native_read_cached = None

# Blocks up to this size are written by group commit (see DirectoryVolume.block_write). For small blocks the
# per-file flushes dominate and grouping halves the kernel's CPU per block; for 1 MiB blocks the data itself does,
# and eight fsyncs side by side beat one syncfs (bench/http_bench.py measures both ways).
GROUP_COMMIT_MAX = 64 * 1024
# One commit thread per volume. syncfs flushes the whole file system, so two groups committed side by side pay
# for two flushes where one would cover both. Each group is also half the size: at 8 connections the groups were
# 1.5 blocks on average. 4 KiB PUTs at c=8, four interleaved runs each way: 1.5-1.9k req/s with one thread against
# 1.3-1.6k with two, at 690-790 against 840-970 us of CPU per PUT.
# The journal relies on it too: groups write their records one after the other, each only once the previous
# group's call returned, so a recovery scan that stops at the first invalid record (a torn write) never stops
# short of an acknowledged one.
GROUP_COMMIT_THREADS = 1


def group_commit_supported() -> bool:
    """Whether this kernel reports writeback errors from syncfs(2) (Linux 5.8 and later; before, it always
    succeeded) and the native write is built: group commit relies on both."""
    if _native_write_group is None or not hasattr(os, "uname"):
        return False
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (5, 8)


@dataclass(frozen=True)
class DirectoryParameters:
    root: str
    serialize: bool = False
    group_commit: bool = False  # KeepstorePy.GroupCommit, and only where group_commit_supported()
    direct_writes: bool = False  # KeepstorePy.DirectWrites, and only with the native extension
    journal: bool = False  # KeepstorePy.Journal: group commits through a write-ahead journal (see journal.py)

    @classmethod
    def parse(cls, params: Mapping[str, Any], key_path: str) -> DirectoryParameters:
        path = f"{key_path}.DriverParameters"
        root = params.get("Root")
        if root is None or root == "":
            raise ConfigError(f"{path}.Root", "required")
        if not isinstance(root, str):
            raise ConfigError(f"{path}.Root", "must be a string")
        if not root.startswith("/"):
            raise ConfigError(f"{path}.Root", f"must be an absolute path, not {root!r}")
        serialize = params.get("Serialize", False)
        if not isinstance(serialize, bool):
            raise ConfigError(f"{path}.Serialize", "must be true or false")
        for key in params:
            if key not in ("Root", "Serialize") and key not in _OTHER_DRIVER_KEYS:
                raise ConfigError(f"{path}.{key}", "unknown parameter for the Directory driver")
        return cls(root=root.rstrip("/") or "/", serialize=serialize)


# Keys of other drivers that Arvados' sample config puts in every DriverParameters block.
_OTHER_DRIVER_KEYS = frozenset(
    "AccessKeyID SecretAccessKey Endpoint Region Bucket LocationConstraint V2Signature UsePathStyle IndexPageSize "
    "ConnectTimeout ReadTimeout RaceWindow PrefixLength UnsafeDelete StorageAccountName StorageAccountKey "
    "StorageBaseURL ContainerName RequestTimeout ListBlobsRetryDelay ListBlobsMaxAttempts MaxGetBytes "
    "WriteRaceInterval WriteRacePollTime".split()
)


class DirectoryVolume(Volume):
    """Blocks in files under ``root``; all file work runs in this volume's own thread pool."""

    def __init__(self, spec: VolumeSpec, params: DirectoryParameters, threads: int = 16) -> None:
        self.spec = spec
        self.root = params.root
        self.stats = VolumeStats()
        if not os.path.isdir(self.root):
            raise ConfigError(f"{spec.key_path}.DriverParameters.Root", f"{self.root} is not a directory")
        self._threads = ThreadPool(1 if params.serialize else threads, f"vol-{spec.uuid[-5:]}")
        self._device_id = _device_id(self.root)
        self._inline_reads = bool(_RWF_NOWAIT)  # see _read_cached
        self._xattrs = hasattr(os, "setxattr")  # see _set_checkpoints
        self._room_checked = -FULL_CHECK_INTERVAL  # see _is_full
        self._write_block = _native_write_block if _native_write_block is not None else self._write_py
        # Block data written with O_DIRECT where the file system takes it (see keepstore/_fileio.c write_data).
        self._direct = params.direct_writes and _native_write_block is not None and _native_append is not None
        self._learn = spec.allow_write  # record checkpoints of blocks that lack them when they are read
        self._started_ns = time.time_ns()
        self._group: BatchingThreadPool | None = None
        self._root_fd = -1
        if params.group_commit and not params.serialize and group_commit_supported():
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # what syncfs syncs
            self._group = BatchingThreadPool(self._write_group, GROUP_COMMIT_THREADS, f"commit-{spec.uuid[-5:]}")
        self._use_journal = params.journal and self._group is not None and spec.allow_write
        self._journal: journal.Journal | None = None
        # The <hash[0:3]> directories whose entries in the root this process knows to be durable: those there at
        # start (the root is fsynced then) and those it has written into since. A first write into any other
        # fsyncs the root first if the directory is young, even where another thread or process made it (see
        # sync_parent in keepstore/_fileio.c): its maker may not have synced its entry yet.
        self._durable_dirs: set[str] = set()

    @property
    def device_id(self) -> str:
        return self._device_id

    async def start(self) -> None:
        # Before any write: blocks a crashed process acknowledged through its journal are made durable (and
        # repaired where a power cut left their files incomplete) whatever this process's own settings are.
        self._journal = await self._run(self._start_journal)
        if self.spec.allow_write:
            try:
                self._durable_dirs = await self._run(self._known_durable_dirs)
            except OSError as exc:
                # Not fatal: with none known durable, each first write into a directory syncs the root itself,
                # and fails on its own if that fails.
                self.stats.error(type(exc).__name__)
                log.error(
                    "cannot sync the volume root at start",
                    extra={"fields": {"volume": self.spec.uuid, "error": str(exc)}},
                )

    def _known_durable_dirs(self) -> set[str]:
        """The block directories there now, made durable in the root by one fsync (see ``_durable_dirs``)."""
        names = {name for name in os.listdir(self.root) if len(name) == 3 and _HEX_DIR_RE.fullmatch(name)}
        fsync_dir(self.root)
        return names

    async def close(self) -> None:
        if self._group is not None:
            await self._group.shutdown()
        if self._journal is not None:
            await self._run(self._journal.close)  # checkpoints what is left: a syncfs
            self._journal = None
        await self._threads.shutdown()
        if self._group is not None:
            os.close(self._root_fd)
            self._group, self._root_fd = None, -1

    @property
    def group_commit(self) -> bool:
        return self._group is not None

    def _run(self, fn: Callable[..., T], *args: Any) -> Coroutine[Any, Any, T]:
        return self._threads.run(fn, *args)

    # --- paths -----------------------------------------------------------------------------------------------

    def _dir(self, hash: str) -> str:
        return f"{self.root}/{hash[:3]}"

    def _path(self, hash: str) -> str:
        return f"{self.root}/{hash[:3]}/{hash}"

    # --- operations ------------------------------------------------------------------------------------------

    async def block_read(self, hash: str, into: memoryview) -> int:
        # Opening (a metadata lookup, served by the dentry/inode caches in steady state) happens on the event loop,
        # and so does the read when the data is already in the page cache: RWF_NOWAIT makes preadv fail rather than
        # wait for the disk. Anything that would wait goes to this volume's threads. For small blocks this saves a
        # thread round trip that costs far more than the read itself.
        fd, size = self._open(hash, len(into))
        try:
            got = self._read_cached(fd, into[:size]) if size <= INLINE_READ_MAX else 0
            if got < size:
                got = await self._run(self._read_rest, hash, fd, size, into, got)
            self.stats.io(read=got)
            return got
        finally:
            os.close(fd)

    def read_cached(self, hash: str, into: memoryview, max_size: int) -> tuple[int, str] | None:
        # One native call (open, fstat, a preadv2 that refuses to wait, MD5, close; keepstore/_md5mb.c): for a
        # small cached GET the Python of the general path (open, stat, LocalBlock, digest, close) cost more than
        # these system calls and the hash together. None leaves everything else, errors included, to that path.
        if not self._inline_reads or _native_read_cached is None:
            return None
        try:
            hit = _native_read_cached(self._path(hash), into, min(max_size, INLINE_READ_MAX))
        except (FileNotFoundError, NotADirectoryError):
            self.stats.op("open")
            raise BlockNotFound() from None
        if hit is not None:
            self.stats.read_done(("open", "stat"), hit[0])
        return hit

    def _read_cached(self, fd: int, into: memoryview) -> int:
        """Read what the page cache holds of ``into``'s range without waiting for the disk: 0 if that is nothing.

        Errors are left for the thread path to report; a file system without RWF_NOWAIT support (tmpfs, some network
        file systems) turns this fast path off for the volume.
        """
        if not self._inline_reads:
            return 0
        try:
            return os.preadv(fd, [into], 0, _RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._inline_reads = False
            return 0

    async def block_open(self, hash: str) -> LocalBlock:
        fd, size = self._open(hash, BLOCK_SIZE)
        return _LocalFile(self, hash, fd, size)

    async def block_write(self, hash: str, data: memoryview, checkpoints: Checkpoints | None = None) -> None:
        if self._group is not None and len(data) <= GROUP_COMMIT_MAX:
            # Group commit: the writes that queue up meanwhile share two syncfs calls instead of an fsync of every
            # file and directory (see keepstore/_fileio.c write_group). Same guarantees: visible only once durable,
            # and durable (rename included) when this returns.
            await self._group.submit(hash, data, checkpoints, False)
            return
        await self._run(self._write, hash, data, checkpoints)

    async def block_create(self, hash: str, data: memoryview, checkpoints: Checkpoints | None = None) -> bool:
        # The existence check happens where the write happens, in a thread: for a new block it searches the
        # directory, from disk if its blocks are not cached, which must not stall the event loop. With group commit
        # the rename itself is the check (keepstore/_fileio.c write_group, if_absent).
        if self._group is not None and len(data) <= GROUP_COMMIT_MAX:
            created: bool = await self._group.submit(hash, data, checkpoints, True)
            return created
        return await self._run(self._create, hash, data, checkpoints)

    async def block_writer(self, hash: str) -> BlockWriter:
        tmp, fd = await self._run(self._create_temp, hash)
        return _StreamingWrite(self, hash, tmp, fd)

    async def block_compare(self, hash: str, data: memoryview) -> bool:
        # Even "absent" is found in a thread: for a new block (most PUTs) the lookup searches the directory, from
        # disk if its blocks are not cached, which must not stall the event loop. (A PUT to one writable volume
        # does not come here at all: block_create looks where it writes.)
        return await self._run(self._compare, hash, data)

    async def block_touch(self, hash: str) -> None:
        await self._run(self._touch, hash)

    async def mtime(self, hash: str) -> int:
        return await self._run(self._mtime, hash)

    async def block_trash(self, hash: str, ttl: float, lifetime: float) -> None:
        await self._run(self._trash, hash, ttl, lifetime)

    async def block_untrash(self, hash: str) -> None:
        await self._run(self._untrash, hash)

    async def block_quarantine(self, hash: str) -> bool:
        return await self._run(self._quarantine, hash)

    async def empty_trash(self, delete_concurrency: int) -> EmptyTrashStats:
        now = time.time()
        subdirs = await self._run(self._hex_subdirs)
        limit = asyncio.Semaphore(max(1, delete_concurrency))
        errors = 0

        async def one(sub: str) -> EmptyTrashStats:
            nonlocal errors
            async with limit:
                try:
                    return await self._run(self._empty_trash_dir, sub, now)
                except VolumeError:
                    errors += 1  # counted in the volume's error stats; the other directories still get swept
                    return EmptyTrashStats()

        parts = await asyncio.gather(*(one(sub) for sub in subdirs))
        return EmptyTrashStats(
            deleted_blocks=sum(p.deleted_blocks for p in parts),
            deleted_bytes=sum(p.deleted_bytes for p in parts),
            remaining_blocks=sum(p.remaining_blocks for p in parts),
            remaining_bytes=sum(p.remaining_bytes for p in parts),
            errors=errors,
        )

    async def usage(self) -> VolumeUsage:
        return await self._run(self._usage)

    async def sweep_temporary(self) -> int:
        return await self._run(self._sweep_temporary)

    async def index(self, prefix: str) -> AsyncIterator[IndexEntry]:
        subdirs = await self._run(self._index_dirs, prefix)
        for sub in subdirs:
            entries = await self._run(self._index_dir, sub, prefix)
            for entry in entries:
                yield entry

    # --- thread side -----------------------------------------------------------------------------------------

    def _fail(self, op: str, path: str, exc: OSError) -> VolumeError:
        self.stats.error(type(exc).__name__)
        return VolumeError(f"{op} {path}: {exc.strerror or exc}")

    def _open(self, hash: str, capacity: int) -> tuple[int, int]:
        """Open a block for reading: (fd, size). The caller closes fd."""
        path = self._path(hash)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            self.stats.op("open")
            raise BlockNotFound() from None
        except OSError as exc:
            self.stats.op("open")
            raise self._fail("open", path, exc) from exc
        self.stats.read_done(("open", "stat"), 0)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise self._fail("stat", path, exc) from exc
        if not stat.S_ISREG(st.st_mode):
            # (A directory's read would also fail with EOPNOTSUPP, which would turn inline reads off for the volume.)
            os.close(fd)
            self.stats.error("NotARegularFile")
            raise VolumeError(f"open {path}: not a regular file")
        size = st.st_size
        if size > capacity or size > BLOCK_SIZE:
            os.close(fd)
            raise TooLarge()
        return fd, size

    def _read_rest(self, hash: str, fd: int, size: int, into: memoryview, got: int) -> int:
        """Read bytes ``got``..``size`` of an open block into ``into``; return the total."""
        try:
            while got < size:
                n = os.preadv(fd, [into[got : min(size, got + 8 * _COPY_CHUNK)]], got)
                if n == 0:
                    break
                got += n
        except OSError as exc:
            raise self._fail("read", self._path(hash), exc) from exc
        if got != size:
            raise VolumeError(f"read {self._path(hash)}: unexpected EOF after {got} of {size} bytes")
        return got

    def _compare(self, hash: str, data: memoryview) -> bool:
        path = self._path(hash)
        self.stats.op("open")
        try:
            f = open(path, "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError):
            raise BlockNotFound() from None
        except OSError as exc:
            raise self._fail("open", path, exc) from exc
        with f:
            try:
                if os.fstat(f.fileno()).st_size != len(data):
                    return False
                chunk = bytearray(min(_COPY_CHUNK, max(1, len(data))))
                pos = 0
                while pos < len(data):
                    n = f.readinto(chunk)
                    if not n:
                        return False
                    if chunk[:n] != data[pos : pos + n]:
                        return False
                    pos += n
                self.stats.io(read=pos)
                return f.read(1) == b""
            except OSError as exc:
                raise self._fail("read", path, exc) from exc

    def _write(self, hash: str, data: memoryview, checkpoints: Checkpoints | None) -> None:
        """The whole write of a block in memory, in one native call (see keepstore/_fileio.c): the thread takes the
        GIL once, not once per system call."""
        if self._is_full():
            raise VolumeFull()
        directory = self._dir(hash)
        tmp = f"{directory}/tmp{hash}{os.urandom(6).hex()}"
        xattr = checkpoints.encode() if checkpoints is not None and self._xattrs else None
        try:
            final = self._path(hash)
            prefix = hash[:3]
            unsynced = prefix not in self._durable_dirs
            xattr_error = self._write_block(
                directory, tmp, final, data, CHECKPOINT_XATTR, xattr, self._direct, unsynced
            )
            if unsynced:
                self._durable_dirs.add(prefix)
        except OSError as exc:
            self.stats.op("create")
            raise self._write_error(exc, tmp) from exc
        if xattr_error in (errno.ENOTSUP, errno.EOPNOTSUPP):
            self._xattrs = False  # this file system has no user xattrs (see _set_checkpoints)
        self.stats.write_done(("create", "utimes", "rename"), len(data))

    def _create(self, hash: str, data: memoryview, checkpoints: Checkpoints | None) -> bool:
        """block_create without group commit: write the block unless a copy is there; whether it wrote it."""
        try:
            self.stats.op("stat")
            os.stat(self._path(hash))
            return False
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            raise self._fail("stat", self._path(hash), exc) from exc
        self._write(hash, data, checkpoints)
        return True

    def _start_journal(self) -> journal.Journal | None:
        if not os.path.isdir(f"{self.root}/{journal.DIRNAME}") and not self._use_journal:
            return None
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the checkpoints' syncfs (see Journal)
        try:
            stats, own = journal.recover(self.root, fd, self._repair, create=self._use_journal)
        except (OSError, KeepError) as exc:
            os.close(fd)
            # The orphans stay for the next start; meanwhile every read is verified, and new writes do without.
            log.error(
                "journal recovery failed: blocks acknowledged before a crash may not be durable yet",
                extra={"fields": {"volume": self.spec.uuid, "error": str(exc)}},
            )
            self.stats.error(type(exc).__name__)
            return None
        if stats.journals:
            log.warning(
                "recovered journals of processes that did not stop cleanly",
                extra={
                    "fields": {
                        "volume": self.spec.uuid,
                        "journals": stats.journals,
                        "records": stats.records,
                        "repaired": stats.repaired,
                    }
                },
            )
        if own is None:
            os.close(fd)
            return None
        try:
            return journal.Journal(own, fd, self._rewrite_record, self._journal_error)  # (it closes both at close)
        except BaseException:
            os.close(own)  # (its unlocked file is an orphan: the next start recovers it)
            os.close(fd)
            raise

    def _repair(self, hash: str, data: bytes) -> bool:
        """Recovery (see journal.recover): make a record's block durable, rewriting it unless its file holds the
        record's data (or it was trashed since); whether it was rewritten."""
        path = self._path(hash)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if self._trashed(hash):
                return False
        else:
            try:
                if os.fstat(fd).st_size == len(data) and os.pread(fd, len(data) + 1, 0) == data:
                    try:
                        os.fsync(fd)
                        fsync_dir(self._dir(hash))
                        return False
                    except OSError:
                        pass  # its writeback failed: written again below
            finally:
                os.close(fd)
        self._rewrite(hash, data)
        return True

    def _rewrite(self, hash: str, data: bytes) -> None:
        self._write(hash, memoryview(data), None)  # temp, fsync, rename, fsync the directory

    def _rewrite_record(self, hash: str, data: bytes) -> None:
        """The journal's checkpoint after a syncfs error: a record's block written again, unless it was trashed
        since (its record outlives the trash, which must not be undone)."""
        if os.path.exists(self._path(hash)) or not self._trashed(hash):
            self._rewrite(hash, data)

    def _trashed(self, hash: str) -> bool:
        """Whether a trashed copy of the block is there."""
        try:
            names = os.listdir(self._dir(hash))
        except FileNotFoundError:
            return False
        return any(name.startswith(f"{hash}.trash.") for name in names)

    def _journal_error(self, what: str, exc: BaseException) -> None:
        self.stats.error(f"journal_{what}")
        log.error(
            f"journal {what} failed: {journal.CONSEQUENCES[what]}",
            extra={"fields": {"volume": self.spec.uuid, "error": str(exc)}},
        )

    def _write_group(self, jobs: list[tuple[Any, ...]]) -> list[KeepError | bool | None]:
        """Write the blocks of ``jobs`` in one group commit; per job an error, or its result.

        A job is (hash, data, checkpoints, if_absent). Its result is None for a block_write (which replaces a copy
        that is there), and for a block_create whether it wrote the block (False: a copy was there, nothing
        written). Errors are returned, not raised: the pool raises each in the request it belongs to.
        """
        if self._is_full():
            # A full volume still takes PUTs of blocks it holds (the caller touches them): creates find them here.
            return [False if job[3] and os.path.isfile(self._path(job[0])) else VolumeFull() for job in jobs]
        assert _native_write_group is not None and _native_write_group_journal is not None  # (only with the extension)
        items = []
        for hash, data, checkpoints, _ in jobs:
            directory = self._dir(hash)
            tmp = f"{directory}/tmp{hash}{os.urandom(6).hex()}"
            xattr = checkpoints.encode() if checkpoints is not None and self._xattrs else None
            items.append((directory, tmp, self._path(hash), data, CHECKPOINT_XATTR, xattr))
        # Every rename refuses to replace a block: block_create jobs need that, and for block_write ones (rare at
        # these sizes: a copy that failed to touch, a pull) the few that find a copy are rewritten one by one below.
        jnl, err = self._journal, 0
        reservation = jnl.reserve(sum(journal.record_size(len(job[1])) for job in jobs)) if jnl else None
        if jnl is not None and reservation is not None:
            try:
                headers = [journal.record_header(reservation.generation, job[0], len(job[1])) for job in jobs]
                results, err = _native_write_group_journal(
                    self._root_fd, items, True, (jnl.fd, reservation.offset, headers)
                )
            except BaseException:
                jnl.failed(errno.EIO)  # nothing written where it had reserved: records after it would be lost
                raise
            finally:
                jnl.release(reservation)
            if err:
                jnl.failed(err)  # this group was committed the two-syncfs way; the journal takes no more
            elif any(isinstance(r, int) for r in results):
                self.stats.op("journal_fdatasync")
        else:
            results = _native_write_group(self._root_fd, items, True)
        if any(isinstance(r, int) for r in results) and (reservation is None or err):
            self.stats.op("syncfs", 2)  # (a group whose blocks were all there syncs nothing)
        out: list[KeepError | bool | None] = []
        for job, item, result in zip(jobs, items, results, strict=True):
            if_absent = job[3]
            if result is None:
                if if_absent:
                    out.append(False)
                    continue
                try:
                    self._write(job[0], job[1], job[2])
                    out.append(None)
                except KeepError as exc:
                    out.append(exc)
                continue
            if isinstance(result, OSError):
                self.stats.op("create")
                error = self._write_error(result, item[1])
                error.__cause__ = result
                out.append(error)
                continue
            if result in (errno.ENOTSUP, errno.EOPNOTSUPP):
                self._xattrs = False  # this file system has no user xattrs (see _set_checkpoints)
            self.stats.write_done(("create", "utimes", "rename"), len(item[3]))
            out.append(True if if_absent else None)
        return out

    def _write_py(
        self,
        directory: str,
        tmp: str,
        final: str,
        data: memoryview,
        name: str,
        value: bytes | None,
        direct: bool,
        sync_parent: bool = False,
    ) -> int:
        """keepstore._fileio.write_block in Python (where the extension is not built): same steps, same contract,
        always buffered (``self._direct`` is false without the extension)."""
        hash = final.rpartition("/")[2]
        tmp, fd = self._create_temp(hash, tmp)  # (syncs the root where sync_parent would: same set)
        try:
            self._append(hash, tmp, fd, data, 0)
        except BaseException:
            self._discard(tmp, fd)
            raise
        failed = 0
        if value is not None:
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                failed = exc.errno or 0
        try:
            _finish_block(fd, directory, tmp, final)
        except OSError:
            _unlink_quietly(tmp)
            raise
        return failed

    # The steps of a write, shared by _write (whole block at once) and _StreamingWrite (block arriving in pieces).

    def _create_temp(self, hash: str, tmp: str = "") -> tuple[str, int]:
        if self._is_full():
            raise VolumeFull()
        directory = self._dir(hash)
        tmp = tmp or f"{directory}/tmp{hash}{os.urandom(6).hex()}"
        made = False
        try:
            self.stats.op("create")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                self.stats.op("mkdir")
                os.makedirs(directory, mode=0o755, exist_ok=True)
                self._durable_dirs.discard(hash[:3])
                made = True
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._write_error(exc, directory) from exc
        try:
            # The flock marks this temp file as owned by a live writer (see _sweep_temporary).
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            self._discard(tmp, fd)
            raise self._write_error(exc, tmp) from exc
        if hash[:3] not in self._durable_dirs:
            # The directory's own entry, which no fsync of the block or of its directory covers (see sync_parent
            # in keepstore/_fileio.c: the same step, for the same reasons).
            try:
                if made or _dir_is_young(directory):
                    fsync_dir(self.root)
            except OSError as exc:
                self._discard(tmp, fd)
                raise self._write_error(exc, directory) from exc
            self._durable_dirs.add(hash[:3])
        return tmp, fd

    def _append(self, hash: str, tmp: str, fd: int, data: memoryview, offset: int) -> None:
        try:
            end = offset + len(data)
            if self._direct:
                assert _native_append is not None
                # The aligned part goes straight to the device; what went through the page cache instead (the
                # unaligned tail, or everything where the file system refuses O_DIRECT) gets the hint below.
                buffered = _native_append(fd, data, True)
            else:
                pos = 0
                while pos < len(data):
                    pos += os.write(fd, data[pos : pos + 8 * _COPY_CHUNK])
                buffered = pos
            self.stats.io(written=len(data))
            if buffered and (offset or len(data) >= _STREAM_SEGMENT):
                # Start writing this range to disk now, without waiting: the final fsync then has little left.
                _sync_file_range(fd, end - buffered, buffered)
        except OSError as exc:
            raise self._write_error(exc, tmp) from exc

    def _finish(self, hash: str, tmp: str, fd: int, checkpoints: Checkpoints | None) -> None:
        """Make the temp file the block: mtime now, fsync, rename under the directory's flock, fsync the directory.

        Always closes ``fd``; on failure removes the temp file too.
        """
        if checkpoints is not None:
            self._set_checkpoints(fd, checkpoints)  # before the fsync: durable with the data, visible with it
        self.stats.op("utimes")
        try:
            _finish_block(fd, self._dir(hash), tmp, self._path(hash))
        except OSError as exc:
            _unlink_quietly(tmp)
            raise self._write_error(exc, tmp) from exc
        self.stats.op("rename")

    def _set_checkpoints(self, fd: int, checkpoints: Checkpoints) -> None:
        """Keep a block's MD5 checkpoints in an extended attribute (a hint: a file system without them does not)."""
        if not self._xattrs:
            return
        try:
            os.setxattr(fd, CHECKPOINT_XATTR, checkpoints.encode())
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                self._xattrs = False  # this file system has no user xattrs: stop trying (reads too)
            # EPERM/EACCES (a file someone else owns), ENOSPC, ...: this block goes without; the write itself, if
            # this is one, decides its own fate

    def _get_checkpoints(self, fd: int, size: int) -> Checkpoints | None:
        if not self._xattrs or size < PARALLEL_MIN:
            return None
        try:
            return Checkpoints.decode(os.getxattr(fd, CHECKPOINT_XATTR), size)
        except OSError:
            return None  # ENODATA: written by Go keepstore or an older keepstore-py (or copied without xattrs)

    def _discard(self, tmp: str, fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass
        _unlink_quietly(tmp)

    def _write_error(self, exc: OSError, path: str) -> KeepError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self._mark_full()
            return VolumeFull()
        return self._fail("write", path, exc)

    def _locked_in_dir(self, directory: str, fn: Callable[[], T], fsync: bool | Callable[[T], bool] = False) -> T:
        """Run ``fn`` holding the flock of ``directory``; then fsync the directory if asked (``fsync`` may also be
        a test of ``fn``'s result)."""
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.stats.op("flock")
            fcntl.flock(dfd, fcntl.LOCK_EX)
            try:
                result = fn()
            finally:
                fcntl.flock(dfd, fcntl.LOCK_UN)
            if fsync(result) if callable(fsync) else fsync:
                self.stats.op("fsync")
                os.fsync(dfd)
            return result
        finally:
            os.close(dfd)

    def _touch(self, hash: str) -> None:
        path = self._path(hash)

        def touch() -> bool:
            # A PUT that finds a copy is answered on the strength of this touch, so the copy must be durable when
            # it returns: another process (a second worker, a Go keepstore on the same directory) may have renamed
            # it into place a moment ago, before its own fsyncs. For a young copy, the file's fsync makes its data
            # and new mtime durable, the directory's (after the unlock) its name. An older one was synced by its
            # writer or written back by the kernel since, and re-PUTs of stored data stay as cheap as they were
            # (two fsyncs per PUT halved the rate of 4 KiB re-PUTs at c=8). Young by birth (statx), not by mtime:
            # a touch makes the mtime new, and each re-PUT of a popular block would pay for the one before.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                now = time.time_ns()
                born = _birth_ns(fd) if _birth_ns is not None else None
                young = now - (born if born is not None else os.fstat(fd).st_mtime_ns) < YOUNG_COPY_NS
                self.stats.op("utimes")
                os.utime(fd, ns=(now, now))
                if young:
                    self.stats.op("fsync")
                    os.fsync(fd)
                return young
            finally:
                os.close(fd)

        try:
            self._locked_in_dir(self._dir(hash), touch, fsync=lambda young: young)
        except (FileNotFoundError, NotADirectoryError):
            raise BlockNotFound() from None
        except OSError as exc:
            raise self._fail("touch", path, exc) from exc

    def _mtime(self, hash: str) -> int:
        path = self._path(hash)
        self.stats.op("stat")
        try:
            return os.stat(path).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            raise BlockNotFound() from None
        except OSError as exc:
            raise self._fail("stat", path, exc) from exc

    def _trash(self, hash: str, ttl: float, lifetime: float) -> None:
        path = self._path(hash)

        def trash() -> None:
            self.stats.op("stat")
            st = os.stat(path)
            if time.time_ns() - st.st_mtime_ns < ttl * 1e9:
                return  # written or touched within the signing TTL: a client may still hold a signed locator
            if lifetime <= 0:
                self.stats.op("unlink")
                os.unlink(path)
            else:
                deadline = int(time.time() + lifetime)
                self.stats.op("rename")
                os.rename(path, f"{path}.trash.{deadline}")

        try:
            self._locked_in_dir(self._dir(hash), trash, fsync=True)
        except (FileNotFoundError, NotADirectoryError):
            raise BlockNotFound() from None
        except OSError as exc:
            raise self._fail("trash", path, exc) from exc

    def _untrash(self, hash: str) -> None:
        directory = self._dir(hash)

        def untrash() -> None:
            self.stats.op("readdir")
            names = sorted(n for n in os.listdir(directory) if n.startswith(f"{hash}.trash."))
            for name in names:
                try:
                    self.stats.op("rename")
                    os.rename(f"{directory}/{name}", self._path(hash))
                    return
                except FileNotFoundError:
                    continue
            raise FileNotFoundError(errno.ENOENT, "no trashed copy", directory)

        try:
            self._locked_in_dir(directory, untrash, fsync=True)
        except (FileNotFoundError, NotADirectoryError):
            raise BlockNotFound() from None
        except OSError as exc:
            raise self._fail("untrash", directory, exc) from exc

    def _quarantine(self, hash: str) -> bool:
        path = self._path(hash)
        qdir = f"{self.root}/quarantine"

        def quarantine() -> bool:
            md5 = hashlib.md5()
            try:
                with open(path, "rb", buffering=0) as f:
                    chunk = bytearray(_COPY_CHUNK)
                    while n := f.readinto(chunk):
                        md5.update(memoryview(chunk)[:n])
            except FileNotFoundError:
                return False
            if md5.hexdigest() == hash:
                return False  # replaced by a good copy since the caller read it
            try:
                os.mkdir(qdir, mode=0o755)
            except FileExistsError:
                pass
            fsync_dir(self.root)  # the directory's own entry (EEXIST too: its maker may not have synced it yet)
            # Opened before the rename and fsynced after it: a writeback error on the directory in between is
            # reported to a descriptor only if that descriptor was open when it happened.
            try:
                qfd = os.open(qdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:  # not "the block vanished" (the caller's reading of ENOENT and ENOTDIR)
                raise self._fail("quarantine", qdir, exc) from exc
            try:
                self.stats.op("rename")
                os.rename(path, f"{qdir}/{hash}.{time.time_ns()}")
                os.fsync(qfd)
            finally:
                os.close(qfd)
            return True

        try:
            return self._locked_in_dir(self._dir(hash), quarantine, fsync=True)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise self._fail("quarantine", path, exc) from exc

    def _is_full(self) -> bool:
        """Whether writes are refused: a recent ``full`` marker (any process may set or clear it), or too little
        free space. The marker is read every time; a statfs that found room enough is trusted for a second (a write
        that runs out of space meanwhile gets ENOSPC, which marks the volume full at once)."""
        marker = f"{self.root}/full"
        try:
            since = int(os.readlink(marker))
            if time.time() - since < FULL_MARKER_TTL:
                return True
        except (OSError, ValueError):
            pass
        now = time.monotonic()
        if now < self._room_checked + FULL_CHECK_INTERVAL:
            return False
        try:
            st = os.statvfs(self.root)
        except OSError:
            return False
        if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
            self._mark_full()
            return True
        self._room_checked = now
        return False

    def _mark_full(self) -> None:
        self._room_checked = -FULL_CHECK_INTERVAL
        marker = f"{self.root}/full"
        tmp = f"{marker}.{os.getpid()}.tmp"
        try:
            os.symlink(str(int(time.time())), tmp)
            os.replace(tmp, marker)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _usage(self) -> VolumeUsage:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return VolumeUsage(bytes_free=None, bytes_used=None)
        return VolumeUsage(bytes_free=st.f_bavail * st.f_frsize, bytes_used=(st.f_blocks - st.f_bfree) * st.f_frsize)

    def _hex_subdirs(self, prefix: str = "") -> list[str]:
        self.stats.op("readdir")
        try:
            names = os.listdir(self.root)
        except OSError as exc:
            raise self._fail("readdir", self.root, exc) from exc
        return [
            n
            for n in names
            if _HEX_DIR_RE.fullmatch(n)
            and (n.startswith(prefix) or prefix.startswith(n))
            and os.path.isdir(f"{self.root}/{n}")
        ]

    def _index_dirs(self, prefix: str) -> list[str]:
        return self._hex_subdirs(prefix)

    def _index_dir(self, sub: str, prefix: str) -> list[IndexEntry]:
        path = f"{self.root}/{sub}"
        out: list[IndexEntry] = []
        self.stats.op("readdir")
        try:
            with os.scandir(path) as it:
                for entry in it:
                    name = entry.name
                    if len(name) != 32 or not name.startswith(prefix) or not _BLOCK_RE.fullmatch(name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # trashed or quarantined while we listed
                    if stat.S_ISREG(st.st_mode):
                        out.append(IndexEntry(name, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            return out
        except OSError as exc:
            raise self._fail("readdir", path, exc) from exc
        return out

    def _empty_trash_dir(self, sub: str, now: float) -> EmptyTrashStats:
        """Delete the expired trash of one 3-character directory (one thread job: the sweep stays cancellable)."""
        deleted_blocks = deleted_bytes = remaining_blocks = remaining_bytes = 0
        try:
            with os.scandir(f"{self.root}/{sub}") as it:
                entries = [(e.path, e.name) for e in it if _TRASH_RE.fullmatch(e.name)]
        except FileNotFoundError:
            return EmptyTrashStats()
        except OSError as exc:
            raise self._fail("readdir", f"{self.root}/{sub}", exc) from exc
        for path, name in entries:
            m = _TRASH_RE.fullmatch(name)
            assert m is not None
            try:
                size = os.stat(path, follow_symlinks=False).st_size
                if int(m.group(2)) <= now:
                    self.stats.op("unlink")
                    os.unlink(path)
                    deleted_blocks += 1
                    deleted_bytes += size
                else:
                    remaining_blocks += 1
                    remaining_bytes += size
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._fail("unlink", path, exc) from exc
        return EmptyTrashStats(deleted_blocks, deleted_bytes, remaining_blocks, remaining_bytes)

    def _sweep_temporary(self) -> int:
        """Delete temp files left by writers that died: older than this process and not flock()ed by anyone."""
        removed = 0
        for sub in self._hex_subdirs():
            try:
                names = os.listdir(f"{self.root}/{sub}")
            except OSError:
                continue
            for name in names:
                if not _TEMP_RE.fullmatch(name):
                    continue
                path = f"{self.root}/{sub}/{name}"
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    if os.fstat(fd).st_mtime_ns >= self._started_ns:
                        continue
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live writer holds it
                    os.unlink(path)
                    removed += 1
                except OSError:
                    continue
                finally:
                    os.close(fd)
        return removed


class _StreamingWrite(BlockWriter):
    def __init__(self, volume: DirectoryVolume, hash: str, tmp: str, fd: int) -> None:
        self.volume = volume
        self.hash = hash
        self.tmp = tmp
        self.fd = fd
        self.offset = 0
        self.closed = False

    async def write(self, data: memoryview) -> None:
        await self.volume._run(self.volume._append, self.hash, self.tmp, self.fd, data, self.offset)
        self.offset += len(data)

    async def commit(self, checkpoints: Checkpoints | None = None) -> None:
        self.closed = True  # _finish closes the file whatever happens after its fsync
        await self.volume._run(self.volume._finish, self.hash, self.tmp, self.fd, checkpoints)

    async def abort(self) -> None:
        if not self.closed:
            self.closed = True
            await self.volume._run(self.volume._discard, self.tmp, self.fd)
        else:
            await self.volume._run(_unlink_quietly, self.tmp)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _LocalFile(LocalBlock):
    def __init__(self, volume: DirectoryVolume, hash: str, fd: int, size: int) -> None:
        self.volume = volume
        self.hash = hash
        self.fd = fd
        self.size = size

    def fileno(self) -> int:
        return self.fd

    async def digest(self, scratch: memoryview, keep: bool) -> str:
        size = self.size
        if keep and size <= INLINE_READ_MAX and self.volume._read_cached(self.fd, scratch[:size]) == size:
            # Small and cached (the common case): read and hash right here, as block_read does.
            self.volume.stats.io(read=size)
            return hashlib.md5(scratch[:size]).hexdigest()
        return await self.volume._run(self._digest, scratch, keep and size <= len(scratch))

    def _digest(self, scratch: memoryview, keep: bool) -> str:
        """Thread side: the file's MD5, from all its segments at once if it has checkpoints, else from the start;
        with ``keep``, ``scratch`` holds the block afterwards."""
        volume = self.volume
        # With checkpoints, all segments at once (with ``keep`` each read to its own place in scratch).
        checkpoints = volume._get_checkpoints(self.fd, self.size)
        if checkpoints is not None:
            try:
                digest = digest_file(self.fd, self.size, checkpoints, scratch, keep)
            except OSError as exc:
                raise volume._fail("read", volume._path(self.hash), exc) from exc
            except ShortRead as exc:
                raise VolumeError(f"read {volume._path(self.hash)}: {exc}") from None
            if digest is not None:
                volume.stats.io(read=self.size)
                return digest
            volume.stats.op("checkpoint_mismatch")  # corrupt data, or a stale hint: hash from the start
            checkpoints = None
        learn = volume._learn and volume._xattrs and self.size >= PARALLEL_MIN
        interval = segment_length(self.size) if learn else 0
        md5 = new_md5(interval)
        digest = self._digest_sequential(md5, scratch, keep)
        if learn and digest == self.hash:
            # A block without checkpoints (written by Go keepstore, or before keepstore-py kept them): record what
            # this read computed anyway, so the next read is parallel. Not fsynced: a hint lost in a crash is
            # harmless. Only for data that just verified, and only on writable mounts.
            found = Checkpoints.of(md5, interval, self.size)
            if found is not None:
                volume._set_checkpoints(self.fd, found)
        return digest

    def _digest_sequential(self, md5: Md5State, scratch: memoryview, keep: bool) -> str:
        """Read chunk by chunk, hashing each chunk (in the hash engine) while the next one is read."""
        pos = 0
        alternate = not keep and len(scratch) >= 2 * _COPY_CHUNK
        pending: concurrent.futures.Future[None] | None = None
        try:
            while pos < self.size:
                n = min(_COPY_CHUNK, self.size - pos)
                if keep:
                    window = scratch[pos : pos + n]
                else:
                    # Two windows in turn: one is read into while the engine hashes the other.
                    start = _COPY_CHUNK if alternate and (pos // _COPY_CHUNK) % 2 else 0
                    window = scratch[start : start + n]
                got = os.preadv(self.fd, [window], pos)
                if pending is not None:
                    pending.result()
                    pending = None
                if got == 0:
                    break
                pending = hash_submit(md5, window[:got])
                if not alternate and not keep:
                    pending.result()  # one window only: it must be hashed before the next read
                    pending = None
                pos += got
        except OSError as exc:
            raise self.volume._fail("read", self.volume._path(self.hash), exc) from exc
        finally:
            if pending is not None:
                concurrent.futures.wait([pending])  # the engine reads scratch until then
        self.volume.stats.io(read=pos)
        if pos != self.size:
            raise VolumeError(f"read {self.volume._path(self.hash)}: unexpected EOF after {pos} of {self.size} bytes")
        return md5.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


YOUNG_DIR_NS = 60 * 10**9  # as in keepstore/_fileio.c (dir_is_young)


def _dir_is_young(path: str) -> bool:
    """Whether a directory was made less than YOUNG_DIR_NS ago, or its age is unknown (see dir_is_young in
    keepstore/_fileio.c)."""
    if _birth_ns is None:
        return True
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        born = _birth_ns(fd)
    finally:
        os.close(fd)
    return born is None or time.time_ns() - born < YOUNG_DIR_NS


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` durable (what was created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _device_id(root: str) -> str:
    """``<filesystem UUID><path inside that filesystem>`` as Arvados computes it, else ``<hostname>:<root>``."""
    try:
        real = os.path.realpath(root)
        dev = os.stat(real).st_dev
        best: tuple[str, str] | None = None  # (mount point, root of the mount inside its filesystem)
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                major, minor = (int(x) for x in fields[2].split(":"))
                if os.makedev(major, minor) != dev:
                    continue
                mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
                if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) and (
                    best is None or len(mount_point) > len(best[0])
                ):
                    best = (mount_point, mount_root)
        by_uuid = "/dev/disk/by-uuid"
        if best is not None and os.path.isdir(by_uuid):
            for uuid in os.listdir(by_uuid):
                try:
                    if os.stat(f"{by_uuid}/{uuid}").st_rdev == dev:
                        inside = os.path.join(best[1], os.path.relpath(real, best[0]))
                        return uuid + os.path.normpath(inside).rstrip(".")
                except OSError:
                    continue
    except (OSError, ValueError, IndexError):
        pass
    return f"{socket.gethostname()}:{root}"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

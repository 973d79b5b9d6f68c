"""keepstore._fileio's direct writes where the file system will not have them (write_data's fallbacks), and the
descriptor group commit syncs through.

O_DIRECT is refused in two ways: by fcntl(F_SETFL) (file systems without direct I/O) or by the write itself with
EINVAL (an alignment the device does not accept). Either way the block must still be written whole, buffered. Any
other error of a direct write is a real one and must reach the caller. An LD_PRELOAD shim makes each happen, in a
child process that writes through the extension and reports what the file holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from keeptest import build_shim

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* FILEIO_SHIM: "setfl" refuses O_DIRECT in F_SETFL; "write-einval" / "write-eio" fail writes on O_DIRECT files. */
static int (*real_fcntl)(int, int, ...);
static ssize_t (*real_write)(int, const void *, size_t);

static int mode_is(const char *m) {
    const char *v = getenv("FILEIO_SHIM");
    return v && strcmp(v, m) == 0;
}

static int shim_fcntl(int fd, int cmd, va_list ap) {
    if (!real_fcntl) real_fcntl = dlsym(RTLD_NEXT, "fcntl64");
    if (!real_fcntl) real_fcntl = dlsym(RTLD_NEXT, "fcntl");
    long arg = va_arg(ap, long);
    if (cmd == F_SETFL && (arg & O_DIRECT) && mode_is("setfl")) {
        errno = EINVAL;
        return -1;
    }
    return real_fcntl(fd, cmd, arg);
}

#define SHIM_FCNTL(name)                        \
    int name(int fd, int cmd, ...) {            \
        va_list ap;                             \
        va_start(ap, cmd);                      \
        int r = shim_fcntl(fd, cmd, ap);        \
        va_end(ap);                             \
        return r;                               \
    }
SHIM_FCNTL(fcntl)
SHIM_FCNTL(fcntl64)

/* renameat2-einval: a file system without RENAME_NOREPLACE (the caller falls back to link + unlink). */
int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags) {
    static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);
    if (!real_renameat2) real_renameat2 = dlsym(RTLD_NEXT, "renameat2");
    if (mode_is("renameat2-einval")) {
        errno = EINVAL;
        return -1;
    }
    return real_renameat2(olddirfd, oldpath, newdirfd, newpath, flags);
}

/* FILEIO_SYNCFS_LOG: append "<fd> <what it refers to>" for every syncfs call, then sync for real. */
int syncfs(int fd) {
    static int (*real_syncfs)(int);
    if (!real_syncfs) real_syncfs = dlsym(RTLD_NEXT, "syncfs");
    const char *log = getenv("FILEIO_SYNCFS_LOG");
    if (log) {
        char link[64], target[4096];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t len = readlink(link, target, sizeof target - 1);
        target[len < 0 ? 0 : len] = 0;
        FILE *f = fopen(log, "a");
        if (f) {
            fprintf(f, "%d %s\n", fd, target);
            fclose(f);
        }
    }
    return real_syncfs(fd);
}

ssize_t write(int fd, const void *buf, size_t n) {
    if (!real_write) real_write = dlsym(RTLD_NEXT, "write");
    if (!real_fcntl) real_fcntl = dlsym(RTLD_NEXT, "fcntl64");
    if (!real_fcntl) real_fcntl = dlsym(RTLD_NEXT, "fcntl");
    if ((mode_is("write-einval") || mode_is("write-eio")) && (real_fcntl(fd, F_GETFL) & O_DIRECT)) {
        errno = mode_is("write-eio") ? EIO : EINVAL;
        return -1;
    }
    return real_write(fd, buf, n);
}
"""

CHILD = r"""
import mmap, os, sys
from keepstore import _fileio
path, size = sys.argv[1], int(sys.argv[2])
buf = memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
buf[:] = os.urandom(size)
fd = os.open(path + ".appended", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
try:
    buffered = _fileio.append(fd, buf, True)
except OSError as exc:
    print("append", exc.errno)
    sys.exit(0)
finally:
    os.close(fd)
directory = os.path.dirname(path)
_fileio.write_block(directory, path + ".tmp", path, buf, "user.x", None, True)
ok = all(open(p, "rb").read() == bytes(buf) for p in (path, path + ".appended"))
print("same" if ok else "different", buffered)
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"), SHIM)


def write_through(shim: Path, mode: str, path: Path, size: int) -> str:
    env = {"LD_PRELOAD": str(shim), "FILEIO_SHIM": mode, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(size)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("mode", ["none", "setfl", "write-einval"])
@pytest.mark.parametrize("size", [4096, (1 << 20) + 100])
def test_refused_direct_io_falls_back_to_buffered_writes(shim: Path, tmp_path: Path, mode: str, size: int) -> None:
    same, buffered = write_through(shim, mode, tmp_path / "block", size).split()
    assert same == "same"
    # append reports what went through the page cache (the volume starts its writeback early): everything when
    # O_DIRECT was refused, else the unaligned tail (everything, too, on a file system that refuses O_DIRECT).
    if mode == "none":
        assert int(buffered) in (size % 4096, size)
    else:
        assert int(buffered) == size


def test_other_errors_of_a_direct_write_are_raised(shim: Path, tmp_path: Path) -> None:
    assert write_through(shim, "write-eio", tmp_path / "block", 1 << 20) == "append 5"  # EIO, not swallowed


# The start of a child that runs a group-commit directory volume on the root given as its argument.
GROUP_VOLUME = r"""
import asyncio, hashlib, os, sys
from keepstore.config import VolumeSpec
from keepstore.volumes.directory import DirectoryParameters, DirectoryVolume
root = sys.argv[1]
spec = VolumeSpec(uuid="zzzzz-nyw5e-000000000000000", driver="Directory", parameters={"Root": root}, key_path="V")

async def main():
    vol = DirectoryVolume(spec, DirectoryParameters(root=root, group_commit=True))
    assert vol.group_commit
"""

GROUPS = (
    GROUP_VOLUME
    + r"""    for _ in range(3):  # one after the other: three groups
        data = os.urandom(4096)
        await vol.block_write(hashlib.md5(data).hexdigest(), memoryview(data))
    print(vol._root_fd)
    await vol.close()

asyncio.run(main())
"""
)


def test_each_group_syncs_through_a_descriptor_of_its_own(shim: Path, tmp_path: Path) -> None:
    # syncfs reports a writeback error once per open file description: through the volume's shared root fd, an
    # error on one group's pages could be reported to another group only, and the first would be renamed into place
    # as if durable. So every group opens its own description of the root for its two syncfs calls.
    root = tmp_path / "vol"
    root.mkdir()
    log = tmp_path / "syncfs.log"
    env = {"LD_PRELOAD": str(shim), "FILEIO_SYNCFS_LOG": str(log), "PATH": "/usr/bin:/bin"}
    child = [sys.executable, "-c", GROUPS, str(root)]
    done = subprocess.run(child, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    shared_fd = int(done.stdout.strip())
    calls = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert len(calls) == 6  # two per group
    assert all(target == str(root) for _, target in calls)
    assert all(int(fd) != shared_fd for fd, _ in calls)


CREATES = (
    GROUP_VOLUME
    + r"""    data = os.urandom(4096)
    h = hashlib.md5(data).hexdigest()
    first = await vol.block_create(h, memoryview(data))
    again = await vol.block_create(h, memoryview(os.urandom(4096)))
    stored = open(os.path.join(root, h[:3], h), "rb").read() == data
    other = os.urandom(4096)  # three copies of one new block in one group: the rename refuses the second and third
    job = (hashlib.md5(other).hexdigest(), memoryview(other), None, True)
    group = vol._write_group([job, job, job])
    leftovers = [n for _, _, names in os.walk(root) for n in names if n.startswith("tmp")]
    print(first, again, stored, group, leftovers)
    await vol.close()

asyncio.run(main())
"""
)


@pytest.mark.parametrize("mode", ["none", "renameat2-einval"])
def test_create_without_rename_noreplace_falls_back_to_link(shim: Path, tmp_path: Path, mode: str) -> None:
    # Where the file system refuses RENAME_NOREPLACE, link(2) (which refuses an existing name too) and unlink do
    # the same: the first create writes the block, the second finds it and writes nothing.
    root = tmp_path / "vol"
    root.mkdir()
    env = {"LD_PRELOAD": str(shim), "FILEIO_SHIM": mode, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", CREATES, str(root)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True False True [True, False, False] []"


def test_birth_ns_is_the_creation_time_not_the_mtime(tmp_path: Path) -> None:
    from keepstore._fileio import birth_ns

    before = time.time_ns()
    path = tmp_path / "f"
    path.write_bytes(b"x")
    after = time.time_ns()
    os.utime(path, ns=(after + 10**12, after + 10**12))  # a touch: the mtime moves, the birth does not
    fd = os.open(path, os.O_RDONLY)
    try:
        born = birth_ns(fd)
    finally:
        os.close(fd)
    if born is None:
        pytest.skip("this file system does not record creation times (statx btime)")
    assert before - 10**7 <= born <= after + 10**7  # (ext4 stamps from a coarse clock: allow 10 ms)
    with pytest.raises(OSError):
        birth_ns(10**6)  # not an open descriptor

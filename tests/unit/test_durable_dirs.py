"""Directories a volume creates are durable in their parent before anything acknowledged lives in them.

A block's fsync and its directory's fsync do not cover the directory's own entry, which is in the parent: after a
power cut the whole directory, with every block fsynced inside it, could be gone (to lost+found, or nowhere on a
file system without a journal). So every mkdir on the way to a block (the <hash[0:3]>/ directories, by each write
path: the native whole-block write, the streaming write, the group commit) and the journal's directory is followed
by an fsync of the volume's root before the write returns. A power cut cannot be staged here; what the process asks
of the kernel can: an LD_PRELOAD shim logs every mkdir and fsync (with the path of the descriptor) of a child process
that writes through a real directory volume, and the child logs each acknowledgement in the same file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from keeptest import build_shim

from keepstore.volumes.directory import group_commit_supported

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static void note(const char *what, const char *path) {
    const char *log = getenv("DIRS_LOG");
    if (!log) return;
    int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return;
    dprintf(fd, "%s %s\n", what, path);
    close(fd);
}

int mkdir(const char *path, mode_t mode) {
    static int (*real)(const char *, mode_t);
    if (!real) real = dlsym(RTLD_NEXT, "mkdir");
    int rc = real(path, mode), err = errno;
    if (rc == 0) note("mkdir", path);
    errno = err;
    return rc;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    target[n < 0 ? 0 : n] = '\0';
    int rc = real(fd), err = errno;
    if (rc == 0) note("fsync", target);
    errno = err;
    return rc;
}
"""

CHILD = r"""
import asyncio, hashlib, os, sys
from keepstore.config import VolumeSpec
from keepstore.volumes.directory import DirectoryParameters, DirectoryVolume

root, log, mode = sys.argv[1], os.environ["DIRS_LOG"], sys.argv[2]
spec = VolumeSpec(uuid="zzzzz-nyw5e-000000000000000", driver="Directory", parameters={"Root": root}, key_path="V")
group = mode == "group"
params = DirectoryParameters(root=root, group_commit=group, journal=group, direct_writes=True)
prefixes = set()

def block(size):
    # Every block in its own <hash[0:3]> directory, so that the directories made are counted exactly.
    while True:
        data = os.urandom(size)
        if hashlib.md5(data).hexdigest()[:3] not in prefixes:
            prefixes.add(hashlib.md5(data).hexdigest()[:3])
            return data

def note(line):
    with open(log, "a") as f:
        f.write(line + "\n")

def acked(what, data):
    note(f"acked {what} {os.path.join(root, hashlib.md5(data).hexdigest()[:3])}")

async def whole(vol, data):
    await vol.block_create(hashlib.md5(data).hexdigest(), memoryview(data))
    acked("whole", data)

async def streamed(vol, data):
    w = await vol.block_writer(hashlib.md5(data).hexdigest())
    for at in range(0, len(data), 1 << 20):
        await w.write(memoryview(data)[at : at + (1 << 20)])
    await w.commit()
    acked("streamed", data)

async def main():
    vol = DirectoryVolume(spec, params)
    if mode == "foreign":
        # One directory there before the start (made by an earlier process, perhaps never synced), two made
        # after it by "another process" (this one, behind the volume's back): the volume made none of them.
        early = block(1 << 20)
        os.mkdir(os.path.join(root, hashlib.md5(early).hexdigest()[:3]))
    await vol.start()
    note("started -")
    try:
        if group:
            assert vol.group_commit and vol._journal is not None, "no journal"
            for i in range(3):
                data = block(4096)
                await vol.block_create(hashlib.md5(data).hexdigest(), memoryview(data))
                acked("journal", data)
        elif mode == "foreign":
            late = [block(1 << 20), block(5 << 20)]
            for data in late:
                os.mkdir(os.path.join(root, hashlib.md5(data).hexdigest()[:3]))
            await whole(vol, early)
            await whole(vol, late[0])
            await streamed(vol, late[1])
        else:
            for i in range(3):
                await whole(vol, block(1 << 20))
            for i in range(3):
                await streamed(vol, block(5 << 20))
    finally:
        await vol.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("dirs-shim"), SHIM)


def run_child(shim: Path, tmp_path: Path, mode: str) -> tuple[Path, list[tuple[str, ...]]]:
    root = tmp_path / "vol"
    root.mkdir()
    root = root.resolve()  # as the shim names what it fsyncs (from /proc/self/fd)
    log = tmp_path / "calls.log"
    env = {**os.environ, "LD_PRELOAD": str(shim), "DIRS_LOG": str(log)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return root, [tuple(line.split(" ")) for line in log.read_text().splitlines()]


def assert_parent_synced_before_ack(root: Path, calls: list[tuple[str, ...]]) -> list[str]:
    """Every directory made under ``root`` has an fsync of ``root`` after its mkdir and before any acknowledgement
    of a block in it; returns the kinds of write acknowledged."""
    made: dict[str, int] = {}  # directory -> index of its mkdir
    acks = []
    for i, call in enumerate(calls):
        if call[0] == "mkdir" and os.path.dirname(call[1]) == str(root):
            made[call[1]] = i
        elif call[0] == "acked":
            acks.append(call[1])
            directory = call[2]
            assert directory in made, f"{directory} was not made by this process: {calls}"
            synced = [j for j in range(made[directory], i) if calls[j] == ("fsync", str(root))]
            assert synced, f"{directory} acknowledged before {root} was fsynced after its mkdir: {calls}"
    return acks


def root_syncs(root: Path, calls: list[tuple[str, ...]]) -> int:
    return sum(1 for c in calls if c == ("fsync", str(root)))


def made_under(root: Path, calls: list[tuple[str, ...]]) -> int:
    return sum(1 for c in calls if c[0] == "mkdir" and os.path.dirname(c[1]) == str(root))


def test_whole_and_streamed_writes_sync_the_root_after_making_a_directory(shim: Path, tmp_path: Path) -> None:
    root, calls = run_child(shim, tmp_path, "plain")
    assert assert_parent_synced_before_ack(root, calls) == ["whole"] * 3 + ["streamed"] * 3
    # The root is fsynced at start, then once per new directory, not once per block.
    assert made_under(root, calls) == 6
    assert root_syncs(root, calls) == 1 + 6


def test_a_directory_the_volume_did_not_make_is_synced_before_its_first_block(shim: Path, tmp_path: Path) -> None:
    # Another thread or process may have made a directory a moment ago and not synced its entry yet: a process
    # syncs the root before its first block in any directory it has not seen made durable (those there at its
    # start are covered by an fsync of the root then).
    root, calls = run_child(shim, tmp_path, "foreign")
    assert assert_parent_synced_before_ack(root, calls) == ["whole", "whole", "streamed"]
    started = calls.index(("started", "-"))
    assert root_syncs(root, calls[:started]) == 1  # at start, after the early directory
    assert root_syncs(root, calls[started:]) == 2  # one per late directory, none for the early one


@pytest.mark.skipif(not group_commit_supported(), reason="group commit needs Linux 5.8+ and the extension")
def test_the_journal_directory_and_group_commit_directories_are_synced_in_the_root(
    shim: Path, tmp_path: Path
) -> None:
    root, calls = run_child(shim, tmp_path, "group")
    journal_dir = str(root / "journal")
    started = calls.index(("started", "-"))
    # Recovery makes the journal directory, syncs it (the journal file's entry), then the root (its own entry);
    # the start's sync of the root for the block directories comes after: two before the first block.
    synced_dir = calls.index(("fsync", journal_dir))
    assert calls.index(("mkdir", journal_dir)) < synced_dir < started
    assert ("fsync", str(root)) in calls[synced_dir:started]
    assert root_syncs(root, calls[:started]) == 2, calls
    assert assert_parent_synced_before_ack(root, [c for c in calls if c[1] != journal_dir]) == ["journal"] * 3

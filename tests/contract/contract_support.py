"""Support for the contract suite: one ``VolumeFactory`` per driver that the generic tests run against.

To add a driver, write a ``VolumeFactory`` subclass (how to build a volume on a fresh, empty backend; how to corrupt
a stored copy behind the driver's back) and add its name to ``DRIVERS`` and to ``make_factory``. Generic tests must
only go through the ``Volume`` interface and these hooks, never touch the backend directly.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path

from keepstore.config import VolumeSpec
from keepstore.volumes import Volume
from keepstore.volumes.directory import DirectoryParameters, DirectoryVolume

VOLUME_UUID = "zzzzz-nyw5e-000000000000000"

Body = Callable[[Volume], Awaitable[None]]


class VolumeFactory(ABC):
    """Builds volumes of one driver on one fresh backend, and runs test bodies against them."""

    name: str
    # Coarsest mtime step the backend can show (S3 keeps whole seconds); tests wait this long between two writes
    # that must get different mtimes.
    mtime_resolution: float = 0.0

    @abstractmethod
    def new_volume(self) -> Volume:
        """A volume on this factory's backend. Every call gives another instance on the *same* backend."""

    @abstractmethod
    async def corrupt(self, vol: Volume, hash: str) -> None:
        """Change the stored bytes of ``hash`` (which must exist) behind the driver's back, keeping its size."""

    def run(self, body: Body) -> None:
        """Run ``body(volume)`` in a fresh event loop; the volume is closed afterwards, whatever happens."""

        async def main() -> None:
            vol = self.new_volume()
            try:
                await vol.start()
                await body(vol)
            finally:
                await vol.close()

        asyncio.run(main())

    async def mtime_tick(self) -> None:
        """Wait until a new write is sure to get a later mtime than an earlier one."""
        await asyncio.sleep(max(0.01, self.mtime_resolution * 1.05))


class DirectoryFactory(VolumeFactory):
    name = "directory"

    def __init__(
        self, tmp_path: Path, group_commit: bool = False, direct_writes: bool = False, journal: bool = False
    ) -> None:
        self.group_commit = group_commit
        self.direct_writes = direct_writes
        self.journal = journal
        self.root = tmp_path / "directory-volume"
        self.root.mkdir()
        self.spec = VolumeSpec(
            uuid=VOLUME_UUID,
            driver="Directory",
            parameters={"Root": str(self.root)},
            key_path=f"Clusters.zzzzz.Volumes.{VOLUME_UUID}",
        )

    def new_volume(self) -> Volume:
        params = DirectoryParameters(
            root=str(self.root), group_commit=self.group_commit, direct_writes=self.direct_writes, journal=self.journal
        )
        vol = DirectoryVolume(self.spec, params)
        assert vol.group_commit == self.group_commit, "group commit is not supported here (needs Linux 5.8+)"
        return vol

    async def corrupt(self, vol: Volume, hash: str) -> None:
        path = self.root / hash[:3] / hash
        data = bytearray(path.read_bytes())
        assert data, "cannot corrupt an empty block without changing its size"
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


# "directory": every write buffered and fsynced file by file (the path without the native extension, or with both
# KeepstorePy keys off); "directory-direct": block data written with O_DIRECT; "directory-group-commit": small
# blocks by group commit with two syncfs calls, the rest with O_DIRECT; "directory-journal": what the default
# configuration runs (group commits through the write-ahead journal).
DRIVERS = ["directory", "directory-direct", "directory-group-commit", "directory-journal"]


def make_factory(driver: str, tmp_path: Path) -> VolumeFactory:
    if driver == "directory":
        return DirectoryFactory(tmp_path)
    if driver == "directory-direct":
        return DirectoryFactory(tmp_path, direct_writes=True)
    if driver == "directory-group-commit":
        return DirectoryFactory(tmp_path, group_commit=True, direct_writes=True)
    if driver == "directory-journal":
        return DirectoryFactory(tmp_path, group_commit=True, direct_writes=True, journal=True)
    raise AssertionError(f"unknown driver {driver}")

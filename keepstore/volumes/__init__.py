"""Storage drivers and the registry that builds them from config."""

from __future__ import annotations

import dataclasses
import os

from ..config import Config, ConfigError, VolumeSpec
from .base import BlockWriter, EmptyTrashStats, IndexEntry, LocalBlock, Volume, VolumeStats, VolumeUsage
from .directory import DirectoryParameters, DirectoryVolume

DRIVERS = ("Directory",)

__all__ = [
    "DRIVERS",
    "BlockWriter",
    "EmptyTrashStats",
    "IndexEntry",
    "LocalBlock",
    "Volume",
    "VolumeStats",
    "VolumeUsage",
    "check_volume_specs",
    "open_volume",
]


def check_volume_specs(config: Config) -> None:
    """Validate every volume's driver name and DriverParameters; raise ConfigError naming the key.

    Includes what can only be checked on this machine (a Directory root must exist), so that a server with several
    worker processes fails once, at start-up, instead of in every worker.
    """
    for spec in config.volumes:
        params = _parse(spec)
        if not os.path.isdir(params.root):
            raise ConfigError(f"{spec.key_path}.DriverParameters.Root", f"{params.root} is not a directory")


def _parse(spec: VolumeSpec) -> DirectoryParameters:
    if spec.driver == "Directory":
        return DirectoryParameters.parse(spec.parameters, spec.key_path)
    raise ConfigError(f"{spec.key_path}.Driver", f"unknown driver {spec.driver!r} (supported: {', '.join(DRIVERS)})")


def open_volume(spec: VolumeSpec, config: Config) -> Volume:
    params = dataclasses.replace(
        _parse(spec), group_commit=config.group_commit, direct_writes=config.direct_writes, journal=config.journal
    )
    return DirectoryVolume(spec, params)

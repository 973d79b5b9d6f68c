"""The running service: every long-lived object, built from the config, and its lifecycle."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .buffers import BufferPool
from .config import Config
from .limiter import RequestLimiter
from .metrics import Metrics
from .signing import Signer
from .store import Mount, Store
from .volumes import open_volume
from .workers.queue import WorkQueue

if TYPE_CHECKING:
    from .http.app import KeepHTTP

log = logging.getLogger("keepstore")


@dataclass
class Service:
    config: Config
    store: Store
    pool: BufferPool
    limiter: RequestLimiter
    signer: Signer | None
    pull_queue: WorkQueue[Any] = field(default_factory=WorkQueue)
    trash_queue: WorkQueue[Any] = field(default_factory=WorkQueue)
    pull_outcomes: dict[str, int] = field(default_factory=dict)
    trash_outcomes: dict[str, int] = field(default_factory=dict)
    sweep_totals: dict[str, int] = field(default_factory=lambda: {"blocks": 0, "bytes": 0})
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    http: KeepHTTP | None = None  # set by the server, for /_inspect/requests

    def __post_init__(self) -> None:
        self.metrics = Metrics(self)

    @classmethod
    def build(cls, config: Config) -> Service:
        mounts = [Mount(spec, open_volume(spec, config)) for spec in config.volumes]
        signer = Signer(config.blob_signing_key.encode(), config.blob_signing_ttl) if config.blob_signing_key else None
        return cls(
            config=config,
            store=Store(config, mounts),
            pool=BufferPool(config.max_keep_blob_buffers),
            limiter=RequestLimiter(config.max_concurrent_requests, config.max_queued_requests),
            signer=signer,
        )

    async def start(self) -> None:
        for mnt in self.store.mounts:
            await mnt.volume.start()
            log.info(
                f"started volume {mnt.uuid} ({mnt.volume.device_id}), AllowWrite={mnt.allow_write}, "
                f"AllowTrash={mnt.allow_trash}"
            )
        self._tasks.append(asyncio.create_task(self._sweep_temporary()))

    async def _sweep_temporary(self) -> None:
        for mnt in self.store.mounts:
            if not mnt.allow_write:
                continue
            try:
                removed = await mnt.volume.sweep_temporary()
            except Exception:
                log.exception("sweeping temporary files failed", extra={"fields": {"mount": mnt.uuid}})
                continue
            if removed:
                log.info(
                    "removed stale temporary files", extra={"fields": {"mount": mnt.uuid, "count": removed}}
                )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

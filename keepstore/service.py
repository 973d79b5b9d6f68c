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
from .state import State, merge, snapshot
from .store import Mount, Store
from .volumes import open_volume
from .workers.group import WorkerGroup
from .workers.lists import PullRequest, TrashRequest, parse_pull_list, parse_trash_list
from .workers.pull import Puller
from .workers.queue import WorkQueue
from .workers.trash import Trasher, TrashSweeper

if TYPE_CHECKING:
    from .http.app import KeepHTTP
    from .multiproc import WorkerInfo

log = logging.getLogger("keepstore")

BUFFER_TRIM_INTERVAL = 5.0  # seconds between checks for idle buffers
BUFFER_IDLE = 10.0  # a buffer unused this long gives its memory back


@dataclass
class Service:
    config: Config
    store: Store
    pool: BufferPool
    limiter: RequestLimiter
    signer: Signer | None
    pull_queue: WorkQueue[PullRequest] = field(default_factory=WorkQueue)
    trash_queue: WorkQueue[TrashRequest] = field(default_factory=WorkQueue)
    pull_outcomes: dict[str, int] = field(default_factory=dict)
    trash_outcomes: dict[str, int] = field(default_factory=dict)
    sweep_totals: dict[str, int] = field(default_factory=lambda: {"blocks": 0, "bytes": 0})
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _groups: list[WorkerGroup[Any]] = field(default_factory=list)
    _puller: Puller | None = None
    sweeper: TrashSweeper | None = None

    http: KeepHTTP | None = None  # set by the server, for /_inspect/requests

    peers: list[str] = field(default_factory=list)  # internal sockets of the other workers (multi-process)
    primary: bool = True  # runs the pull/trash workers and the sweeps (the only one in a single process)
    worker: WorkerInfo | None = None

    def __post_init__(self) -> None:
        self.metrics = Metrics()

    async def state(self) -> State:
        """This server's state: this process's, merged with every other worker's when there are several."""
        local = snapshot(self)
        if not self.peers:
            return local
        from .multiproc import gather_states

        return merge([local, *await gather_states(self.peers)])

    @classmethod
    def build(cls, config: Config) -> Service:
        mounts = [Mount(spec, open_volume(spec, config)) for spec in config.volumes]
        signer = Signer(config.blob_signing_key.encode(), config.blob_signing_ttl) if config.blob_signing_key else None
        return cls(
            config=config,
            store=Store(config, mounts),
            pool=BufferPool(config.max_keep_blob_buffers, huge_pages=config.huge_page_buffers),
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
        self._tasks.append(asyncio.create_task(self._trim_buffers()))
        if self.primary:
            self._tasks.append(asyncio.create_task(self._sweep_temporary()))
            await self._start_workers()

    async def _start_workers(self) -> None:
        cfg = self.config
        if self.store.writable:
            self._puller = Puller(self)
            await self._puller.start()
            self._groups.append(
                WorkerGroup("pull", self.pull_queue, self._puller, self.pull_outcomes, cfg.blob_replicate_concurrency)
            )
        if cfg.blob_trash and self.store.trashable and cfg.blob_trash_concurrency > 0:
            trasher = Trasher(self)
            self._groups.append(
                WorkerGroup("trash", self.trash_queue, trasher, self.trash_outcomes, cfg.blob_trash_concurrency)
            )
        sweep = cfg.blob_trash_check_interval > 0 and cfg.blob_delete_concurrency > 0
        if cfg.blob_trash and self.store.trashable and sweep:
            self.sweeper = TrashSweeper(self)
            self.sweeper.start()
        for group in self._groups:
            group.start()

    async def accept_list(self, kind: str, body: bytes) -> int:
        """Validate a pull or trash list and replace the queue with it (here, or in the primary worker)."""
        items: list[Any] = parse_pull_list(body) if kind == "pull" else parse_trash_list(body)
        if not self.primary:
            assert self.worker is not None
            from .multiproc import forward_list

            await forward_list(self.worker.primary_socket, kind, body)
        elif kind == "pull":
            self.pull_queue.replace(items)
        else:
            self.trash_queue.replace(items)
        return len(items)

    async def stop_workers(self) -> None:
        """Stop pull and trash workers where they stand, and the sweep (SIGTERM; also part of close)."""
        for group in self._groups:
            await group.stop()
        self._groups = []
        if self.sweeper is not None:
            await self.sweeper.stop()
        if self._puller is not None:
            await self._puller.close()

    async def _trim_buffers(self) -> None:
        while True:
            await asyncio.sleep(BUFFER_TRIM_INTERVAL)
            self.pool.trim(idle=BUFFER_IDLE)

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
                log.info("removed stale temporary files", extra={"fields": {"mount": mnt.uuid, "count": removed}})

    async def close(self) -> None:
        await self.stop_workers()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

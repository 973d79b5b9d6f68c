"""Trash workers (SPEC §4.4) and the periodic trash sweep (SPEC §4.5)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..errors import BlockNotFound, KeepError
from .lists import TrashRequest

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger("keepstore.trash")


class Trasher:
    """Carries out one trash-list item: exact-mtime match, never younger than BlobSigningTTL."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def __call__(self, req: TrashRequest) -> str:
        cfg = self.service.config
        store = self.service.store
        h = req.locator.hash
        fields = {"locator": f"{h}+{req.locator.size or 0}", "block_mtime": req.block_mtime}
        age = time.time_ns() - req.block_mtime
        if age < cfg.blob_signing_ttl * 1_000_000_000:
            log.warning("asked to trash a block younger than BlobSigningTTL: skipping", extra={"fields": fields})
            return "too_young"
        if req.mount_uuid is not None:
            mnt = store.by_uuid.get(req.mount_uuid)
            if mnt is None or not mnt.allow_trash:
                why = "nonexistent" if mnt is None else "non-trashable"
                fields["mount"] = req.mount_uuid
                log.warning(f"ignoring trash list entry for {why} mount", extra={"fields": fields})
                return "skipped"
            targets = [mnt]
        else:
            targets = list(store.trashable)
        outcome = "not_found"
        for mnt in targets:
            try:
                mtime = await mnt.volume.mtime(h)
                if mtime != req.block_mtime:
                    log.info(
                        "stored mtime does not match trash list mtime: skipping",
                        extra={"fields": {**fields, "mount": mnt.uuid, "stored_mtime": mtime}},
                    )
                    outcome = "mtime_mismatch" if outcome != "trashed" else outcome
                    continue
                await mnt.volume.block_trash(h, cfg.blob_signing_ttl, cfg.blob_trash_lifetime)
                log.info("block trashed", extra={"fields": {**fields, "mount": mnt.uuid}})
                outcome = "trashed"
            except BlockNotFound:
                continue
            except KeepError as exc:
                log.error("trash failed", extra={"fields": {**fields, "mount": mnt.uuid, "error": str(exc)}})
                if outcome != "trashed":
                    outcome = "error"
        return outcome


class TrashSweeper:
    """Every BlobTrashCheckInterval (first run one interval after start), empty the trash of every trashable mount."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="trash-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        interval = self.service.config.blob_trash_check_interval
        while True:
            await asyncio.sleep(interval)
            await self.sweep_once()

    async def sweep_once(self) -> None:
        svc = self.service
        for mnt in svc.store.trashable:
            try:
                st = await mnt.volume.empty_trash(svc.config.blob_delete_concurrency)
            except Exception as exc:  # one volume's failure must not end the sweeps of the others, or later ones
                log.error("EmptyTrash failed", extra={"fields": {"mount": mnt.uuid, "error": str(exc)}})
                continue
            svc.sweep_totals["blocks"] += st.deleted_blocks
            svc.sweep_totals["bytes"] += st.deleted_bytes
            log.info(
                f"EmptyTrash stats for {mnt.uuid}: Deleted {st.deleted_bytes} bytes in {st.deleted_blocks} blocks. "
                f"Remaining in trash: {st.remaining_bytes} bytes in {st.remaining_blocks} blocks.",
                extra={"fields": {"mount": mnt.uuid}},
            )
            if st.errors:
                log.error(
                    "EmptyTrash could not sweep everything", extra={"fields": {"mount": mnt.uuid, "errors": st.errors}}
                )

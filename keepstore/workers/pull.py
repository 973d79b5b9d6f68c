"""Pull workers (SPEC §4.3, deliberate difference 4): copy a block from a peer keepstore onto a local mount.

For each item: pick the target mount (``mount_uuid``, or the first writable mount in rendezvous order); if it
already holds a verified copy, touch it and stop; otherwise try the listed servers *in order*, each with a freshly
signed locator for a random token (expiry now + 60 s), stream the body into a pool buffer while hashing, reject a
wrong size or hash, and write the block with the same durable write a client PUT uses. Outcomes are counted:
``pulled``, ``already_present``, ``not_found``, ``bad_checksum``, ``error`` (plus ``skipped`` for an item whose
mount does not exist here or is read-only).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING

import aiohttp

from ..bodies import Body, receive
from ..errors import KeepError, TooLarge
from ..logs import new_request_id
from ..store import Mount
from .lists import PullRequest

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger("keepstore.pull")

PULL_SIGNATURE_TTL = 60  # seconds: the signed locator only has to last for this one request
_SEVERITY = {"not_found": 0, "error": 1, "bad_checksum": 2}


class Puller:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        cfg = self.service.config
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=cfg.pull_connect_timeout,
            sock_connect=cfg.pull_connect_timeout,
            sock_read=cfg.pull_read_timeout,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            auto_decompress=False,
            # TLS.Insecure: accept any certificate from the servers pulled from, as Arvados does with it.
            connector=aiohttp.TCPConnector(
                limit_per_host=max(4, cfg.blob_replicate_concurrency), ssl=False if cfg.tls_insecure else True
            ),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def target(self, req: PullRequest) -> Mount | None:
        store = self.service.store
        if req.mount_uuid is None:
            writable = store.rendezvous(req.locator.hash, store.writable)
            return writable[0] if writable else None
        mnt = store.by_uuid.get(req.mount_uuid)
        return mnt if mnt is not None and mnt.allow_write else None

    async def __call__(self, req: PullRequest) -> str:
        h, size = req.locator.hash, req.locator.size
        assert size is not None  # lists are validated: pull locators carry a size hint
        fields: dict[str, object] = {"locator": f"{h}+{size}", "mount": req.mount_uuid or ""}
        mnt = self.target(req)
        if mnt is None:
            log.warning("ignoring pull list entry for nonexistent or readonly mount", extra={"fields": fields})
            return "skipped"
        fields["mount"] = mnt.uuid
        started = time.monotonic()
        async with self.service.pool.buffer() as buf:
            if await self._verified_copy(mnt, h, size, buf.view):
                await mnt.volume.block_touch(h)
                log.info("block already present: touched", extra={"fields": fields})
                return "already_present"
            outcome = "not_found"
            for server in req.servers:
                result = await self._fetch(server, h, size, buf.view)
                if isinstance(result, Body):
                    try:
                        await mnt.volume.block_write(h, buf.view[:size], result.checkpoints)
                    except KeepError as exc:
                        log.warning("error writing pulled block", extra={"fields": {**fields, "error": str(exc)}})
                        return "error"
                    fields.update(server=server, seconds=round(time.monotonic() - started, 6))
                    log.info("block pulled", extra={"fields": fields})
                    return "pulled"
                if _SEVERITY[result] > _SEVERITY[outcome]:
                    outcome = result
        log.warning("error pulling data from remote servers", extra={"fields": {**fields, "outcome": outcome}})
        return outcome

    async def _verified_copy(self, mnt: Mount, h: str, size: int, view: memoryview) -> bool:
        try:
            return await self.service.store.verified_on(mnt, h, size, view)
        except KeepError:
            return False

    async def _fetch(self, server: str, h: str, size: int, view: memoryview) -> Body | str:
        """GET the block from one peer into ``view``: the verified body, or "not_found", "bad_checksum", "error"."""
        assert self._session is not None
        svc = self.service
        token = secrets.token_hex(20)
        locator = f"{h}+{size}"
        if svc.signer is not None:
            locator = svc.signer.sign(locator, token, int(time.time()) + PULL_SIGNATURE_TTL)
        headers = {"Authorization": f"Bearer {token}", "X-Request-Id": new_request_id()}
        fields = {"locator": f"{h}+{size}", "server": server}
        try:
            async with self._session.get(f"{server}/{locator}", headers=headers) as resp:
                if resp.status == 404:
                    return "not_found"
                if resp.status != 200:
                    log.info("peer refused pull", extra={"fields": {**fields, "status": resp.status}})
                    return "error"
                if resp.content_length is not None and resp.content_length != size:
                    log.warning("peer sent wrong size", extra={"fields": {**fields, "size": resp.content_length}})
                    return "bad_checksum"
                body = await receive(resp.content, view, limit=size, size_hint=size)
        except TooLarge:
            log.warning("peer sent more than the size hint", extra={"fields": fields})
            return "bad_checksum"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("pull from peer failed", extra={"fields": {**fields, "error": f"{type(exc).__name__}: {exc}"}})
            return "error"
        if body.size != size or body.md5 != h:
            log.warning("peer sent data that does not match the locator", extra={"fields": fields})
            return "bad_checksum"
        return body

"""Admin routes (SPEC §2.7–2.13): SystemRootToken only; the root check comes before any other validation."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from urllib.parse import parse_qsl

from ..errors import ClientGone, KeepError, MethodNotAllowed, TooLarge
from ..locator import parse_locator
from .app import TEXT, Call, Reply, json_reply
from .auth import require_root

log = logging.getLogger("keepstore.http")

INDEX_FLUSH_LINES = 2000


def _root(call: Call) -> None:
    require_root(call.request, call.service.config.system_root_token)


def _query(call: Call, key: str) -> str:
    query = call.request.raw_path.partition("?")[2]
    values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == key]
    return values[0] if values else ""


async def index(call: Call, match: re.Match[str]) -> None:
    """Stream ``<hash>+<size> <mtime ns>`` lines, then a blank line only if every mount was listed completely."""
    _root(call)
    groups = match.groupdict()
    prefix = _query(call, "prefix") or groups.get("prefix") or ""
    entries = call.service.store.index(prefix, groups.get("uuid"))
    lines: list[str] = []
    try:
        async for e in entries:
            lines.append(f"{e.hash}+{e.size} {e.mtime_ns}\n")
            if len(lines) >= INDEX_FLUSH_LINES:
                if not call.responded:
                    await call.start(None, TEXT)
                await call.send("".join(lines).encode())
                lines.clear()
    except KeepError as exc:
        if not call.responded:
            raise  # nothing sent yet: a proper error status is still possible
        # Too late for a status: end the body without the blank line, which tells the client it is incomplete.
        log.error("index failed mid-stream", extra={"fields": {"RequestID": call.request_id, "error": str(exc)}})
        await call.send("".join(lines).encode())
        return None
    if not call.responded:
        await call.start(None, TEXT)
    lines.append("\n")
    await call.send("".join(lines).encode())
    return None


index.no_deadline = True  # type: ignore[attr-defined]  # a big index may take longer than RequestTimeout


async def mounts(call: Call, match: re.Match[str]) -> Reply:
    _root(call)
    out = [
        {
            "uuid": m.uuid,
            "device_id": m.volume.device_id,
            "allow_write": m.allow_write,
            "allow_trash": m.allow_trash,
            "replication": m.replication,
            "storage_classes": {c: True for c in m.storage_classes},
        }
        for m in call.service.store.readable
    ]
    return json_reply(json.dumps(out, separators=(",", ":")) + "\n")


async def touch(call: Call, match: re.Match[str]) -> Reply:
    _root(call)
    await call.service.store.touch(parse_locator(match["loc"]).hash)
    return Reply(200)


async def trash(call: Call, match: re.Match[str]) -> Reply:
    _root(call)
    if not call.service.config.blob_trash:
        raise MethodNotAllowed()
    await call.service.store.trash(parse_locator(match["loc"]).hash)
    return Reply(200)


async def untrash(call: Call, match: re.Match[str]) -> Reply:
    _root(call)
    await call.service.store.untrash(parse_locator(match["loc"]).hash)
    return Reply(200)


LIST_BODY_LIMIT = 64 << 20  # a 100,000-item pull list (keep-balance's default cap) is about 20 MB


async def _read_list(call: Call) -> bytes:
    declared = call.request.content_length
    if declared is not None and declared > LIST_BODY_LIMIT:
        raise TooLarge()
    chunks: list[bytes] = []
    total = 0
    try:
        while chunk := await call.request.content.readany():
            total += len(chunk)
            if total > LIST_BODY_LIMIT:
                raise TooLarge()
            chunks.append(chunk)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        raise ClientGone(str(exc)) from exc
    return b"".join(chunks)


async def pull_list(call: Call, match: re.Match[str]) -> Reply:
    """Replace the pull queue with a validated list (SPEC §2.11, difference 6)."""
    _root(call)
    n = await call.service.accept_list("pull", await _read_list(call))
    log.info("pull list received", extra={"fields": {"RequestID": call.request_id, "items": n}})
    return Reply(200)


async def trash_list(call: Call, match: re.Match[str]) -> Reply:
    """Replace the trash queue with a validated list (SPEC §2.12, difference 6)."""
    _root(call)
    n = await call.service.accept_list("trash", await _read_list(call))
    log.info("trash list received", extra={"fields": {"RequestID": call.request_id, "items": n}})
    return Reply(200)

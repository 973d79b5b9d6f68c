"""Operational endpoints, served before the limiter and without CORS headers (SPEC §2.15, difference 5)."""

from __future__ import annotations

import json
import re

from .. import __version__
from ..errors import Forbidden, Unauthorized
from .app import Call, Handler, Reply, error_reply, json_reply, text_reply
from .auth import request_tokens, same_token


def routes() -> dict[str, Handler]:
    return {
        "/_health/ping": health,
        "/metrics": metrics,
        "/metrics.json": metrics_json,
        "/status.json": status_json,
        "/_inspect/requests": inspect_requests,
    }


def _bearer_ok(call: Call) -> Reply | None:
    """The exact ``Authorization: Bearer <ManagementToken>`` check of /_health/ping and /_inspect."""
    token = call.service.config.management_token
    if not token:
        return text_reply(404, "disabled\n")
    header = call.request.headers.get("Authorization")
    if header is None:
        return text_reply(401, "authorization required\n")
    if not same_token(header, "Bearer " + token):
        return text_reply(403, "authorization error\n")
    return None


def _management_token_ok(call: Call) -> Reply | None:
    """RequireLiteralToken(ManagementToken): any token form; open when no ManagementToken is configured."""
    token = call.service.config.management_token
    if not token:
        return None
    tokens = request_tokens(call.request)
    if not tokens:
        return error_reply(Unauthorized())
    if not any(same_token(t, token) for t in tokens):
        return error_reply(Forbidden())
    return None


async def health(call: Call, match: re.Match[str]) -> Reply:
    if call.request.method != "GET":
        return text_reply(405, "Method Not Allowed\n")
    denied = _bearer_ok(call)
    if denied is not None:
        return denied
    return json_reply('{"health":"OK"}\n')


async def metrics(call: Call, match: re.Match[str]) -> Reply:
    if call.request.method not in ("GET", "HEAD"):
        return text_reply(405, "Method Not Allowed\n")
    denied = _management_token_ok(call)
    if denied is not None:
        return denied
    body = call.service.metrics.text(await call.service.state()).encode()
    return Reply(200, body, "text/plain; version=0.0.4; charset=utf-8")


async def metrics_json(call: Call, match: re.Match[str]) -> Reply:
    if call.request.method not in ("GET", "HEAD"):
        return text_reply(405, "Method Not Allowed\n")
    denied = _management_token_ok(call)
    if denied is not None:
        return denied
    return _json(call.service.metrics.json(await call.service.state()))


async def status_json(call: Call, match: re.Match[str]) -> Reply:
    """Deliberate difference 5: the 2.x status document, behind the ManagementToken like /metrics."""
    if call.request.method not in ("GET", "HEAD"):
        return text_reply(405, "Method Not Allowed\n")
    denied = _management_token_ok(call)
    if denied is not None:
        return denied
    svc = call.service
    state = await svc.state()
    volumes = []
    for mnt in svc.store.mounts:
        usage = await mnt.volume.usage()
        vol = state["volumes"][mnt.uuid]
        volumes.append(
            {
                "UUID": mnt.uuid,
                "DeviceID": mnt.volume.device_id,
                "BytesFree": usage.bytes_free,
                "BytesUsed": usage.bytes_used,
                "AllowWrite": mnt.allow_write,
                "AllowTrash": mnt.allow_trash,
                "InternalStats": {
                    "Ops": vol["ops"],
                    "ErrorCodes": vol["errors"],
                    "Errors": sum(vol["errors"].values()),
                    "InBytes": vol["in_bytes"],
                    "OutBytes": vol["out_bytes"],
                },
            }
        )
    pool = state["pool"]
    lim = state["limiter"]
    doc = {
        "Volumes": volumes,
        "BufferPool": {
            "BuffersMax": pool["max_buffers"],
            "BuffersInUse": pool["in_use"],
            "BytesAllocated": pool["bytes_allocated"],
            "Waiting": pool["waiting"],
        },
        "PullQueue": state["pull_queue"],
        "TrashQueue": state["trash_queue"],
        "RequestsCurrent": lim["active"],
        "RequestsMax": lim["max_concurrent"],
        "RequestsQueued": sum(lim["queued"].values()),
        "Version": __version__,
    }
    return _json(doc)


async def inspect_requests(call: Call, match: re.Match[str]) -> Reply:
    token = call.service.config.management_token
    header = call.request.headers.get("Authorization", "")
    if not token or not same_token(header, "Bearer " + token):
        return json_reply('{"errors":["unauthorized"]}\n', status=401)
    out = sorted((await call.service.state())["inflight"], key=lambda d: float(d["Elapsed"]))
    return _json(out)


def _json(doc: object) -> Reply:
    return json_reply(json.dumps(doc) + "\n")

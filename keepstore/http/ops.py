"""Operational endpoints, served before the limiter and without CORS headers (SPEC §2.15, difference 5)."""

from __future__ import annotations

import json
import re
import time

from aiohttp import web

from .. import __version__
from ..errors import Forbidden, Unauthorized
from .app import Call, Handler, error_response, text_response
from .auth import request_tokens, same_token


def routes() -> dict[str, Handler]:
    return {
        "/_health/ping": health,
        "/metrics": metrics,
        "/metrics.json": metrics_json,
        "/status.json": status_json,
        "/_inspect/requests": inspect_requests,
    }


def _bearer_ok(call: Call) -> web.StreamResponse | None:
    """The exact ``Authorization: Bearer <ManagementToken>`` check of /_health/ping and /_inspect."""
    token = call.service.config.management_token
    if not token:
        return text_response(404, "disabled\n")
    header = call.request.headers.get("Authorization")
    if header is None:
        return text_response(401, "authorization required\n")
    if not same_token(header, "Bearer " + token):
        return text_response(403, "authorization error\n")
    return None


def _management_token_ok(call: Call) -> web.StreamResponse | None:
    """RequireLiteralToken(ManagementToken): any token form; open when no ManagementToken is configured."""
    token = call.service.config.management_token
    if not token:
        return None
    tokens = request_tokens(call.request)
    if not tokens:
        return error_response(Unauthorized())
    if not any(same_token(t, token) for t in tokens):
        return error_response(Forbidden())
    return None


async def health(call: Call, match: re.Match[str]) -> web.StreamResponse:
    if call.request.method != "GET":
        return text_response(405, "Method Not Allowed\n")
    denied = _bearer_ok(call)
    if denied is not None:
        return denied
    return web.Response(status=200, body=b'{"health":"OK"}\n', content_type="application/json")


async def metrics(call: Call, match: re.Match[str]) -> web.StreamResponse:
    if call.request.method not in ("GET", "HEAD"):
        return text_response(405, "Method Not Allowed\n")
    denied = _management_token_ok(call)
    if denied is not None:
        return denied
    body = call.service.metrics.text().encode()
    resp = web.Response(status=200, body=body)
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp


async def metrics_json(call: Call, match: re.Match[str]) -> web.StreamResponse:
    if call.request.method not in ("GET", "HEAD"):
        return text_response(405, "Method Not Allowed\n")
    denied = _management_token_ok(call)
    if denied is not None:
        return denied
    return _json(call.service.metrics.json())


async def status_json(call: Call, match: re.Match[str]) -> web.StreamResponse:
    """Deliberate difference 5: the 2.x status document, behind the ManagementToken like /metrics."""
    if call.request.method not in ("GET", "HEAD"):
        return text_response(405, "Method Not Allowed\n")
    denied = _management_token_ok(call)
    if denied is not None:
        return denied
    svc = call.service
    volumes = []
    for mnt in svc.store.mounts:
        usage = await mnt.volume.usage()
        stats = mnt.volume.stats
        volumes.append(
            {
                "UUID": mnt.uuid,
                "DeviceID": mnt.volume.device_id,
                "BytesFree": usage.bytes_free,
                "BytesUsed": usage.bytes_used,
                "AllowWrite": mnt.allow_write,
                "AllowTrash": mnt.allow_trash,
                "InternalStats": {
                    "Ops": dict(stats.ops),
                    "ErrorCodes": dict(stats.errors),
                    "Errors": sum(stats.errors.values()),
                    "InBytes": stats.in_bytes,
                    "OutBytes": stats.out_bytes,
                },
            }
        )
    pool = svc.pool.status()
    doc = {
        "Volumes": volumes,
        "BufferPool": {
            "BuffersMax": pool.max_buffers,
            "BuffersInUse": pool.in_use,
            "BytesAllocated": pool.bytes_allocated,
            "Waiting": pool.waiting,
        },
        "PullQueue": svc.pull_queue.status().as_json(),
        "TrashQueue": svc.trash_queue.status().as_json(),
        "RequestsCurrent": svc.limiter.active,
        "RequestsMax": svc.limiter.max_concurrent,
        "RequestsQueued": sum(svc.limiter.queued().values()),
        "Version": __version__,
    }
    return _json(doc)


async def inspect_requests(call: Call, match: re.Match[str]) -> web.StreamResponse:
    token = call.service.config.management_token
    header = call.request.headers.get("Authorization", "")
    if not token or not same_token(header, "Bearer " + token):
        return web.Response(status=401, body=b'{"errors":["unauthorized"]}\n', content_type="application/json")
    now = time.monotonic()
    out = []
    assert call.service.http is not None
    for c in call.service.http.in_flight.values():
        r = c.request
        out.append(
            {
                "RequestID": c.request_id,
                "Method": r.method,
                "Host": r.host,
                "URL": c.fields.get("reqPath", ""),
                "RemoteAddr": c.fields.get("remoteAddr", ""),
                "XForwardedFor": r.headers.get("X-Forwarded-For", ""),
                "Elapsed": round(now - c.started, 6),
            }
        )
    out.sort(key=lambda d: float(d["Elapsed"]))  # type: ignore[arg-type]
    return _json(out)


def _json(doc: object) -> web.Response:
    return web.Response(status=200, body=(json.dumps(doc) + "\n").encode(), content_type="application/json")

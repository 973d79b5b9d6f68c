"""Operational endpoints, served before the limiter and without CORS headers (SPEC §2.15)."""

from __future__ import annotations

import re

from aiohttp import web

from .app import Call, Handler, text_response
from .auth import same_token


def routes() -> dict[str, Handler]:
    return {"/_health/ping": health}


async def health(call: Call, match: re.Match[str]) -> web.StreamResponse:
    request = call.request
    token = call.service.config.management_token
    if request.method != "GET":
        return text_response(405, "Method Not Allowed\n")
    if not token:
        return text_response(404, "disabled\n")
    header = request.headers.get("Authorization")
    if header is None:
        return text_response(401, "authorization required\n")
    if not same_token(header, "Bearer " + token):
        return text_response(403, "authorization error\n")
    return web.Response(status=200, body=b'{"health":"OK"}\n', content_type="application/json")

"""Pull and trash lists: parsed and validated whole before they replace a queue (deliberate difference 6).

The Go keepstore answers 500 to undecodable JSON and checks only the first pull item for a size hint, skipping bad
items later in the worker. Here any problem rejects the whole list with 400 and a message naming the item, and the
queue keeps its previous content: a data manager learns at once that it sent something wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import InvalidList, KeepError
from ..locator import Locator, parse_locator


@dataclass(frozen=True)
class PullRequest:
    locator: Locator
    servers: tuple[str, ...]
    mount_uuid: str | None


@dataclass(frozen=True)
class TrashRequest:
    locator: Locator
    block_mtime: int  # nanoseconds, as in the index
    mount_uuid: str | None


def _decode(body: bytes) -> list[Any]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidList(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise InvalidList("invalid JSON: nested too deeply") from None
    if not isinstance(doc, list):
        raise InvalidList(f"expected a JSON array, got {type(doc).__name__}")
    return doc


def _item(n: int, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidList(f"item {n}: expected an object, got {type(raw).__name__}")
    return raw


def _locator(n: int, item: dict[str, Any]) -> Locator:
    text = item.get("locator")
    if not isinstance(text, str):
        raise InvalidList(f'item {n}: "locator" must be a string')
    try:
        return parse_locator(text)
    except KeepError:
        raise InvalidList(f"item {n}: invalid locator {text[:80]!r}") from None


def _mount(n: int, item: dict[str, Any]) -> str | None:
    uuid = item.get("mount_uuid")
    if uuid is None or uuid == "":
        return None
    if not isinstance(uuid, str):
        raise InvalidList(f'item {n}: "mount_uuid" must be a string')
    return uuid


def parse_pull_list(body: bytes) -> list[PullRequest]:
    out = []
    for n, raw in enumerate(_decode(body)):
        item = _item(n, raw)
        loc = _locator(n, item)
        if loc.size is None:
            raise InvalidList(
                f"item {n}: locator {loc.hash} has no size hint -- this probably means keep-balance needs to be "
                "upgraded"
            )
        servers = item.get("servers")
        if not isinstance(servers, list) or not servers or not all(isinstance(s, str) for s in servers):
            raise InvalidList(f'item {n}: "servers" must be an array of URLs, not empty')
        for s in servers:
            if not _is_http_url(s):
                raise InvalidList(f"item {n}: server {s[:80]!r} is not an http(s) URL")
        out.append(PullRequest(loc, tuple(s.rstrip("/") for s in servers), _mount(n, item)))
    return out


def _is_http_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises on a malformed port
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. a malformed IPv6 literal
        return False


_INT64 = (-(1 << 63), (1 << 63) - 1)


def parse_trash_list(body: bytes) -> list[TrashRequest]:
    out = []
    for n, raw in enumerate(_decode(body)):
        item = _item(n, raw)
        loc = _locator(n, item)
        mtime = item.get("block_mtime")
        if not isinstance(mtime, int) or isinstance(mtime, bool) or not _INT64[0] <= mtime <= _INT64[1]:
            raise InvalidList(f'item {n}: "block_mtime" must be an integer (nanoseconds) that fits in 64 bits')
        out.append(TrashRequest(loc, mtime, _mount(n, item)))
    return out

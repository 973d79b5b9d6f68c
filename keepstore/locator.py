"""Block locators: keepstore's own lenient parser (SPEC §3.2).

A locator is ``<32 lowercase hex>[+<size>][+<hint>...]``. keepstore accepts more than the documented grammar (hint
contents are not validated) because the Go keepstore does and clients rely on it; it rejects empty parts, a hash that
is not exactly 32 lowercase hex digits, and any hint after the first that starts with a digit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidLocator

EMPTY_BLOCK_HASH = "d41d8cd98f00b204e9800998ecf8427e"
BLOCK_SIZE = 1 << 26  # 64 MiB, the largest block Keep stores.

_HASH_RE = re.compile(r"[0-9a-f]{32}")
_SIZE_RE = re.compile(r"[0-9]+")
# Go's strconv.Atoi fails on values that do not fit in an int64; such a "size" is then treated as absent.
_MAX_INT64 = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Locator:
    hash: str
    size: int | None  # None when the locator carries no size hint
    signed: bool  # has a +A hint
    remote: bool  # has a +R hint
    text: str  # the locator exactly as given (signature verification needs it whole)


def is_hash(text: str) -> bool:
    return len(text) == 32 and _HASH_RE.fullmatch(text) is not None


# The shape nearly every request has (hash+size, maybe +A<signature>@<expiry>), recognised in one match.
_COMMON_RE = re.compile(r"([0-9a-f]{32})\+([0-9]{1,18})(\+A[0-9a-zA-Z@_-]+)?")


def parse_locator(text: str) -> Locator:
    """Parse ``text`` the way the Go keepstore's ``getLocatorInfo`` does, or raise :class:`InvalidLocator`.

    Deliberate difference: Go's Atoi accepts a negative size hint (``+-1``) and then behaves inconsistently; here a
    second part that is not all digits is simply "not a size", so ``+-1`` is a hint, not a size.
    """
    m = _COMMON_RE.fullmatch(text)
    if m is not None:
        return Locator(hash=m[1], size=int(m[2]), signed=m[3] is not None, remote=False, text=text)
    parts = text.split("+")
    if any(p == "" for p in parts):
        raise InvalidLocator()
    digest = parts[0]
    if not is_hash(digest):
        raise InvalidLocator()
    size: int | None = None
    signed = remote = False
    for i, part in enumerate(parts[1:], start=1):
        first = part[0]
        if i == 1 and _SIZE_RE.fullmatch(part):
            value = int(part)
            size = value if value <= _MAX_INT64 else None
            continue
        if i > 1 and first.isascii() and first.isdigit():
            # size, if present at all, must come first
            raise InvalidLocator()
        if first == "A":
            signed = True
        elif first == "R":
            remote = True
    return Locator(hash=digest, size=size, signed=signed, remote=remote, text=text)

"""Permission signatures on locators (SPEC §3.3–3.5), byte-for-byte as Arvados computes them.

    message   = hash "@" token "@" expiry_hex8 "@" ttl_hex
    signature = hex(HMAC-SHA1(key, message))
    signed    = locator "+A" signature "@" expiry_hex8

The TTL is part of the message, so signer and verifier must agree on BlobSigningTTL as well as on the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidSignature, SignatureExpired

# Group 1: hash, 2: signature, 3: expiry. [[:xdigit:]] in Go's regexp is case-insensitive, so an uppercase
# signature matches here and then fails the (case-sensitive) comparison, as it does upstream.
_SIGNED_RE = re.compile(
    r"([0-9a-fA-F]{32})(?:\+[0-9]+)?(?:\+[B-Z][A-Za-z0-9@_-]*)*"
    r"\+A([0-9a-fA-F]{40})@([0-9a-fA-F]{8})(?:\+[B-Z][A-Za-z0-9@_-]*)*"
)

_SHA1_BLOCK = 64


@dataclass(frozen=True)
class Signer:
    """Signs and verifies locators with one key and TTL (whole seconds)."""

    key: bytes
    ttl: int
    # HMAC's keyed inner and outer SHA-1 states (RFC 2104), computed once: a signature is then two state copies and
    # two short hashes, 0.7 us against 1.6 us for OpenSSL's one-shot HMAC, which sets up its key on every call.
    _inner: Any = field(init=False, repr=False, compare=False)
    _outer: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = hashlib.sha1(self.key).digest() if len(self.key) > _SHA1_BLOCK else self.key
        key = key.ljust(_SHA1_BLOCK, b"\0")
        object.__setattr__(self, "_inner", hashlib.sha1(bytes(b ^ 0x36 for b in key)))
        object.__setattr__(self, "_outer", hashlib.sha1(bytes(b ^ 0x5C for b in key)))

    def signature(self, hash_: str, token: str, expiry_hex: str) -> str:
        inner = self._inner.copy()
        inner.update(f"{hash_}@{token}@{expiry_hex}@{self.ttl:x}".encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        signature: str = outer.hexdigest()
        return signature

    def sign(self, locator: str, token: str, expiry: int | None = None) -> str:
        """Return ``locator`` with a ``+A`` hint for ``token``; expiry defaults to now + TTL."""
        if expiry is None:
            expiry = int(time.time()) + self.ttl
        expiry_hex = f"{expiry:08x}"
        return f"{locator}+A{self.signature(locator[:32], token, expiry_hex)}@{expiry_hex}"

    def verify(self, locator: str, token: str, now: float | None = None) -> None:
        """Raise :class:`SignatureExpired` or :class:`InvalidSignature` unless ``locator`` is validly signed.

        The expiry is checked before the HMAC (an expired forgery gets 401, not 400), an expiry equal to now is
        still valid, and there is no upper bound on expiry: all as upstream.
        """
        m = _SIGNED_RE.fullmatch(locator)
        if m is None:
            raise InvalidSignature()
        hash_, sig, expiry_hex = m.group(1), m.group(2), m.group(3)
        if int(expiry_hex, 16) < (time.time() if now is None else now):
            raise SignatureExpired()
        expected = self.signature(hash_, token, expiry_hex)
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            raise InvalidSignature()

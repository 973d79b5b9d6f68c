"""Tokens from a request, collected the way Arvados does (SPEC §2.2), and the literal-token checks."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from ..errors import Forbidden, Unauthorized

if TYPE_CHECKING:
    from .app import Incoming


def request_tokens(request: Incoming) -> list[str]:
    """All tokens the request presents, in Arvados' order: Authorization (Bearer/OAuth2), Basic password,
    ``api_token`` query parameters, ``arvados_api_token`` cookie (base64url)."""
    tokens: list[str] = []
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme in ("Bearer", "OAuth2") and value.strip():
        tokens.append(value.strip())
    elif scheme == "Basic" and value:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
            _, sep, password = decoded.partition(":")
            if sep and password:
                tokens.append(password)
        except (binascii.Error, UnicodeDecodeError):
            pass
    query = request.raw_path.partition("?")[2]
    if query:
        tokens.extend(v for k, v in parse_qsl(query, keep_blank_values=False) if k == "api_token" and v)
    cookie = request.cookies.get("arvados_api_token")
    if cookie:
        try:
            padded = cookie + "=" * (-len(cookie) % 4)
            token = base64.urlsafe_b64decode(padded).decode()
            if token:
                tokens.append(token)
        except (binascii.Error, UnicodeDecodeError):
            pass
    return tokens


def same_token(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def require_root(request: Incoming, root_token: str) -> None:
    """Admin routes: 401 with no token, 403 unless some token equals the root token.

    Deliberate difference 8: with an empty SystemRootToken the admin routes are closed (403), not open.
    """
    if not root_token:
        raise Forbidden()
    tokens = request_tokens(request)
    if not tokens:
        raise Unauthorized()
    if not any(same_token(t, root_token) for t in tokens):
        raise Forbidden()

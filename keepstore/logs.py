"""Structured logs in the shape Arvados services write (logrus): one JSON object per line, keys sorted.

Every line carries ``PID`` and ``ClusterID``; request lines carry ``RequestID``. Callers attach fields with
``log.info("msg", extra={"fields": {...}})``. Nothing that can hold a secret is logged: paths and queries are
passed through :func:`redact` first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
import sys
import time
from typing import Any

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}

_SIG_RE = re.compile(r"\+A[0-9a-fA-F]{40}@")
_REMOTE_SIG_RE = re.compile(r"(\+R[A-Za-z0-9]{5}-)[0-9a-fA-F]{40}@")
_TOKEN_QUERY_RE = re.compile(r"(api_token=)[^&]*")


_ID_ALPHABET = string.digits + string.ascii_lowercase


def new_request_id() -> str:
    """``req-`` and 20 characters of [0-9a-z], as Arvados generates them."""
    return "req-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


def redact(text: str) -> str:
    """Remove signatures from locators and tokens from query strings."""
    text = _SIG_RE.sub("+A(redacted)@", text)
    text = _REMOTE_SIG_RE.sub(r"\1(redacted)@", text)
    return _TOKEN_QUERY_RE.sub(r"\1(redacted)", text)


def _timestamp(created: float) -> str:
    ns = int(created * 1e9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d}Z"


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, cluster_id: str) -> None:
        super().__init__()
        self.json = fmt == "json"
        self.static = {"PID": os.getpid(), "ClusterID": cluster_id}

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(self.static)
        fields.update(getattr(record, "fields", {}) or {})
        fields["level"] = _LEVEL_NAMES.get(record.levelno, "info")
        # Redacted here too, not only by callers: aiohttp's own messages can quote a request line.
        fields["msg"] = redact(record.getMessage())
        fields["time"] = _timestamp(record.created)
        if record.exc_info:
            fields["error"] = redact(self.formatException(record.exc_info))
        if self.json:
            return json.dumps(fields, sort_keys=True, default=str)
        head = f'time="{fields.pop("time")}" level={fields.pop("level")} msg={json.dumps(fields.pop("msg"))}'
        rest = " ".join(f"{k}={_text_value(v)}" for k, v in sorted(fields.items()))
        return f"{head} {rest}" if rest else head


def _text_value(v: Any) -> str:
    s = str(v)
    return s if s and re.fullmatch(r"[A-Za-z0-9_.:/@+-]+", s) else json.dumps(s)


def setup(fmt: str = "json", level: str = "info", cluster_id: str = "", stream: Any = None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(fmt, cluster_id))
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # aiohttp's own access log duplicates ours; its error log is useful.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

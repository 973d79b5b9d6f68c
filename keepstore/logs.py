"""Structured logs in the shape Arvados services write (logrus): one JSON object per line, keys sorted.

Every line carries ``PID`` and ``ClusterID``; request lines carry ``RequestID``. Callers attach fields with
``log.info("msg", extra={"fields": {...}})``. Nothing that can hold a secret is logged: paths and queries are
passed through :func:`redact` first.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import random
import re
import string
import sys
import threading
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
_ID_TABLE = bytes((_ID_ALPHABET[b % 36]).encode()[0] for b in range(256))


def new_request_id() -> str:
    """``req-`` and 20 characters of [0-9a-z], as Arvados generates them.

    20 random bytes mapped onto 36 characters (a slight bias toward 0-3 does not matter: an id must be unique, not
    secret); ~1 us where 20 ``secrets.choice`` calls cost ~40. The bytes come from the ``random`` module (reseeded
    in every forked worker by Python itself), not ``os.urandom``: a getrandom(2) per request cost 3 % of a small
    PUT's event-loop time on this class of virtual machine.
    """
    return "req-" + random.randbytes(20).translate(_ID_TABLE).decode()


def redact(text: str) -> str:
    """Remove signatures from locators and tokens from query strings."""
    if "+A" in text:
        text = _SIG_RE.sub("+A(redacted)@", text)
    if "+R" in text:
        text = _REMOTE_SIG_RE.sub(r"\1(redacted)@", text)
    if "api_token" in text:
        text = _TOKEN_QUERY_RE.sub(r"\1(redacted)", text)
    return text


_ts_cache: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    global _ts_cache
    ns = int(created * 1e9)
    sec = ns // 1_000_000_000
    if _ts_cache[0] != sec:
        _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_ts_cache[1]}.{ns % 1_000_000_000:09d}Z"


_ATOMIC_WRITE = 4096  # PIPE_BUF on Linux


class _Output:
    """Where log lines go: buffered in memory and written out in batches.

    A busy server logs two lines per request; one write(2) per line would cost more than the request itself. Lines
    are appended here and written when the running event loop next gets to it (at most 20 ms later), when 64 KiB
    have piled up, at once for warnings and errors, and at exit. With no running loop (start-up, threads, tests)
    every line is written immediately.
    """

    FLUSH_DELAY = 0.02
    FLUSH_BYTES = 64 * 1024

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._scheduled = False

    def write(self, line: str, urgent: bool = False) -> None:
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            big = self._size >= self.FLUSH_BYTES
        if urgent or big:
            self.flush()
            return
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_later(self.FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
            self._scheduled = False
        if lines:
            try:
                # Several worker processes may share stderr (a pipe to journald): writes of at most PIPE_BUF
                # bytes are atomic, so lines from different processes never interleave mid-line.
                chunk: list[str] = []
                size = 0
                for line in lines:
                    if chunk and size + len(line) > _ATOMIC_WRITE:
                        self.stream.write("".join(chunk))
                        self.stream.flush()
                        chunk, size = [], 0
                    chunk.append(line)
                    size += len(line)
                self.stream.write("".join(chunk))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed: nothing sensible to do


class _Handler(logging.Handler):
    def __init__(self, output: _Output) -> None:
        super().__init__()
        self.output = output

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self.output.write(line, urgent=record.levelno >= logging.WARNING)

    def flush(self) -> None:
        self.output.flush()


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, cluster_id: str) -> None:
        super().__init__()
        self.json = fmt == "json"
        self.static = {"PID": os.getpid(), "ClusterID": cluster_id}
        self.prefix = f'{{"ClusterID":{_json_str(cluster_id)},"PID":{os.getpid()},'  # for the per-request lines

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        # Redacted here too, not only by callers: aiohttp's own messages can quote a request line.
        error = redact(self.formatException(record.exc_info)) if record.exc_info else None
        return self.line(record.levelno, redact(record.getMessage()), fields, record.created, error)

    def line(self, level: int, msg: str, fields: dict[str, Any], created: float, error: str | None = None) -> str:
        fields = {**self.static, **fields}
        fields["level"] = _LEVEL_NAMES.get(level, "info")
        fields["msg"] = msg
        fields["time"] = _timestamp(created)
        if error is not None:
            fields["error"] = error
        if self.json:
            return "{" + ",".join(f"{_json_str(k)}:{_json_value(fields[k])}" for k in sorted(fields)) + "}"
        head = f'time="{fields.pop("time")}" level={fields.pop("level")} msg={json.dumps(fields.pop("msg"))}'
        rest = " ".join(f"{k}={_text_value(v)}" for k, v in sorted(fields.items()))
        return f"{head} {rest}" if rest else head


_json_str = json.encoder.encode_basestring_ascii  # the C implementation


def _json_value(v: Any) -> str:
    """JSON for one log field; the common types by hand (several times faster than json.dumps per line)."""
    if isinstance(v, str):
        return _json_str(v)
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else "null"
    return json.dumps(v, default=str, separators=(",", ":"))


def _text_value(v: Any) -> str:
    s = str(v)
    return s if s and re.fullmatch(r"[A-Za-z0-9_.:/@+-]+", s) else json.dumps(s)


_formatter = _Formatter("json", "")
_output = _Output(sys.stderr)
_root = logging.getLogger()
atexit.register(lambda: _output.flush())


def fast_info(msg: str, fields: dict[str, Any]) -> None:
    """Log an info line without the logging module's per-record machinery (for per-request lines).

    Callers pass fields that are already free of secrets.
    """
    if _root.isEnabledFor(logging.INFO):
        _output.write(_formatter.line(logging.INFO, msg, fields, time.time()) + "\n")


def flush() -> None:
    _output.flush()


def after_fork() -> None:
    """In a forked worker: lines must carry the worker's own PID."""
    _formatter.static["PID"] = os.getpid()
    _formatter.prefix = f'{{"ClusterID":{_json_str(str(_formatter.static["ClusterID"]))},"PID":{os.getpid()},'


# Per-request lines, the hottest log path: the JSON is assembled from fragments in the fixed sorted key order
# (ClusterID, PID, RequestID, error, level, msg, remoteAddr, reqBytes, reqForwardedFor, reqHost, reqMethod, reqPath,
# reqQuery, respBody, respBytes, respStatus, respStatusCode, time, timeToStatus, timeTotal, timeWriteBody), and
# the request fields are encoded once for both lines.
_REQUEST_KEYS = ("remoteAddr", "reqBytes", "reqForwardedFor", "reqHost", "reqMethod", "reqPath", "reqQuery")


def request_lines_enabled() -> bool:
    """Whether the per-request "request"/"response" lines are written (LogLevel info or debug)."""
    return _root.isEnabledFor(logging.INFO)


def log_request(fields: dict[str, Any]) -> str:
    """Write the "request" line; return the encoded request fields for :func:`log_response`."""
    if not _formatter.json:
        fast_info("request", fields)
        return ""
    shared = ",".join(f'"{k}":{_json_value(fields[k])}' for k in _REQUEST_KEYS)
    if _root.isEnabledFor(logging.INFO):
        rid = _json_str(fields["RequestID"])
        _output.write(
            f'{_formatter.prefix}"RequestID":{rid},"level":"info","msg":"request",{shared},'
            f'"time":"{_timestamp(time.time())}"}}\n'
        )
    return shared


def log_response(fields: dict[str, Any], shared: str, resp: dict[str, Any]) -> None:
    """Write the "response" line: the request fields plus ``resp`` (respStatusCode, timeTotal, ...)."""
    if not _root.isEnabledFor(logging.INFO):
        return
    if not _formatter.json:
        fast_info("response", {**fields, **resp})
        return
    rid = _json_str(fields["RequestID"])
    error = f'"error":{_json_str(fields["error"])},' if "error" in fields else ""
    body = f'"respBody":{_json_str(resp["respBody"])},' if "respBody" in resp else ""
    _output.write(
        f'{_formatter.prefix}"RequestID":{rid},{error}"level":"info","msg":"response",{shared},{body}'
        f'"respBytes":{resp["respBytes"]},"respStatus":{_json_str(resp["respStatus"])},'
        f'"respStatusCode":{resp["respStatusCode"]},"time":"{_timestamp(time.time())}",'
        f'"timeToStatus":{resp["timeToStatus"]!r},"timeTotal":{resp["timeTotal"]!r},'
        f'"timeWriteBody":{resp["timeWriteBody"]!r}}}\n'
    )


def setup(fmt: str = "json", level: str = "info", cluster_id: str = "", stream: Any = None) -> None:
    global _formatter, _output
    for h in list(_root.handlers):
        _root.removeHandler(h)
    _output.flush()
    _output = _Output(stream or sys.stderr)
    _formatter = _Formatter(fmt, cluster_id)
    handler = _Handler(_output)
    handler.setFormatter(_formatter)
    _root.addHandler(handler)
    _root.setLevel(_LEVELS.get(level, logging.INFO))
    # aiohttp's own access log duplicates ours; its error log is useful.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

"""Serving https: the server's TLS context, from the cluster's TLS.Certificate and TLS.Key, reloadable.

As in Arvados (lib/service/tls.go), an ``https://`` listen URL (the InternalURL's ListenURL, else the InternalURL)
makes keepstore serve TLS with the key pair named by ``Clusters.<id>.TLS.Certificate`` and ``TLS.Key``
(``file://`` URLs or absolute paths), at TLS 1.2 or later with forward-secret AEAD suites only. SIGHUP loads the
files again, and so does an hourly look at them (certificate renewal without a restart). A pair that fails to load
at start-up is a config error naming the key; one that fails later is logged and the pair in use is kept.

A reload builds a new context and swaps it in: loading a pair into the context in use would add to what it
holds (an RSA certificate stays offered beside a new ECDSA one) instead of replacing it. The swap happens in the
listening context's SNI callback, which OpenSSL runs for every ClientHello (with or without SNI), so a listening
socket created once, by asyncio or by keepstore.accept, serves whatever pair is current.
"""

from __future__ import annotations

import logging
import os
import ssl
from asyncio import sslproto

from .config import Config, ConfigError

log = logging.getLogger("keepstore")

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
# TLS 1.2 suites (1.3's are all AEAD and forward-secret already), as Arvados restricts them.
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
CHECK_INTERVAL = 3600.0  # seconds between looks at the key pair files (SIGHUP reloads at once)
# asyncio gives every TLS connection a read buffer of SSLProtocol.max_size (256 KiB) from its first byte, idle
# keep-alive connections and handshakes that never finish included: 64 KiB, as plain connections read.
READ_SIZE = 64 * 1024


class ServerTLS:
    """The TLS side of one server process: ``context`` to listen with, ``reload()`` to take the files again."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._stamp = _stamp(config)  # before the load: a change written meanwhile is seen next time
        # The first pair is the listening context's own; a reload's is swapped in by _pick.
        self._current = self.context = _load(config)  # ConfigError (naming the key) if the pair does not load
        self.context.sni_callback = self._pick
        _shrink_read_buffer()

    def reload(self) -> bool:
        """Load the key pair again for new connections; whether that worked. Never raises."""
        stamp = _stamp(self._config)  # before the load: a change written meanwhile is seen next time
        try:
            self._current = _load(self._config)
        except ConfigError as exc:
            log.warning("TLS certificate not reloaded: keeping the one in use", extra={"fields": {"error": str(exc)}})
            return False
        self._stamp = stamp
        log.info("TLS certificate reloaded", extra={"fields": {"certificate": self._config.tls_certificate}})
        return True

    def reload_if_changed(self) -> None:
        """Reload if either file has changed since it was loaded (the hourly look)."""
        if _stamp(self._config) != self._stamp:
            self.reload()

    def _pick(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if self._current is not context:
            ssl_object.context = self._current


def check(config: Config) -> None:
    """ConfigError (naming the key) unless the configured key pair loads."""
    _load(config)


def _load(config: Config) -> ssl.SSLContext:
    base = f"Clusters.{config.cluster_id}.TLS"
    for key, path in (("Certificate", config.tls_certificate), ("Key", config.tls_key)):
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
        except OSError as exc:
            raise ConfigError(f"{base}.{key}", f"cannot read {path}: {exc.strerror or exc}") from None
        if key == "Certificate" and _PEM_CERTIFICATE not in head:
            raise ConfigError(f"{base}.Certificate", f"{path} holds no PEM certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_ciphers(_CIPHERS)
    try:
        # An empty password, not OpenSSL's default of asking on the terminal: a daemon has no one to ask.
        ctx.load_cert_chain(config.tls_certificate, config.tls_key, password=lambda: b"")
    except ssl.SSLError as exc:
        # The certificate file has a PEM certificate (checked above): what is wrong is the key, or the pair.
        raise ConfigError(
            f"{base}.Key", f"{config.tls_key} is not the private key of {config.tls_certificate}: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        # A file replaced or removed since the look above (a renewal that deletes and writes anew).
        raise ConfigError(base, f"cannot load {exc.filename or 'the key pair'}: {exc.strerror or exc}") from None
    return ctx


def _stamp(config: Config) -> tuple[tuple[int, int, int], ...]:
    out = []
    for path in (config.tls_certificate, config.tls_key):
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


def _shrink_read_buffer() -> None:
    protocol = getattr(sslproto, "SSLProtocol", None)
    if protocol is not None and getattr(protocol, "max_size", 0) > READ_SIZE:
        protocol.max_size = READ_SIZE

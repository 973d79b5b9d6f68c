"""Serving https: the server's TLS context, from the cluster's TLS.Certificate and TLS.Key, reloadable on SIGHUP.

As in Arvados (lib/service/tls.go), an ``https://`` InternalURL (or ListenURL) makes keepstore serve TLS with the
key pair named by ``Clusters.<id>.TLS.Certificate`` and ``TLS.Key``, both ``file://`` URLs, at TLS 1.2 or later;
SIGHUP loads the files again (certificate renewal without a restart). A pair that fails to load at start-up is a
config error naming the key; one that fails on SIGHUP is logged and the pair in use is kept.
"""

from __future__ import annotations

import logging
import ssl

from .config import Config, ConfigError

log = logging.getLogger("keepstore")

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def server_context(config: Config) -> ssl.SSLContext:
    """A TLS server context holding the configured key pair; ConfigError (naming the key) if it cannot be loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    _load(ctx, config)
    return ctx


def reload(ctx: ssl.SSLContext, config: Config) -> bool:
    """Load the key pair again into ``ctx`` (new connections get it); whether that worked. Never raises."""
    try:
        # Into a scratch context first: a certificate that loads with a key that does not would leave the live
        # context with the new certificate and the old key, and every handshake failing.
        _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), config)
        _load(ctx, config)
    except ConfigError as exc:
        log.warning("TLS certificate not reloaded: keeping the one in use", extra={"fields": {"error": str(exc)}})
        return False
    log.info("TLS certificate reloaded", extra={"fields": {"certificate": config.tls_certificate}})
    return True


def _load(ctx: ssl.SSLContext, config: Config) -> None:
    base = f"Clusters.{config.cluster_id}.TLS"
    for key, path in (("Certificate", config.tls_certificate), ("Key", config.tls_key)):
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
        except OSError as exc:
            raise ConfigError(f"{base}.{key}", f"cannot read {path}: {exc.strerror or exc}") from None
        if key == "Certificate" and _PEM_CERTIFICATE not in head:
            raise ConfigError(f"{base}.Certificate", f"{path} holds no PEM certificate")
    try:
        # An empty password, not OpenSSL's default of asking on the terminal: a daemon has no one to ask.
        ctx.load_cert_chain(config.tls_certificate, config.tls_key, password=lambda: b"")
    except ssl.SSLError as exc:
        # The certificate file has a PEM certificate (checked above): what is wrong is the key, or the pair.
        raise ConfigError(
            f"{base}.Key", f"{config.tls_key} is not the private key of {config.tls_certificate}: {exc.reason or exc}"
        ) from None

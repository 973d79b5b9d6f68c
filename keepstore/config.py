"""Configuration: an Arvados cluster config file, read into one typed, frozen object.

keepstore reads the same YAML file as the Go keepstore (``Clusters.<id>...``, SPEC §5.2, §10). Everything is
validated here, at start-up, and every error names the key path it is about, e.g.
``Clusters.zzzzz.Volumes.zzzzz-nyw5e-000000000000000.DriverParameters.Root: required``.

Keys that Arvados knows but keepstore does not use are ignored silently (a cluster config holds settings for every
Arvados service); keys that Arvados does not know either are reported as warnings, as they are probably typos.
Settings that only keepstore-py has live under ``Clusters.<id>.KeepstorePy`` so the file stays valid for Arvados.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_CONFIG_PATH = "/etc/arvados/config.yml"


class ConfigError(Exception):
    """A config problem; ``str()`` is one line naming the key path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


# ---------------------------------------------------------------------------------------------------------------
# Typed configuration


@dataclass(frozen=True)
class StorageClass:
    name: str
    priority: int = 0
    default: bool = False


@dataclass(frozen=True)
class VolumeSpec:
    """One entry of ``Volumes``, as this server sees it (AccessViaHosts already applied)."""

    uuid: str
    driver: str
    parameters: Mapping[str, Any]  # raw DriverParameters; each driver validates its own
    key_path: str  # "Clusters.<id>.Volumes.<uuid>", for error messages
    read_only: bool = False
    allow_trash_when_read_only: bool = False
    replication: int = 1
    storage_classes: tuple[str, ...] = ("default",)
    host_read_only: bool = False  # AccessViaHosts[<this server>].ReadOnly
    priority: int = 0  # highest Priority among the classes listed (an implicit "default" counts as 0)

    @property
    def allow_write(self) -> bool:
        return not self.read_only and not self.host_read_only

    @property
    def allow_trash(self) -> bool:
        return not self.host_read_only and (not self.read_only or self.allow_trash_when_read_only)


@dataclass(frozen=True)
class Config:
    cluster_id: str
    internal_url: str
    listen_host: str
    listen_port: int
    volumes: tuple[VolumeSpec, ...]
    tls: bool = False  # serve https (keepstore.tls), with this key pair (paths)
    tls_certificate: str = ""
    tls_key: str = ""
    tls_insecure: bool = False  # pull workers: accept any certificate from peers
    system_root_token: str = ""
    management_token: str = ""
    max_keep_blob_buffers: int = 128
    max_concurrent_requests: int = 64
    max_queued_requests: int = 128
    request_timeout: float = 300.0
    blob_signing: bool = True
    blob_signing_key: str = ""
    blob_signing_ttl: int = 336 * 3600
    blob_trash: bool = True
    blob_trash_lifetime: float = 336 * 3600.0
    blob_trash_check_interval: float = 24 * 3600.0
    blob_trash_concurrency: int = 4
    blob_delete_concurrency: int = 4
    blob_replicate_concurrency: int = 4
    storage_classes: Mapping[str, StorageClass] = field(default_factory=dict)
    log_format: str = "json"
    log_level: str = "info"
    # keepstore-py only (Clusters.<id>.KeepstorePy)
    drain_timeout: float = 30.0
    pull_connect_timeout: float = 5.0
    pull_read_timeout: float = 60.0
    workers: int = 0  # worker processes; 0 = one per CPU (see keepstore.multiproc)
    group_commit: bool = True  # small Directory-volume writes share syncfs calls (see keepstore.volumes.directory)
    direct_writes: bool = True  # Directory-volume block data written with O_DIRECT (see keepstore.volumes.directory)
    huge_page_buffers: bool = True  # block buffers in transparent huge pages (see keepstore.buffers)
    journal: bool = True  # group commits made durable through a write-ahead journal (see keepstore.volumes.journal)
    worker_stall_timeout: float = 60.0  # a worker whose event loop stops this long is restarted; 0 = never
    source: str = ""
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# Value parsers

_DURATION_RE = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse a Go duration string ("336h", "1h30m", "2.5s", "0") into seconds; raise ValueError."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f'invalid duration {text!r} (expected e.g. "336h", "5m", "1.5s")')
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


class _Reader:
    """Typed access to one mapping of the YAML tree, recording which keys were read."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(path, f"must be a mapping, not {_kind(data)}")
        self.data: dict[str, Any] = data
        self.path = path

    def sub(self, key: str) -> _Reader:
        return _Reader(self.data.get(key), f"{self.path}.{key}")

    def _get(self, key: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.path}.{key}", f"must be {what}, not a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(f"{self.path}.{key}", f"must be {what}, not {_kind(value)}")
        return value

    def string(self, key: str, default: str = "") -> str:
        return str(self._get(key, (str,), default, "a string"))

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._get(key, (bool,), default, "true or false"))

    def integer(self, key: str, default: int, minimum: int | None = None) -> int:
        value = int(self._get(key, (int,), default, "an integer"))
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.path}.{key}", f"must be at least {minimum}, not {value}")
        return value

    def duration(self, key: str, default: float) -> float:
        value = self._get(key, (str, int), None, 'a duration string like "5m"')
        if value is None:
            return default
        if isinstance(value, int):
            if value == 0:
                return 0.0
            raise ConfigError(f"{self.path}.{key}", f'missing unit in duration {value} (write e.g. "{value}s")')
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{self.path}.{key}", str(exc)) from None
        if seconds < 0:
            raise ConfigError(f"{self.path}.{key}", f"must not be negative, not {value!r}")
        return seconds


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


MIN_STALL_TIMEOUT = 2.0  # seconds: KeepstorePy.WorkerStallTimeout, when not 0

# ---------------------------------------------------------------------------------------------------------------
# Unknown-key detection

_OWN_KEYS: dict[str, Any] = {
    "KeepstorePy": {
        "DrainTimeout": None,
        "PullConnectTimeout": None,
        "PullReadTimeout": None,
        "Workers": None,
        "GroupCommit": None,
        "DirectWrites": None,
        "HugePageBuffers": None,
        "Journal": None,
        "WorkerStallTimeout": None,
    },
}


def _known_keys() -> dict[str, Any]:
    text = resources.files("keepstore").joinpath("data/arvados-config-keys.json").read_text()
    tree: dict[str, Any] = json.loads(text)
    tree.update(_OWN_KEYS)
    return tree


def _unknown_keys(data: Any, schema: Any, path: str) -> list[str]:
    if not isinstance(data, dict) or not isinstance(schema, dict):
        return []
    out: list[str] = []
    for key, value in data.items():
        sub = schema.get(str(key), schema.get("*", _MISSING)) if isinstance(schema, dict) else _MISSING
        if sub is _MISSING:
            out.append(f"{path}.{key}")
        else:
            out.extend(_unknown_keys(value, sub, f"{path}.{key}"))
    return out


_MISSING = object()


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_file(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the cluster config at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    return load_text(text, source=path, env=env)


def load_text(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{source}: invalid YAML: {exc}") from None
    return from_document(doc, source=source, env=os.environ if env is None else env)


def from_document(doc: Any, source: str, env: Mapping[str, str]) -> Config:
    top = _Reader(doc, "")
    clusters = top.data.get("Clusters")
    if not isinstance(clusters, dict) or not clusters:
        raise ConfigError("Clusters", "required: a mapping with exactly one cluster")
    if len(clusters) != 1:
        raise ConfigError("Clusters", f"must hold exactly one cluster, found {len(clusters)}: {sorted(clusters)}")
    ((cluster_id, cluster_doc),) = clusters.items()
    cluster_id = str(cluster_id)
    base = f"Clusters.{cluster_id}"
    c = _Reader(cluster_doc, base)

    warnings = [f"{k}: unknown config key (ignored)" for k in _unknown_keys(cluster_doc, _known_keys(), base)]
    warnings += [f"{k}: unknown top-level key (ignored)" for k in top.data if k != "Clusters"]

    internal_url, listen_url = _pick_internal_url(c, base, env)
    parsed = urlsplit(listen_url)
    tls = parsed.scheme == "https"
    port = parsed.port or (443 if tls else 80)
    tls_reader = c.sub("TLS")
    tls_certificate, tls_key = "", ""
    if tls:
        # Both files, as file:// URLs or absolute paths (Arvados takes either; keepstore.tls loads them).
        for key in ("Certificate", "Key"):
            value = tls_reader.string(key)
            path = value[len("file://") :] if value.startswith("file://") else value
            if not path.startswith("/"):
                raise ConfigError(
                    f"{base}.TLS.{key}",
                    f"required as a file:// URL or an absolute path (e.g. file:///etc/arvados/tls.{key.lower()}) "
                    f"to serve {listen_url}",
                )
            if key == "Certificate":
                tls_certificate = path
            else:
                tls_key = path

    api = c.sub("API")
    coll = c.sub("Collections")
    logs = c.sub("SystemLogs")
    own = c.sub("KeepstorePy")

    stall = own.duration("WorkerStallTimeout", 60.0)
    if 0 < stall < MIN_STALL_TIMEOUT:
        # Worker event loops record that they run once a second: a shorter timeout would kill healthy ones.
        raise ConfigError(
            f"{base}.KeepstorePy.WorkerStallTimeout",
            f"must be 0 (off) or at least {MIN_STALL_TIMEOUT:g}s, not {stall:g}s",
        )
    storage_classes = _storage_classes(c.sub("StorageClasses"))
    volumes = _volumes(c.sub("Volumes"), internal_url, storage_classes)

    blob_signing = coll.boolean("BlobSigning", True)
    blob_signing_key = coll.string("BlobSigningKey")
    if blob_signing and not blob_signing_key:
        raise ConfigError(f"{base}.Collections.BlobSigningKey", "required when Collections.BlobSigning is true")
    ttl = coll.duration("BlobSigningTTL", 336 * 3600.0)
    if ttl < 1:
        raise ConfigError(f"{base}.Collections.BlobSigningTTL", "must be at least 1s")

    log_format = logs.string("Format", "json") or "json"
    if log_format not in ("json", "text"):
        raise ConfigError(f"{base}.SystemLogs.Format", f'must be "json" or "text", not {log_format!r}')
    log_level = (logs.string("LogLevel", "info") or "info").lower()
    if log_level not in ("debug", "info", "warn", "warning", "error"):
        raise ConfigError(f"{base}.SystemLogs.LogLevel", f"must be debug, info, warn or error, not {log_level!r}")

    max_buffers = api.integer("MaxKeepBlobBuffers", 128)
    if max_buffers <= 0:
        raise ConfigError(f"{base}.API.MaxKeepBlobBuffers", "must be greater than zero")
    max_concurrent = api.integer("MaxConcurrentRequests", 64, minimum=0)
    if 0 < max_concurrent < max_buffers:
        warnings.append(
            f"Possible configuration mistake: not useful to set API.MaxKeepBlobBuffers ({max_buffers}) "
            f"higher than API.MaxConcurrentRequests ({max_concurrent})"
        )
    system_root_token = c.string("SystemRootToken")
    if not system_root_token:
        warnings.append(f"{base}.SystemRootToken is empty: admin routes (index, trash, pull, ...) answer 403")
    if not blob_signing_key:
        warnings.append(
            "Running without a blob signing key. Block locators returned by this server will not be signed, and "
            "will be rejected by a server that enforces permissions."
        )

    return Config(
        cluster_id=cluster_id,
        internal_url=internal_url,
        listen_host=parsed.hostname or "0.0.0.0",
        listen_port=port,
        tls=tls,
        tls_certificate=tls_certificate,
        tls_key=tls_key,
        tls_insecure=tls_reader.boolean("Insecure", False),
        volumes=volumes,
        system_root_token=system_root_token,
        management_token=c.string("ManagementToken"),
        max_keep_blob_buffers=max_buffers,
        max_concurrent_requests=max_concurrent,
        max_queued_requests=api.integer("MaxQueuedRequests", 128, minimum=0),
        request_timeout=api.duration("RequestTimeout", 300.0),
        blob_signing=blob_signing,
        blob_signing_key=blob_signing_key,
        blob_signing_ttl=math.floor(ttl),
        blob_trash=coll.boolean("BlobTrash", True),
        blob_trash_lifetime=coll.duration("BlobTrashLifetime", 336 * 3600.0),
        blob_trash_check_interval=coll.duration("BlobTrashCheckInterval", 24 * 3600.0),
        blob_trash_concurrency=coll.integer("BlobTrashConcurrency", 4, minimum=0),
        blob_delete_concurrency=coll.integer("BlobDeleteConcurrency", 4, minimum=0),
        blob_replicate_concurrency=max(1, coll.integer("BlobReplicateConcurrency", 4, minimum=0)),
        storage_classes=storage_classes,
        log_format=log_format,
        log_level="warn" if log_level == "warning" else log_level,
        drain_timeout=own.duration("DrainTimeout", 30.0),
        pull_connect_timeout=own.duration("PullConnectTimeout", 5.0),
        pull_read_timeout=own.duration("PullReadTimeout", 60.0),
        workers=own.integer("Workers", 0, minimum=0),
        group_commit=own.boolean("GroupCommit", True),
        direct_writes=own.boolean("DirectWrites", True),
        huge_page_buffers=own.boolean("HugePageBuffers", True),
        journal=own.boolean("Journal", True),
        worker_stall_timeout=stall,
        source=source,
        warnings=tuple(warnings),
    )


def _pick_internal_url(c: _Reader, base: str, env: Mapping[str, str]) -> tuple[str, str]:
    """Return (InternalURL, URL to listen on), choosing among several InternalURLs the way Arvados does."""
    urls = c.sub("Services").sub("Keepstore").sub("InternalURLs")
    path = urls.path
    if not urls.data:
        raise ConfigError(path, 'required: the URL(s) this keepstore listens on, e.g. {"http://127.0.0.1:25107": {}}')
    for url in urls.data:
        _check_url(str(url), f"{path}.{url}")
    chosen = env.get("ARVADOS_SERVICE_INTERNAL_URL", "")
    if chosen:
        if chosen not in urls.data:
            raise ConfigError(path, f"ARVADOS_SERVICE_INTERNAL_URL={chosen} is not one of {sorted(urls.data)}")
    elif len(urls.data) == 1:
        chosen = str(next(iter(urls.data)))
    else:
        local = [str(u) for u in urls.data if _is_local(urlsplit(str(u)).hostname or "")]
        if len(local) != 1:
            raise ConfigError(
                path, "several URLs and none (or more than one) is on this host: set ARVADOS_SERVICE_INTERNAL_URL"
            )
        chosen = local[0]
    entry = urls.sub(chosen)
    listen = entry.string("ListenURL") or chosen
    if listen != chosen:
        _check_url(listen, f"{entry.path}.ListenURL")
    return chosen, listen


def _check_url(url: str, path: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(path, f"must be an http:// or https:// URL with a host, not {url!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(path, f"invalid port in {url!r}") from None


def _is_local(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


def _storage_classes(r: _Reader) -> dict[str, StorageClass]:
    out: dict[str, StorageClass] = {}
    for name in r.data:
        sc = r.sub(str(name))
        out[str(name)] = StorageClass(
            name=str(name), priority=sc.integer("Priority", 0), default=sc.boolean("Default", False)
        )
    return out


def _volumes(r: _Reader, internal_url: str, classes: Mapping[str, StorageClass]) -> tuple[VolumeSpec, ...]:
    if not r.data:
        raise ConfigError(r.path, "no volumes configured")
    out: list[VolumeSpec] = []
    for uuid in sorted(str(u) for u in r.data):
        v = r.sub(uuid)
        hosts = v.sub("AccessViaHosts")
        host_read_only = False
        if hosts.data:
            if internal_url not in hosts.data:
                continue  # this volume belongs to other keepstore servers
            host_read_only = hosts.sub(internal_url).boolean("ReadOnly", False)
        driver = v.string("Driver")
        if not driver:
            raise ConfigError(f"{v.path}.Driver", "required (e.g. Directory)")
        params = v.sub("DriverParameters")
        vol_classes = v.sub("StorageClasses")
        names = tuple(sorted(str(k) for k, on in vol_classes.data.items() if on is True))
        for k, on in vol_classes.data.items():
            if not isinstance(on, bool):
                raise ConfigError(f"{vol_classes.path}.{k}", "must be true or false")
        out.append(
            VolumeSpec(
                uuid=uuid,
                driver=driver,
                parameters=params.data,
                key_path=v.path,
                read_only=v.boolean("ReadOnly", False),
                allow_trash_when_read_only=v.boolean("AllowTrashWhenReadOnly", False),
                replication=max(1, v.integer("Replication", 1)),
                storage_classes=names if vol_classes.data else ("default",),
                host_read_only=host_read_only,
                priority=max([0] + [classes[n].priority for n in names if n in classes]),
            )
        )
    if not out:
        raise ConfigError(r.path, f"no volumes configured for {internal_url}")
    return tuple(out)

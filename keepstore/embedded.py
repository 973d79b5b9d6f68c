"""The embedded default: a ready-to-use single-node keepstore when no config file exists.

One Directory volume under ``<data dir>/blocks``, listening on 127.0.0.1:25107, signing on. The signing key, the
admin and management tokens and a client token for trying it out are generated on first start and kept in
``<data dir>/secrets.json`` (mode 0600), so a restart reuses them and earlier signed locators stay valid.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from dataclasses import dataclass
from typing import Any

from .config import Config, ConfigError, from_document
from .volumes.directory import fsync_dir

CLUSTER_ID = "zzzzz"
VOLUME_UUID = f"{CLUSTER_ID}-nyw5e-000000000000000"
_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class Secrets:
    system_root_token: str
    management_token: str
    blob_signing_key: str
    client_token: str


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def load_or_create_secrets(data_dir: str) -> Secrets:
    path = os.path.join(data_dir, "secrets.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        values = [doc[k] for k in ("SystemRootToken", "ManagementToken", "BlobSigningKey", "ClientToken")]
        if not all(isinstance(v, str) and v for v in values):
            raise ValueError("empty or non-string value")
        return Secrets(*values)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(path, f"unreadable secrets file ({exc}); fix or delete it to generate new secrets") from None
    s = Secrets(_random(50), _random(50), _random(64), _random(50))
    _makedirs_durably(data_dir, 0o700)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(
            {
                "SystemRootToken": s.system_root_token,
                "ManagementToken": s.management_token,
                "BlobSigningKey": s.blob_signing_key,
                "ClientToken": s.client_token,
            },
            f,
            indent=2,
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(data_dir)  # the rename: the tokens printed at start-up must survive a power cut
    return s


def _makedirs_durably(path: str, mode: int) -> None:
    """``os.makedirs``, with each directory it creates fsynced into its parent (a power cut must not take away the
    volume root with the blocks acknowledged in it)."""
    missing = []
    head = path
    while not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    os.makedirs(path, mode=mode, exist_ok=True)
    for made in reversed(missing):
        fsync_dir(os.path.dirname(made))


def embedded_config(data_dir: str, listen: str = "127.0.0.1:25107") -> tuple[Config, Secrets]:
    data_dir = os.path.abspath(data_dir)
    s = load_or_create_secrets(data_dir)
    root = os.path.join(data_dir, "blocks")
    _makedirs_durably(root, 0o755)
    doc: dict[str, Any] = {
        "Clusters": {
            CLUSTER_ID: {
                "SystemRootToken": s.system_root_token,
                "ManagementToken": s.management_token,
                "Services": {"Keepstore": {"InternalURLs": {f"http://{listen}": {}}}},
                "Collections": {"BlobSigning": True, "BlobSigningKey": s.blob_signing_key},
                # 16 x 64 MiB = 1 GiB of block buffers at most: a sane ceiling for a workstation.
                "API": {"MaxKeepBlobBuffers": 16},
                "Volumes": {VOLUME_UUID: {"Driver": "Directory", "DriverParameters": {"Root": root}}},
                "SystemLogs": {"Format": "text"},
            }
        }
    }
    return from_document(doc, source=f"<embedded default, {data_dir}>", env={}), s


def banner(config: Config, s: Secrets, data_dir: str) -> str:
    url = config.internal_url
    return f"""
keepstore: embedded default configuration (no --config given and no /etc/arvados/config.yml)
  listening on   {url}
  volume         {data_dir}/blocks
  secrets        {data_dir}/secrets.json (reused on restart)
  client token   {s.client_token}
  admin token    {s.system_root_token}   (SystemRootToken: index, trash, pull ...)
  mgmt token     {s.management_token}   (ManagementToken: /_health/ping, /metrics, /status.json)

Try it:
  TOKEN={s.client_token}
  echo 'hello keep' > hello.txt
  LOC=$(curl -sS -X PUT -H "Authorization: Bearer $TOKEN" --data-binary @hello.txt \\
        {url}/$(md5sum hello.txt | cut -d' ' -f1))
  echo $LOC
  curl -sS -H "Authorization: Bearer $TOKEN" {url}/$LOC
"""

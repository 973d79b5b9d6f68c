"""keepstore.tls.ServerTLS: loads, reloads, and what a reload does when the files are broken or go away."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from pathlib import Path

import pytest
import trustme

from keepstore import tls
from keepstore.aio import repeat
from keepstore.config import Config, ConfigError


def config_for(tmp_path: Path) -> Config:
    leaf = trustme.CA().issue_cert("127.0.0.1")
    leaf.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    return Config(
        cluster_id="zzzzz",
        internal_url="https://127.0.0.1:1",
        listen_host="127.0.0.1",
        listen_port=1,
        volumes=(),
        tls=True,
        tls_certificate=str(tmp_path / "tls.crt"),
        tls_key=str(tmp_path / "tls.key"),
    )


def test_reload_survives_a_file_that_goes_away_between_the_look_and_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = tls.ServerTLS(config_for(tmp_path))
    before = server._current

    def vanished(self: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "tls.key"))

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", vanished)
    assert server.reload() is False  # logged, not raised: the supervisor must survive a renewal in progress
    assert server._current is before


def test_a_missing_key_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    cfg = dataclasses.replace(config_for(tmp_path), tls_key=str(tmp_path / "gone.key"))
    with pytest.raises(ConfigError) as err:
        tls.ServerTLS(cfg)
    assert err.value.path == "Clusters.zzzzz.TLS.Key"


def test_reload_if_changed_takes_a_renewal_and_nothing_else(tmp_path: Path) -> None:
    cfg = config_for(tmp_path)
    server = tls.ServerTLS(cfg)
    first = server._current
    server.reload_if_changed()
    assert server._current is first  # unchanged files: nothing loaded
    config_for(tmp_path)  # a renewal over the same files
    server.reload_if_changed()
    assert server._current is not first


def test_repeat_goes_on_after_a_failing_call() -> None:
    calls = []

    async def main() -> None:
        def flaky() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("once")

        stop = repeat(0.01, flaky)
        await asyncio.sleep(0.1)
        stop()
        seen = len(calls)
        await asyncio.sleep(0.05)
        assert len(calls) == seen  # stopped

    asyncio.run(main())
    assert len(calls) >= 3

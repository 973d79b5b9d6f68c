"""Config loading and validation (SPEC §1.3, §5.2, §10): every error names its key path."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from keepstore import cli
from keepstore.config import Config, ConfigError, from_document, load_file, load_text, parse_duration
from keepstore.embedded import VOLUME_UUID, embedded_config
from keepstore.volumes import check_volume_specs
from keepstore.volumes.directory import DirectoryParameters, DirectoryVolume

UUID0 = "zzzzz-nyw5e-000000000000000"
UUID1 = "zzzzz-nyw5e-111111111111111"
UUID2 = "zzzzz-nyw5e-222222222222222"
URL = "http://127.0.0.1:25107"
REPO = Path(__file__).resolve().parents[2]


def make_doc(root: str = "/tmp", **cluster: Any) -> dict[str, Any]:
    """A minimal valid, warning-free config document; keyword arguments replace cluster-level keys."""
    c: dict[str, Any] = {
        "SystemRootToken": "roottoken",
        "ManagementToken": "mgmttoken",
        "Services": {"Keepstore": {"InternalURLs": {URL: {}}}},
        "Collections": {"BlobSigningKey": "signingkey"},
        "API": {"MaxKeepBlobBuffers": 16},
        "Volumes": {UUID0: {"Driver": "Directory", "DriverParameters": {"Root": root}}},
    }
    c.update(cluster)
    return {"Clusters": {"zzzzz": c}}


def load(doc: Any, env: dict[str, str] | None = None) -> Config:
    return from_document(doc, source="<test>", env=env or {})


def error(doc: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(doc, env)
    return str(info.value)


def with_key(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy ``doc`` with the dotted ``path`` (below Clusters.zzzzz) set to ``value``."""
    doc = copy.deepcopy(doc)
    node = doc["Clusters"]["zzzzz"]
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return doc


# --- minimal config and defaults -------------------------------------------------------------------------------


def test_minimal_config_and_defaults() -> None:
    c = load_text(yaml.safe_dump(make_doc()), env={})
    assert c.cluster_id == "zzzzz"
    assert c.internal_url == URL
    assert (c.listen_host, c.listen_port) == ("127.0.0.1", 25107)
    assert c.system_root_token == "roottoken"
    assert c.management_token == "mgmttoken"
    assert c.blob_signing is True
    assert c.blob_signing_key == "signingkey"
    assert c.blob_signing_ttl == 1209600
    assert c.blob_trash is True
    assert c.blob_trash_lifetime == 336 * 3600
    assert c.blob_trash_check_interval == 24 * 3600
    assert (c.blob_trash_concurrency, c.blob_delete_concurrency, c.blob_replicate_concurrency) == (4, 4, 4)
    assert c.max_keep_blob_buffers == 16
    assert (c.max_concurrent_requests, c.max_queued_requests) == (64, 128)
    assert c.request_timeout == 300
    assert c.warnings == ()
    assert c.source == "<string>"
    (v,) = c.volumes
    assert v.uuid == UUID0
    assert v.driver == "Directory"
    assert v.parameters == {"Root": "/tmp"}
    assert v.key_path == f"Clusters.zzzzz.Volumes.{UUID0}"
    assert v.storage_classes == ("default",)
    assert (v.replication, v.priority) == (1, 0)
    assert v.allow_write and v.allow_trash


def test_load_file_and_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(make_doc()))
    assert load_file(str(path), env={}).source == str(path)
    with pytest.raises(ConfigError) as info:
        load_file(str(tmp_path / "missing.yml"), env={})
    assert str(info.value).startswith(f"cannot read config file {tmp_path / 'missing.yml'}")


def test_invalid_yaml() -> None:
    with pytest.raises(ConfigError) as info:
        load_text("Clusters: [", source="bad.yml", env={})
    assert str(info.value).startswith("bad.yml: invalid YAML")
    assert "\n" not in str(info.value).split("invalid YAML")[0]


def test_frozen() -> None:
    c = load(make_doc())
    with pytest.raises(AttributeError):
        c.blob_signing_key = "x"  # type: ignore[misc]


# --- errors name the key path ------------------------------------------------------------------------------------


def test_no_clusters() -> None:
    assert error({}) == "Clusters: required: a mapping with exactly one cluster"
    assert error(None) == "Clusters: required: a mapping with exactly one cluster"
    assert error({"Clusters": {}}) == "Clusters: required: a mapping with exactly one cluster"


def test_several_clusters() -> None:
    doc = make_doc()
    doc["Clusters"]["yyyyy"] = copy.deepcopy(doc["Clusters"]["zzzzz"])
    msg = error(doc)
    assert msg.startswith("Clusters: must hold exactly one cluster, found 2")
    assert "yyyyy" in msg and "zzzzz" in msg


def test_blob_signing_without_key() -> None:
    doc = with_key(make_doc(), "Collections", {})
    assert error(doc) == "Clusters.zzzzz.Collections.BlobSigningKey: required when Collections.BlobSigning is true"
    doc = with_key(make_doc(), "Collections", {"BlobSigning": True, "BlobSigningKey": ""})
    assert error(doc).startswith("Clusters.zzzzz.Collections.BlobSigningKey: required")


def test_no_signing_key_with_signing_off_is_a_warning() -> None:
    c = load(with_key(make_doc(), "Collections", {"BlobSigning": False}))
    assert c.blob_signing is False and c.blob_signing_key == ""
    assert any("without a blob signing key" in w for w in c.warnings)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("Collections.BlobSigningTTL", "5x", "invalid duration '5x'"),
        ("Collections.BlobSigningTTL", "", "invalid duration ''"),
        ("Collections.BlobTrashLifetime", "1h-1m", "invalid duration"),
        ("Collections.BlobTrashCheckInterval", "h", "invalid duration"),
        ("API.RequestTimeout", "5", "invalid duration '5'"),
        ("API.RequestTimeout", "1.5.5s", "invalid duration"),
        ("API.RequestTimeout", "-5m", "must not be negative"),
        ("API.RequestTimeout", 300, 'missing unit in duration 300 (write e.g. "300s")'),
        ("API.RequestTimeout", 1.5, "must be a duration string"),
        ("API.RequestTimeout", True, "not a boolean"),
        ("API.RequestTimeout", [], "not a list"),
        ("KeepstorePy.DrainTimeout", "soon", "invalid duration"),
    ],
)
def test_bad_durations(key: str, value: Any, message: str) -> None:
    msg = error(with_key(make_doc(), key, value))
    assert msg.startswith(f"Clusters.zzzzz.{key}: ")
    assert message in msg


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("336h", 1209600.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("0", 0.0),
        ("2m30s", 150.0),
        ("1h0m0s", 3600.0),
        ("100us", 1e-4),
        ("100µs", 1e-4),
        ("3ns", 3e-9),
        (".5s", 0.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    c = load(with_key(make_doc(), "Collections.BlobTrashLifetime", text))
    assert c.blob_trash_lifetime == pytest.approx(seconds)


def test_integer_duration_zero_is_accepted() -> None:
    c = load(with_key(make_doc(), "Collections.BlobTrashLifetime", 0))
    assert c.blob_trash_lifetime == 0.0
    c = load(with_key(make_doc(), "Collections.BlobTrashCheckInterval", 0))
    assert c.blob_trash_check_interval == 0.0


@pytest.mark.parametrize("value", [1, 60, -1])
def test_other_integer_durations_are_rejected(value: int) -> None:
    msg = error(with_key(make_doc(), "Collections.BlobTrashLifetime", value))
    assert (
        msg == f'Clusters.zzzzz.Collections.BlobTrashLifetime: missing unit in duration {value} (write e.g. "{value}s")'
    )


def test_signing_ttl_is_whole_seconds_and_positive() -> None:
    assert load(with_key(make_doc(), "Collections.BlobSigningTTL", "1h")).blob_signing_ttl == 3600
    assert load(with_key(make_doc(), "Collections.BlobSigningTTL", "90.9s")).blob_signing_ttl == 90
    assert error(with_key(make_doc(), "Collections.BlobSigningTTL", "0")).startswith(
        "Clusters.zzzzz.Collections.BlobSigningTTL: "
    )


def test_no_volumes() -> None:
    doc = make_doc()
    del doc["Clusters"]["zzzzz"]["Volumes"]
    assert error(doc) == "Clusters.zzzzz.Volumes: no volumes configured"
    assert error(make_doc(Volumes={})) == "Clusters.zzzzz.Volumes: no volumes configured"


def test_volume_without_driver() -> None:
    msg = error(make_doc(Volumes={UUID0: {"DriverParameters": {"Root": "/tmp"}}}))
    assert msg.startswith(f"Clusters.zzzzz.Volumes.{UUID0}.Driver: required")


def test_unknown_driver(tmp_path: Path) -> None:
    # The driver name is checked with the driver parameters (keepstore.volumes.check_volume_specs).
    c = load(make_doc(Volumes={UUID0: {"Driver": "Bogus", "DriverParameters": {}}}))
    with pytest.raises(ConfigError) as info:
        check_volume_specs(c)
    assert str(info.value) == f"Clusters.zzzzz.Volumes.{UUID0}.Driver: unknown driver 'Bogus' (supported: Directory)"


def test_volume_not_a_mapping() -> None:
    assert error(make_doc(Volumes={UUID0: "Directory"})).startswith(
        f"Clusters.zzzzz.Volumes.{UUID0}: must be a mapping"
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("API.MaxKeepBlobBuffers", 0, "Clusters.zzzzz.API.MaxKeepBlobBuffers: must be greater than zero"),
        ("API.MaxKeepBlobBuffers", -1, "Clusters.zzzzz.API.MaxKeepBlobBuffers: must be greater than zero"),
        (
            "API.MaxKeepBlobBuffers",
            "x",
            "Clusters.zzzzz.API.MaxKeepBlobBuffers: must be an integer, not the string 'x'",
        ),
        ("API.MaxKeepBlobBuffers", True, "Clusters.zzzzz.API.MaxKeepBlobBuffers: must be an integer, not a boolean"),
        ("API.MaxConcurrentRequests", -1, "Clusters.zzzzz.API.MaxConcurrentRequests: must be at least 0, not -1"),
        (
            "Collections.BlobSigning",
            "yes",
            "Clusters.zzzzz.Collections.BlobSigning: must be true or false, not the string 'yes'",
        ),
        (
            "Collections.BlobTrashConcurrency",
            -2,
            "Clusters.zzzzz.Collections.BlobTrashConcurrency: must be at least 0, not -2",
        ),
        ("SystemRootToken", 12, "Clusters.zzzzz.SystemRootToken: must be a string, not int 12"),
        ("API", [], "Clusters.zzzzz.API: must be a mapping, not a list"),
        ("SystemLogs.Format", "xml", 'Clusters.zzzzz.SystemLogs.Format: must be "json" or "text", not \'xml\''),
        (
            "SystemLogs.LogLevel",
            "loud",
            "Clusters.zzzzz.SystemLogs.LogLevel: must be debug, info, warn or error, not 'loud'",
        ),
        (
            "Volumes." + UUID0 + ".ReadOnly",
            "no",
            f"Clusters.zzzzz.Volumes.{UUID0}.ReadOnly: must be true or false, not the string 'no'",
        ),
        (
            "Volumes." + UUID0 + ".StorageClasses",
            {"default": "yes"},
            f"Clusters.zzzzz.Volumes.{UUID0}.StorageClasses.default: must be true or false",
        ),
        (
            "Volumes." + UUID0 + ".Replication",
            "2",
            f"Clusters.zzzzz.Volumes.{UUID0}.Replication: must be an integer, not the string '2'",
        ),
    ],
)
def test_value_errors_name_the_key(key: str, value: Any, message: str) -> None:
    assert error(with_key(make_doc(), key, value)) == message


def test_errors_are_one_line() -> None:
    for doc in (make_doc(Volumes={}), with_key(make_doc(), "API.RequestTimeout", "x"), {}):
        assert "\n" not in error(doc)


def test_config_error_path_attribute() -> None:
    with pytest.raises(ConfigError) as info:
        load(with_key(make_doc(), "API.MaxKeepBlobBuffers", 0))
    assert info.value.path == "Clusters.zzzzz.API.MaxKeepBlobBuffers"


# --- the full chain: cli.load (config + driver parameters) and the DirectoryVolume constructor ------------------


def write_config(tmp_path: Path, doc: Any, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "DriverParameters.Root: required"),
        ({"Root": ""}, "DriverParameters.Root: required"),
        ({"Root": None}, "DriverParameters.Root: required"),
        ({"Root": "relative/dir"}, "DriverParameters.Root: must be an absolute path, not 'relative/dir'"),
        ({"Root": 5}, "DriverParameters.Root: must be a string"),
        ({"Root": "/tmp", "Serialize": "yes"}, "DriverParameters.Serialize: must be true or false"),
        ({"Root": "/tmp", "Rooot": "/tmp"}, "DriverParameters.Rooot: unknown parameter for the Directory driver"),
    ],
)
def test_directory_parameters_via_cli_load(tmp_path: Path, params: dict[str, Any], message: str) -> None:
    path = write_config(tmp_path, make_doc(Volumes={UUID0: {"Driver": "Directory", "DriverParameters": params}}))
    with pytest.raises(ConfigError) as info:
        cli.load(str(path))
    assert str(info.value) == f"Clusters.zzzzz.Volumes.{UUID0}.{message}"


def test_root_required_message_exactly(tmp_path: Path) -> None:
    path = write_config(tmp_path, make_doc(Volumes={UUID0: {"Driver": "Directory"}}))
    with pytest.raises(ConfigError) as info:
        cli.load(str(path))
    assert str(info.value) == f"Clusters.zzzzz.Volumes.{UUID0}.DriverParameters.Root: required"


def test_other_drivers_keys_are_accepted_in_directory_parameters(tmp_path: Path) -> None:
    params = {"Root": str(tmp_path), "Serialize": True, "Bucket": "", "Region": "", "StorageAccountName": ""}
    path = write_config(tmp_path, make_doc(Volumes={UUID0: {"Driver": "Directory", "DriverParameters": params}}))
    c = cli.load(str(path))
    assert DirectoryParameters.parse(c.volumes[0].parameters, c.volumes[0].key_path) == DirectoryParameters(
        root=str(tmp_path), serialize=True
    )


def test_unknown_driver_via_cli_load(tmp_path: Path) -> None:
    path = write_config(tmp_path, make_doc(Volumes={UUID0: {"Driver": "Azure", "DriverParameters": {}}}))
    with pytest.raises(ConfigError) as info:
        cli.load(str(path))
    assert str(info.value).startswith(f"Clusters.zzzzz.Volumes.{UUID0}.Driver: unknown driver 'Azure'")


def test_root_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    expected = f"Clusters.zzzzz.Volumes.{UUID0}.DriverParameters.Root: {missing} is not a directory"
    with pytest.raises(ConfigError) as info:
        cli.load(str(write_config(tmp_path, make_doc(root=str(missing)))))
    assert str(info.value) == expected
    c = load_text(yaml.safe_dump(make_doc(root=str(missing))), env={})
    spec = c.volumes[0]
    with pytest.raises(ConfigError) as info:
        DirectoryVolume(spec, DirectoryParameters.parse(spec.parameters, spec.key_path))
    assert str(info.value) == expected
    # a file is not a directory either
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError):
        DirectoryVolume(spec, DirectoryParameters(root=str(tmp_path / "file")))


def run_keepstore(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ARVADOS_SERVICE_INTERNAL_URL"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "keepstore", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def assert_config_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("config error: ")
    assert message in lines[0]


def free_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_subprocess_root_required(tmp_path: Path) -> None:
    path = write_config(tmp_path, make_doc(Volumes={UUID0: {"Driver": "Directory", "DriverParameters": {}}}))
    proc = run_keepstore("--config", str(path), cwd=tmp_path)
    assert_config_error(proc, f"config error: Clusters.zzzzz.Volumes.{UUID0}.DriverParameters.Root: required")


def test_subprocess_blob_signing_without_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, make_doc(Collections={"BlobSigning": True}))
    proc = run_keepstore("--config", str(path), cwd=tmp_path)
    assert_config_error(proc, "config error: Clusters.zzzzz.Collections.BlobSigningKey: required")


def test_subprocess_unknown_driver(tmp_path: Path) -> None:
    path = write_config(tmp_path, make_doc(Volumes={UUID0: {"Driver": "Bogus"}}))
    proc = run_keepstore("check-config", "--config", str(path), cwd=tmp_path)
    assert_config_error(proc, f"Clusters.zzzzz.Volumes.{UUID0}.Driver: unknown driver 'Bogus'")


def test_subprocess_root_does_not_exist(tmp_path: Path) -> None:
    # This one passes cli.load and fails when the server opens the volume.
    doc = make_doc(root=str(tmp_path / "missing"))
    doc = with_key(doc, "Services.Keepstore.InternalURLs", {free_url(): {}})
    path = write_config(tmp_path, doc)
    proc = run_keepstore("--config", str(path), cwd=tmp_path)
    assert_config_error(proc, f"Clusters.zzzzz.Volumes.{UUID0}.DriverParameters.Root: {tmp_path / 'missing'} is not")


def test_subprocess_tls_certificate_file_missing(tmp_path: Path) -> None:
    url = free_url().replace("http://", "https://")
    doc = with_key(make_doc(root=str(tmp_path)), "Services.Keepstore.InternalURLs", {url: {}})
    doc["Clusters"]["zzzzz"]["TLS"] = {"Certificate": f"file://{tmp_path}/nope.crt", "Key": f"file://{tmp_path}/k"}
    path = write_config(tmp_path, doc)
    for command in ("check-config", "serve"):
        proc = run_keepstore(command, "--config", str(path), cwd=tmp_path)
        assert_config_error(proc, f"Clusters.zzzzz.TLS.Certificate: cannot read {tmp_path}/nope.crt: No such file")


def test_subprocess_missing_config_file(tmp_path: Path) -> None:
    proc = run_keepstore("--config", str(tmp_path / "nope.yml"), cwd=tmp_path)
    assert_config_error(proc, "cannot read config file")


def test_subprocess_check_config_ok(tmp_path: Path) -> None:
    path = write_config(tmp_path, make_doc(root=str(tmp_path)))
    proc = run_keepstore("check-config", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"config OK: {path}"


# --- Services.Keepstore.InternalURLs -----------------------------------------------------------------------------

# Documentation addresses (RFC 5737), assumed not to be assigned to this host (checked in not_local()).
FAR1 = "198.51.100.7"
FAR2 = "203.0.113.7"
TWO_URLS: dict[str, Any] = {f"http://{FAR1}:25107": {}, f"http://{FAR2}:25108": {}}


def not_local(*hosts: str) -> None:
    import socket

    for host in hosts:
        with socket.socket() as s:
            try:
                s.bind((host, 0))
            except OSError:
                continue
        pytest.skip(f"{host} is an address of this host")


def test_no_internal_urls() -> None:
    doc = with_key(make_doc(), "Services.Keepstore.InternalURLs", {})
    assert error(doc).startswith("Clusters.zzzzz.Services.Keepstore.InternalURLs: required")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21", "127.0.0.1:25107", "http://:25107", "http://127.0.0.1:99999"])
def test_bad_internal_url(url: str) -> None:
    doc = with_key(make_doc(), "Services.Keepstore.InternalURLs", {url: {}})
    assert error(doc).startswith(f"Clusters.zzzzz.Services.Keepstore.InternalURLs.{url}: ")


def test_several_internal_urls_chosen_by_env() -> None:
    doc = with_key(make_doc(), "Services.Keepstore.InternalURLs", TWO_URLS)
    c = load(doc, env={"ARVADOS_SERVICE_INTERNAL_URL": f"http://{FAR2}:25108"})
    assert c.internal_url == f"http://{FAR2}:25108"
    assert (c.listen_host, c.listen_port) == (FAR2, 25108)
    c = load(doc, env={"ARVADOS_SERVICE_INTERNAL_URL": f"http://{FAR1}:25107"})
    assert c.internal_url == f"http://{FAR1}:25107"


def test_several_internal_urls_env_not_listed() -> None:
    doc = with_key(make_doc(), "Services.Keepstore.InternalURLs", TWO_URLS)
    msg = error(doc, env={"ARVADOS_SERVICE_INTERNAL_URL": f"http://{FAR1}:25108"})
    assert msg.startswith("Clusters.zzzzz.Services.Keepstore.InternalURLs: ARVADOS_SERVICE_INTERNAL_URL=")


def test_several_internal_urls_none_local_without_env() -> None:
    not_local(FAR1, FAR2)
    doc = with_key(make_doc(), "Services.Keepstore.InternalURLs", TWO_URLS)
    msg = error(doc)
    assert msg.startswith("Clusters.zzzzz.Services.Keepstore.InternalURLs: ")
    assert "ARVADOS_SERVICE_INTERNAL_URL" in msg


def test_several_internal_urls_one_local() -> None:
    not_local(FAR1)
    doc = with_key(make_doc(), "Services.Keepstore.InternalURLs", {URL: {}, f"http://{FAR1}:25107": {}})
    assert load(doc).internal_url == URL


def test_single_url_ignores_nothing_but_env_must_match() -> None:
    assert load(make_doc(), env={"ARVADOS_SERVICE_INTERNAL_URL": URL}).internal_url == URL
    assert error(make_doc(), env={"ARVADOS_SERVICE_INTERNAL_URL": "http://127.0.0.1:1"}).startswith(
        "Clusters.zzzzz.Services.Keepstore.InternalURLs: "
    )


def test_listen_url_overrides_bind_address() -> None:
    doc = with_key(
        make_doc(), "Services.Keepstore.InternalURLs", {"http://keep0.example:25107": {"ListenURL": "http://0.0.0.0:9"}}
    )
    c = load(doc)
    assert c.internal_url == "http://keep0.example:25107"
    assert (c.listen_host, c.listen_port) == ("0.0.0.0", 9)


def test_http_without_a_port_means_port_80() -> None:
    doc = with_key(make_doc(), "Services.Keepstore.InternalURLs", {"http://keep0.example": {}})
    assert load(doc).listen_port == 80


def tls_doc(url: str = "https://keep0.example", **tls: Any) -> dict[str, Any]:
    doc = with_key(make_doc(), "Services.Keepstore.InternalURLs", {url: {}})
    if tls:
        doc["Clusters"]["zzzzz"]["TLS"] = tls
    return doc


def test_https_means_tls_on_port_443_with_the_key_pair_files() -> None:
    c = load(tls_doc(Certificate="file:///etc/arvados/tls.crt", Key="file:///etc/arvados/tls.key"))
    assert c.tls and c.listen_port == 443
    assert (c.tls_certificate, c.tls_key, c.tls_insecure) == ("/etc/arvados/tls.crt", "/etc/arvados/tls.key", False)
    c = load(tls_doc("https://keep0.example:25107", Certificate="file:///c", Key="file:///k", Insecure=True))
    assert c.listen_port == 25107 and c.tls_insecure


def test_http_ignores_the_tls_keys() -> None:
    c = load(tls_doc("http://keep0.example:25107", Certificate="not even a url"))
    assert not c.tls and c.tls_certificate == ""


@pytest.mark.parametrize(
    ("tls", "key"),
    [
        ({}, "Certificate"),
        ({"Certificate": "file:///c"}, "Key"),
        ({"Certificate": "-----BEGIN CERTIFICATE-----...", "Key": "file:///k"}, "Certificate"),
        ({"Certificate": "file:///c", "Key": "tls.key"}, "Key"),
        ({"Certificate": "file://", "Key": "file:///k"}, "Certificate"),
        ({"Certificate": "file://relative/c", "Key": "file:///k"}, "Certificate"),
    ],
)
def test_https_needs_both_files_as_file_urls_or_absolute_paths(tls: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tls_doc(**tls))
    assert err.value.path == f"Clusters.zzzzz.TLS.{key}"
    assert "required as a file:// URL or an absolute path" in str(err.value)


def test_tls_files_as_plain_absolute_paths() -> None:
    c = load(tls_doc(Certificate="/etc/arvados/tls.crt", Key="file:///etc/arvados/tls.key"))
    assert (c.tls_certificate, c.tls_key) == ("/etc/arvados/tls.crt", "/etc/arvados/tls.key")


def test_an_https_listen_url_serves_tls_behind_an_http_internal_url() -> None:
    # The scheme that counts is the one listened on.
    doc = with_key(
        make_doc(),
        "Services.Keepstore.InternalURLs",
        {"http://keep0.example:25107": {"ListenURL": "https://0.0.0.0:25108"}},
    )
    with pytest.raises(ConfigError) as err:
        load(doc)
    assert err.value.path == "Clusters.zzzzz.TLS.Certificate"
    doc["Clusters"]["zzzzz"]["TLS"] = {"Certificate": "file:///c", "Key": "file:///k"}
    c = load(doc)
    assert c.tls and (c.listen_host, c.listen_port) == ("0.0.0.0", 25108)


# --- volumes: AccessViaHosts, read-only, classes -----------------------------------------------------------------


def volume(**kw: Any) -> dict[str, Any]:
    v: dict[str, Any] = {"Driver": "Directory", "DriverParameters": {"Root": "/tmp"}}
    v.update(kw)
    return v


def test_access_via_hosts() -> None:
    c = load(
        make_doc(
            Volumes={
                UUID0: volume(AccessViaHosts={"http://keep9.example:25107": {}}),  # another server's
                UUID1: volume(AccessViaHosts={URL: {"ReadOnly": True}, "http://keep9.example:25107": {}}),
                UUID2: volume(AccessViaHosts={URL: {}}),
            }
        )
    )
    assert [v.uuid for v in c.volumes] == [UUID1, UUID2]
    v1, v2 = c.volumes
    assert v1.host_read_only and not v1.read_only
    assert not v1.allow_write and not v1.allow_trash
    assert v2.allow_write and v2.allow_trash


def test_access_via_hosts_none_for_us() -> None:
    msg = error(make_doc(Volumes={UUID0: volume(AccessViaHosts={"http://keep9.example:25107": {}})}))
    assert msg == f"Clusters.zzzzz.Volumes: no volumes configured for {URL}"


def test_read_only_and_allow_trash_when_read_only() -> None:
    c = load(
        make_doc(
            Volumes={
                UUID0: volume(ReadOnly=True),
                UUID1: volume(ReadOnly=True, AllowTrashWhenReadOnly=True),
                UUID2: volume(AccessViaHosts={URL: {"ReadOnly": True}}, AllowTrashWhenReadOnly=True),
            }
        )
    )
    v0, v1, v2 = c.volumes
    assert (v0.allow_write, v0.allow_trash) == (False, False)
    assert (v1.allow_write, v1.allow_trash) == (False, True)
    assert (v2.allow_write, v2.allow_trash) == (False, False)  # host ReadOnly wins


def test_volumes_sorted_by_uuid_and_replication_at_least_one() -> None:
    c = load(make_doc(Volumes={UUID2: volume(Replication=3), UUID0: volume(Replication=0), UUID1: volume()}))
    assert [v.uuid for v in c.volumes] == [UUID0, UUID1, UUID2]
    assert [v.replication for v in c.volumes] == [1, 1, 3]


def test_storage_classes_config() -> None:
    c = load(make_doc(StorageClasses={"default": {"Priority": 0, "Default": True}, "fast": {"Priority": 10}}))
    assert c.storage_classes["fast"].priority == 10
    assert c.storage_classes["fast"].default is False
    assert c.storage_classes["default"].default is True


def test_implicit_default_class_has_priority_zero() -> None:
    c = load(make_doc(StorageClasses={"default": {"Priority": 50}}))
    assert c.volumes[0].storage_classes == ("default",)
    assert c.volumes[0].priority == 0


def test_storage_class_priority_gives_volume_priority() -> None:
    c = load(
        make_doc(
            StorageClasses={
                "default": {"Priority": 0},
                "class1": {"Priority": 66},
                "class2": {"Priority": 99},
                "class3": {"Priority": 33},
            },
            Volumes={
                UUID0: volume(),
                UUID1: volume(StorageClasses={"class1": True}),
                UUID2: volume(StorageClasses={"class2": True, "class3": True, "class1": False}),
            },
        )
    )
    v0, v1, v2 = c.volumes
    assert (v0.priority, v1.priority, v2.priority) == (0, 66, 99)
    assert v1.storage_classes == ("class1",)
    assert v2.storage_classes == ("class2", "class3")


def test_volume_class_not_in_cluster_storage_classes_has_priority_zero() -> None:
    c = load(make_doc(Volumes={UUID0: volume(StorageClasses={"special": True, "extra": True})}))
    assert c.volumes[0].storage_classes == ("extra", "special")
    assert c.volumes[0].priority == 0


# --- warnings ----------------------------------------------------------------------------------------------------


def test_unknown_keys_warn() -> None:
    doc = with_key(make_doc(), "Collections.BlobSigningKye", "typo")
    doc = with_key(doc, "Volumes." + UUID0 + ".Drvier", "x")
    doc = with_key(doc, "KeepstorePy.Bogus", 1)
    doc["Stray"] = 1
    c = load(doc)
    assert "Clusters.zzzzz.Collections.BlobSigningKye: unknown config key (ignored)" in c.warnings
    assert f"Clusters.zzzzz.Volumes.{UUID0}.Drvier: unknown config key (ignored)" in c.warnings
    assert "Clusters.zzzzz.KeepstorePy.Bogus: unknown config key (ignored)" in c.warnings
    assert "Stray: unknown top-level key (ignored)" in c.warnings
    assert len(c.warnings) == 4


def test_keys_arvados_knows_do_not_warn() -> None:
    doc = with_key(make_doc(), "PostgreSQL.Connection.host", "db.example")
    doc = with_key(doc, "PostgreSQL.Connection.dbname", "arvados")
    doc = with_key(doc, "Services.Controller.ExternalURL", "https://zzzzz.example")
    doc = with_key(doc, "Services.Keepstore.InternalURLs", {URL: {"ListenURL": URL}})
    doc = with_key(doc, "Collections.DefaultReplication", 2)
    doc = with_key(doc, "Collections.BlobTrashConcurrency", 2)
    doc = with_key(doc, "StorageClasses", {"default": {"Default": True, "Priority": 0}})
    doc = with_key(doc, "KeepstorePy", {"DrainTimeout": "5s", "PullConnectTimeout": "1s", "PullReadTimeout": "1m"})
    doc = with_key(doc, "Volumes." + UUID0 + ".DriverParameters.Anything", "x")
    doc = with_key(doc, "Volumes." + UUID0 + ".AccessViaHosts", {URL: {"ReadOnly": False}})
    doc = with_key(doc, "Volumes." + UUID0 + ".Replication", 2)
    c = load(doc)
    assert c.warnings == ()
    assert c.drain_timeout == 5 and c.pull_connect_timeout == 1 and c.pull_read_timeout == 60


def test_warnings_for_empty_tokens_and_buffer_mistake() -> None:
    doc = make_doc(SystemRootToken="", API={"MaxKeepBlobBuffers": 128, "MaxConcurrentRequests": 64})
    c = load(doc)
    assert any(w.startswith("Clusters.zzzzz.SystemRootToken is empty") for w in c.warnings)
    assert any("MaxKeepBlobBuffers (128)" in w and "MaxConcurrentRequests (64)" in w for w in c.warnings)
    assert load(make_doc(API={"MaxKeepBlobBuffers": 128, "MaxConcurrentRequests": 0})).warnings == ()


# --- the embedded default ----------------------------------------------------------------------------------------


def test_embedded_default_creates_and_reuses_secrets(tmp_path: Path) -> None:
    data_dir = tmp_path / "kd"
    config, secrets = embedded_config(str(data_dir), "127.0.0.1:1234")
    path = data_dir / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {
        "SystemRootToken": secrets.system_root_token,
        "ManagementToken": secrets.management_token,
        "BlobSigningKey": secrets.blob_signing_key,
        "ClientToken": secrets.client_token,
    }
    assert (
        len({secrets.system_root_token, secrets.management_token, secrets.blob_signing_key, secrets.client_token}) == 4
    )
    assert config.internal_url == "http://127.0.0.1:1234"
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 1234)
    assert config.blob_signing and config.blob_signing_key == secrets.blob_signing_key
    assert config.system_root_token == secrets.system_root_token
    assert config.management_token == secrets.management_token
    assert config.warnings == ()
    (v,) = config.volumes
    assert v.uuid == VOLUME_UUID
    assert v.parameters["Root"] == str(data_dir / "blocks")
    assert (data_dir / "blocks").is_dir()
    assert not list(data_dir.glob("*.tmp"))

    config2, secrets2 = embedded_config(str(data_dir), "127.0.0.1:1234")
    assert secrets2 == secrets
    assert config2.blob_signing_key == config.blob_signing_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_embedded_default_makes_its_directories_and_secrets_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every directory it creates is fsynced into its parent, and the renamed secrets file into its directory: a
    # power cut right after the first start must not take away the volume root, or the tokens printed at start.
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    base = tmp_path.resolve()
    data_dir = base / "a" / "kd"
    embedded_config(str(data_dir), "127.0.0.1:1234")
    assert str(base) in synced  # a/'s entry
    assert str(base / "a") in synced  # kd/'s entry
    assert synced.count(str(data_dir)) >= 2  # secrets.json's rename, then blocks/'s entry
    assert synced.index(str(data_dir / "secrets.json.tmp")) < synced.index(str(data_dir))  # data before name


def test_check_config_prints_settings_with_secrets_masked(tmp_path: Path) -> None:
    doc = make_doc(root=str(tmp_path))
    cluster = doc["Clusters"]["zzzzz"]
    cluster["SystemRootToken"] = "rootsecret0123456789"
    cluster["ManagementToken"] = "mgmtsecret0123456789"
    cluster.setdefault("Collections", {})["BlobSigningKey"] = "signsecret0123456789"
    path = write_config(tmp_path, doc)
    proc = run_keepstore("check-config", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"config OK: {path}")
    assert "max_keep_blob_buffers:" in proc.stdout and "volume zzzzz-nyw5e-000000000000000" in proc.stdout
    for secret in ("rootsecret0123456789", "mgmtsecret0123456789", "signsecret0123456789"):
        assert secret not in proc.stdout + proc.stderr
    assert "system_root_token: (set, 20 characters)" in proc.stdout


def test_group_commit_is_on_unless_turned_off() -> None:
    assert load(make_doc()).group_commit is True
    c = load(with_key(make_doc(), "KeepstorePy.GroupCommit", False))
    assert c.group_commit is False and c.warnings == ()
    msg = error(with_key(make_doc(), "KeepstorePy.GroupCommit", "yes"))
    assert msg.startswith("Clusters.zzzzz.KeepstorePy.GroupCommit: ")


def test_direct_writes_are_on_unless_turned_off() -> None:
    assert load(make_doc()).direct_writes is True
    c = load(with_key(make_doc(), "KeepstorePy.DirectWrites", False))
    assert c.direct_writes is False and c.warnings == ()
    msg = error(with_key(make_doc(), "KeepstorePy.DirectWrites", 1))
    assert msg.startswith("Clusters.zzzzz.KeepstorePy.DirectWrites: ")


def test_huge_page_buffers_are_on_unless_turned_off() -> None:
    assert load(make_doc()).huge_page_buffers is True
    c = load(with_key(make_doc(), "KeepstorePy.HugePageBuffers", False))
    assert c.huge_page_buffers is False and c.warnings == ()
    msg = error(with_key(make_doc(), "KeepstorePy.HugePageBuffers", "off"))
    assert msg.startswith("Clusters.zzzzz.KeepstorePy.HugePageBuffers: ")


@pytest.mark.parametrize(("value", "seconds"), [(None, 60.0), ("0s", 0.0), (0, 0.0), ("2s", 2.0), ("5m", 300.0)])
def test_worker_stall_timeout(value: Any, seconds: float) -> None:
    doc = make_doc() if value is None else with_key(make_doc(), "KeepstorePy.WorkerStallTimeout", value)
    assert load(doc).worker_stall_timeout == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [("1s", "must be 0 (off) or at least 2s, not 1s"), ("500ms", "at least 2s"), ("-1s", "must not be negative")],
)
def test_worker_stall_timeout_too_short(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(with_key(make_doc(), "KeepstorePy.WorkerStallTimeout", value))
    assert err.value.path == "Clusters.zzzzz.KeepstorePy.WorkerStallTimeout"
    assert message in str(err.value)

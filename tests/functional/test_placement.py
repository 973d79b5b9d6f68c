"""Placement over volumes and storage classes: SPEC §5.3–5.5, §5.8, §11 items 13–19."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from keeptest import (
    USER_TOKEN,
    KeepServer,
    ServerFactory,
    directory_volume,
    md5,
    sign,
    stored_files,
    temp_files,
    vol_uuid,
)

DATA = b"placement test block"
H = md5(DATA)


def classes_server(server_factory: ServerFactory, tmp_path: Path) -> KeepServer:
    # V0: default; V1: archive.
    return server_factory(
        volumes=[
            directory_volume(tmp_path / "v0", 0),
            directory_volume(tmp_path / "v1", 1, StorageClasses={"archive": True}),
        ],
        storage_classes={"default": {"Default": True}, "archive": {"Priority": 10}},
    )


def test_class_archive(server_factory: ServerFactory, tmp_path: Path) -> None:  # item 13
    srv = classes_server(server_factory, tmp_path)
    r = srv.put(DATA, headers={"X-Keep-Storage-Classes": "archive"})
    assert r.status == 200
    assert r.header("X-Keep-Storage-Classes-Confirmed") == "archive=1"
    assert srv.index_hashes(f"/mounts/{vol_uuid(1)}/blocks") == [H]
    assert srv.index_hashes(f"/mounts/{vol_uuid(0)}/blocks") == []


def test_two_classes(server_factory: ServerFactory, tmp_path: Path) -> None:  # item 14, difference 7
    srv = classes_server(server_factory, tmp_path)
    r = srv.put(DATA, headers={"X-Keep-Storage-Classes": "default, archive"})
    assert r.status == 200
    assert r.header("X-Keep-Replicas-Stored") == "2"
    assert r.header("X-Keep-Storage-Classes-Confirmed") == "archive=1, default=1"  # sorted by name


def test_unknown_class(server_factory: ServerFactory, tmp_path: Path) -> None:  # items 15, 16
    srv = classes_server(server_factory, tmp_path)
    r = srv.put(DATA, headers={"X-Keep-Storage-Classes": "nosuchclass"})
    assert (r.status, r.text) == (507, "insufficient storage\n")
    assert srv.index_hashes() == []
    r = srv.put(DATA, headers={"X-Keep-Storage-Classes": "default, nosuchclass"})
    assert r.status == 200
    assert r.header("X-Keep-Storage-Classes-Confirmed") == "default=1"


def test_replication_summed(server_factory: ServerFactory, tmp_path: Path) -> None:
    srv = server_factory(
        volumes=[
            directory_volume(tmp_path / "v0", 0, Replication=2),
            directory_volume(tmp_path / "v1", 1, Replication=3, StorageClasses={"archive": True}),
        ],
    )
    r = srv.put(DATA, headers={"X-Keep-Storage-Classes": "archive, default"})
    assert (r.header("X-Keep-Replicas-Stored"), r.header("X-Keep-Storage-Classes-Confirmed")) == (
        "5",
        "archive=3, default=2",
    )


def test_priority_orders_reads(server_factory: ServerFactory, tmp_path: Path) -> None:
    # Pick a block that rendezvous order would read from V0 first; V1 has the higher class priority.
    data = next(
        d
        for d in (f"prio-{i}".encode() for i in range(100))
        if md5((md5(d) + "0" * 15).encode()) < md5((md5(d) + "1" * 15).encode())
    )
    h = md5(data)
    srv = classes_server(server_factory, tmp_path)
    for n, content in ((0, b"X" * len(data)), (1, data)):  # V0 holds a corrupt copy
        d = srv.volume_root(n) / h[:3]
        d.mkdir(parents=True, exist_ok=True)
        (d / h).write_bytes(content)
    r = srv.get(sign(f"{h}+{len(data)}"))
    assert (r.status, r.body) == (200, data)
    # V1 was read first, so V0's corrupt copy was never looked at (and not quarantined).
    time.sleep(0.2)
    assert (srv.volume_root(0) / h[:3] / h).exists()
    assert "checksum mismatch" not in srv.log_text()


def test_all_read_only(server_factory: ServerFactory, tmp_path: Path) -> None:  # item 17
    srv = server_factory(
        volumes=[directory_volume(tmp_path / f"v{n}", n, ReadOnly=True) for n in range(2)],
    )
    r = srv.put(DATA)
    assert (r.status, r.text) == (507, "insufficient storage\n")


def test_full_symlink(server_factory: ServerFactory) -> None:  # item 18
    srv = server_factory()
    for n in range(2):
        os.symlink(str(int(time.time())), srv.volume_root(n) / "full")
    r = srv.put(DATA)
    assert (r.status, r.text) == (507, "insufficient storage\n")
    assert all(not stored_files(srv.volume_root(n)) for n in range(2))
    for n in range(2):
        (srv.volume_root(n) / "full").unlink()
        os.symlink(str(int(time.time()) - 7200), srv.volume_root(n) / "full")
    assert srv.put(DATA).status == 200


@pytest.mark.parametrize("volumes", [1, 2], ids=["one-volume", "two-volumes"])
def test_full_volume_takes_a_put_of_a_block_it_holds(server_factory: ServerFactory, volumes: int) -> None:
    srv = server_factory(volumes=volumes)
    assert srv.put(DATA).status == 200
    before = srv.index().text
    time.sleep(0.01)
    for n in range(volumes):
        os.symlink(str(int(time.time())), srv.volume_root(n) / "full")
    r = srv.put(DATA)
    assert r.status == 200  # the copy there is touched: the PUT is satisfied without room for a new one
    assert int(srv.index().text.split()[1]) > int(before.split()[1])
    r = srv.put(DATA + b" and more")
    assert (r.status, r.text) == (507, "insufficient storage\n")


def test_one_full_volume_other_used(server_factory: ServerFactory) -> None:
    srv = server_factory()
    # md5("placement test block") goes to one volume first; mark that one full.
    first = next(n for n in range(2) if srv.put(DATA).status == 200 and H in stored_files(srv.volume_root(n)))
    stored_files(srv.volume_root(first))[H].unlink()
    os.symlink(str(int(time.time())), srv.volume_root(first) / "full")
    r = srv.put(DATA)
    assert r.status == 200
    assert H in stored_files(srv.volume_root(1 - first))


def test_all_volumes_failing(server_factory: ServerFactory) -> None:  # item 19
    srv = server_factory()
    for n in range(2):
        (srv.volume_root(n) / H[:3]).write_bytes(b"not a directory")
    r = srv.put(DATA)
    assert (r.status, r.text) == (503, "volume unavailable\n")
    assert all(not temp_files(srv.volume_root(n)) for n in range(2) if (srv.volume_root(n) / H[:3]).is_dir())


def test_failing_volume_skipped(server_factory: ServerFactory) -> None:
    srv = server_factory()
    first = 0 if md5((H + "0" * 15).encode()) < md5((H + "1" * 15).encode()) else 1
    (srv.volume_root(first) / H[:3]).write_bytes(b"not a directory")
    r = srv.put(DATA)
    assert r.status == 200
    assert H in stored_files(srv.volume_root(1 - first))
    assert "write failed" in srv.log_text()
    assert re.search(r'^arvados_keepstore_volume_errors\{device_id="[^"]+",error_type="\w+"\} 1$', srv.metrics(), re.M)


def test_access_via_hosts(server_factory: ServerFactory, tmp_path: Path) -> None:
    other = {"http://keep9.example:25107": {}}
    srv = server_factory(
        volumes=[
            directory_volume(tmp_path / "v0", 0, AccessViaHosts=other),  # belongs to another server
            directory_volume(tmp_path / "v1", 1),
        ],
    )
    import json

    mounts = json.loads(srv.req("GET", "/mounts", token="roottoken0123456789abcdefghijklmnopqrstuvwxyz0123").body)
    assert [m["uuid"] for m in mounts] == [vol_uuid(1)]


def test_host_read_only(server_factory: ServerFactory, tmp_path: Path) -> None:
    port_holder = server_factory(start=False)  # only to learn a free port and URL shape
    url = f"http://127.0.0.1:{port_holder.port}"
    cfg_vols = [
        directory_volume(tmp_path / "v0", 0, AccessViaHosts={url: {"ReadOnly": True}}),
        directory_volume(tmp_path / "v1", 1, ReadOnly=True, AllowTrashWhenReadOnly=True),
    ]
    port_holder.config["Clusters"]["zzzzz"]["Volumes"] = {v.pop("uuid"): v for v in cfg_vols}
    port_holder.start()
    import json

    mounts = json.loads(
        port_holder.req("GET", "/mounts", token="roottoken0123456789abcdefghijklmnopqrstuvwxyz0123").body
    )
    assert [(m["allow_write"], m["allow_trash"]) for m in mounts] == [(False, False), (False, True)]
    assert port_holder.put(DATA, token=USER_TOKEN).status == 507

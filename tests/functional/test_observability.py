"""Metrics, status document and logs: SPEC §7, difference 5, §11 items 72–74."""

from __future__ import annotations

import base64
import json
import re

from keeptest import MGMT_TOKEN, ROOT_TOKEN, SIGNING_KEY, USER_TOKEN, KeepServer, ServerFactory, md5, sign, vol_uuid


def test_metrics(server: KeepServer) -> None:  # item 73
    for i in range(3):
        assert server.put(f"m{i}".encode()).status == 200
    r = server.req("GET", "/metrics", token=MGMT_TOKEN)
    assert r.status == 200
    text = r.text
    for name in [
        "arvados_keepstore_bufferpool_inuse_buffers",
        "arvados_keepstore_bufferpool_max_buffers",
        "arvados_keepstore_bufferpool_allocated_bytes",
        "arvados_keepstore_pull_queue_pending_entries",
        "arvados_keepstore_pull_queue_inprogress_entries",
        "arvados_keepstore_trash_queue_pending_entries",
        "arvados_keepstore_trash_queue_inprogress_entries",
        "request_duration_seconds",
    ]:
        assert re.search(rf"^# TYPE {name} ", text, re.M), name
    assert re.search(r'^request_duration_seconds_count\{code="200",method="put"\} 3$', text, re.M)
    assert "# TYPE arvados_keepstore_volume_operations counter" in text
    ops_re = r'^arvados_keepstore_volume_operations\{device_id="[^"]+",operation="create"\} (\d+)$'
    creates = re.findall(ops_re, text, re.M)
    assert sum(map(int, creates)) == 3  # one temp file per PUT, over both volumes
    out = re.findall(r'^arvados_keepstore_volume_io_bytes\{device_id="[^"]+",direction="out"\} (\d+)$', text, re.M)
    assert sum(map(int, out)) == 6
    assert server.req("GET", "/metrics").status == 401
    assert server.req("GET", "/metrics", token="wrong").status == 403
    assert server.req("GET", "/metrics", token=ROOT_TOKEN).status == 403
    assert server.req("GET", f"/metrics?api_token={MGMT_TOKEN}").status == 200  # any token form


def test_metrics_json(server: KeepServer) -> None:  # item 74
    server.put(b"foo")
    r = server.req("GET", "/metrics.json", token=MGMT_TOKEN)
    assert r.status == 200
    families = json.loads(r.body)
    assert isinstance(families, list)
    by_name = {f["name"]: f for f in families}
    assert by_name["arvados_keepstore_bufferpool_max_buffers"]["metric"][0]["gauge"]["value"] == 16
    assert by_name["request_duration_seconds"]["type"] == "SUMMARY"


def test_status_json(server: KeepServer) -> None:  # difference 5
    server.put(b"foo")
    st = server.status_json()
    assert [v["UUID"] for v in st["Volumes"]] == [vol_uuid(0), vol_uuid(1)]
    for v in st["Volumes"]:
        assert v["DeviceID"] and v["BytesFree"] > 0 and v["BytesUsed"] > 0
    assert st["BufferPool"]["BuffersMax"] == 16
    assert st["BufferPool"]["BuffersInUse"] == 0
    assert st["BufferPool"]["BytesAllocated"] >= 64 << 20
    assert st["PullQueue"] == {"Queued": 0, "InProgress": 0}
    assert st["TrashQueue"] == {"Queued": 0, "InProgress": 0}
    assert st["RequestsCurrent"] == 0 and st["RequestsMax"] == 64
    assert isinstance(st["Version"], str)
    assert server.req("GET", "/status.json").status == 401
    assert server.req("GET", "/status.json", token=USER_TOKEN).status == 403


def test_inspect_requests(server: KeepServer) -> None:
    r = server.req("GET", "/_inspect/requests", headers={"Authorization": f"Bearer {MGMT_TOKEN}"})
    assert r.status == 200
    reqs = json.loads(r.body)
    assert [x["URL"] for x in reqs] == ["_inspect/requests"]
    assert server.req("GET", "/_inspect/requests").status == 401


def test_logs_have_no_secrets_and_one_response_per_request(server_factory: ServerFactory) -> None:
    srv = server_factory()
    loc = srv.put(b"foo").text.strip()
    signature = loc.split("+A")[1].split("@")[0]
    basic = base64.b64encode(f"u:{USER_TOKEN}".encode()).decode()
    requests = [
        ("GET", f"/{loc}", {"Authorization": f"Bearer {USER_TOKEN}"}),
        ("GET", f"/{loc}?api_token={USER_TOKEN}", {}),
        ("HEAD", f"/{loc}", {"Authorization": f"Basic {basic}"}),
        ("GET", f"/{loc}", {"Authorization": "Bearer wrongtoken-secret-1"}),
        ("GET", f"/{sign(md5(b'x') + '+1')}", {"Authorization": f"OAuth2 {USER_TOKEN}"}),
        ("GET", "/index", {"Authorization": f"Bearer {ROOT_TOKEN}"}),
        ("TOUCH", f"/{md5(b'foo')}+3", {"Authorization": f"Bearer {ROOT_TOKEN}"}),
        ("GET", "/metrics", {"Authorization": f"Bearer {MGMT_TOKEN}"}),
        ("GET", "/_health/ping", {"Authorization": f"Bearer {MGMT_TOKEN}"}),
        ("PUT", f"/{md5(b'bar')}", {"Authorization": f"Bearer {USER_TOKEN}"}),
        ("GET", "/nonexistent-route", {}),
    ]
    for method, path, headers in requests:
        body = b"bar" if method == "PUT" else None
        srv.req(method, path, headers=headers, body=body)
    srv.stop()
    text = srv.log_text()
    for secret in [USER_TOKEN, ROOT_TOKEN, MGMT_TOKEN, SIGNING_KEY, signature, basic, "wrongtoken-secret-1"]:
        assert secret not in text, secret
    lines = srv.log_lines()
    responses = [x for x in lines if x["msg"] == "response"]
    assert len(responses) == 1 + len(requests), [(x["reqMethod"], x["reqPath"][:20], x["PID"]) for x in responses]
    assert len({x["RequestID"] for x in responses}) == len(responses)
    assert len([x for x in lines if x["msg"] == "request"]) == len(responses)
    for x in responses:
        assert {"RequestID", "respStatusCode", "respBytes", "timeTotal", "timeToStatus", "PID", "ClusterID"} <= set(x)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", x["time"])
    # Lines of different worker processes may be out of order in the file: find the block GET by its path.
    get = next(
        x
        for x in responses
        if x["reqMethod"] == "GET" and x["respStatusCode"] == 200 and x["reqPath"].startswith(loc.split("+")[0])
    )
    assert get["respBytes"] == 3
    assert "+A(redacted)@" in get["reqPath"]

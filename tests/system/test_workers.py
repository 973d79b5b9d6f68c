"""Several worker processes on one port (keepstore.multiproc): shares, forwarding, totals, life and death."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

from keeptest import (
    ROOT_TOKEN,
    KeepServer,
    ServerFactory,
    md5,
    process_tree,
    sign,
    wait_for,
)


def workers_of(srv: KeepServer) -> list[int]:
    return process_tree(srv.pid)[1:]


def three_workers(server_factory: ServerFactory, **kw: object) -> KeepServer:
    srv = server_factory(extra={"KeepstorePy": {"Workers": 3}}, **kw)
    wait_for(lambda: len(workers_of(srv)) == 3, what="3 workers")
    wait_for(lambda: "all workers ready" in srv.log_text(), what="workers ready")
    return srv


def test_workers_share_the_port_and_report_totals(server_factory: ServerFactory) -> None:
    srv = three_workers(server_factory, api={"MaxKeepBlobBuffers": 10, "MaxConcurrentRequests": 30})
    blocks = [f"multi {i}".encode() for i in range(30)]
    for b in blocks:  # a new connection each time: the kernel spreads them over the workers
        assert srv.put(b).status == 200
    for b in blocks:
        assert srv.get(sign(f"{md5(b)}+{len(b)}")).body == b
    served_by = {line["PID"] for line in srv.log_lines() if line.get("msg") == "response"}
    assert len(served_by) >= 2, "connections were not spread over the workers"
    metrics = srv.metrics()
    assert re.search(r'^request_duration_seconds_count\{code="200",method="put"\} 30$', metrics, re.M)
    st = srv.status_json()
    assert st["BufferPool"]["BuffersMax"] == 10  # 4 + 3 + 3
    assert st["RequestsMax"] == 30
    assert sorted(srv.index_hashes()) == sorted(md5(b) for b in blocks)


def test_lists_reach_the_primary_from_any_worker(server_factory: ServerFactory) -> None:
    srv = three_workers(server_factory)
    # A peer that accepts connections and never answers: each of the primary's 4 pull workers holds its first item
    # for the read timeout (60 s), so the queue's figures below do not depend on how fast failures come back (with
    # a peer that refuses connections, dozens of items could fail between a PUT and the status request).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        peer = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for n in range(1, 13):
            items = [{"locator": f"{md5(str(i).encode())}+1", "servers": [peer]} for i in range(n * 100)]
            r = srv.req("PUT", "/trash", body=json.dumps([]).encode(), token=ROOT_TOKEN)
            assert r.status == 200
            r = srv.req("PUT", "/pull", body=json.dumps(items).encode(), token=ROOT_TOKEN)
            assert r.status == 200, r.text
            st = srv.status_json()["PullQueue"]
            # Each list replaced the one before (nothing appended, nothing lost): it is all queued, less what the
            # workers took of the first one.
            assert n * 100 - 4 <= st["Queued"] <= n * 100
            assert st["InProgress"] <= 4
    r = srv.req("PUT", "/pull", body=b"[1]", token=ROOT_TOKEN)
    assert r.status == 400 and "item 0" in r.text  # validated by whichever worker got it
    # Every worker got some of those requests, and every list landed in the one queue.
    received = [line for line in srv.log_lines() if line.get("msg") == "pull list received"]
    assert len({line["PID"] for line in received}) >= 2


def test_dead_worker_is_replaced(server_factory: ServerFactory) -> None:
    srv = three_workers(server_factory)
    victim = workers_of(srv)[1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(workers_of(srv)) == 3 and victim not in workers_of(srv), what="replacement worker")
    assert "worker exited unexpectedly; restarting" in srv.log_text()
    for i in range(20):
        assert srv.put(f"after restart {i}".encode()).status == 200


def test_sigterm_stops_everything(server_factory: ServerFactory) -> None:
    srv = three_workers(server_factory)
    children = workers_of(srv)
    assert srv.stop() == 0
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_workers_die_with_the_supervisor(server_factory: ServerFactory) -> None:
    srv = three_workers(server_factory)
    children = workers_of(srv)
    srv.kill()
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children), what="orphaned workers gone")


def test_worker_count_bounded_by_buffers(server_factory: ServerFactory) -> None:
    srv = server_factory(extra={"KeepstorePy": {"Workers": 4}}, api={"MaxKeepBlobBuffers": 2})
    wait_for(lambda: "all workers ready" in srv.log_text(), what="workers ready")
    assert len(workers_of(srv)) == 2
    assert srv.status_json()["BufferPool"]["BuffersMax"] == 2


def test_single_worker_has_no_supervisor(server_factory: ServerFactory) -> None:
    srv = server_factory(extra={"KeepstorePy": {"Workers": 1}})
    time.sleep(0.2)
    assert workers_of(srv) == []
    assert srv.put(b"single").status == 200


def test_sighup_does_not_stop_the_server(server_factory: ServerFactory) -> None:
    for workers in (1, 3):
        srv = server_factory(name=f"hup{workers}", extra={"KeepstorePy": {"Workers": workers}})
        before = workers_of(srv)
        os.kill(srv.pid, signal.SIGHUP)
        wait_for(lambda: "SIGHUP received" in srv.log_text(), what="SIGHUP logged")  # noqa: B023
        assert srv.proc is not None and srv.proc.poll() is None
        assert workers_of(srv) == before  # no worker died and was replaced
        assert srv.put(f"after hup {workers}".encode()).status == 200
        assert srv.stop() == 0

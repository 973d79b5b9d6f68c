"""A JSON-able snapshot of a server's live state, and merging snapshots of several worker processes.

/metrics, /metrics.json and /status.json are all built from one merged snapshot, so a multi-process server reports
the same totals as a single process would: counters and gauges add up (each worker holds its share of the buffer
pool and request slots), the pull and trash queues live in the primary worker only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .logs import redact

if TYPE_CHECKING:
    from .service import Service

State = dict[str, Any]


def snapshot(svc: Service) -> State:
    pool = svc.pool.status()
    lim = svc.limiter
    now = time.monotonic()
    inflight = []
    if svc.http is not None:
        from .http.app import peer_of

        for c in svc.http.in_flight.values():
            r = c.request
            inflight.append(
                {
                    "RequestID": c.request_id,
                    "Method": r.method,
                    "Host": r.host,
                    "URL": redact(r.raw_path.partition("?")[0].lstrip("/")),
                    "RemoteAddr": peer_of(r.transport),
                    "XForwardedFor": r.headers.get("X-Forwarded-For", ""),
                    "Elapsed": round(now - c.started, 6),
                }
            )
    volumes = {}
    for mnt in svc.store.mounts:
        st = mnt.volume.stats
        volumes[mnt.uuid] = {
            "device_id": mnt.volume.device_id,
            "ops": dict(st.ops),
            "errors": dict(st.errors),
            "in_bytes": st.in_bytes,
            "out_bytes": st.out_bytes,
        }
    return {
        "pool": {
            "max_buffers": pool.max_buffers,
            "in_use": pool.in_use,
            "bytes_allocated": pool.bytes_allocated,
            "waiting": pool.waiting,
        },
        "limiter": {
            "active": lim.active,
            "max_concurrent": lim.max_concurrent,
            "max_queued": lim.max_queued,
            "queued": lim.queued(),
        },
        "pull_queue": svc.pull_queue.status().as_json(),
        "trash_queue": svc.trash_queue.status().as_json(),
        "volumes": volumes,
        "requests": {f"{code} {method}": list(v) for (code, method), v in svc.metrics.requests.series.items()},
        "counters": {
            "checksum_errors": svc.store.counters.checksum_errors,
            "quarantined": svc.store.counters.quarantined,
            "fast_path_requests": svc.http.fast_served if svc.http is not None else 0,
        },
        "pull_outcomes": dict(svc.pull_outcomes),
        "trash_outcomes": dict(svc.trash_outcomes),
        "sweep": dict(svc.sweep_totals),
        "inflight": inflight,
    }


def merge(states: list[State]) -> State:
    """Add up numbers key by key; concatenate lists; keep the first of anything else."""
    if not states:
        return {}
    out: State = {}
    for st in states:
        _merge_into(out, st)
    return out


def _merge_into(out: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if key not in out:
            out[key] = _copy(value)
        elif isinstance(value, dict) and isinstance(out[key], dict):
            _merge_into(out[key], value)
        elif isinstance(value, bool) or isinstance(out[key], bool):
            continue
        elif isinstance(value, (int, float)) and isinstance(out[key], (int, float)):
            out[key] += value
        elif isinstance(value, list) and isinstance(out[key], list):
            if key == "inflight":
                out[key] = out[key] + _copy(value)
            else:  # fixed-length number vectors (request summaries)
                out[key] = [a + b for a, b in zip(out[key], value, strict=False)]


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value

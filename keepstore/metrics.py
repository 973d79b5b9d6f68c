"""Prometheus metrics with the Arvados names (SPEC §7.1), so existing keepstore dashboards keep working.

Everything is produced from a state snapshot (``keepstore.state``) when scraped, so nothing on the request path
updates a metric object; request durations are two plain numbers per (code, method). prometheus-client provides the
metric model; the text exposition is written here because prometheus-client renames every counter with a
``_total`` suffix, and the Go keepstore exposes ``arvados_keepstore_volume_operations``, not ``..._total``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric

from . import __version__
from .state import State


def _family(name: str, doc: str, kind: str, samples: Iterable[tuple[dict[str, str], float]]) -> Metric:
    m = Metric(name, doc, kind)
    for labels, value in samples:
        m.add_sample(name, labels, value)
    return m


def families(state: State) -> Iterator[Metric]:
    """Every metric family, from a (possibly merged) state snapshot."""
    for name, doc, idx in (
        ("request_duration_seconds", "Summary of request duration.", 1),
        ("time_to_status_seconds", "Summary of request TTFB.", 2),
    ):
        m = Metric(name, doc, "summary")
        for key, s in sorted(state["requests"].items()):
            code, method = key.split(" ", 1)
            labels = {"code": code, "method": method}
            m.add_sample(f"{name}_sum", labels, s[idx])
            m.add_sample(f"{name}_count", labels, s[0])
        yield m
    pool = state["pool"]
    yield _family(
        "arvados_keepstore_bufferpool_allocated_bytes",
        "Number of bytes allocated to buffers",
        "gauge",
        [({}, pool["bytes_allocated"])],
    )
    yield _family(
        "arvados_keepstore_bufferpool_max_buffers",
        "Maximum number of buffers allowed",
        "gauge",
        [({}, pool["max_buffers"])],
    )
    yield _family(
        "arvados_keepstore_bufferpool_inuse_buffers", "Number of buffers in use", "gauge", [({}, pool["in_use"])]
    )
    for name in ("pull", "trash"):
        q = state[f"{name}_queue"]
        yield _family(
            f"arvados_keepstore_{name}_queue_pending_entries",
            f"Number of queued {name} requests",
            "gauge",
            [({}, q["Queued"])],
        )
        yield _family(
            f"arvados_keepstore_{name}_queue_inprogress_entries",
            f"Number of {name} requests in progress",
            "gauge",
            [({}, q["InProgress"])],
        )
    ops, errors, io = [], [], []
    for vol in state["volumes"].values():
        dev = vol["device_id"]
        ops += [({"device_id": dev, "operation": k}, v) for k, v in sorted(vol["ops"].items())]
        errors += [({"device_id": dev, "error_type": k}, v) for k, v in sorted(vol["errors"].items())]
        io += [
            ({"device_id": dev, "direction": "in"}, vol["in_bytes"]),
            ({"device_id": dev, "direction": "out"}, vol["out_bytes"]),
        ]
    yield _family("arvados_keepstore_volume_operations", "Number of volume operations", "counter", ops)
    yield _family("arvados_keepstore_volume_errors", "Number of volume errors", "counter", errors)
    yield _family("arvados_keepstore_volume_io_bytes", "Volume I/O traffic in bytes", "counter", io)
    c = state["counters"]
    yield _family(
        "arvados_keepstore_checksum_errors",
        "Stored copies that failed verification on read",
        "counter",
        [({}, c["checksum_errors"])],
    )
    yield _family(
        "arvados_keepstore_quarantined_blocks",
        "Corrupt copies moved to quarantine",
        "counter",
        [({}, c["quarantined"])],
    )
    yield _family(
        "keepstorepy_fast_path_requests",
        "Block reads served by the fast path (keepstore.http.fast) rather than through aiohttp",
        "counter",
        [({}, c.get("fast_path_requests", 0))],
    )
    yield _family(
        "arvados_keepstore_pull_results",
        "Pull list items processed, by outcome",
        "counter",
        [({"outcome": k}, v) for k, v in sorted(state["pull_outcomes"].items())],
    )
    yield _family(
        "arvados_keepstore_trash_results",
        "Trash list items processed, by outcome",
        "counter",
        [({"outcome": k}, v) for k, v in sorted(state["trash_outcomes"].items())],
    )
    yield _family(
        "arvados_keepstore_emptytrash_deleted_blocks",
        "Blocks deleted by the trash sweep",
        "counter",
        [({}, state["sweep"]["blocks"])],
    )
    yield _family(
        "arvados_keepstore_emptytrash_deleted_bytes",
        "Bytes deleted by the trash sweep",
        "counter",
        [({}, state["sweep"]["bytes"])],
    )
    lim = state["limiter"]
    yield _family(
        "arvados_concurrent_requests", "Number of requests in progress", "gauge", [({"queue": "api"}, lim["active"])]
    )
    yield _family(
        "arvados_max_concurrent_requests",
        "Maximum number of concurrent requests",
        "gauge",
        [({"queue": "api"}, lim["max_concurrent"])],
    )
    yield _family(
        "arvados_max_queued_requests",
        "Maximum number of queued requests",
        "gauge",
        [({"queue": "api"}, lim["max_queued"])],
    )
    yield _family(
        "arvados_queued_requests",
        "Number of requests in queue",
        "gauge",
        [({"queue": "api", "priority": p}, n) for p, n in sorted(lim["queued"].items())],
    )
    yield _family("arvados_version_running", "Indicated version is running", "gauge", [({"version": __version__}, 1)])


class _RequestCollector:
    """request_duration_seconds and time_to_status_seconds summaries (count and sum per code and method).

    Kept as plain numbers updated on the event loop: a prometheus-client Summary takes a lock and a label lookup
    per observation, which is a measurable share of a small request.
    """

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], list[float]] = {}  # (code, method) -> [count, total, to_status]

    def observe(self, method: str, code: int, total: float, to_status: float) -> None:
        key = (str(code), method.lower())
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [0, 0.0, 0.0]
        s[0] += 1
        s[1] += total
        s[2] += to_status


class Metrics:
    def __init__(self) -> None:
        self.requests = _RequestCollector()
        self.observe = self.requests.observe

    def text(self, state: State) -> str:
        out: list[str] = []
        for fam in families(state):
            out.append(f"# HELP {fam.name} {_escape_help(fam.documentation)}")
            out.append(f"# TYPE {fam.name} {fam.type}")
            for s in fam.samples:
                out.append(f"{s.name}{_labels(s.labels)} {_number(s.value)}")
        return "\n".join(out) + "\n"

    def json(self, state: State) -> list[dict[str, Any]]:
        """Metric families in the shape of the protobuf JSON the Go services serve at /metrics.json."""
        out: list[dict[str, Any]] = []
        for fam in families(state):
            metrics: list[dict[str, Any]] = []
            if fam.type == "summary":
                series: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
                for s in fam.samples:
                    key = tuple(sorted(s.labels.items()))
                    if s.name.endswith("_count"):
                        series.setdefault(key, {})["sample_count"] = s.value
                    elif s.name.endswith("_sum"):
                        series.setdefault(key, {})["sample_sum"] = s.value
                for key, vals in series.items():
                    metrics.append({"label": [{"name": k, "value": v} for k, v in key], "summary": vals})
            else:
                for s in fam.samples:
                    metrics.append(
                        {
                            "label": [{"name": k, "value": v} for k, v in sorted(s.labels.items())],
                            fam.type if fam.type in ("gauge", "counter") else "untyped": {"value": s.value},
                        }
                    )
            out.append({"name": fam.name, "help": fam.documentation, "type": fam.type.upper(), "metric": metrics})
        return out


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + "n").replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))

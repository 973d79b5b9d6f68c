"""Request ids (keepstore.logs.new_request_id): Arvados' format, and unique across forked worker processes."""

from __future__ import annotations

import os
import re

from keepstore.logs import new_request_id


def test_format_and_uniqueness() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(re.fullmatch(r"req-[0-9a-z]{20}", i) for i in ids)


def test_forked_workers_do_not_repeat_each_others_ids() -> None:
    # Workers are forked from the supervisor: each must draw its own ids, not replay the parent's sequence.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(w, " ".join(new_request_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        child = set(f.read().decode().split())
    parent = {new_request_id() for _ in range(100)}
    assert len(child) == 100 and not child & parent

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from keeptest import KeepServer, ServerFactory, cluster_config, directory_volume, free_port


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start keepstore processes: ``server_factory(volumes=2, api={...}, collections={...}, ...)``."""
    started: list[KeepServer] = []

    def make(
        volumes: int | list[dict[str, Any]] = 2,
        name: str = "keepstore",
        start: bool = True,
        env: dict[str, str] | None = None,
        **kw: Any,
    ) -> KeepServer:
        port = free_port()
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        if isinstance(volumes, int):
            vols = [directory_volume(workdir / f"vol{i}", i) for i in range(volumes)]
        else:
            vols = volumes
        srv = KeepServer(workdir=workdir, port=port, config=cluster_config(port, vols, **kw), name=name, env=env or {})
        started.append(srv)
        if start:
            srv.start()
        return srv

    yield make
    for srv in started:
        if srv.proc is not None:
            srv.stop()


@pytest.fixture
def server(server_factory: ServerFactory) -> KeepServer:
    """The SPEC §11 fixture: signing on, two writable Directory volumes V0/V1."""
    return server_factory()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        tmp = item.funcargs.get("tmp_path")
        if isinstance(tmp, Path):
            for log in tmp.glob("*/*.log"):
                rep.sections.append((f"server log {log.parent.name}", log.read_text(errors="replace")[-4000:]))

"""Test support: real keepstore processes on 127.0.0.1 and a plain HTTP client that sends exactly what it is told.

``http.client`` is used on purpose: it neither normalises paths (``//<loc>``, ``/../x`` go out as written) nor
refuses custom methods (``TOUCH``, ``PROPFIND``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from keepstore.signing import Signer

ROOT_TOKEN = "roottoken0123456789abcdefghijklmnopqrstuvwxyz0123"
MGMT_TOKEN = "mgmttoken0123456789abcdefghijklmnopqrstuvwxyz0123"
SIGNING_KEY = "signingkey0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdef"
USER_TOKEN = "usertoken0123456789abcdefghijklmnopqrstuvwxyz0123"
TTL = 1209600
CLUSTER = "zzzzz"
LOG_DIR = Path(__file__).parent / ".logs"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def vol_uuid(n: int) -> str:
    return f"{CLUSTER}-nyw5e-{str(n) * 15}"[:27] if n < 10 else f"{CLUSTER}-nyw5e-{n:015d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def text(self) -> str:
        return self.body.decode()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
    timeout: float = 60,
) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.headers, data)
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 10, shutdown: bool = False) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or the timeout passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def cluster_config(
    port: int,
    volumes: list[dict[str, Any]],
    *,
    storage_classes: dict[str, Any] | None = None,
    api: dict[str, Any] | None = None,
    collections: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "SystemRootToken": ROOT_TOKEN,
        "ManagementToken": MGMT_TOKEN,
        "Services": {"Keepstore": {"InternalURLs": {f"http://127.0.0.1:{port}": {}}}},
        "API": {"MaxKeepBlobBuffers": 16, "MaxConcurrentRequests": 64, **(api or {})},
        "Collections": {
            "BlobSigning": True,
            "BlobSigningKey": SIGNING_KEY,
            "BlobSigningTTL": f"{TTL}s",
            **(collections or {}),
        },
        "Volumes": {v.pop("uuid"): v for v in volumes},
        "SystemLogs": {"Format": "json", "LogLevel": "info"},
    }
    if storage_classes:
        cluster["StorageClasses"] = storage_classes
    if extra:
        cluster.update(extra)
    return {"Clusters": {CLUSTER: cluster}}


def directory_volume(root: Path, n: int, **kw: Any) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    return {"uuid": vol_uuid(n), "Driver": "Directory", "DriverParameters": {"Root": str(root)}, **kw}


@dataclass
class KeepServer:
    """A real ``keepstore`` process started from a generated cluster config."""

    workdir: Path
    port: int
    config: dict[str, Any]
    name: str = "keepstore"
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    env: dict[str, str] = field(default_factory=dict)
    _log_offset: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.yml"

    def volume_root(self, n: int) -> Path:
        cluster = self.config["Clusters"][CLUSTER]
        return Path(cluster["Volumes"][vol_uuid(n)]["DriverParameters"]["Root"])

    def start(self, wait: bool = True) -> KeepServer:
        self.config_path.write_text(yaml.safe_dump(self.config))
        LOG_DIR.mkdir(exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # the log is appended to
        log = open(self.log_path, "ab")
        env = dict(os.environ, **self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keepstore", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env=env,
            cwd=self.workdir,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"keepstore exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            # With several worker processes the port accepts as soon as the supervisor has bound it: wait for the
            # supervisor's "all workers ready" (log lines reach the file up to 20 ms late, so their absence says
            # nothing), or, where the log level hides it, at least for all the workers to exist.
            workers = self._workers
            if workers == 1:
                return
            level = str(self.config["Clusters"][CLUSTER].get("SystemLogs", {}).get("LogLevel", "info")).lower()
            if level in ("info", "debug"):
                if "all workers ready" in self.log_text()[self._log_offset :]:
                    return
            elif len(process_tree(self.proc.pid)) > workers:
                return
            time.sleep(0.05)
        raise RuntimeError(f"keepstore did not start listening:\n{self.log_text()[-3000:]}")

    @property
    def _workers(self) -> int:
        """How many worker processes this config makes keepstore start (as keepstore.cli decides)."""
        from keepstore.config import ConfigError, from_document
        from keepstore.multiproc import worker_count

        try:
            return worker_count(from_document(self.config, str(self.config_path), dict(os.environ, **self.env)))
        except ConfigError:
            return 1  # keepstore will refuse the config: wait_ready reports its exit

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> KeepServer:
        self.stop()
        return self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # --- HTTP helpers --------------------------------------------------------------------------------------------

    def req(self, method: str, path: str, **kw: Any) -> Response:
        return request(self.port, method, path, **kw)

    def put(self, data: bytes, token: str | None = USER_TOKEN, path: str | None = None, **kw: Any) -> Response:
        return self.req("PUT", path or f"/{md5(data)}", body=data, token=token, **kw)

    def get(self, locator: str, token: str | None = USER_TOKEN, **kw: Any) -> Response:
        return self.req("GET", f"/{locator}", token=token, **kw)

    def head(self, locator: str, token: str | None = USER_TOKEN, **kw: Any) -> Response:
        return self.req("HEAD", f"/{locator}", token=token, **kw)

    def index(self, path: str = "/index", token: str = ROOT_TOKEN) -> Response:
        return self.req("GET", path, token=token)

    def index_hashes(self, path: str = "/index") -> list[str]:
        r = self.index(path)
        assert r.status == 200, r
        assert r.body.endswith(b"\n")
        return [line.split(" ")[0].split("+")[0] for line in r.text.splitlines() if line]

    def metrics(self) -> str:
        r = self.req("GET", "/metrics", token=MGMT_TOKEN)
        assert r.status == 200, r
        return r.text

    def status_json(self) -> dict[str, Any]:
        r = self.req("GET", "/status.json", token=MGMT_TOKEN)
        assert r.status == 200, r
        return json.loads(r.body)  # type: ignore[no-any-return]


ServerFactory = Callable[..., "KeepServer"]


def sign(
    locator: str, token: str = USER_TOKEN, key: str = SIGNING_KEY, ttl: int = TTL, expiry: int | None = None
) -> str:
    return Signer(key.encode(), ttl).sign(locator, token, expiry)


def stored_files(root: Path) -> dict[str, Path]:
    """hash -> path of every live block file under a Directory volume root."""
    out = {}
    for sub in root.iterdir():
        if sub.is_dir() and len(sub.name) == 3:
            for f in sub.iterdir():
                if len(f.name) == 32:
                    out[f.name] = f
    return out


def temp_files(root: Path) -> list[Path]:
    return [f for sub in root.iterdir() if sub.is_dir() for f in sub.iterdir() if f.name.startswith("tmp")]


def page_cache_residency(path: Path) -> float:
    """Fraction of ``path``'s pages in the page cache (mincore(2)): 0.0 when a write bypassed it (O_DIRECT)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def page_cache_skip_reason(directory: Path) -> str | None:
    """Why a test of page-cache residency after direct writes cannot run in ``directory`` (None: it can)."""
    kind = file_system_type(directory)
    if kind in ("tmpfs", "ramfs"):
        return f"the directory is on {kind}: every file lives in the page cache there, written or not"
    probe = directory / ".direct-io-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        return f"{kind} refuses O_DIRECT here ({exc.strerror}): writes fall back to buffered (see test_fileio.py)"
    os.close(fd)
    probe.unlink()
    return None


def file_system_type(path: Path) -> str:
    """What ``stat -f`` calls the file system holding ``path`` (ext2/ext3 for ext4, tmpfs, xfs, ...)."""
    done = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a keepstore with several workers is a supervisor and its children)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for child in (task / "children").read_text().split():
                out += process_tree(int(child))
        except OSError:
            pass
    return out


def peak_rss_kib(pid: int) -> int:
    """Sum of the peak RSS (VmHWM) of ``pid`` and its descendants: an upper bound of their combined peak."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    if not total:
        raise RuntimeError("no VmHWM")
    return total


class InProcessServer:
    """A keepstore server running in this process, on its own event loop thread, on 127.0.0.1.

    For the few tests that must control something outside keepstore's reach (a slow disk): they swap a volume
    for a subclass before serving. Everything else is the real service and HTTP stack.
    """

    def __init__(self, doc: dict[str, Any], patch: Any = None) -> None:
        import asyncio
        import threading

        from keepstore.config import from_document
        from keepstore.http.app import KeepHTTP
        from keepstore.http.protocol import KeepServer as LowLevelServer
        from keepstore.service import Service

        self.config = from_document(doc, source="<test>", env={})
        self.port = self.config.listen_port
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()

        async def main() -> None:
            from aiohttp import web

            service = Service.build(self.config)
            if patch is not None:
                patch(service)
            await service.start()
            http = KeepHTTP(service)
            service.http = http
            server = LowLevelServer(http.handle, handler_cancellation=True, auto_decompress=False)
            self.runner = web.ServerRunner(server, shutdown_timeout=5)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
            self.service = service
            self._ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(main(), self.loop).result(20)

    def req(self, method: str, path: str, **kw: Any) -> Response:
        return request(self.port, method, path, **kw)

    def close(self) -> None:
        import asyncio

        async def stop() -> None:
            await self.runner.cleanup()
            if self.service.http is not None:
                await self.service.http.close()
            await self.service.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_for(cond: Callable[[], Any], timeout: float = 30, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class StubPeer:
    """A misbehaving keepstore peer: answers every GET with what ``respond(path)`` returns (status, body)."""

    def __init__(self, respond: Callable[[str], tuple[int, bytes]]) -> None:
        import http.server
        import threading

        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, dict(self.headers)))
                status, body = respond(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def build_shim(directory: Path, source: str, name: str = "shim") -> Path:
    """An LD_PRELOAD library compiled from C ``source`` into ``directory`` (skips the test without a C compiler,
    which the C extensions need too)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("needs a C compiler to build the shim (the C extensions need one too)")
    src, out = directory / f"{name}.c", directory / f"{name}.so"
    src.write_text(source)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"], check=True)
    return out

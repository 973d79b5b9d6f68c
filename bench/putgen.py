"""PUT load generator for large blocks: what bench/lua/put.lua does in wrk, without a fresh body per request.

wrk's Lua builds each request as a new string, so every 64 MiB PUT allocates 64 MiB (twice: the string, then
wrk's copy of it) and the kernel zeroes every new page. On this machine that zeroing (``clear_page_erms``) took
half of both cores during 64 MiB PUTs, more than either server: the load generator, not the server, set the pace.
Here each connection owns one body buffer and rewrites only its last 16 bytes (the counter that makes each block
unique) between requests, then sends it with ``sendall`` (no copy in user space).

Same inputs as put.lua (the KS_BENCH_* environment variables: names file, base file, size, first counter value,
token) and the same output lines as wrk (``Requests/sec``, latency percentiles, non-2xx count, ``wrapped=``), so
bench/http_bench.py runs and parses it exactly like wrk. Like wrk, it counts only requests that completed within
the duration; at the deadline the requests still in flight are dropped (their connections closed).

    python bench/putgen.py -c 8 -d 10 http://127.0.0.1:25107
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from urllib.parse import urlsplit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--connections", type=int, required=True)
    ap.add_argument("-d", "--duration", type=float, required=True, help="seconds")
    ap.add_argument("url")
    args = ap.parse_args()
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    size = int(os.environ["KS_BENCH_SIZE"])
    first = int(os.environ.get("KS_BENCH_FIRST", "0"))
    token = os.environ.get("KS_BENCH_TOKEN", "")
    with open(os.environ["KS_BENCH_NAMES"]) as f:
        names = [line.strip() for line in f if line.strip()]
    with open(os.environ["KS_BENCH_BASE"], "rb") as f:
        prefix = f.read(size - 16)
    extra = f"Host: {host}:{port}\r\nContent-Length: {size}\r\n"
    if token:
        extra += f"Authorization: Bearer {token}\r\n"

    conns = args.connections
    latencies: list[list[float]] = [[] for _ in range(conns)]
    non2xx = [0] * conns
    errors = [0] * conns
    wrapped = [0] * conns
    bodies = []
    for _ in range(conns):
        body = bytearray(size)  # touched now, before the clock starts
        body[: size - 16] = prefix
        bodies.append(body)
    start = threading.Barrier(conns + 1)
    deadline = [0.0]

    def connection(k: int) -> None:
        body = bodies[k]
        view = memoryview(body)
        n = k
        sock: socket.socket | None = None
        start.wait()
        while True:
            i = n % len(names)
            if n >= len(names):
                wrapped[k] += 1
            n += conns
            body[size - 16 :] = b"%016x" % (first + i)
            head = f"PUT /{names[i]} HTTP/1.1\r\n{extra}\r\n".encode()
            t0 = time.monotonic()
            if t0 >= deadline[0]:
                break
            try:
                if sock is None:
                    sock = socket.create_connection((host, port))
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(max(0.01, deadline[0] - t0))
                sock.sendall(head)
                sock.sendall(view)
                status, close = _response(sock)
            except TimeoutError:
                break  # still in flight at the deadline: not counted, as in wrk
            except OSError:
                errors[k] += 1
                if sock is not None:
                    sock.close()
                sock = None
                continue
            t1 = time.monotonic()
            if t1 > deadline[0]:
                break
            latencies[k].append(t1 - t0)
            if not 200 <= status < 400:
                non2xx[k] += 1
            if close:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=connection, args=(k,), daemon=True) for k in range(conns)]
    for t in threads:
        t.start()
    began = time.monotonic()
    deadline[0] = began + args.duration
    start.wait()
    for t in threads:
        t.join()
    elapsed = max(args.duration, 1e-9)
    done = sorted(x for per in latencies for x in per)
    count = len(done)

    def pct(p: float) -> str:
        if not done:
            return "0.00ms"
        return f"{1000 * done[min(count - 1, int(p * count))]:.2f}ms"

    print(f"Running {args.duration:.0f}s test @ {args.url}\n  {conns} connections (bench/putgen.py)")
    print("  Latency Distribution")
    for label, p in (("50%", 0.50), ("75%", 0.75), ("90%", 0.90), ("99%", 0.99)):
        print(f"     {label}   {pct(p)}")
    print(f"  {count} requests in {elapsed:.2f}s, {count * size / 1e6:.1f}MB sent")
    if sum(non2xx):
        print(f"  Non-2xx or 3xx responses: {sum(non2xx)}")
    if sum(errors):
        print(f"  Socket errors: connect 0, read {sum(errors)}, write 0, timeout 0")
    print(f"Requests/sec: {count / elapsed:10.2f}")
    print(f"wrapped={sum(wrapped)}")


def _response(sock: socket.socket) -> tuple[int, bool]:
    """Read one response (status line, headers, Content-Length body): its status, and whether the server closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        rest += chunk
    return status, close


if __name__ == "__main__":
    main()

"""tunneld vs a direct connection vs OpenSSH ``ssh -R``: throughput, req/s, latency, connections.

    python bench/bench.py                      # everything, ~3-4 min on a 2-CPU VM
    python bench/bench.py --quick              # everything, shorter runs, ~1 min
    python bench/bench.py --scenarios wrk,c1000 --rounds 5

One run starts, as separate processes on 127.0.0.1 only (never a system service):

* a dev-mode edge (``tunneld edge --dev``) with a throwaway data dir, writing its access log to a
  file as users run it (``--stripped``: no access log, and agents without local API/inspector);
* a Python bulk upstream (TCP source/sink + minimal HTTP/1.1 server) and a private nginx (own
  config in the temp dir, 1 worker) serving small static files;
* four agents: ``tunneld tcp`` and ``tunneld http`` to the bulk upstream, ``tunneld http`` and
  ``tunneld tcp`` to nginx, each with its local API and inspector on (capture included);
* a private sshd (own config, throwaway host/user keys, ``GatewayPorts no``, ``PermitListen``
  limited to its loopback ports) and one ``ssh -N -R`` client forwarding three loopback ports to
  the bulk TCP upstream, the bulk HTTP upstream and nginx.

Scenarios (``--scenarios``, default all):

* ``bulk``  -- MB/s of one upload and one download through direct / tunneld / OpenSSH, TCP and HTTP;
* ``wrk``   -- wrk req/s and p50/p99 latency at 1, 16 and 64 connections against nginx through
  direct, OpenSSH -R and the tunneld HTTP tunnel (the edge's plain-HTTP listener);
* ``ttfb``  -- a new TCP connection per request: time from connect() to the first response byte;
* ``c1000`` -- 1000 connections opened at once through each path; once all are open each sends one
  request and reads the whole response: share served, time, per-request latency.

Every figure is the median of ``--rounds`` (>= 3) interleaved rounds (each round runs every path
once, in a rotated order) and is shown with its ratio to direct and to OpenSSH from the same run.
Edge-side (tunneld edge / sshd tree) and agent-side (tunneld agent / ssh) CPU seconds and peak RSS
are measured around every run from /proc (peak RSS is reset per run with /proc/PID/clear_refs).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
BUF = 1 * MiB
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 30.0
#: Children run the tunneld of this checkout, whatever the installed copy points at.
REPO = Path(__file__).resolve().parent.parent
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}

# =============================================================================================
# Bulk upstream (runs in its own process: `python bench.py --upstream TCP_PORT HTTP_PORT`)
# =============================================================================================

# TCP protocol: the client sends 9 bytes, op (b"U" upload or b"D" download) + N (8 bytes, big
# endian). Upload: the server reads N bytes and answers b"k". Download: it sends N zero bytes
# and closes.


def _recv_exact_into(sock: socket.socket, buf: memoryview, n: int) -> int:
    got = 0
    while got < n:
        k = sock.recv_into(buf[: min(len(buf), n - got)])
        if not k:
            break
        got += k
    return got


def _sink(sock: socket.socket, n: int) -> int:
    return _recv_exact_into(sock, memoryview(bytearray(BUF)), n)


def _source(sock: socket.socket, n: int) -> None:
    chunk = memoryview(bytes(BUF))
    left = n
    while left >= BUF:
        sock.sendall(chunk)
        left -= BUF
    if left:
        sock.sendall(chunk[:left])


def _tcp_conn(sock: socket.socket) -> None:
    with sock:
        head = memoryview(bytearray(9))
        if _recv_exact_into(sock, head, 9) < 9:
            return  # readiness probes connect and close
        op, n = bytes(head[:1]), int.from_bytes(head[1:], "big")
        if op == b"U":
            got = _sink(sock, n)
            if got == n:
                sock.sendall(b"k")
        elif op == b"D":
            _source(sock, n)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass


def _read_head(sock: socket.socket, pending: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in pending:
        if len(pending) > 64 * 1024:
            return None
        data = sock.recv(65536)
        if not data:
            return None
        pending += data
    end = pending.index(b"\r\n\r\n") + 4
    head = bytes(pending[:end])
    del pending[:end]
    return head


def _http_conn(sock: socket.socket) -> None:
    with sock:
        pending = bytearray()
        while True:
            head = _read_head(sock, pending)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = (lines[0].split(" ") + ["", ""])[:3]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            close = headers.get("connection", "").lower() == "close"
            if method == "GET" and target.startswith("/bytes"):
                n = 0
                if "?" in target:
                    for part in target.split("?", 1)[1].split("&"):
                        if part.startswith("n="):
                            n = int(part[2:])
                conn = b"Connection: close\r\n" if close else b""
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n%s\r\n" % (n, conn))
                _source(sock, n)
            elif method in ("POST", "PUT"):
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    got = _sink_chunked(sock, pending)
                else:
                    n = int(headers.get("content-length", "0"))
                    got = min(n, len(pending))
                    del pending[:got]
                    got += _sink(sock, n - got)
                body = b"received %d\n" % got
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (len(body), b"Connection: close\r\n" if close else b"", body))
            else:
                body = b"not found\n"
                sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            if close:
                sock.shutdown(socket.SHUT_WR)
                return


def _sink_chunked(sock: socket.socket, pending: bytearray) -> int:
    total = 0

    def fill(k: int) -> bool:
        while len(pending) < k:
            data = sock.recv(BUF)
            if not data:
                return False
            pending.extend(data)
        return True

    while True:
        while b"\r\n" not in pending:
            if not fill(len(pending) + 1):
                return total
        i = pending.index(b"\r\n")
        size = int(bytes(pending[:i]).split(b";")[0], 16)
        del pending[: i + 2]
        if size == 0:
            while b"\r\n\r\n" not in b"\r\n" + pending:
                if not fill(len(pending) + 1):
                    return total
            j = (b"\r\n" + pending).index(b"\r\n\r\n")
            del pending[: max(0, j + 2)]
            return total
        if not fill(size + 2):
            return total
        del pending[: size + 2]
        total += size


def _serve(port: int, handler: Callable[[socket.socket], None]) -> None:
    ls = socket.create_server((HOST, port), backlog=64)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_guard, args=(handler, conn), daemon=True).start()


def _guard(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    try:
        handler(conn)
    except OSError:
        pass


def upstream_main(tcp_port: int, http_port: int) -> None:
    threading.Thread(target=_serve, args=(tcp_port, _tcp_conn), daemon=True).start()
    threading.Thread(target=_serve, args=(http_port, _http_conn), daemon=True).start()
    print("upstream ready", flush=True)
    # Exit when the parent goes away (stdin closes) or on SIGTERM.
    try:
        sys.stdin.read()
    except (OSError, KeyboardInterrupt):
        pass


# =============================================================================================
# Bulk clients (blocking sockets in the bench process)
# =============================================================================================


class TransferError(Exception):
    pass


def _connect(port: int, timeout: float) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def tcp_upload(port: int, n: int, timeout: float) -> float:
    chunk = memoryview(bytes(BUF))
    t0 = time.perf_counter()
    with _connect(port, timeout) as s:
        s.sendall(b"U" + n.to_bytes(8, "big"))
        left = n
        while left >= BUF:
            s.sendall(chunk)
            left -= BUF
        if left:
            s.sendall(chunk[:left])
        ack = s.recv(1)
        if ack != b"k":
            raise TransferError(f"no ack after upload (got {ack!r})")
    return time.perf_counter() - t0


def _download_rest(s: socket.socket, buf: memoryview, got: int, n: int) -> int:
    """Receive until ``n`` bytes in all have arrived (``got`` already did); an early end fails."""
    while got < n:
        k = s.recv_into(buf)
        if not k:
            raise TransferError(f"download ended early: {got} of {n} bytes")
        got += k
    return got


def tcp_download(port: int, n: int, timeout: float) -> float:
    buf = memoryview(bytearray(BUF))
    t0 = time.perf_counter()
    with _connect(port, timeout) as s:
        s.sendall(b"D" + n.to_bytes(8, "big"))
        got = _download_rest(s, buf, 0, n)
        elapsed = time.perf_counter() - t0
    if got != n:
        raise TransferError(f"download got {got} bytes, expected {n}")
    return elapsed


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


def _read_response_head(s: socket.socket, first: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    data = first
    while b"\r\n\r\n" not in data:
        more = s.recv(65536)
        if not more:
            raise TransferError(f"connection closed before the response head ({data[:200]!r})")
        data += more
        if len(data) > 256 * 1024:
            raise TransferError("response head too large")
    head, rest = data.split(b"\r\n\r\n", 1)
    status, headers = _parse_head(head)
    return status, headers, rest


def _read_body(s: socket.socket, headers: dict[str, str], rest: bytes, limit: int) -> bytes:
    if "content-length" in headers:
        n = int(headers["content-length"])
        body = bytearray(rest)
        while len(body) < n:
            more = s.recv(65536)
            if not more:
                break
            body += more
        return bytes(body[:n])
    body = bytearray(rest)
    while len(body) < limit:
        more = s.recv(65536)
        if not more:
            break
        body += more
    return bytes(body)


def http_upload(port: int, host: str, n: int, timeout: float) -> float:
    chunk = memoryview(bytes(BUF))
    t0 = time.perf_counter()
    with _connect(port, timeout) as s:
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Length: {n}\r\nConnection: close\r\n\r\n".encode())
        left = n
        while left >= BUF:
            s.sendall(chunk)
            left -= BUF
        if left:
            s.sendall(chunk[:left])
        status, headers, rest = _read_response_head(s)
        body = _read_body(s, headers, rest, 64 * 1024)
        elapsed = time.perf_counter() - t0
    if status != 200 or body.strip() != b"received %d" % n:
        raise TransferError(f"upload answered {status} {body[:200]!r}")
    return elapsed


def http_download(port: int, host: str, n: int, timeout: float) -> float:
    buf = memoryview(bytearray(BUF))
    t0 = time.perf_counter()
    with _connect(port, timeout) as s:
        s.sendall(f"GET /bytes?n={n} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        status, headers, rest = _read_response_head(s)
        if status != 200:
            raise TransferError(f"download answered {status} {headers} {rest[:200]!r}")
        if headers.get("content-length") != str(n):
            raise TransferError(f"download response has no Content-Length {n}: {headers}")
        got = _download_rest(s, buf, len(rest), n)
        elapsed = time.perf_counter() - t0
    if got != n:
        raise TransferError(f"download got {got} bytes, expected {n}")
    return elapsed


# =============================================================================================
# Small-request clients: new-connection TTFB, and N connections at once
# =============================================================================================


def get_request(host: str, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tunneld-bench\r\n"
            "Connection: close\r\n\r\n").encode()


def ttfb_once(port: int, request: bytes, body_len: int, timeout: float) -> float:
    """Seconds from connect() to the first response byte on a new connection (then read it all)."""
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(request)
        first = s.recv(65536)
        t1 = time.perf_counter()
        if not first:
            raise TransferError("closed without a response")
        status, headers, rest = _read_response_head(s, first)
        body = _read_body(s, headers, rest, body_len + 1)
    if status != 200 or len(body) != body_len:
        raise TransferError(f"answered {status} with {len(body)} body bytes (expected 200, {body_len})")
    return t1 - t0


@dataclass
class Wave:
    """What happened to N connections opened at once."""

    n: int
    served: int = 0
    connected: int = 0
    connect_s: float = 0.0  # until the last connect() finished
    total_s: float = 0.0  # until the last response (or failure)
    latencies: list[float] = field(default_factory=list)  # request -> full response, after all opened
    errors: Counter[str] = field(default_factory=Counter)


async def _wave(port: int, request: bytes, body_len: int, n: int, deadline: float) -> Wave:
    loop = asyncio.get_running_loop()
    res = Wave(n)
    all_open = asyncio.Event()
    left = n
    t0 = loop.time()

    def opened() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            res.connect_s = loop.time() - t0
            all_open.set()

    async def one() -> None:
        writer = None
        stage = "connect"
        try:
            try:
                reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
                res.connected += 1
            finally:
                opened()
            await all_open.wait()
            stage = "request"
            t1 = loop.time()
            writer.write(request)
            await writer.drain()
            stage = "response"
            data = await reader.read()  # until EOF: the request says Connection: close
            t2 = loop.time()
            head, sep, body = data.partition(b"\r\n\r\n")
            status, headers = _parse_head(head)
            if not sep:
                res.errors[f"{stage}: closed after {len(data)} bytes"] += 1
            elif status != 200:
                code = headers.get("tunneld-error-code")
                res.errors[f"status {status}" + (f" {code}" if code else "")] += 1
            elif len(body) != body_len:
                res.errors[f"body {len(body)} of {body_len} bytes"] += 1
            else:
                res.served += 1
                res.latencies.append(t2 - t1)
        except (OSError, EOFError) as exc:
            res.errors[f"{stage}: {type(exc).__name__} {getattr(exc, 'strerror', '') or exc}"[:80]] += 1
        except asyncio.CancelledError:
            res.errors[f"{stage}: timeout"] += 1
        finally:
            if writer is not None:
                writer.transport.abort()

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    _done, pending = await asyncio.wait(tasks, timeout=deadline)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)
    if not all_open.is_set():
        res.connect_s = loop.time() - t0
    res.total_s = loop.time() - t0
    return res


def conn_wave(port: int, request: bytes, body_len: int, n: int, deadline: float) -> Wave:
    return asyncio.run(_wave(port, request, body_len, n, deadline))


# =============================================================================================
# wrk
# =============================================================================================

WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKRESULT requests=%d duration_us=%d bytes=%d p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f "
    .. "mean_us=%.1f err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\\n",
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def run_wrk(script: Path, port: int, host: str, path: str, conns: int, duration: float) -> dict[str, float]:
    threads = min(2, conns)
    argv = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration:g}s", "--timeout", "5s",
            "-s", str(script), "-H", f"Host: {host}", f"http://{HOST}:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    for line in out.stdout.splitlines():
        if line.startswith("WRKRESULT"):
            return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    raise TransferError(f"wrk exited {out.returncode}: {out.stdout[-300:]} {out.stderr[-300:]}")


# =============================================================================================
# /proc: CPU seconds and peak RSS of process trees
# =============================================================================================


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rindex(b")") + 2:].split()
        kids.setdefault(int(rest[1]), []).append(int(entry))
    return kids


def tree_pids(pid: int | None) -> list[int]:
    """A process and all its live descendants."""
    if pid is None:
        return []
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return 0.0
    rest = stat[stat.rindex(b")") + 2:].split()
    # Fields 14-17: utime, stime, cutime, cstime (the last two: reaped children's).
    return (int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])) / CLK_TCK


def tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a process and all its live descendants."""
    return sum(_cpu_of(p) for p in tree_pids(pid))


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def system_busy() -> float:
    """CPU seconds all CPUs spent busy (user+nice+system+irq+softirq) since boot."""
    with open("/proc/stat") as fh:
        f = fh.readline().split()
    return (int(f[1]) + int(f[2]) + int(f[3]) + int(f[6]) + int(f[7])) / CLK_TCK


class PeakRss:
    """Peak RSS per process, reset with /proc/PID/clear_refs ("5" resets VmHWM, Linux >= 4.0).

    Every reading first folds the current VmHWM into all open accumulators, so per-run resets
    do not lose the peak of the enclosing scenario.
    """

    def __init__(self) -> None:
        self.accums: list[dict[int, int]] = []
        self.can_reset = True

    def _fold(self, pid: int) -> int:
        kib = _status_kib(pid, "VmHWM")
        for acc in self.accums:
            acc[pid] = max(acc.get(pid, 0), kib)
        return kib

    def reset(self, pids: list[int]) -> None:
        for pid in pids:
            self._fold(pid)
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                self.can_reset = False

    def read(self, pids: list[int]) -> float:
        """MiB: the sum over the tree of each process's peak since its reset."""
        return sum(self._fold(pid) for pid in pids) / 1024


PEAK = PeakRss()


class Meter:
    """CPU seconds and peak RSS of one process tree over an interval."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.cpu0 = 0.0

    def start(self) -> None:
        if self.pid is not None:
            PEAK.reset(tree_pids(self.pid))
            self.cpu0 = tree_cpu(self.pid)

    def stop(self) -> tuple[float, float]:
        if self.pid is None:
            return 0.0, 0.0
        pids = tree_pids(self.pid)
        return tree_cpu(self.pid) - self.cpu0, PEAK.read(pids)


def interpreter_note(pid: int) -> str:
    """Which Python runs a tunneld process, and how it was built.

    The interpreter's build moves every figure here: a statically linked, profile-optimised
    CPython (Debian's /usr/bin/python3.11) used 2-10 % less CPU per proxied request than a
    pyenv build with a shared libpython and no PGO, in five alternating pairs (README).
    """
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "tunneld's interpreter: unknown"
    try:
        version = subprocess.run([exe, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        libs = subprocess.run(["ldd", exe], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return f"tunneld's interpreter: {exe}"
    shared = "shared libpython" if "libpython" in libs else "libpython linked in"
    return f"tunneld's interpreter: Python {version}, {exe} ({shared})"


def nofile_limit(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return "/".join(line.split()[3:5])
    except OSError:
        pass
    return "?"


def raise_nofile(want: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(max(want, soft), hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# =============================================================================================
# Processes
# =============================================================================================

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_port_range(count: int) -> tuple[int, int]:
    for _ in range(200):
        low = random.randrange(30000, 60000 - count)
        socks = []
        try:
            for p in range(low, low + count):
                s = socket.socket()
                socks.append(s)
                s.bind((HOST, p))
            return low, low + count - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range found")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    lines: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def start_reader(self) -> None:
        def pump() -> None:
            assert self.popen.stdout is not None
            with open(self.log, "ab") as out:
                for raw in self.popen.stdout:
                    out.write(raw)
                    out.flush()
                    with self.cond:
                        if len(self.lines) < 1000:
                            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                        self.cond.notify_all()
            with self.cond:
                self.cond.notify_all()

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, pred: Callable[[list[str]], object], timeout: float) -> object:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = pred(self.lines)
                if found:
                    return found
                if self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; see {self.log}\n"
                                       + tail(self.log))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log}\n"
                                       + tail(self.log))
                self.cond.wait(min(left, 0.5))


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], *, stdin: bool = False) -> Proc:
        log = self.tmp / f"{name}.log"
        popen = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.tmp,
                                 start_new_session=True, env=CHILD_ENV)
        proc = Proc(name, popen, log)
        proc.start_reader()
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} died (exit {p.popen.returncode})\n" + tail(p.log))

    def stop_all(self) -> None:
        # Descendants first collected by pid: sshd's per-connection children leave the group.
        trees = {proc.pid: tree_pids(proc.pid) for proc in self.procs if proc.popen.poll() is None}
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(5)
            for stream in (proc.popen.stdin, proc.popen.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        for root, pids in trees.items():
            for pid in pids:
                if pid != root:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass


def wait_connectable(port: int, timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            pass
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}\n" + tail(proc.log))
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} not connectable after {timeout:.0f}s")
        time.sleep(0.1)


def forwarding(lines: list[str], prefix: str) -> str | None:
    for line in lines:
        url = ""
        if line.startswith("Forwarding"):
            url = line.split()[1]
        elif 'msg="started tunnel"' in line and " url=" in line:  # the logfmt log, stdout not a tty
            url = line.split(" url=", 1)[1].split()[0]
        if url.startswith(prefix):
            return url
    return None


# ---- nginx --------------------------------------------------------------------------------------

#: Static files nginx serves (name -> size).
FILES = {"index.html": 612, "1k.bin": 1024, "16k.bin": 16 * 1024}


def start_nginx(procs: Procs, tmp: Path) -> tuple[Proc, int]:
    d = tmp / "nginx"
    www = d / "www"
    www.mkdir(parents=True)
    for name, size in FILES.items():
        (www / name).write_bytes(b"x" * size)
    port = free_port()
    user = "user root root;" if os.geteuid() == 0 else ""  # workers must read the 0700 temp dir
    (d / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 16384;
{user}
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    types {{ text/html html; application/octet-stream bin; }}
    default_type application/octet-stream;
    server {{
        listen {HOST}:{port} backlog=4096;
        server_name _;
        root {www};
        location / {{ }}
    }}
}}
""")
    proc = procs.start("nginx", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", "stderr"])
    wait_connectable(port, READY_TIMEOUT, proc)
    return proc, port


# ---- OpenSSH ------------------------------------------------------------------------------------


def start_ssh(procs: Procs, tmp: Path, targets: dict[str, int]) -> tuple[Proc, Proc, dict[str, int]]:
    """sshd + one ``ssh -N -R`` client; returns the remote port forwarded to each target port."""
    sshdir = tmp / "ssh"
    sshdir.mkdir(mode=0o700)
    hostkey, userkey = sshdir / "host_ed25519", sshdir / "user_ed25519"
    for key in (hostkey, userkey):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    authorized = sshdir / "authorized_keys"
    shutil.copy(userkey.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    root = os.geteuid() == 0
    user = "root" if root else getpass.getuser()
    if root and not Path("/run/sshd").is_dir():
        # sshd (as root) insists on its privilege-separation directory; Debian's unit creates it.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    sshd_port = free_port()
    rports = {name: free_port() for name in targets}
    config = sshdir / "sshd_config"
    config.write_text("\n".join([
        f"Port {sshd_port}",
        f"ListenAddress {HOST}",
        f"HostKey {hostkey}",
        "PidFile none",
        f"AuthorizedKeysFile {authorized}",
        "StrictModes no",  # the temp dir lives under world-writable /tmp
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        f"PermitRootLogin {'yes' if root else 'no'}",
        f"AllowUsers {user}",
        "UsePAM no",
        "AllowTcpForwarding remote",
        "GatewayPorts no",
        "PermitListen " + " ".join(f"{HOST}:{p}" for p in rports.values()),
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTTY no",
        "LogLevel ERROR",
        "",
    ]))
    sshd = procs.start("sshd", ["/usr/sbin/sshd", "-f", str(config), "-D", "-e"])
    wait_connectable(sshd_port, READY_TIMEOUT, sshd)
    forwards = []
    for name, target in targets.items():
        forwards += ["-R", f"{HOST}:{rports[name]}:{HOST}:{target}"]
    ssh = procs.start("ssh", [
        "ssh", "-N", "-F", "/dev/null", *forwards,
        "-p", str(sshd_port), "-i", str(userkey), "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR", f"{user}@{HOST}",
    ])
    for port in rports.values():
        wait_connectable(port, READY_TIMEOUT, ssh)
    return sshd, ssh, rports


# =============================================================================================
# Results
# =============================================================================================

DIRECT, SSH, TUN_HTTP, TUN_TCP = "direct", "OpenSSH -R", "tunneld HTTP", "tunneld TCP"


@dataclass
class Route:
    """One way to reach a target: a local port (+ Host header) and who relays it."""

    name: str
    port: int
    host: str
    edge_pid: int | None = None  # edge-side process: tunneld edge / sshd
    agent_pid: int | None = None  # agent-side process: tunneld agent / ssh


@dataclass
class Row:
    scenario: str
    metric: str  # e.g. "req/s c=16"
    path: str
    unit: str
    fmt: str = ".1f"
    values: list[float] = field(default_factory=list)
    edge_cpu: list[float] = field(default_factory=list)
    agent_cpu: list[float] = field(default_factory=list)
    edge_rss: list[float] = field(default_factory=list)
    agent_rss: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    show_res: bool = True

    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


class Results:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], Row] = {}

    def row(self, scenario: str, metric: str, path: str, unit: str, fmt: str = ".1f",
            show_res: bool = True) -> Row:
        key = (scenario, metric, path)
        if key not in self.rows:
            self.rows[key] = Row(scenario, metric, path, unit, fmt, show_res=show_res)
        return self.rows[key]

    def get(self, scenario: str, metric: str, path: str) -> float | None:
        r = self.rows.get((scenario, metric, path))
        return r.median() if r else None

    def ratio(self, scenario: str, metric: str, path: str, base: str) -> float | None:
        a, b = self.get(scenario, metric, path), self.get(scenario, metric, base)
        return a / b if a is not None and b else None


class Gate:
    """Wait before each run until processes outside this benchmark leave the CPUs alone.

    The machine is shared: a run starts once foreign CPU (all busy CPU time minus this process
    tree's) stayed below ``threshold`` cores over a 0.3 s window, or after ``max_wait`` seconds.
    """

    def __init__(self, threshold: float, max_wait: float, budget: float = 60.0) -> None:
        self.threshold = threshold
        self.max_wait = max_wait
        self.budget = budget  # total seconds of waiting per benchmark run
        self.waited = 0.0
        self.gave_up = 0
        self.runs = 0

    def wait(self) -> None:
        if self.max_wait <= 0 or self.waited >= self.budget:
            return
        self.runs += 1
        t0 = time.monotonic()
        me = os.getpid()
        while True:
            b0, o0, w0 = system_busy(), tree_cpu(me), time.monotonic()
            time.sleep(0.3)
            foreign = ((system_busy() - b0) - (tree_cpu(me) - o0)) / (time.monotonic() - w0)
            if foreign < self.threshold:
                break
            if time.monotonic() - t0 > min(self.max_wait, self.budget - self.waited):
                self.gave_up += 1
                break
        self.waited += time.monotonic() - t0


GATE = Gate(0.25, 0.0)


def measured(route: Route, fn: Callable[[], object]) -> tuple[object, float, float, float, float]:
    """Run ``fn`` with CPU/peak-RSS meters on the route's edge-side and agent-side processes."""
    GATE.wait()
    em, am = Meter(route.edge_pid), Meter(route.agent_pid)
    em.start()
    am.start()
    out = fn()
    ecpu, erss = em.stop()
    acpu, arss = am.stop()
    return out, ecpu, acpu, erss, arss


def record_res(row: Row, route: Route, ecpu: float, acpu: float, erss: float, arss: float) -> None:
    if route.edge_pid is not None:
        row.edge_cpu.append(ecpu)
        row.edge_rss.append(erss)
    if route.agent_pid is not None:
        row.agent_cpu.append(acpu)
        row.agent_rss.append(arss)


def rotated(items: list[Route], rnd: int) -> list[Route]:
    k = rnd % len(items) if items else 0
    return items[k:] + items[:k]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# =============================================================================================
# Scenarios
# =============================================================================================


@dataclass
class Env:
    args: argparse.Namespace
    tmp: Path
    procs: Procs
    results: Results
    bulk_tcp: list[Route]
    bulk_http: list[Route]
    nginx_http: list[Route]  # direct, ssh, tunneld HTTP
    nginx_tcp: Route | None  # tunneld TCP -> nginx
    wrk_script: Path


def say(msg: str) -> None:
    print(msg, flush=True)


def scenario_bulk(env: Env) -> None:
    a = env.args
    n, to = a.size_mib * MiB, a.timeout
    jobs: list[tuple[str, str, Route, Callable[[], float]]] = []
    for r in env.bulk_tcp:
        jobs.append(("TCP", "up", r, lambda r=r: tcp_upload(r.port, n, to)))
        jobs.append(("TCP", "down", r, lambda r=r: tcp_download(r.port, n, to)))
    for r in env.bulk_http:
        jobs.append(("HTTP", "up", r, lambda r=r: http_upload(r.port, r.host, n, to)))
        jobs.append(("HTTP", "down", r, lambda r=r: http_download(r.port, r.host, n, to)))
    say(f"bulk: {a.size_mib} MiB per transfer, {len(jobs)} variants x {a.rounds} rounds")
    for rnd in range(a.rounds):
        k = rnd % len(jobs)
        for proto, direction, route, fn in jobs[k:] + jobs[:k]:
            path = route.name
            row = env.results.row("bulk", f"{proto} {direction} MB/s", path, "MB/s")
            try:
                secs, ecpu, acpu, erss, arss = measured(route, fn)
            except (OSError, TransferError) as exc:
                row.errors.append(f"round {rnd + 1}: {type(exc).__name__}: {exc}")
                say(f"  round {rnd + 1} {proto:<4} {direction:<4} {path:<13} FAILED {exc}")
                time.sleep(0.5)
                continue
            assert isinstance(secs, float)
            row.values.append(n / secs / 1e6)
            record_res(row, route, ecpu, acpu, erss, arss)
            say(f"  round {rnd + 1} {proto:<4} {direction:<4} {path:<13} {n / secs / 1e6:8.1f} MB/s")
        env.procs.check_alive()


def scenario_wrk(env: Env) -> None:
    a = env.args
    path = a.path
    say(f"wrk: GET {path} ({FILES[path.lstrip('/')]} B) for {a.wrk_duration:g}s, connections "
        f"{','.join(map(str, a.wrk_conns))}, {len(env.nginx_http)} paths x {a.rounds} rounds")
    for rnd in range(a.rounds):
        for c in a.wrk_conns:
            for route in rotated(env.nginx_http, rnd):
                rps = env.results.row("wrk", f"req/s c={c}", route.name, "req/s", ".0f")
                p50 = env.results.row("wrk", f"p50 ms c={c}", route.name, "ms", ".2f", show_res=False)
                p99 = env.results.row("wrk", f"p99 ms c={c}", route.name, "ms", ".2f", show_res=False)
                try:
                    out, ecpu, acpu, erss, arss = measured(
                        route,
                        lambda r=route, c=c: run_wrk(env.wrk_script, r.port, r.host, path, c, a.wrk_duration))
                except (OSError, TransferError, subprocess.TimeoutExpired) as exc:
                    rps.errors.append(f"round {rnd + 1}: {exc}")
                    say(f"  round {rnd + 1} c={c:<3} {route.name:<13} FAILED {exc}")
                    continue
                assert isinstance(out, dict)
                secs = out["duration_us"] / 1e6
                rate = out["requests"] / secs
                rps.values.append(rate)
                p50.values.append(out["p50_us"] / 1000)
                p99.values.append(out["p99_us"] / 1000)
                record_res(rps, route, ecpu, acpu, erss, arss)
                if route.edge_pid is not None and out["requests"]:
                    env.results.row(
                        "wrk", f"CPU us/req c={c}", route.name, "us", ".0f", show_res=False
                    ).values.append(1e6 * (ecpu + acpu) / out["requests"])
                errs = {k[4:]: int(v) for k, v in out.items() if k.startswith("err_") and v}
                if errs:
                    rps.notes.append(f"round {rnd + 1}: wrk errors {errs}")
                say(f"  round {rnd + 1} c={c:<3} {route.name:<13} {rate:9.0f} req/s  p50 "
                    f"{out['p50_us'] / 1000:6.2f} ms  p99 {out['p99_us'] / 1000:6.2f} ms"
                    + (f"  errors {errs}" if errs else ""))
        env.procs.check_alive()


def _ttfb_routes(env: Env) -> list[Route]:
    return env.nginx_http + ([env.nginx_tcp] if env.nginx_tcp else [])


def scenario_ttfb(env: Env) -> None:
    a = env.args
    routes = _ttfb_routes(env)
    body_len = FILES[a.path.lstrip("/")]
    say(f"ttfb: {a.ttfb_requests} new connections per path per round (GET {a.path}), "
        f"{len(routes)} paths x {a.rounds} rounds")
    for route in routes:  # warm up: first connections through ssh / the agents
        for _ in range(5):
            try:
                ttfb_once(route.port, get_request(route.host, a.path), body_len, a.timeout)
            except (OSError, TransferError):
                pass
    for rnd in range(a.rounds):
        for route in rotated(routes, rnd):
            request = get_request(route.host, a.path)
            p50 = env.results.row("ttfb", "p50 ms", route.name, "ms", ".3f")
            p99 = env.results.row("ttfb", "p99 ms", route.name, "ms", ".3f", show_res=False)
            errors: Counter[str] = Counter()

            def run(route: Route = route, request: bytes = request,
                    errors: Counter[str] = errors) -> list[float]:
                out = []
                for _ in range(a.ttfb_requests):
                    try:
                        out.append(ttfb_once(route.port, request, body_len, a.timeout))
                    except (OSError, TransferError) as exc:
                        errors[f"{type(exc).__name__}: {exc}"[:80]] += 1
                return out

            times, ecpu, acpu, erss, arss = measured(route, run)
            assert isinstance(times, list)
            if errors:
                p50.errors.append(f"round {rnd + 1}: {sum(errors.values())} failed: {dict(errors)}")
            if len(times) >= 2:
                q = statistics.quantiles(times, n=100, method="inclusive")
                p50.values.append(statistics.median(times) * 1000)
                p99.values.append(q[98] * 1000)
                record_res(p50, route, ecpu, acpu, erss, arss)
                say(f"  round {rnd + 1} {route.name:<13} p50 {statistics.median(times) * 1000:7.3f} ms  "
                    f"p99 {q[98] * 1000:7.3f} ms" + (f"  {sum(errors.values())} failed" if errors else ""))
            else:
                say(f"  round {rnd + 1} {route.name:<13} FAILED {dict(errors)}")
        env.procs.check_alive()


def scenario_c1000(env: Env) -> None:
    a = env.args
    routes = _ttfb_routes(env)
    body_len = FILES[a.path.lstrip("/")]
    n = a.conns
    say(f"c{n}: {n} connections at once per path, then one GET {a.path} each (deadline "
        f"{a.conn_deadline:g}s), {len(routes)} paths x {a.rounds} rounds")
    for rnd in range(a.rounds):
        for route in rotated(routes, rnd):
            served = env.results.row("c1000", f"served % of {n}", route.name, "%", ".1f")
            opened = env.results.row("c1000", "all open s", route.name, "s", ".2f", show_res=False)
            total = env.results.row("c1000", "all done s", route.name, "s", ".2f", show_res=False)
            lat99 = env.results.row("c1000", "req p99 ms", route.name, "ms", ".1f", show_res=False)
            request = get_request(route.host, a.path)
            wave, ecpu, acpu, erss, arss = measured(
                route, lambda r=route, q=request: conn_wave(r.port, q, body_len, n, a.conn_deadline))
            assert isinstance(wave, Wave)
            served.values.append(100.0 * wave.served / n)
            opened.values.append(wave.connect_s)
            total.values.append(wave.total_s)
            if wave.latencies:
                lat99.values.append(statistics.quantiles(wave.latencies, n=100, method="inclusive")[98] * 1000
                                    if len(wave.latencies) > 1 else wave.latencies[0] * 1000)
            record_res(served, route, ecpu, acpu, erss, arss)
            if wave.errors:
                served.notes.append(f"round {rnd + 1}: {dict(wave.errors.most_common(4))}")
            say(f"  round {rnd + 1} {route.name:<13} served {wave.served}/{n}, opened {wave.connected} in "
                f"{wave.connect_s:.2f}s, done in {wave.total_s:.2f}s"
                + (f"  errors {dict(wave.errors.most_common(4))}" if wave.errors else ""))
            time.sleep(0.3)
        env.procs.check_alive()


SCENARIOS: dict[str, Callable[[Env], None]] = {
    "bulk": scenario_bulk, "wrk": scenario_wrk, "ttfb": scenario_ttfb, "c1000": scenario_c1000,
}

# =============================================================================================
# Report
# =============================================================================================


def print_table(results: Results, scenario: str, title: str) -> None:
    rows = [r for r in results.rows.values() if r.scenario == scenario]
    if not rows:
        return
    say("")
    say(title)
    rw = max([16] + [len(" ".join(format(v, r.fmt) for v in r.values)) + 2 for r in rows])
    hdr = (f"{'metric':<18}{'path':<14}{'median':>10}{'x direct':>9}{'x ssh':>8}   {'per round':<{rw}}"
           f"{'edge CPU':>9}{'agent CPU':>10}{'edge MiB':>9}{'agent MiB':>10}")
    say(hdr)
    say("-" * len(hdr))
    order = [DIRECT, SSH, TUN_HTTP, TUN_TCP]
    metrics: list[str] = []
    for r in rows:
        if r.metric not in metrics:
            metrics.append(r.metric)
    for metric in metrics:
        for r in sorted((r for r in rows if r.metric == metric), key=lambda r: order.index(r.path)):
            med = r.median()
            xd = results.ratio(scenario, metric, r.path, DIRECT)
            xs = results.ratio(scenario, metric, r.path, SSH)
            per = " ".join(format(v, r.fmt) for v in r.values)
            res = ""
            if r.show_res:
                res = (f"{_fmt(_med(r.edge_cpu), '.2f'):>9}{_fmt(_med(r.agent_cpu), '.2f'):>10}"
                       f"{_fmt(_med(r.edge_rss), '.0f'):>9}{_fmt(_med(r.agent_rss), '.0f'):>10}")
            bad = f"  ({len(r.errors)} round(s) with errors)" if r.errors else ""
            say(f"{metric:<18}{r.path:<14}{_fmt(med, r.fmt):>10}{_fmt(xd, '.2f'):>9}{_fmt(xs, '.2f'):>8}   "
                f"{per:<{rw}}{res}{bad}")


def print_errors(results: Results) -> None:
    lines = []
    for r in results.rows.values():
        for e in r.errors:
            lines.append(f"ERROR {r.scenario} {r.metric} {r.path}: {e}")
        for note in r.notes[:6]:
            lines.append(f"note  {r.scenario} {r.metric} {r.path}: {note}")
    if lines:
        say("")
        for line in lines:
            say(line)


def check_targets(results: Results, args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """Issue 17's targets; each (name, value, met)."""
    out = []

    def add(name: str, value: float | None, ok: Callable[[float], bool], spec: str) -> None:
        out.append((name, _fmt(value, spec), value is not None and ok(value)))

    if any(r.scenario == "bulk" for r in results.rows.values()):
        for proto in ("TCP", "HTTP"):
            for d in ("up", "down"):
                path = TUN_TCP if proto == "TCP" else TUN_HTTP
                add(f"bulk {proto} {d}: tunneld >= 1.5x OpenSSH",
                    results.ratio("bulk", f"{proto} {d} MB/s", path, SSH),
                    lambda v: v >= 1.5, ".2f")
    if any(r.scenario == "wrk" for r in results.rows.values()):
        for c in (16, 64):
            if c in args.wrk_conns:
                add(f"wrk req/s c={c}: tunneld HTTP >= 2.5x OpenSSH",
                    results.ratio("wrk", f"req/s c={c}", TUN_HTTP, SSH), lambda v: v >= 2.5, ".2f")
        if 64 in args.wrk_conns:
            add("wrk p99 c=64: tunneld HTTP <= 8 ms", results.get("wrk", "p99 ms c=64", TUN_HTTP),
                lambda v: v <= 8.0, ".2f")
            add("wrk CPU per request c=64, edge + agent: <= 100 us",
                results.get("wrk", "CPU us/req c=64", TUN_HTTP), lambda v: v <= 100.0, ".0f")
    if any(r.scenario == "c1000" for r in results.rows.values()):
        for path in (TUN_HTTP, TUN_TCP):
            row = results.rows.get(("c1000", f"served % of {args.conns}", path))
            worst = min(row.values) if row and row.values else None
            add(f"c{args.conns} {path}: 100 % served (worst round)", worst, lambda v: v >= 100.0, ".1f")
    return out


# =============================================================================================
# Main
# =============================================================================================


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--scenarios", default="bulk,wrk,ttfb,c1000",
                    help="comma-separated subset of " + ",".join(SCENARIOS))
    ap.add_argument("--quick", action="store_true",
                    help="shorter runs (~1 min): 128 MiB bulk, 1 s wrk runs, 60 TTFB requests")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3 for medians)")
    ap.add_argument("--size-mib", type=int, default=None, help="bulk: MiB per transfer [512; quick 128]")
    ap.add_argument("--wrk-duration", type=float, default=None, help="wrk: seconds per run [3; quick 1]")
    ap.add_argument("--wrk-conns", default="1,16,64", help="wrk: connection counts")
    ap.add_argument("--path", default="/1k.bin", choices=[f"/{f}" for f in FILES],
                    help="nginx file for wrk, ttfb and c1000")
    ap.add_argument("--ttfb-requests", type=int, default=None,
                    help="ttfb: new connections per path per round [200; quick 60]")
    ap.add_argument("--conns", type=int, default=1000, help="c1000: connections at once")
    ap.add_argument("--conn-deadline", type=float, default=None,
                    help="c1000: seconds before unfinished connections count as failed [30; quick 15]")
    ap.add_argument("--timeout", type=float, default=60.0, help="socket inactivity timeout, seconds")
    ap.add_argument("--gate", type=float, default=None,
                    help="before each run wait up to this many seconds for foreign CPU load (other "
                         "users of this machine) to drop below --gate-cores; 0 disables [3; quick 2]")
    ap.add_argument("--gate-budget", type=float, default=None,
                    help="total seconds the gate may wait in one benchmark run [60; quick 15]")
    ap.add_argument("--gate-cores", type=float, default=0.25, help="foreign load that counts as quiet")
    ap.add_argument("--no-ssh", action="store_true", help="skip the OpenSSH ssh -R paths")
    ap.add_argument("--stripped", action="store_true",
                    help="edge access log off and agents without local API/inspector (the default "
                         "is the configuration users run: access log to a file, agent web UI on)")
    ap.add_argument("--tunneld", default=None,
                    help="command that runs tunneld (default: this interpreter, `-m tunneld`)")
    ap.add_argument("--pause", action="store_true",
                    help="after startup print the pids and wait for Enter (to attach a profiler)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs) afterwards")
    ap.add_argument("--upstream", nargs=2, type=int, metavar=("TCP_PORT", "HTTP_PORT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        upstream_main(*args.upstream)
        return 0
    q = args.quick
    args.size_mib = args.size_mib or (128 if q else 512)
    args.wrk_duration = args.wrk_duration or (1.0 if q else 3.0)
    args.ttfb_requests = args.ttfb_requests or (60 if q else 200)
    args.conn_deadline = args.conn_deadline or (15.0 if q else 30.0)
    args.wrk_conns = [int(c) for c in args.wrk_conns.split(",") if c]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r} (choose from {', '.join(SCENARIOS)})")
    if args.rounds < 3:
        say(f"warning: --rounds {args.rounds}: medians need >= 3 rounds")
    needs_nginx = any(s in scenarios for s in ("wrk", "ttfb", "c1000"))
    if needs_nginx and shutil.which("nginx") is None:
        ap.error("nginx not found (apt-get install -y nginx)")
    if "wrk" in scenarios and shutil.which("wrk") is None:
        ap.error("wrk not found (apt-get install -y wrk)")

    GATE.threshold = args.gate_cores
    GATE.max_wait = args.gate if args.gate is not None else (2.0 if q else 3.0)
    GATE.budget = args.gate_budget if args.gate_budget is not None else (15.0 if q else 60.0)
    soft, hard = raise_nofile(max(65536, 4 * args.conns + 1024))
    tunneld = shlex.split(args.tunneld) if args.tunneld else [sys.executable, "-m", "tunneld"]
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-bench-"))
    procs = Procs(tmp)
    # A benchmark stopped with kill or by a closed terminal must not leave its edge, agents,
    # nginx and sshd running (they would skew every later run): unwind through ``finally``.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    started = time.monotonic()
    load0 = os.getloadavg()
    try:
        # ---- processes ----
        up_tcp, up_http = free_port(), free_port()
        upstream = procs.start("upstream", [sys.executable, str(Path(__file__).resolve()), "--upstream",
                                            str(up_tcp), str(up_http)], stdin=True)
        upstream.wait_for(lambda ls: "upstream ready" in ls, READY_TIMEOUT)
        nginx, nginx_port = start_nginx(procs, tmp) if needs_nginx else (None, 0)

        data = tmp / "edge"
        http_port, https_port, agent_port = free_port(), free_port(), free_port()
        low, high = free_port_range(8)
        domain = "bench.localhost"
        edge = procs.start("edge", tunneld + [
            "edge", "--dev", "--data-dir", str(data), "--domain", domain,
            "--http-addr", f"{HOST}:{http_port}", "--https-addr", f"{HOST}:{https_port}",
            "--agent-addr", f"{HOST}:{agent_port}", "--tcp-ports", f"{HOST}:{low}-{high}",
            "--log", "false" if args.stripped else str(tmp / "edge-access.log")])
        edge.wait_for(lambda ls: any("dev authtoken file" in line for line in ls), READY_TIMEOUT)
        wait_connectable(agent_port, READY_TIMEOUT, edge)
        token = (data / "dev-authtoken").read_text().strip()
        common = ["--server-addr", f"{HOST}:{agent_port}", "--authtoken", token,
                  "--root-cas", str(data / "ca.pem")]
        if args.stripped:
            common += ["--web-addr", "false", "--log", "false"]
        agents: dict[str, tuple[Proc, str]] = {}  # name -> (proc, forwarding URL)
        specs = [("agent-bulk-tcp", ["tcp", f"{HOST}:{up_tcp}"], "tcp://"),
                 ("agent-bulk-http", ["http", f"{HOST}:{up_http}", "--subdomain", "bulk"], "http://")]
        if needs_nginx:
            specs += [("agent-nginx-http", ["http", f"{HOST}:{nginx_port}", "--subdomain", "nginx"], "http://"),
                      ("agent-nginx-tcp", ["tcp", f"{HOST}:{nginx_port}"], "tcp://")]
        def web(name: str) -> list[str]:
            # The default configuration: each agent's local API and inspector on, as a user runs it.
            return [] if args.stripped else ["--web-addr", f"{HOST}:{free_port()}"]

        started_agents = [(name, procs.start(name, tunneld + argv + common + web(name)), prefix)
                          for name, argv, prefix in specs]
        for name, proc, prefix in started_agents:
            agents[name] = (proc, str(proc.wait_for(lambda ls, p=prefix: forwarding(ls, p), READY_TIMEOUT)))

        def hostport(url: str) -> tuple[str, int]:
            hp = url.split("://", 1)[1].rstrip("/")
            return hp, int(hp.rsplit(":", 1)[1])

        ep = edge.pid
        bt_proc, bt_url = agents["agent-bulk-tcp"]
        bh_proc, bh_url = agents["agent-bulk-http"]
        bulk_tcp = [Route(DIRECT, up_tcp, f"{HOST}:{up_tcp}"),
                    Route(TUN_TCP, hostport(bt_url)[1], "", ep, bt_proc.pid)]
        bulk_http = [Route(DIRECT, up_http, f"{HOST}:{up_http}"),
                     Route(TUN_HTTP, http_port, hostport(bh_url)[0], ep, bh_proc.pid)]
        nginx_http: list[Route] = []
        nginx_tcp = None
        if needs_nginx:
            nh_proc, nh_url = agents["agent-nginx-http"]
            nt_proc, nt_url = agents["agent-nginx-tcp"]
            nginx_http = [Route(DIRECT, nginx_port, f"{HOST}:{nginx_port}"),
                          Route(TUN_HTTP, http_port, hostport(nh_url)[0], ep, nh_proc.pid)]
            nginx_tcp = Route(TUN_TCP, hostport(nt_url)[1], f"{HOST}:{nginx_port}", ep, nt_proc.pid)

        ssh_note = ""
        sshd = ssh = None
        if args.no_ssh:
            ssh_note = "OpenSSH paths skipped (--no-ssh)."
        elif not Path("/usr/sbin/sshd").exists() or shutil.which("ssh") is None:
            ssh_note = ("OpenSSH paths skipped: /usr/sbin/sshd or ssh missing "
                        "(apt-get install openssh-server).")
        else:
            targets = {"tcp": up_tcp, "http": up_http}
            if needs_nginx:
                targets["nginx"] = nginx_port
            try:
                sshd, ssh, rports = start_ssh(procs, tmp, targets)
                ver = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
                ssh_note = (f"OpenSSH: {ver}, default ciphers; ssh -R to ports {rports} "
                            f"(sshd pid {sshd.pid}, ssh pid {ssh.pid}).")
                sp, cp = sshd.pid, ssh.pid
                bulk_tcp.insert(1, Route(SSH, rports["tcp"], "", sp, cp))
                bulk_http.insert(1, Route(SSH, rports["http"], f"{HOST}:{rports['http']}", sp, cp))
                if needs_nginx:
                    nginx_http.insert(1, Route(SSH, rports["nginx"], f"{HOST}:{rports['nginx']}", sp, cp))
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                ssh_note = f"OpenSSH paths skipped: could not start sshd/ssh: {exc}"
                sshd = ssh = None

        say(f"edge pid {ep}; " + "; ".join(f"{n} pid {p.pid} ({u})" for n, (p, u) in agents.items())
            + (f"; nginx pid {nginx.pid} port {nginx_port}" if nginx else ""))
        say(ssh_note)
        py_note = interpreter_note(ep)
        say(py_note)
        say(f"RLIMIT_NOFILE: bench {soft}/{hard}, edge {nofile_limit(ep)}, agents "
            f"{nofile_limit(started_agents[0][1].pid)}; somaxconn "
            f"{Path('/proc/sys/net/core/somaxconn').read_text().strip()}, tcp_max_syn_backlog "
            f"{Path('/proc/sys/net/ipv4/tcp_max_syn_backlog').read_text().strip()}")
        if args.pause:
            input("paused: attach a profiler now, then press Enter ")

        wrk_script = tmp / "report.lua"
        wrk_script.write_text(WRK_LUA)
        results = Results()
        env = Env(args, tmp, procs, results, bulk_tcp, bulk_http, nginx_http, nginx_tcp, wrk_script)

        # Per-scenario totals for every process tree we started, plus foreign CPU.
        watched = [("tunneld edge", ep)] + [
            (n.replace("agent-", "agent "), p.pid) for n, (p, _u) in agents.items()]
        if sshd is not None and ssh is not None:
            watched += [("sshd (tree)", sshd.pid), ("ssh client", ssh.pid)]
        if nginx is not None:
            watched.append(("nginx (tree)", nginx.pid))
        watched.append(("bulk upstream", upstream.pid))
        totals: dict[str, dict[str, tuple[float, float]]] = {}
        foreign: dict[str, tuple[float, float]] = {}
        for name in scenarios:
            procs.check_alive()
            acc: dict[int, int] = {}
            cpu0 = {label: tree_cpu(pid) for label, pid in watched}
            trees0 = {label: tree_pids(pid) for label, pid in watched}
            for pids in trees0.values():
                PEAK.reset(pids)
            PEAK.accums.append(acc)
            busy0, ours0, t0 = system_busy(), tree_cpu(os.getpid()), time.monotonic()
            SCENARIOS[name](env)
            wall = time.monotonic() - t0
            foreign_cpu = (system_busy() - busy0) - (tree_cpu(os.getpid()) - ours0)
            foreign[name] = (wall, max(0.0, foreign_cpu) / wall)
            totals[name] = {}
            for label, pid in watched:
                pids = set(trees0[label]) | set(tree_pids(pid))
                PEAK.read(list(pids))
                totals[name][label] = (tree_cpu(pid) - cpu0[label], sum(acc.get(p, 0) for p in pids) / 1024)
            PEAK.accums.remove(acc)

        # ---- report ----
        say("")
        say("=" * 100)
        say(f"Host: {os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}, Python "
            f"{sys.version.split()[0]}; load average at start {load0[0]:.2f}, "
            f"at end {os.getloadavg()[0]:.2f}.")
        say(f"Every figure: median of {args.rounds} interleaved rounds; "
            "'x direct' / 'x ssh' = median / median "
            "of the direct / OpenSSH path in this run (for ms and s lower is better).")
        say("edge/agent CPU = CPU seconds (user+sys) per run of the edge-side (tunneld edge, sshd tree) and "
            "agent-side (tunneld agent, ssh client) process; MiB = their peak RSS during the run"
            + ("" if PEAK.can_reset else " (could not reset: lifetime peak)") + ".")
        titles = {
            "bulk": f"bulk: MB/s (10^6 B/s) of one {args.size_mib} MiB transfer on one connection",
            "wrk": f"wrk: GET {args.path} from nginx, keep-alive, {args.wrk_duration:g} s per run, "
                   f"{'/'.join(str(min(2, c)) for c in args.wrk_conns)} threads; 'CPU us/req' = edge-side + "
                   "agent-side CPU per request",
            "ttfb": f"ttfb: new TCP connection per request, connect() -> first response byte, "
                    f"{args.ttfb_requests} requests per round (GET {args.path}, Connection: close); "
                    "CPU per round",
            "c1000": f"c1000: {args.conns} connections opened at once, then one GET {args.path} each; "
                     f"'req p99' = request -> full response once all were open",
        }
        for name in scenarios:
            print_table(results, name, titles[name])
        say("")
        say("CPU seconds / peak RSS MiB of each process over each whole scenario (wall s; foreign CPU = "
            "cores used by processes outside this benchmark):")
        hdr = f"{'process':<22}" + "".join(f"{name:>22}" for name in scenarios)
        say(hdr)
        say("-" * len(hdr))
        for label, _pid in watched:
            say(f"{label:<22}" + "".join(
                f"{totals[n][label][0]:>12.1f} s {totals[n][label][1]:>5.0f} MiB" for n in scenarios))
        say(f"{'wall / foreign CPU':<22}" + "".join(
            f"{foreign[n][0]:>12.0f} s {foreign[n][1]:>5.2f} cpu" for n in scenarios))
        if GATE.runs:
            say(f"quiet gate: waited {GATE.waited:.0f} s in all (budget {GATE.budget:g} s) "
                f"before {GATE.runs} runs "
                f"for foreign load < {GATE.threshold:g} cores; {GATE.gave_up} run(s) started anyway after "
                f"{GATE.max_wait:g} s" + ("; budget used up" if GATE.waited >= GATE.budget else ""))
        print_errors(results)
        say("")
        say(ssh_note)
        say(py_note)
        say("Targets (issue 17)" + (" -- stripped configuration, not the one the targets are for"
                                     if args.stripped else "") + ":")
        targets = check_targets(results, args)
        for tname, value, ok in targets:
            say(f"  {'met    ' if ok else 'MISSED '} {tname}: {value}")
        errors = any(r.errors for r in results.rows.values())
        say(f"total time {time.monotonic() - started:.0f} s; logs in {tmp}"
            + ("" if args.keep_tmp else " (removed)"))
        return 0 if not errors and all(ok for _n, _v, ok in targets) else 1
    finally:
        procs.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

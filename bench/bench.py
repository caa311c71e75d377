"""End-to-end throughput of tunneld tunnels vs direct connections (and OpenSSH ``ssh -R``).

    python bench/bench.py [--size-mib 1024] [--rounds 3] [--no-ssh] [--timeout 60]

One run starts, as separate processes on 127.0.0.1 only:

* a dev-mode edge (``tunneld edge --dev``) with its own throwaway data dir;
* a Python bulk upstream: a TCP source/sink and a minimal HTTP/1.1 server;
* a ``tunneld tcp`` agent and a ``tunneld http`` agent pointed at that upstream;
* if ``/usr/sbin/sshd`` exists: a private sshd (own config, host and user keys in the temp dir) and
  an ``ssh -N -R`` client forwarding a loopback port to the TCP upstream.

It then moves --size-mib MiB over one connection per measurement, upload and download, through:
direct TCP, the TCP tunnel, (OpenSSH -R), direct HTTP, the HTTP tunnel (the edge's plain HTTP port
with the tunnel's Host header). Rounds are interleaved (every variant once per round) and the
table shows the median MB/s (10**6 bytes per second), the ratio to the direct connection and the
CPU seconds the edge-side and agent-side processes used per transfer (from /proc/PID/stat, summed
over each process tree).

Clients are blocking sockets (sendall of a 1 MiB buffer, recv_into a preallocated 1 MiB buffer)
so the client is not the bottleneck. Everything is killed at the end.
"""

from __future__ import annotations

import argparse
import getpass
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MiB = 1 << 20
BUF = 1 * MiB
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 30.0

# =============================================================================================
# Upstream (runs in its own process: `python bench.py --upstream TCP_PORT HTTP_PORT`)
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
# Clients (blocking sockets in the bench process)
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


def _read_response_head(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = s.recv(65536)
        if not more:
            raise TransferError(f"connection closed before the response head ({data[:200]!r})")
        data += more
        if len(data) > 256 * 1024:
            raise TransferError("response head too large")
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
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


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return 0.0
    rest = stat[stat.rindex(b")") + 2:].split()
    # Fields 14 and 15 (utime, stime) are rest[11] and rest[12]; plus the reaped children's.
    return (int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])) / CLK_TCK


def tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a process and all its live descendants."""
    if pid is None:
        return 0.0
    kids = _children()
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += _cpu_of(p)
        todo.extend(kids.get(p, []))
    return total


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    lines: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def start_reader(self) -> None:
        def pump() -> None:
            assert self.popen.stdout is not None
            with open(self.log, "ab") as out:
                for raw in self.popen.stdout:
                    out.write(raw)
                    out.flush()
                    with self.cond:
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
                                 start_new_session=True)
        proc = Proc(name, popen, log)
        proc.start_reader()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
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
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(5)
            for stream in (proc.popen.stdin, proc.popen.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
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
        if line.startswith("Forwarding"):
            url = line.split()[1]
            if url.startswith(prefix):
                return url
    return None


# ---- OpenSSH ------------------------------------------------------------------------------------


def start_ssh(procs: Procs, tmp: Path, upstream_port: int) -> tuple[Proc, Proc, int]:
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
    sshd_port, rport = free_port(), free_port()
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
        f"PermitListen {HOST}:{rport}",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTTY no",
        "LogLevel ERROR",
        "",
    ]))
    sshd = procs.start("sshd", ["/usr/sbin/sshd", "-f", str(config), "-D", "-e"])
    wait_connectable(sshd_port, READY_TIMEOUT, sshd)
    ssh = procs.start("ssh", [
        "ssh", "-N", "-F", "/dev/null", "-R", f"{HOST}:{rport}:{HOST}:{upstream_port}",
        "-p", str(sshd_port), "-i", str(userkey), "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR", f"{user}@{HOST}",
    ])
    wait_connectable(rport, READY_TIMEOUT, ssh)
    return sshd, ssh, rport


# =============================================================================================
# The benchmark
# =============================================================================================


@dataclass
class Variant:
    key: str
    label: str
    proto: str  # "TCP" or "HTTP"
    direction: str  # "up" or "down"
    run: Callable[[], float]
    edge_pid: int | None = None  # edge-side process (tunneld edge / sshd)
    agent_pid: int | None = None  # agent-side process (tunneld agent / ssh)
    baseline: str | None = None  # key of the direct variant
    secs: list[float] = field(default_factory=list)
    edge_cpu: list[float] = field(default_factory=list)
    agent_cpu: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def mbps(self, nbytes: int) -> float | None:
        if not self.secs:
            return None
        return nbytes / statistics.median(self.secs) / 1e6


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="MiB per transfer [1024]")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds [3]")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="socket inactivity timeout per transfer, seconds [60]")
    ap.add_argument("--no-ssh", action="store_true", help="skip the OpenSSH ssh -R variant")
    ap.add_argument("--tunneld", default=f"{sys.executable} -m tunneld",
                    help="command that runs tunneld [python -m tunneld, same interpreter]")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs) afterwards")
    ap.add_argument("--upstream", nargs=2, type=int, metavar=("TCP_PORT", "HTTP_PORT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        upstream_main(*args.upstream)
        return 0

    n = args.size_mib * MiB
    tunneld = args.tunneld.split()
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-bench-"))
    procs = Procs(tmp)
    started = time.monotonic()
    load0 = os.getloadavg()
    try:
        # ---- processes ----
        up_tcp, up_http = free_port(), free_port()
        upstream = procs.start("upstream", [sys.executable, str(Path(__file__).resolve()), "--upstream",
                                            str(up_tcp), str(up_http)], stdin=True)
        upstream.wait_for(lambda ls: "upstream ready" in ls, READY_TIMEOUT)

        data = tmp / "edge"
        http_port, https_port, agent_port = free_port(), free_port(), free_port()
        low, high = free_port_range(8)
        edge = procs.start("edge", tunneld + [
            "edge", "--dev", "--data-dir", str(data), "--domain", "bench.localhost",
            "--http-addr", f"{HOST}:{http_port}", "--https-addr", f"{HOST}:{https_port}",
            "--agent-addr", f"{HOST}:{agent_port}", "--tcp-ports", f"{HOST}:{low}-{high}", "--log", "false"])
        edge.wait_for(lambda ls: any("dev authtoken file" in line for line in ls), READY_TIMEOUT)
        wait_connectable(agent_port, READY_TIMEOUT, edge)
        token = (data / "dev-authtoken").read_text().strip()
        common = ["--server-addr", f"{HOST}:{agent_port}", "--authtoken", token,
                  "--root-cas", str(data / "ca.pem"), "--web-addr", "false", "--log", "false"]
        tcp_agent = procs.start("agent-tcp", tunneld + ["tcp", f"{HOST}:{up_tcp}"] + common)
        http_agent = procs.start("agent-http", tunneld + ["http", f"{HOST}:{up_http}", "--subdomain", "bench"]
                                 + common)
        tcp_url = str(tcp_agent.wait_for(lambda ls: forwarding(ls, "tcp://"), READY_TIMEOUT))
        http_url = str(http_agent.wait_for(lambda ls: forwarding(ls, "http://"), READY_TIMEOUT))
        tunnel_tcp_port = int(tcp_url.rsplit(":", 1)[1])
        http_host = http_url.split("://", 1)[1].rstrip("/")  # NAME.bench.localhost:PORT
        print(f"edge pid {edge.popen.pid}; tcp agent pid {tcp_agent.popen.pid} ({tcp_url}); "
              f"http agent pid {http_agent.popen.pid} ({http_url})", flush=True)

        ssh_note = ""
        sshd = ssh = None
        rport = 0
        if args.no_ssh:
            ssh_note = "OpenSSH variant skipped (--no-ssh)."
        elif not Path("/usr/sbin/sshd").exists() or shutil.which("ssh") is None:
            ssh_note = ("OpenSSH variant skipped: /usr/sbin/sshd or ssh not installed "
                        "(apt-get install openssh-server).")
        else:
            try:
                sshd, ssh, rport = start_ssh(procs, tmp, up_tcp)
                ver = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
                ssh_note = f"OpenSSH: {ver}, default cipher negotiation, ssh -R {HOST}:{rport} (pids sshd " \
                           f"{sshd.popen.pid}, ssh {ssh.popen.pid})."
                print(ssh_note, flush=True)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                ssh_note = f"OpenSSH variant skipped: could not start sshd/ssh: {exc}"
                sshd = ssh = None
                print(ssh_note, flush=True)

        # ---- variants ----
        to = args.timeout
        ep, tp, hp = edge.popen.pid, tcp_agent.popen.pid, http_agent.popen.pid
        variants = [
            Variant("tcp-direct-up", "direct TCP", "TCP", "up", lambda: tcp_upload(up_tcp, n, to)),
            Variant("tcp-tunnel-up", "tunneld TCP", "TCP", "up", lambda: tcp_upload(tunnel_tcp_port, n, to),
                    ep, tp, "tcp-direct-up"),
            Variant("tcp-direct-down", "direct TCP", "TCP", "down", lambda: tcp_download(up_tcp, n, to)),
            Variant("tcp-tunnel-down", "tunneld TCP", "TCP", "down",
                    lambda: tcp_download(tunnel_tcp_port, n, to), ep, tp, "tcp-direct-down"),
        ]
        if sshd is not None and ssh is not None:
            sp, cp = sshd.popen.pid, ssh.popen.pid
            variants[2:2] = [Variant("tcp-ssh-up", "OpenSSH -R TCP", "TCP", "up",
                                     lambda: tcp_upload(rport, n, to), sp, cp, "tcp-direct-up")]
            variants.append(Variant("tcp-ssh-down", "OpenSSH -R TCP", "TCP", "down",
                                    lambda: tcp_download(rport, n, to), sp, cp, "tcp-direct-down"))
        variants += [
            Variant("http-direct-up", "direct HTTP", "HTTP", "up",
                    lambda: http_upload(up_http, f"{HOST}:{up_http}", n, to)),
            Variant("http-tunnel-up", "tunneld HTTP", "HTTP", "up",
                    lambda: http_upload(http_port, http_host, n, to), ep, hp, "http-direct-up"),
            Variant("http-direct-down", "direct HTTP", "HTTP", "down",
                    lambda: http_download(up_http, f"{HOST}:{up_http}", n, to)),
            Variant("http-tunnel-down", "tunneld HTTP", "HTTP", "down",
                    lambda: http_download(http_port, http_host, n, to), ep, hp, "http-direct-down"),
        ]
        by_key = {v.key: v for v in variants}

        print(f"moving {args.size_mib} MiB per transfer, {len(variants)} variants x {args.rounds} rounds",
              flush=True)
        for rnd in range(1, args.rounds + 1):
            for v in variants:
                e0, a0 = tree_cpu(v.edge_pid), tree_cpu(v.agent_pid)
                try:
                    secs = v.run()
                except (OSError, TransferError) as exc:
                    msg = f"round {rnd}: {type(exc).__name__}: {exc}"
                    v.errors.append(msg)
                    print(f"  round {rnd} {v.label:<15} {v.direction:<4} FAILED {msg}", flush=True)
                    time.sleep(0.5)
                    continue
                v.secs.append(secs)
                if v.edge_pid is not None:
                    v.edge_cpu.append(tree_cpu(v.edge_pid) - e0)
                    v.agent_cpu.append(tree_cpu(v.agent_pid) - a0)
                print(f"  round {rnd} {v.label:<15} {v.direction:<4} {n / secs / 1e6:9.1f} MB/s  "
                      f"({secs:.2f} s)", flush=True)
            for p in procs.procs:
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} died (exit {p.popen.returncode})\n" + tail(p.log))

        # ---- report ----
        print()
        print(f"Results: {args.size_mib} MiB per transfer, one connection, median of {args.rounds} round(s); "
              "MB/s = 10^6 B/s; CPU = seconds per transfer (user+sys) of the edge-side / agent-side "
              "process.")
        print(f"Host: {os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}, "
              f"Python {sys.version.split()[0]}, load average at start {load0[0]:.2f}, "
              f"at end {os.getloadavg()[0]:.2f}.")
        rw = max([26] + [len(" ".join(f"{n / s / 1e6:.0f}" for s in v.secs)) + 2 for v in variants])
        hdr = (f"{'variant':<16}{'dir':<6}{'MB/s':>9}{'x direct':>10}   {'per round MB/s':<{rw}}"
               f"{'edge CPU s':>11}{'agent CPU s':>12}")
        print(hdr)
        print("-" * len(hdr))
        for proto in ("TCP", "HTTP"):
            for direction in ("up", "down"):
                for v in variants:
                    if v.proto != proto or v.direction != direction:
                        continue
                    mb = v.mbps(n)
                    ratio = None
                    if v.baseline and mb is not None and by_key[v.baseline].mbps(n):
                        ratio = mb / by_key[v.baseline].mbps(n)  # type: ignore[operator]
                    rounds = " ".join(f"{n / s / 1e6:.0f}" for s in v.secs)
                    ecpu = statistics.median(v.edge_cpu) if v.edge_cpu else None
                    acpu = statistics.median(v.agent_cpu) if v.agent_cpu else None
                    ratio_s = "1.00" if v.baseline is None and mb is not None else _fmt(ratio, ".3f")
                    print(f"{v.label:<16}{direction:<6}{_fmt(mb, '9.1f'):>9}{ratio_s:>10}   {rounds:<{rw}}"
                          f"{_fmt(ecpu, '.2f'):>11}{_fmt(acpu, '.2f'):>12}"
                          + (f"  ({len(v.errors)} failed)" if v.errors else ""))
        print()
        for direction in ("up", "down"):
            t, o = by_key.get(f"tcp-tunnel-{direction}"), by_key.get(f"tcp-ssh-{direction}")
            t_mb, o_mb = (t.mbps(n) if t else None), (o.mbps(n) if o else None)
            if t_mb and o_mb:
                print(f"tunneld TCP / OpenSSH -R, {direction:<4}: {t_mb / o_mb:.2f}x")
        if ssh_note:
            print(ssh_note)
        for v in variants:
            for err in v.errors:
                print(f"ERROR {v.label} {v.direction}: {err}")
        target = 0.15
        verdict = []
        for key in ("tcp-tunnel-up", "tcp-tunnel-down", "http-tunnel-up", "http-tunnel-down"):
            v = by_key[key]
            base = by_key[v.baseline].mbps(n) if v.baseline else None
            mb = v.mbps(n)
            ok = bool(mb and base and mb / base >= target)
            verdict.append(ok)
        print(f"target >= {target}x direct for every tunnel variant: {'met' if all(verdict) else 'NOT met'}")
        print(f"total time {time.monotonic() - started:.0f} s; logs in {tmp}"
              + ("" if args.keep_tmp else " (removed)"))
        return 0 if all(verdict) and not any(v.errors for v in variants) else 1
    finally:
        procs.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

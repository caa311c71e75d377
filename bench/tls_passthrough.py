"""TLS tunnel (SNI passthrough) vs direct TLS to the same upstream: MB/s and new-connection time.

    python bench/tls_passthrough.py              # 256 MiB transfers, 200 connections, 3 rounds
    python bench/tls_passthrough.py --quick      # 64 MiB, 100 connections

Separate processes on 127.0.0.1 (never a system service): a TLS upstream (stdlib ssl, a thread
per connection, its own trustme CA and a ``*.bench.localhost`` certificate), a dev-mode edge
(``tunneld edge --dev``) and an agent (``tunneld tls PORT --subdomain bench``).  The client, in
this process, talks to the upstream directly and through the edge's HTTPS port with the same SNI
and verifies the upstream's certificate both ways, so the tunnel path is end-to-end TLS that the
edge never decrypts.  Measured, each figure the median of ``--rounds`` interleaved rounds:

* ``down`` / ``up``: one connection moving SIZE bytes (MB = 10**6 bytes);
* ``connect``: TCP connect + TLS handshake + a 1-byte request/response, one connection after
  another (median and p90 ms).

A third path carries the same TLS through a plain ``tunneld tcp`` tunnel: the difference to the
TLS tunnel is the cost of SNI routing on the shared HTTPS port.

Edge and agent CPU seconds are read from /proc around each tunnel run.  Upstream protocol: the
client sends ``op`` (1 byte) + N (8 bytes, big endian): ``D`` sends N bytes then closes, ``U``
reads N bytes then answers ``k``, ``P`` answers ``p``.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 1 << 20
HOST = "127.0.0.1"
DOMAIN = "bench.localhost"
NAME = f"bench.{DOMAIN}"
REPO = Path(__file__).resolve().parent.parent
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
CLK_TCK = os.sysconf("SC_CLK_TCK")
BUF = 1 * MiB

# ---- upstream (own process: ``--upstream PORT CRT KEY``) --------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def serve_one(conn: socket.socket) -> None:
    """One upstream connection, TLS or plain (``bench/carriers.py`` serves plain TCP with it)."""
    with conn:
        try:
            head = _recv_exact(conn, 9)
            op, n = head[:1], int.from_bytes(head[1:], "big")
            if op == b"D":
                block = memoryview(bytes(BUF))
                while n > 0:
                    conn.sendall(block[: min(BUF, n)])
                    n -= min(BUF, n)
            elif op == b"U":
                buf = bytearray(BUF)
                while n > 0:
                    k = conn.recv_into(buf, min(BUF, n))
                    if not k:
                        return
                    n -= k
                conn.sendall(b"k")
            elif op == b"P":
                conn.sendall(b"p")
        except (OSError, ConnectionError):
            pass


def run_upstream(port: int, crt: str, key: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    with socket.create_server((HOST, port), backlog=1024) as srv:
        print("upstream ready", flush=True)
        while True:
            raw, _ = srv.accept()
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def handshake_then_serve(raw: socket.socket = raw) -> None:
                try:
                    conn = ctx.wrap_socket(raw, server_side=True)
                except (OSError, ssl.SSLError):
                    raw.close()
                    return
                serve_one(conn)

            threading.Thread(target=handshake_then_serve, daemon=True).start()


# ---- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, name: str, argv: list[str], cwd: Path) -> None:
        self.name = name
        self.lines: list[str] = []
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, cwd=cwd, env=CHILD_ENV, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {text!r} in its output:\n" + "\n".join(self.lines[-20:]))

    def cpu(self) -> float:
        """utime + stime of the process and its reaped children, in seconds."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / CLK_TCK

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


# ---- client ------------------------------------------------------------------------------------------


def connect(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(raw, server_hostname=NAME)


def download(ctx: ssl.SSLContext, port: int, size: int) -> float:
    with connect(ctx, port) as s:
        return download_on(s, size)


def download_on(s: socket.socket, size: int) -> float:
    """MB/s of ``size`` bytes sent by the upstream on the connected ``s`` (TLS or plain)."""
    t0 = time.perf_counter()
    s.sendall(b"D" + size.to_bytes(8, "big"))
    buf = bytearray(BUF)
    got = 0
    while got < size:
        k = s.recv_into(buf)
        if not k:
            break
        got += k
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"download got {got} of {size} bytes")
    return size / elapsed / 1e6


def upload(ctx: ssl.SSLContext, port: int, size: int) -> float:
    with connect(ctx, port) as s:
        return upload_on(s, size)


def upload_on(s: socket.socket, size: int) -> float:
    """MB/s of ``size`` bytes sent to the upstream on the connected ``s`` (TLS or plain)."""
    t0 = time.perf_counter()
    s.sendall(b"U" + size.to_bytes(8, "big"))
    block = memoryview(bytes(BUF))
    left = size
    while left > 0:
        s.sendall(block[: min(BUF, left)])
        left -= min(BUF, left)
    if s.recv(1) != b"k":
        raise RuntimeError("upload not acknowledged")
    return size / (time.perf_counter() - t0) / 1e6


def connections(ctx: ssl.SSLContext, port: int, count: int) -> list[float]:
    """Milliseconds per connection: connect + handshake + 1-byte exchange."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        with connect(ctx, port) as s:
            s.sendall(b"P" + bytes(8))
            if s.recv(1) != b"p":
                raise RuntimeError("ping not answered")
        times.append((time.perf_counter() - t0) * 1000)
    return times


def p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9) - 1]


# ---- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", nargs=3, metavar=("PORT", "CRT", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--conns", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 MiB, 100 connections")
    args = parser.parse_args()
    if args.upstream:
        run_upstream(int(args.upstream[0]), args.upstream[1], args.upstream[2])
        return
    if args.quick:
        args.size_mib, args.conns = 64, 100
    size = args.size_mib * MiB

    import trustme

    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="tunneld-tls-bench-") as tmp_s:
        tmp = Path(tmp_s)
        ca = trustme.CA()
        leaf = ca.issue_cert(f"*.{DOMAIN}")
        crt, key, ca_file = tmp / "up.crt", tmp / "up.key", tmp / "up-ca.pem"
        crt.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        try:
            up_port = free_port()
            argv = [sys.executable, __file__, "--upstream", str(up_port), str(crt), str(key)]
            upstream = Proc("upstream", argv, tmp)
            procs.append(upstream)
            upstream.wait_for("upstream ready")
            data = tmp / "edge"
            https_port, agent_port = free_port(), free_port()
            tunneld = [sys.executable, "-m", "tunneld"]
            edge = Proc("edge", tunneld + ["edge", "--dev", "--data-dir", str(data), "--domain", DOMAIN,
                                           "--http-addr", "false", "--https-addr", f"{HOST}:{https_port}",
                                           "--agent-addr", f"{HOST}:{agent_port}", "--log", "stdout",
                                           "--log-level", "warn"], tmp)
            procs.append(edge)
            token_file = data / "dev-authtoken"
            deadline = time.monotonic() + 30
            while not token_file.exists() or not token_file.read_text().strip():
                if time.monotonic() > deadline or edge.popen.poll() is not None:
                    raise RuntimeError("edge did not start:\n" + "\n".join(edge.lines[-20:]))
                time.sleep(0.05)
            time.sleep(0.3)
            common = ["--server-addr", f"{HOST}:{agent_port}", "--authtoken", token_file.read_text().strip(),
                      "--root-cas", str(data / "ca.pem"), "--web-addr", "false", "--log", "false"]
            agent = Proc("agent", tunneld + ["tls", f"{HOST}:{up_port}", "--subdomain", "bench", *common],
                         tmp)
            procs.append(agent)
            print(agent.wait_for("tls://").strip(), flush=True)
            # Baseline for the SNI routing: the same TLS carried by a plain TCP tunnel.
            tcp_agent = Proc("tcp agent", tunneld + ["tcp", f"{HOST}:{up_port}", *common], tmp)
            procs.append(tcp_agent)
            tcp_line = tcp_agent.wait_for("tcp://").strip()
            print(tcp_line, flush=True)
            tcp_port = int(tcp_line.split("tcp://", 1)[1].split()[0].rsplit(":", 1)[1])

            ctx = ssl.create_default_context(cafile=str(ca_file))
            paths = {"direct TLS": up_port, "TLS tunnel": https_port, "TCP tunnel": tcp_port}
            results: dict[str, dict[str, list[float]]] = {p: {"down": [], "up": [], "conn": [], "conn90": []}
                                                          for p in paths}
            cpu: dict[str, list[float]] = {"edge": [], "agent": []}
            for r in range(args.rounds):
                items = list(paths.items())
                order = items[r % len(items):] + items[:r % len(items)]
                for name, port in order:
                    c0 = (edge.cpu(), agent.cpu())
                    results[name]["down"].append(download(ctx, port, size))
                    results[name]["up"].append(upload(ctx, port, size))
                    if name == "TLS tunnel":
                        c1 = (edge.cpu(), agent.cpu())
                        gib = 2 * size / (1 << 30)
                        cpu["edge"].append((c1[0] - c0[0]) / gib)
                        cpu["agent"].append((c1[1] - c0[1]) / gib)
                    times = connections(ctx, port, args.conns)
                    results[name]["conn"].append(statistics.median(times))
                    results[name]["conn90"].append(p90(times))
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for proc in reversed(procs):
                proc.stop()

    med = {p: {k: statistics.median(v) for k, v in m.items()} for p, m in results.items()}
    direct = med["direct TLS"]
    print(f"\n{args.size_mib} MiB per transfer, {args.conns} sequential connections, median of {args.rounds} "
          f"rounds, {os.cpu_count()} CPUs; x = ratio to direct")
    print(f"{'path':<12} {'down MB/s':>15} {'up MB/s':>15} {'connect p50 ms':>17} {'p90 ms':>15}")
    for name, m in med.items():
        cells = [f"{m[k]:.0f} ({m[k] / direct[k]:.2f}x)" for k in ("down", "up")]
        cells += [f"{m[k]:.2f} ({m[k] / direct[k]:.1f}x)" for k in ("conn", "conn90")]
        print(f"{name:<12} {cells[0]:>15} {cells[1]:>15} {cells[2]:>17} {cells[3]:>15}")
    print(f"tunnel CPU per GiB moved: edge {statistics.median(cpu['edge']):.2f} s, "
          f"agent {statistics.median(cpu['agent']):.2f} s")


if __name__ == "__main__":
    main()

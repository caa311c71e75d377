"""Requests per second through an HTTP tunnel with and without ``--basic-auth``.

    python bench/http_auth.py [--seconds 5] [--rounds 5] [--connections 8]

One run starts, as separate processes on 127.0.0.1 only: a dev-mode edge (``tunneld edge
--dev``, throwaway data dir, no HTTPS listener), a tiny keep-alive HTTP upstream (this script
with ``--upstream PORT``: every request gets a 2-byte answer),
and one ``tunneld start`` agent serving two tunnels to it: ``open`` without basic auth and
``auth`` with it (``basic_auth`` in the agent's config, as ``--basic-auth`` would set).

Each round runs both variants (order alternating, so drifting load hits both) for --seconds
with --connections keep-alive client connections, each a thread sending one small GET after
another (``Authorization`` sent to both: only the edge's check differs).  The table shows
req/s per round and the medians; the last line is the cost of auth in percent.  The exit status
is 1 if any request failed or auth costs more than --max-overhead percent (default 10).
"""

from __future__ import annotations

import argparse
import base64
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
from pathlib import Path

HOST = "127.0.0.1"
CREDENTIAL = "bench:bench-password"
REPO = Path(__file__).resolve().parents[1]


# ---- upstream (its own process) ------------------------------------------------------------


def _upstream_conn(sock: socket.socket) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
    pending = b""
    with sock:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            pending += data
            # Requests have no body: one answer per head, pipelined or not.
            count = pending.count(b"\r\n\r\n")
            if count:
                pending = pending[pending.rindex(b"\r\n\r\n") + 4:]
                sock.sendall(answer * count)


def upstream_main(port: int) -> None:
    listener = socket.create_server((HOST, port), backlog=128)
    print("upstream ready", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_upstream_conn, args=(conn,), daemon=True).start()


# ---- client ----------------------------------------------------------------------------------


def _client(port: int, host: str, deadline: float, counts: list[int], errors: list[str], i: int) -> None:
    request = (f"GET / HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic "
               f"{base64.b64encode(CREDENTIAL.encode()).decode()}\r\n\r\n").encode()
    try:
        with socket.create_connection((HOST, port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = b""
            while time.perf_counter() < deadline:
                s.sendall(request)
                while b"\r\n\r\nok" not in buf:
                    data = s.recv(65536)
                    if not data:
                        raise OSError(f"closed after {counts[i]} requests: {buf[:200]!r}")
                    buf += data
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise OSError(f"answered {buf[:200]!r}")
                buf = buf[buf.index(b"\r\n\r\nok") + 6:]
                counts[i] += 1
    except OSError as exc:
        errors.append(str(exc))


def measure(port: int, host: str, seconds: float, connections: int) -> tuple[float, list[str]]:
    counts = [0] * connections
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + seconds
    threads = [threading.Thread(target=_client, args=(port, host, deadline, counts, errors, i))
               for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start), errors


def check_cost() -> float:
    """Microseconds one ``BasicAuth.check`` takes on a typical head (three credentials)."""
    sys.path.insert(0, str(REPO))
    from tunneld.plugins.http._auth import BasicAuth

    auth = BasicAuth([CREDENTIAL, "alice:correct horse", "bob:battery staple"])
    headers = [(b"Host", b"auth.bench.test"), (b"User-Agent", b"bench/1.0"), (b"Accept", b"*/*"),
               (b"Authorization", b"Basic " + base64.b64encode(CREDENTIAL.encode()))]
    n = 100_000
    start = time.perf_counter()
    for _ in range(n):
        auth.check(headers)
    return (time.perf_counter() - start) / n * 1e6


# ---- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, host: str, procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"a process exited early: {p.args}")
        rate, errors = measure(port, host, 0.05, 1)
        if rate and not errors:
            return
        time.sleep(0.1)
    raise SystemExit(f"{host} did not come up in {timeout:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--max-overhead", type=float, default=10.0, help="percent; above it, exit 1")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        upstream_main(args.upstream)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="tunneld-auth-bench-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs: list[subprocess.Popen[bytes]] = []

    def start(*cmd: str, log: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, *cmd], env=env, stdout=subprocess.PIPE if log == "upstream"
                                else subprocess.DEVNULL, stderr=(tmp / f"{log}.log").open("wb"))
        procs.append(proc)
        return proc

    try:
        up_port, http_port, agent_port = free_port(), free_port(), free_port()
        upstream = start(__file__, "--upstream", str(up_port), log="upstream")
        assert upstream.stdout is not None
        upstream.stdout.readline()
        data = tmp / "edge"
        low = random.randrange(30000, 60000, 10)  # TCP tunnel range: unused, but the edge wants one
        start("-m", "tunneld", "edge", "--dev", "--data-dir", str(data), "--domain", "bench.test",
              "--http-addr", f"{HOST}:{http_port}", "--https-addr", "false",
              "--agent-addr", f"{HOST}:{agent_port}",
              "--tcp-ports", f"{HOST}:{low}-{low + 9}", "--log-level", "warn", log="edge")
        deadline = time.monotonic() + 30
        while not (data / "dev-authtoken").exists() or not (data / "ca.pem").exists():
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                raise SystemExit("the edge did not start: " + (tmp / "edge.log").read_text()[-2000:])
            time.sleep(0.05)
        token = (data / "dev-authtoken").read_text().strip()
        # One agent with both tunnels: the two variants differ in nothing but the edge's check.
        config = tmp / "agent.yml"
        config.write_text(
            "tunnels:\n"
            f"  open: {{proto: http, addr: {up_port}, subdomain: open, schemes: [http]}}\n"
            f"  auth: {{proto: http, addr: {up_port}, subdomain: auth, schemes: [http], "
            f"basic_auth: ['{CREDENTIAL}']}}\n")
        start("-m", "tunneld", "start", "--all", "--config", str(config),
              "--server-addr", f"{HOST}:{agent_port}", "--root-cas", str(data / "ca.pem"),
              "--authtoken", token, "--web-addr", "false", "--log", "stderr", "--log-level", "warn",
              log="agent")
        hosts = {"open": "open.bench.test", "auth": "auth.bench.test"}
        for host in hosts.values():
            wait_ready(http_port, host, procs)

        for host in hosts.values():  # warm-up, not counted
            measure(http_port, host, 1.0, args.connections)
        results: dict[str, list[float]] = {"open": [], "auth": []}
        ratios: list[float] = []
        failed: list[str] = []
        print(f"{args.rounds} rounds x {args.seconds:.0f}s, {args.connections} keep-alive connections")
        for r in range(args.rounds):
            order = ["open", "auth"] if r % 2 == 0 else ["auth", "open"]
            for name in order:
                rate, errors = measure(http_port, hosts[name], args.seconds, args.connections)
                results[name].append(rate)
                failed += errors
            ratios.append(results["auth"][-1] / results["open"][-1])
            print(f"round {r + 1}: without auth {results['open'][-1]:8.0f} req/s   "
                  f"with auth {results['auth'][-1]:8.0f} req/s   ratio {ratios[-1]:.3f}")
        off, on = statistics.median(results["open"]), statistics.median(results["auth"])
        # The median of the per-round ratios: each pair ran back to back under the same load.
        overhead = (1 - statistics.median(ratios)) * 100
        print(f"median:  without auth {off:8.0f} req/s   with auth {on:8.0f} req/s")
        check_us = check_cost()
        print(f"the edge's check alone: {check_us:.2f} us per request = {check_us * off / 1e6 * 100:.2f}% "
              f"of a second's requests at {off:.0f} req/s")
        print(f"basic auth costs {overhead:+.1f}% of the request rate (median of per-round ratios; "
              f"limit {args.max_overhead:.0f}%)")
        for error in failed[:5]:
            print(f"error: {error}")
        return 1 if failed or overhead > args.max_overhead else 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

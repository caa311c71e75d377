"""``ssh -R`` to tunneld's SSH gateway vs ``ssh -R`` to OpenSSH's own sshd: MB/s and HTTP req/s.

    python bench/ssh_gateway.py                 # ~1-2 min on a 2-CPU VM
    python bench/ssh_gateway.py --quick         # shorter transfers and runs

One run starts, as separate processes on 127.0.0.1 only: bench.py's bulk upstream (TCP
source/sink and a minimal HTTP/1.1 server), a tunneld edge with the gateway on (this file's
``--edge`` mode: the ``--ssh-addr`` flag is not wired into the CLI yet), two OpenSSH clients to it
(``ssh -R 0:... v2@... tcp`` and ``ssh -R 80:... v2@... http``), and bench.py's private sshd with
one ``ssh -N -R`` client forwarding two loopback ports to the same upstream.

Figures, each the median of ``--rounds`` interleaved rounds: TCP upload and download MB/s, HTTP
download MB/s, HTTP req/s over 16 keep-alive connections, and req/s with a new connection per
request (16 at a time: each one is a new forwarded-tcpip channel).  Every line shows the ratio
tunneld / OpenSSH and the edge-side CPU seconds (tunneld edge process; sshd tree).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402 - bench.py's processes, upstream and clients

HOST = b.HOST
FORWARDING = re.compile(r"Forwarding (\S+) -> ")


# ---- the edge, in a process of its own ------------------------------------------------------


def edge_main(data_dir: Path, ssh_port: int, http_port: int, tcp_low: int, tcp_high: int) -> None:
    import trio

    from tunneld.core import Edge, EdgeConfig
    from tunneld.core._certs import ensure_dev_certs
    from tunneld.core._store import Store

    certs = ensure_dev_certs(data_dir, "tunneld.localhost", ["127.0.0.1", "localhost"])
    config = EdgeConfig(data_dir=data_dir, domain="tunneld.localhost", tls_cert=certs.cert,
                        tls_key=certs.key, agent_addr=(HOST, 0), http_addr=(HOST, http_port),
                        https_addr=(HOST, 0), tcp_host=HOST, tcp_ports=(tcp_low, tcp_high), dev=True,
                        ssh_addr=(HOST, ssh_port))
    store = Store.open(data_dir)

    async def main() -> None:
        edge = Edge(config, store)
        async with trio.open_nursery() as nursery:
            await nursery.start(edge.serve)
            print("edge ready", flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass


# ---- a keep-alive HTTP upstream for request rates --------------------------------------------
# bench.py's upstream writes each response head and body in two sends without TCP_NODELAY:
# on a keep-alive connection the body then waits for a delayed ACK (~40 ms a request, on
# every path alike).  This one answers in one write.

SMALL_BODY = 1024


def small_upstream_main(port: int) -> None:
    body = b"x" * SMALL_BODY

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                close = b"connection: close" in head.lower()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (len(body), b"Connection: close\r\n" if close else b"", body))
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, HOST, port, backlog=1024)
        print("small upstream ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---- HTTP request rates ---------------------------------------------------------------------


async def _keepalive_rate(port: int, host: str, conns: int, duration: float) -> tuple[int, int]:
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    done = errors = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + duration

    async def one() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while loop.time() < end:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers = b._parse_head(head[:-4])
                await reader.readexactly(int(headers.get("content-length", "0")))
                if status == 200:
                    done += 1
                else:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))
    return done, errors


async def _newconn_rate(port: int, host: str, conns: int, duration: float) -> tuple[int, int]:
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    done = errors = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + duration

    async def one() -> None:
        nonlocal done, errors
        while loop.time() < end:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(request)
            data = await reader.read()
            writer.close()
            if data.startswith(b"HTTP/1.1 200") and len(data.partition(b"\r\n\r\n")[2]) == SMALL_BODY:
                done += 1
            else:
                errors += 1

    await asyncio.gather(*(one() for _ in range(conns)))
    return done, errors


def request_rate(kind: str, port: int, host: str, conns: int, duration: float) -> float:
    fn = _keepalive_rate if kind == "keepalive" else _newconn_rate
    t0 = time.perf_counter()
    done, errors = asyncio.run(fn(port, host, conns, duration))
    if errors:
        raise b.TransferError(f"{errors} failed requests")
    return done / (time.perf_counter() - t0)


# ---- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Path_:
    """One way through: ports (and Host headers) of the bulk and small upstreams, edge-side pid."""

    tcp: int
    http: int
    http_host: str
    small: int
    small_host: str
    pid: int


def ssh_to_tunneld(procs: b.Procs, name: str, key: Path, known_hosts: Path, port: int, forward: str,
                   command: list[str], options: list[str]) -> str:
    proc = procs.start(name, [
        "ssh", "-T", "-F", "/dev/null", *options, "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=accept-new",
        "-o", "LogLevel=ERROR", "-p", str(port), "-R", forward, f"v2@{HOST}", *command])
    found = proc.wait_for(lambda lines: next((m.group(1) for line in lines
                                              if (m := FORWARDING.search(line))), None), b.READY_TIMEOUT)
    return str(found)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB transfers, 1 s request runs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=None, help="MiB per transfer [256; quick 64]")
    ap.add_argument("--duration", type=float, default=None, help="seconds per req/s run [3; quick 1]")
    ap.add_argument("--conns", type=int, default=16, help="concurrent connections for req/s")
    ap.add_argument("--cipher", default=None,
                    help="ssh -c CIPHER for the clients of tunneld (default: OpenSSH's choice)")
    ap.add_argument("--small-upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--edge", nargs=5, metavar=("DATA_DIR", "SSH", "HTTP", "TCP_LOW", "TCP_HIGH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.edge:
        edge_main(Path(args.edge[0]), *map(int, args.edge[1:]))
        return 0
    if args.small_upstream:
        small_upstream_main(args.small_upstream)
        return 0
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (apt-get install openssh-client)", file=sys.stderr)
            return 2
    have_sshd = Path("/usr/sbin/sshd").exists()
    size = (args.size_mib or (64 if args.quick else 256)) * b.MiB
    duration = args.duration or (1.0 if args.quick else 3.0)
    ssh_options = ["-c", args.cipher] if args.cipher else []
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-sshbench-"))
    procs = b.Procs(tmp)
    try:
        tcp_up, http_up = b.free_port(), b.free_port()
        upstream = procs.start("upstream", [sys.executable, str(Path(b.__file__).resolve()), "--upstream",
                                            str(tcp_up), str(http_up)], stdin=True)
        upstream.wait_for(lambda lines: "upstream ready" in lines, b.READY_TIMEOUT)
        small_up = b.free_port()
        small = procs.start("small-upstream", [sys.executable, str(Path(__file__).resolve()),
                                               "--small-upstream", str(small_up)])
        small.wait_for(lambda lines: "small upstream ready" in lines, b.READY_TIMEOUT)
        data = tmp / "edge"
        data.mkdir()
        key = tmp / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        (data / "authorized_keys").write_bytes(key.with_suffix(".pub").read_bytes())
        ssh_port, http_port = b.free_port(), b.free_port()
        low, high = b.free_port_range(20)
        edge = procs.start("edge", [sys.executable, str(Path(__file__).resolve()), "--edge", str(data),
                                    str(ssh_port), str(http_port), str(low), str(high)])
        edge.wait_for(lambda lines: "edge ready" in lines, b.READY_TIMEOUT)
        tcp_url = ssh_to_tunneld(procs, "ssh-tcp", key, tmp / "known_hosts", ssh_port,
                                 f"0:{HOST}:{tcp_up}", ["tcp"], ssh_options)
        http_url = ssh_to_tunneld(procs, "ssh-http", key, tmp / "known_hosts", ssh_port,
                                  f"80:{HOST}:{http_up}", ["http"], ssh_options)
        small_url = ssh_to_tunneld(procs, "ssh-small", key, tmp / "known_hosts", ssh_port,
                                   f"80:{HOST}:{small_up}", ["http"], ssh_options)
        t_tcp = int(tcp_url.rsplit(":", 1)[1])
        t_host = http_url.split("://", 1)[1].rsplit(":", 1)[0]
        s_host = small_url.split("://", 1)[1].rsplit(":", 1)[0]
        paths: dict[str, Path_] = {
            "tunneld": Path_(t_tcp, http_port, t_host, http_port, s_host, edge.pid),
        }
        if have_sshd:
            sshd, _ssh, rports = b.start_ssh(procs, tmp, {"tcp": tcp_up, "http": http_up, "small": small_up})
            paths["openssh"] = Path_(rports["tcp"], rports["http"], "localhost", rports["small"], "localhost",
                                     sshd.pid)
        else:
            print("OpenSSH sshd missing (/usr/sbin/sshd): tunneld figures only", file=sys.stderr)
        tests: dict[str, Callable[[Path_], float]] = {
            "tcp upload MB/s": lambda p: size / b.tcp_upload(p.tcp, size, 60) / 1e6,
            "tcp download MB/s": lambda p: size / b.tcp_download(p.tcp, size, 60) / 1e6,
            "http download MB/s": lambda p: size / b.http_download(p.http, p.http_host, size, 60) / 1e6,
            "http upload MB/s": lambda p: size / b.http_upload(p.http, p.http_host, size, 60) / 1e6,
            f"http req/s keep-alive x{args.conns}":
                lambda p: request_rate("keepalive", p.small, p.small_host, args.conns, duration),
            f"http req/s new conn x{args.conns}":
                lambda p: request_rate("newconn", p.small, p.small_host, args.conns, duration),
        }
        results: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        names = list(paths)
        for rnd in range(args.rounds):
            for test, fn in tests.items():
                for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                    procs.check_alive()
                    c0 = b.tree_cpu(paths[name].pid)
                    value = fn(paths[name])
                    cpu.setdefault((test, name), []).append(b.tree_cpu(paths[name].pid) - c0)
                    results.setdefault((test, name), []).append(value)
        print(f"\nssh -R through tunneld's gateway vs OpenSSH sshd (median of {args.rounds}; "
              f"{size // b.MiB} MiB transfers, {duration:g} s request runs; edge-side CPU s per run)")
        print(f"{'':34} {'tunneld':>10} {'openssh':>10} {'ratio':>7}   {'cpu t':>6} {'cpu o':>6}")
        for test in tests:
            t = statistics.median(results[(test, "tunneld")])
            ct = statistics.median(cpu[(test, "tunneld")])
            if "openssh" in paths:
                o = statistics.median(results[(test, "openssh")])
                co = statistics.median(cpu[(test, "openssh")])
                print(f"{test:34} {t:10.1f} {o:10.1f} {t / o:7.2f}   {ct:6.2f} {co:6.2f}")
            else:
                print(f"{test:34} {t:10.1f} {'-':>10} {'-':>7}   {ct:6.2f}")
        return 0
    finally:
        procs.stop_all()
        if not os.environ.get("KEEP_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

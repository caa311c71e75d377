"""Many public connections through one HTTP tunnel: N keep-alive connections open at once.

Processes on 127.0.0.1: a dev-mode ``tunneld edge``, one ``tunneld http`` agent (local API and
inspector off) and a small keep-alive HTTP upstream.  The driver (this process) opens
``--conns`` connections to the edge at the same moment; each sends one request, and once every
connection has its first answer (all N open at once) the edge's and the agent's RSS and
descriptors are read; then each sends ``--requests - 1`` more and closes.  Reported: requests
served (200) and refused (502 or a failed connection), the time, RSS per connection on each
side, and descriptors.

``--churn N`` instead makes N short connections (one request, ``Connection: close``),
``--conns`` at a time, and compares the edge's RSS and descriptors after a warm-up round with
those at the end.

    python bench/many_conns.py --conns 20000        # ~1 minute on 2 vCPUs
    python bench/many_conns.py --conns 500 --churn 20000

It raises the descriptor limit of every process (root may go past the hard limit, up to
``fs.nr_open``): each connection costs the driver, the edge, the agent and the upstream one each.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from many_agents import (  # noqa: E402
    IP_BIND_ADDRESS_NO_PORT,
    cpu_seconds,
    fd_count,
    free_port,
    repo_env,
    rss_kib,
    start_edge,
    stop,
)

#: The upstream: answers every request on a connection with ``ok`` until the client closes.
UPSTREAM = Path(__file__).resolve().parent / "ok_upstream.py"

HOST = "many.bench.localhost"
#: The body of the first answer that was not a 200 (shown with the results).
FIRST_ERROR: list[str] = []


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                            env=repo_env())


def sources() -> itertools.cycle[str]:
    """Client source addresses: 127.0.2.1 .. 127.0.2.200, so ports never run out."""
    return itertools.cycle([f"127.0.2.{i}" for i in range(1, 201)])


async def connect(port: int, source: str) -> trio.SocketStream:
    sock = trio.socket.socket()
    try:
        # The port is chosen at connect() for the whole 4-tuple (with bind(port 0) it would be
        # reserved outright, and the driver's and the agent's connections would share one range).
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def request(stream: trio.SocketStream, buf: bytearray, close: bool = False) -> int:
    """Send one GET and read its answer (Content-Length framed); return the status, 0 if cut."""
    conn = b"close" if close else b"keep-alive"
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: %s\r\n\r\n" % (HOST.encode(), conn))
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(buf) >= end + 4 + length:
                status = int(head.split(" ", 2)[1])
                if status != 200 and not FIRST_ERROR:
                    FIRST_ERROR.append(bytes(buf[end + 4:end + 4 + length]).decode("utf-8", "replace")[:300])
                del buf[:end + 4 + length]
                return status
        data = await stream.receive_some(65536)
        if not data:
            return 0
        buf += data


async def wait_online(port: int) -> None:
    """Until the tunnel answers (the agent is connected and bound)."""
    src = sources()
    with trio.fail_after(60):
        while True:
            try:
                stream = await connect(port, next(src))
                async with stream:
                    if await request(stream, bytearray(), close=True) == 200:
                        return
            except OSError:
                pass
            await trio.sleep(0.2)


class Tally:
    """Requests served (200), refused (any other status: the edge's 502 when the tunnel failed
    it) and failed (connection refused or cut without an answer)."""

    def __init__(self) -> None:
        self.served = self.refused = self.failed = 0
        self.statuses: collections.Counter[int] = collections.Counter()

    def add(self, status: int) -> None:
        if status == 200:
            self.served += 1
        elif status:
            self.refused += 1
            self.statuses[status] += 1
        else:
            self.failed += 1

    def __str__(self) -> str:
        other = f" {dict(self.statuses)}" if self.statuses else ""
        return f"served {self.served}, refused {self.refused}{other}, failed {self.failed}"


async def hold(args: argparse.Namespace, port: int, edge: subprocess.Popen[str],
               agent: subprocess.Popen[str]) -> None:
    before = {p.pid: (rss_kib(p.pid), fd_count(p.pid)) for p in (edge, agent)}
    tally = Tally()
    first_done = 0
    all_open = trio.Event()
    go_on = trio.Event()
    src = sources()

    async def one() -> None:
        nonlocal first_done
        try:
            stream = await connect(port, next(src))
        except OSError:
            tally.add(0)
            first_done += 1
            if first_done == args.conns:
                all_open.set()
            return
        async with stream:
            buf = bytearray()
            status = 0
            try:
                status = await request(stream, buf)
            except (trio.BrokenResourceError, OSError):
                pass
            tally.add(status)
            first_done += 1
            if first_done == args.conns:
                all_open.set()
            await go_on.wait()
            for _ in range(args.requests - 1):
                if not status:
                    break
                try:
                    status = await request(stream, buf)
                except (trio.BrokenResourceError, OSError):
                    status = 0
                tally.add(status)

    t0 = time.monotonic()
    cpu0 = {p.pid: cpu_seconds(p.pid) for p in (edge, agent)}
    async with trio.open_nursery() as nursery:
        for _ in range(args.conns):
            nursery.start_soon(one)
        with trio.fail_after(args.timeout):
            await all_open.wait()
        opened = time.monotonic() - t0
        print(f"{args.conns} connections, first request each: {tally} in {opened:.1f}s")
        for name, proc in (("edge", edge), ("agent", agent)):
            rss0, fds0 = before[proc.pid]
            rss, fds = rss_kib(proc.pid), fd_count(proc.pid)
            print(f"  {name}: RSS {rss0 / 1024:.0f} -> {rss / 1024:.0f} MiB = "
                  f"{(rss - rss0) / args.conns:.1f} KiB per open connection; descriptors {fds0} -> {fds}")
        go_on.set()
    took = time.monotonic() - t0
    cpu = {p.pid: cpu_seconds(p.pid) - cpu0[p.pid] for p in (edge, agent)}
    total = tally.served + tally.refused + tally.failed
    print(f"all {total} requests: {tally} in {took:.1f}s; CPU edge {cpu[edge.pid]:.1f}s, "
          f"agent {cpu[agent.pid]:.1f}s")
    if FIRST_ERROR:
        print(f"first refusal: {FIRST_ERROR[0]!r}")
    if args.after:
        # Memory given back once the crowd has gone (the edge's idle sweeps and collections run).
        await trio.sleep(args.after)
        for name, proc in (("edge", edge), ("agent", agent)):
            rss0, fds0 = before[proc.pid]
            rss, fds = rss_kib(proc.pid), fd_count(proc.pid)
            print(f"  {args.after:.0f}s after they closed: {name} RSS {rss / 1024:.0f} MiB "
                  f"({(rss - rss0) / 1024:+.1f} over before), descriptors {fds} ({fds - fds0:+d})")


async def churn(args: argparse.Namespace, port: int, edge: subprocess.Popen[str]) -> None:
    src = sources()

    async def round_(n: int, tally: Tally) -> None:
        limit = trio.CapacityLimiter(args.conns)

        async def one() -> None:
            async with limit:
                try:
                    stream = await connect(port, next(src))
                    async with stream:
                        tally.add(await request(stream, bytearray(), close=True))
                except (trio.BrokenResourceError, OSError):
                    tally.add(0)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)

    async def settled() -> tuple[int, int]:
        await trio.sleep(args.after)
        return rss_kib(edge.pid), fd_count(edge.pid)

    await round_(min(args.churn, 2000), Tally())
    rss0, fds0 = await settled()
    print(f"after warm-up: edge RSS {rss0 / 1024:.1f} MiB, {fds0} descriptors")
    tally = Tally()
    t0 = time.monotonic()
    await round_(args.churn, tally)
    took = time.monotonic() - t0
    rss1, fds1 = await settled()
    print(f"{args.churn} short connections ({args.conns} at a time): {tally} in {took:.1f}s; edge RSS "
          f"{rss1 / 1024:.1f} MiB ({(rss1 - rss0) / 1024:+.1f} MiB), descriptors {fds1} ({fds1 - fds0:+d})")


async def run(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="tunneld-conns-"))
    agent_port, http_port, up_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[str]] = []
    try:
        upstream = subprocess.Popen(  # noqa: ASYNC220 - before anything runs concurrently
            [sys.executable, str(UPSTREAM), str(up_port)], stdout=subprocess.PIPE, text=True)
        procs.append(upstream)
        assert upstream.stdout is not None
        upstream.stdout.readline()
        edge = start_edge(data, agent_port, http_port, sessions=16)
        procs.append(edge)
        token = (data / "dev-authtoken").read_text().strip()
        agent = start([sys.executable, "-m", "tunneld", "http", f"127.0.0.1:{up_port}", "--subdomain", "many",
                       "--scheme", "http", "--server-addr", f"127.0.0.1:{agent_port}", "--authtoken", token,
                       "--root-cas", str(data / "ca.pem"), "--web-addr", "false",
                       "--log", str(data / "agent.log")])
        procs.append(agent)
        await wait_online(http_port)
        FIRST_ERROR.clear()  # 404s while the agent was still binding
        await trio.sleep(1)
        if args.churn:
            await churn(args, http_port, edge)
        else:
            await hold(args, http_port, edge, agent)
    finally:
        for proc in reversed(procs):
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=20000, help="connections open at once")
    parser.add_argument("--requests", type=int, default=3, help="requests per connection")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up waiting for all after")
    parser.add_argument("--churn", type=int, default=0, help="short connections instead")
    parser.add_argument("--after", type=float, default=12.0,
                        help="seconds to settle before measuring: after the churn, or after the held "
                             "connections closed (0: not measured)")
    args = parser.parse_args()
    if args.conns < 1 or args.requests < 1:
        parser.error("--conns and --requests must be at least 1")
    # Each process holds one descriptor per connection (the edge: the public socket; the agent:
    # the upstream one) and a few more; above the hard limit only a privileged process may go.
    want = args.conns + 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        limit = max(hard, min(want, nr_open))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard < want:
            print(f"note: the descriptor limit is {hard} and may not be raised here: the edge keeps ~100 "
                  f"for itself, so about {hard - 100} connections at once fit")
    trio.run(run, args)


if __name__ == "__main__":
    main()

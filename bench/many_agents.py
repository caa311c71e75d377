"""Many agents on one edge: connect N sessions at once, hold them idle, let them go.

One load-generator process runs N of the project's own :class:`~tunneld.core.Agent` (each with
one HTTP tunnel, inspector and local API off) against a dev-mode edge in a process of its own,
and reports what issue 17 asks about:

* how long until every session is online when all N connect at the same moment, and how many
  connection attempts failed on the way (each one a timeout or refusal the agent retried);
* the edge's RSS per idle session (RSS with N sessions minus RSS before, over N);
* the edge's CPU while the sessions idle (heartbeats only), as % of one core per 1,000 sessions
  (CPU seconds of the edge process over the idle period: contention barely moves it);
* the edge's RSS and open descriptors after every session left (memory given back).

``--churn N`` instead runs N connect/disconnect cycles (``--agents`` at a time) and compares the
edge's RSS and descriptors after a warm-up round with those at the end.

The edge allows 32 unauthenticated sessions per client address, so the agents connect from many
source addresses (127.0.x.y, ``--per-address`` agents each).

    python bench/many_agents.py --agents 2000          # about a minute on 2 vCPUs
    python bench/many_agents.py --agents 10000 --idle 30
    python bench/many_agents.py --agents 100 --churn 2000

Run it on an idle machine: the load generator and the edge share the CPUs.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunneld.core import Agent, AgentConfig, TunnelConfig, _agent, _gcpace, _tls  # noqa: E402
from tunneld.core._plugins import build_registry, get_plugin_manager  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _status_kib  # noqa: E402  (bench.py, next to this file)

#: Linux: bind() a source address without reserving a port yet (socket.h).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def rss_kib(pid: int) -> int:
    """A process's resident set in KiB (0 when it cannot be read), as ``bench.py`` reads it."""
    return _status_kib(pid, "VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_edge(data: Path, agent_port: int, http_port: int, sessions: int = 60000,
               extra: list[str] | None = None) -> subprocess.Popen[str]:
    """A dev-mode edge with room for ``sessions`` agents; returns once it is listening."""
    args = [sys.executable, "-m", "tunneld", "edge", "--dev", "--data-dir", str(data), "--domain",
            "bench.localhost", "--agent-addr", f"127.0.0.1:{agent_port}", "--http-addr",
            f"127.0.0.1:{http_port}", "--https-addr", "false", "--tcp-ports", "127.0.0.1:61000-61001",
            "--max-sessions", str(sessions), "--max-sessions-per-token", "60000",
            "--max-tunnels-per-token", "60000", "--log", "false", *(extra or [])]
    # cwd: ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH
    # (repo_env's checkout): run from the repository, it would shadow another checkout's code.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=repo_env(),
                            cwd=data)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if "--server-addr" in line:
            break
        if time.monotonic() > deadline:
            raise SystemExit("the edge did not start")
    # Keep reading its output: a full pipe would block the edge at its next log line.
    threading.Thread(target=collections.deque, args=(proc.stdout, 50), daemon=True).start()
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def repo_env() -> dict[str, str]:
    """The environment for child processes: this checkout's tunneld, whatever is installed."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def source_addresses(per_address: int) -> Iterator[str]:
    """127.0.1.1, 127.0.1.1, ... (``per_address`` times each), 127.0.1.2, ...: all loopback."""
    for b, c in itertools.product(range(1, 255), range(1, 255)):
        for _ in range(per_address):
            yield f"127.{b}.{c}.1"


def spread_sources(per_address: int) -> None:
    """Make every agent of this process connect from the next source address.

    A bench-only patch of the agent's TCP connect (its TLS handshake is the real one): the real
    one connects from the default address, and the edge rightly caps unauthenticated sessions
    per address.
    """
    sources = itertools.cycle(source_addresses(per_address))
    contexts: dict[str, Any] = {}

    def client_context(root: Path | None) -> Any:
        # One context for all: loading the CA file per agent costs the generator, not the edge.
        key = str(root)
        if key not in contexts:
            contexts[key] = _tls.client_context(root)
        return contexts[key]

    async def open_edge_tcp(host: str, port: int) -> trio.SocketStream:
        sock = trio.socket.socket()
        try:
            with trio.fail_after(_agent.CONNECT_TIMEOUT):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                await sock.bind((next(sources), 0))
                await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    _agent.open_edge_tcp = open_edge_tcp  # type: ignore[assignment]
    _agent.client_context = client_context  # type: ignore[assignment]


class Fleet:
    """Agents sharing one plugin registry (the generator's memory stays small)."""

    def __init__(self, token: str, agent_port: int, ca: Path) -> None:
        self.cfg = AgentConfig(authtoken=token, server_addr=f"127.0.0.1:{agent_port}", root_cas=str(ca),
                               web_addr=None)
        self.registry = build_registry(get_plugin_manager())

    def make(self, n: int) -> list[Agent]:
        return [Agent(self.cfg, [TunnelConfig("t", "http", "127.0.0.1:9", inspect=False, schemes=["http"])],
                      registry=self.registry) for _ in range(n)]


async def connect_all(agents: list[Agent], nursery: trio.Nursery, settle: float, verbose: bool = True
                      ) -> tuple[int, float, bool]:
    """Start every agent in ``nursery`` at once; wait until all are online or ``settle`` passed."""
    online = 0
    done = trio.Event()

    async def one(agent: Agent) -> None:
        nonlocal online
        await agent.online.wait()
        online += 1
        if online == len(agents):
            done.set()

    t0 = time.monotonic()
    for agent in agents:
        nursery.start_soon(agent.run)
        nursery.start_soon(one, agent)
    with trio.move_on_after(settle) as scope:
        while not done.is_set():
            with trio.move_on_after(1):
                await done.wait()
            if verbose:
                print(f"  {time.monotonic() - t0:5.1f}s online {online}/{len(agents)}", flush=True)
    return online, time.monotonic() - t0, not scope.cancelled_caught


async def hold(args: argparse.Namespace, edge: subprocess.Popen[str], fleet: Fleet) -> None:
    base_rss, base_fds = rss_kib(edge.pid), fd_count(edge.pid)
    agents = fleet.make(args.agents)
    cpu0 = cpu_seconds(edge.pid)
    async with trio.open_nursery() as nursery:
        online, settle, ok = await connect_all(agents, nursery, args.settle)
        retries = sum(a.failed_attempts for a in agents)
        print(f"all online: {ok} after {settle:.1f}s (edge CPU {cpu_seconds(edge.pid) - cpu0:.1f}s; "
              f"failed attempts retried {retries})")
        await trio.sleep(3)
        held = rss_kib(edge.pid)
        per = (held - base_rss) / max(1, online)
        print(f"edge RSS: {base_rss / 1024:.0f} MiB before, {held / 1024:.0f} MiB with {online} "
              f"sessions: {per:.1f} KiB per idle session; descriptors {base_fds} -> {fd_count(edge.pid)}")
        for _ in range(args.repeat):
            c0, w0 = cpu_seconds(edge.pid), time.monotonic()
            await trio.sleep(args.idle)
            used = (cpu_seconds(edge.pid) - c0) / (time.monotonic() - w0)
            print(f"edge CPU while idle ({args.idle:.0f}s): {used * 100:.2f}% of a core, "
                  f"{used * 100 * 1000 / max(1, online):.2f}% per 1,000 sessions")
        nursery.cancel_scope.cancel()
    del agents
    await trio.sleep(args.after)
    after = rss_kib(edge.pid)
    print(f"edge RSS {args.after:.0f}s after every session left: {after / 1024:.0f} MiB "
          f"({(after - base_rss) / 1024:+.0f} MiB vs before); descriptors {fd_count(edge.pid)}")


async def churn(args: argparse.Namespace, edge: subprocess.Popen[str], fleet: Fleet) -> None:
    """``args.churn`` connect/disconnect cycles, ``args.agents`` at a time."""
    async def round_() -> int:
        agents = fleet.make(args.agents)
        async with trio.open_nursery() as nursery:
            online, _, _ = await connect_all(agents, nursery, args.settle, verbose=False)
            nursery.cancel_scope.cancel()
        return online

    async def settled() -> tuple[int, int]:
        # The edge notices the agents left (EOF) and frees their sessions; its trim runs every 10 s.
        await trio.sleep(args.after)
        return rss_kib(edge.pid), fd_count(edge.pid)

    await round_()  # warm-up: the first sessions grow the heap and the caches
    rss0, fds0 = await settled()
    print(f"after warm-up: edge RSS {rss0 / 1024:.1f} MiB, {fds0} descriptors")
    t0, cycles, online = time.monotonic(), 0, 0
    while cycles < args.churn:
        online += await round_()
        cycles += args.agents
    rss1, fds1 = await settled()
    print(f"{cycles} connect/disconnect cycles ({online} came online) in {time.monotonic() - t0:.1f}s: "
          f"edge RSS {rss1 / 1024:.1f} MiB ({(rss1 - rss0) / 1024:+.1f} MiB), "
          f"descriptors {fds1} ({fds1 - fds0:+d})")


async def run(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="tunneld-many-"))
    agent_port, http_port = free_port(), free_port()
    edge = start_edge(data, agent_port, http_port)
    try:
        await trio.sleep(1)
        token = (data / "dev-authtoken").read_text().strip()
        fleet = Fleet(token, agent_port, data / "ca.pem")
        spread_sources(args.per_address)
        await (churn if args.churn else hold)(args, edge, fleet)
    finally:
        stop(edge)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measured")
    parser.add_argument("--repeat", type=int, default=2, help="idle CPU measurements")
    parser.add_argument("--settle", type=float, default=120.0, help="give up waiting for all online after")
    parser.add_argument("--after", type=float, default=12.0, help="seconds to wait after they leave")
    parser.add_argument("--per-address", type=int, default=16, help="agents per source address")
    parser.add_argument("--churn", type=int, default=0, help="connect/disconnect cycles instead")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        # Root may go past the hard limit (up to fs.nr_open): the generator holds 1 fd per agent.
        target = max(hard, min(int(Path("/proc/sys/fs/nr_open").read_text()), 4 * args.agents + 1024))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not args.churn:
        # Thousands of agents in one process: pace its full collections as the edge paces its
        # own (agents in processes of their own have small heaps, where this does not matter).
        # Not when churning: nothing here reclaims the frozen cycles of agents that left.
        _gcpace.install()
    trio.run(run, args)


if __name__ == "__main__":
    main()

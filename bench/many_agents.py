"""Many agents on one edge: connect N sessions at once, hold them idle, let them go.

One load-generator process runs N of the project's own :class:`~tunneld.core.Agent` (each with
one HTTP tunnel, inspector and local API off) against a dev-mode edge in a process of its own,
and reports what ../shared/perf-notes.md and issue 17 ask about:

* how long until every session is online when all N connect at the same moment, and how many
  connection attempts failed on the way;
* the edge's RSS per idle session (RSS with N sessions minus RSS before, over N);
* the edge's CPU while the sessions idle (heartbeats only), as % of one core per 1,000 sessions;
* the edge's RSS after every session left (memory given back).

    python bench/many_agents.py --agents 2000          # about a minute on 2 vCPUs
    python bench/many_agents.py --agents 10000 --idle 30

Run it on an idle machine: the load generator and the edge share the CPUs.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunneld.core import Agent, AgentConfig, TunnelConfig  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_edge(data: Path, agent_port: int, http_port: int) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "tunneld", "edge", "--dev", "--data-dir", str(data), "--domain",
            "bench.localhost", "--agent-addr", f"127.0.0.1:{agent_port}", "--http-addr",
            f"127.0.0.1:{http_port}", "--https-addr", "false", "--tcp-ports", "127.0.0.1:61000-61001",
            "--max-sessions", "60000", "--max-sessions-per-token", "60000",
            "--max-tunnels-per-token", "60000", "--log", "false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if "--server-addr" in line:
            break
        if time.monotonic() > deadline:
            raise SystemExit("the edge did not start")
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="tunneld-many-"))
    agent_port, http_port = free_port(), free_port()
    edge = start_edge(data, agent_port, http_port)
    try:
        await trio.sleep(1)
        token = (data / "dev-authtoken").read_text().strip()
        base_rss = rss_kib(edge.pid)
        cfg = AgentConfig(authtoken=token, server_addr=f"127.0.0.1:{agent_port}",
                          root_cas=str(data / "ca.pem"), web_addr=None)
        agents = [Agent(cfg, [TunnelConfig("t", "http", "127.0.0.1:9", inspect=False, schemes=["http"])])
                  for _ in range(args.agents)]
        retries = 0
        online = 0
        t0 = time.monotonic()
        cpu0 = cpu_seconds(edge.pid)
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def one(agent: Agent) -> None:
                nonlocal online
                await agent.online.wait()
                online += 1
                if online == len(agents):
                    done.set()

            for agent in agents:
                nursery.start_soon(agent.run)
                nursery.start_soon(one, agent)
            with trio.move_on_after(args.settle) as scope:
                while not done.is_set():
                    await trio.sleep(1)
                    retries = sum(getattr(a, "attempts", 0) for a in agents)
                    print(f"  {time.monotonic() - t0:5.1f}s online {online}/{len(agents)}", flush=True)
            settle = time.monotonic() - t0
            connect_cpu = cpu_seconds(edge.pid) - cpu0
            print(f"all online: {not scope.cancelled_caught} after {settle:.1f}s "
                  f"(edge CPU {connect_cpu:.1f}s; reconnect attempts seen {retries})")
            await trio.sleep(3)
            held = rss_kib(edge.pid)
            per = (held - base_rss) / max(1, online)
            print(f"edge RSS: {base_rss / 1024:.0f} MiB before, {held / 1024:.0f} MiB with {online} "
                  f"sessions: {per:.1f} KiB per idle session")
            c0, w0 = cpu_seconds(edge.pid), time.monotonic()
            await trio.sleep(args.idle)
            used = (cpu_seconds(edge.pid) - c0) / (time.monotonic() - w0)
            print(f"edge CPU while idle: {used * 100:.2f}% of a core, "
                  f"{used * 100 * 1000 / max(1, online):.2f}% per 1,000 sessions")
            nursery.cancel_scope.cancel()
        await trio.sleep(args.after)
        after = rss_kib(edge.pid)
        print(f"edge RSS {args.after:.0f}s after every session left: {after / 1024:.0f} MiB "
              f"({(after - base_rss) / 1024:+.0f} MiB vs before)")
    finally:
        edge.terminate()
        edge.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measured")
    parser.add_argument("--settle", type=float, default=120.0, help="give up waiting for all online after")
    parser.add_argument("--after", type=float, default=12.0, help="seconds to wait after they leave")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trio.run(run, args)


if __name__ == "__main__":
    main()

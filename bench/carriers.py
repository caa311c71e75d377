"""The agent's two carriers side by side: TLS (the default) and a WebSocket over TLS (``wss://``).

    python bench/carriers.py              # 1 GiB each way, 3 interleaved rounds
    python bench/carriers.py --quick      # 256 MiB

Separate processes on 127.0.0.1: a plain TCP source/sink upstream, a dev-mode edge and two
agents, each with a TCP tunnel to the upstream, one dialling ``HOST:PORT`` and one
``wss://HOST:PORT/tunneld`` (local API on, as users run them).  The client, in this process,
moves SIZE bytes down (upstream to client) and up through each tunnel, alternating which goes
first.  Printed: each figure's median (MB = 10**6 bytes), the WebSocket carrier's share of the
TLS carrier's speed, and CPU seconds per GiB of the edge and of each agent.

Upstream protocol: ``D`` + N (8 bytes, big endian) sends N bytes then closes; ``U`` + N reads
N bytes then answers ``k``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from tls_passthrough import HOST, MiB, Proc, download_on, free_port, serve_one, upload_on


def run_upstream(port: int) -> None:
    server = socket.create_server((HOST, port))
    print("upstream ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def transfer(port: int, op: str, size: int) -> float:
    """MB/s of one plain TCP connection moving ``size`` bytes ``down`` or ``up``."""
    with socket.create_connection((HOST, port)) as s:
        return (download_on if op == "down" else upload_on)(s, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB")
    args = parser.parse_args()
    if args.upstream:
        run_upstream(args.upstream)
        return
    size = (256 if args.quick else args.size_mib) * MiB
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="tunneld-carriers-bench-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            up_port = free_port()
            upstream = Proc("upstream", [sys.executable, __file__, "--upstream", str(up_port)], tmp)
            procs.append(upstream)
            upstream.wait_for("upstream ready")
            data = tmp / "edge"
            agent_port, low = free_port(), free_port()
            tunneld = [sys.executable, "-m", "tunneld"]
            edge = Proc("edge", tunneld + ["edge", "--dev", "--data-dir", str(data), "--http-addr", "false",
                                           "--https-addr", "false", "--agent-addr", f"{HOST}:{agent_port}",
                                           "--tcp-ports", f"{HOST}:{low + 1}-{low + 40}",
                                           "--log", "stdout"], tmp)
            procs.append(edge)
            edge.wait_for("run an agent with")
            token = (data / "dev-authtoken").read_text().strip()
            agents: dict[str, tuple[Proc, int]] = {}
            carriers = (("TLS", f"{HOST}:{agent_port}"), ("WebSocket", f"wss://{HOST}:{agent_port}/tunneld"))
            for name, addr in carriers:
                agent = Proc(f"{name} agent", tunneld + [
                    "tcp", f"{HOST}:{up_port}", "--server-addr", addr, "--authtoken", token,
                    "--root-cas", str(data / "ca.pem"), "--web-addr", f"{HOST}:{free_port()}",
                    "--log", "stdout"], tmp)
                procs.append(agent)
                url = agent.wait_for("tcp://").split("tcp://", 1)[1].split()[0].split('"')[0]
                agents[name] = agent, int(url.rsplit(":", 1)[1])
            print(f"{size // MiB} MiB each way, {args.rounds} rounds; edge pid {edge.popen.pid}", flush=True)
            speed: dict[tuple[str, str], list[float]] = {}
            cpu: dict[tuple[str, str], list[float]] = {}
            names = list(agents)
            for r in range(args.rounds):
                for name in names[r % 2:] + names[:r % 2]:
                    agent, port = agents[name]
                    for label in ("down", "up"):
                        e0, a0 = edge.cpu(), agent.cpu()
                        speed.setdefault((name, label), []).append(transfer(port, label, size))
                        gib = size / (1 << 30)
                        cpu.setdefault((name, "edge"), []).append((edge.cpu() - e0) / gib)
                        cpu.setdefault((name, "agent"), []).append((agent.cpu() - a0) / gib)
                done = ", ".join(f"{n} {lab} {v[-1]:.0f}" for (n, lab), v in speed.items())
                print(f"round {r + 1}: {done}", flush=True)
            print(f"\n{'carrier':10s} {'down MB/s':>10s} {'up MB/s':>10s} {'edge s/GiB':>11s} "
                  f"{'agent s/GiB':>12s}")
            for name in names:
                med = {k: statistics.median(v) for k, v in (*speed.items(), *cpu.items()) if k[0] == name}
                print(f"{name:10s} {med[name, 'down']:10.0f} {med[name, 'up']:10.0f} "
                      f"{med[name, 'edge']:11.2f} {med[name, 'agent']:12.2f}")
            for label in ("down", "up"):
                ratio = statistics.median(speed["WebSocket", label]) / statistics.median(speed["TLS", label])
                print(f"WebSocket / TLS, {label}: {ratio:.2f}")
        finally:
            for proc in reversed(procs):
                proc.stop()


if __name__ == "__main__":
    main()

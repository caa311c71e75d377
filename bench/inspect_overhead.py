#!/usr/bin/env python3
"""What request capture (the local inspector) costs: req/s and CPU per request, inspection on vs off.

One edge, nginx, and two agents for the same upstream that differ only in ``--inspect`` /
``--no-inspect`` (both with a web interface, so both would capture if told to).  Rounds
alternate the two: wrk keep-alive load on ``GET /1k.bin`` through each tunnel, reading the
agent's CPU seconds around each run.  Then a 1 GiB upload (and download) through the inspected
tunnel to the bulk upstream, reading the agent's peak RSS (VmHWM, reset first).

    python bench/inspect_overhead.py                # 6 s warm-up, 5 rounds of 3 s at 16 connections
    python bench/inspect_overhead.py --rounds 3 --duration 2 --conns 16 --size-mib 1024

Needs ``wrk`` and ``nginx`` (see bench/README.md); reuses bench.py's process helpers.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b  # noqa: E402  (bench.py, next to this file)


def _http_url(lines: list[str]) -> str | None:
    """The plain-HTTP URL from the console's Forwarding line, or from the log's "started tunnel"."""
    found = b.forwarding(lines, "http://")
    if found:
        return found
    for line in lines:
        if "started tunnel" in line and " url=http://" in line:
            return line.split(" url=", 1)[1].split()[0]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of wrk per run")
    parser.add_argument("--conns", type=int, default=16, help="wrk keep-alive connections")
    parser.add_argument("--warmup", type=float, default=6.0,
                        help="seconds of wrk on each agent first, unmeasured: enough to fill the 50 MB "
                             "capture store, so the rounds see its steady state (evicting), not its growth")
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="upload/download size for the RSS figure")
    parser.add_argument("--py-spy", default="", metavar="DIR", help="first profile each agent with py-spy")
    parser.add_argument("--tunneld", default="",
                        help="command running tunneld (default: this python -m tunneld)")
    args = parser.parse_args()
    tunneld = shlex.split(args.tunneld) if args.tunneld else [sys.executable, "-m", "tunneld"]
    b.raise_nofile(65536)
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-inspect-bench-"))
    procs = b.Procs(tmp)
    try:
        up_tcp, up_http = b.free_port(), b.free_port()
        upstream = procs.start("upstream", [sys.executable, str(Path(b.__file__).resolve()),
                                            "--upstream", str(up_tcp), str(up_http)], stdin=True)
        upstream.wait_for(lambda ls: "upstream ready" in ls, b.READY_TIMEOUT)
        _nginx, nginx_port = b.start_nginx(procs, tmp)
        data = tmp / "edge"
        http_port, https_port, agent_port = b.free_port(), b.free_port(), b.free_port()
        low, high = b.free_port_range(4)
        edge = procs.start("edge", tunneld + [
            "edge", "--dev", "--data-dir", str(data), "--domain", "bench.localhost",
            "--http-addr", f"{b.HOST}:{http_port}", "--https-addr", f"{b.HOST}:{https_port}",
            "--agent-addr", f"{b.HOST}:{agent_port}", "--tcp-ports", f"{b.HOST}:{low}-{high}",
            "--log", "false"])
        edge.wait_for(lambda ls: any("dev authtoken file" in line for line in ls), b.READY_TIMEOUT)
        b.wait_connectable(agent_port, b.READY_TIMEOUT, edge)
        token = (data / "dev-authtoken").read_text().strip()
        common = ["--server-addr", f"{b.HOST}:{agent_port}", "--authtoken", token,
                  "--root-cas", str(data / "ca.pem"), "--web-addr", f"{b.HOST}:0", "--log", "false"]
        agents = {}
        for name, flag in (("on", "--inspect"), ("off", "--no-inspect")):
            proc = procs.start(f"agent-{name}", tunneld + ["http", f"{b.HOST}:{nginx_port}", flag,
                                                          "--subdomain", f"n{name}"] + common)
            agents[name] = proc
        bulk = procs.start("agent-bulk", tunneld + ["http", f"{b.HOST}:{up_http}", "--subdomain", "bulk"]
                           + common)
        hosts = {}
        for name, proc in [*agents.items(), ("bulk", bulk)]:
            url = str(proc.wait_for(_http_url, b.READY_TIMEOUT))
            hosts[name] = url.split("://", 1)[1].rstrip("/")
        script = tmp / "report.lua"
        script.write_text(b.WRK_LUA)

        if args.py_spy:
            # Profile both agents under the same load (flame data in --py-spy DIR, raw format).
            import subprocess
            for name in ("on", "off"):
                out = Path(args.py_spy) / f"agent-{name}.txt"
                spy = subprocess.Popen(["py-spy", "record", "-r", "200", "-d", str(int(args.duration) + 1),
                                        "-f", "raw", "-o", str(out), "-p", str(agents[name].pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                b.run_wrk(script, http_port, hosts[name], "/1k.bin", args.conns, args.duration)
                spy.wait(30)
        for name in ("on", "off"):
            if args.warmup > 0:
                b.run_wrk(script, http_port, hosts[name], "/1k.bin", args.conns, args.warmup)
        rps: dict[str, list[float]] = {"on": [], "off": []}
        cpu_per_req: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(args.rounds):
            order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
            for name in order:
                pid = agents[name].pid
                cpu0 = b.tree_cpu(pid)
                res = b.run_wrk(script, http_port, hosts[name], "/1k.bin", args.conns, args.duration)
                cpu = b.tree_cpu(pid) - cpu0
                n = res["requests"]
                rps[name].append(n / (res["duration_us"] / 1e6))
                cpu_per_req[name].append(cpu / n * 1e6)
                procs.check_alive()
        print(f"\nwrk GET /1k.bin, {args.conns} keep-alive connections, {args.duration:g} s x "
              f"{args.rounds} rounds (medians; per-round values in brackets)")
        for name in ("on", "off"):
            print(f"  inspect {name:3}: {statistics.median(rps[name]):8.0f} req/s "
                  f"[{', '.join(f'{x:.0f}' for x in rps[name])}]   agent CPU "
                  f"{statistics.median(cpu_per_req[name]):6.1f} us/request "
                  f"[{', '.join(f'{x:.1f}' for x in cpu_per_req[name])}]")
        ratio = statistics.median(rps["on"]) / statistics.median(rps["off"])
        cpu = statistics.median(cpu_per_req["on"]) / statistics.median(cpu_per_req["off"])
        print(f"  inspection on / off: {ratio:.3f} of the req/s ({(1 - ratio) * 100:+.1f} % cost; "
              f"target <= 15 %), {cpu:.3f} of the agent CPU per request")

        size = args.size_mib * 1024 * 1024
        pid = bulk.pid
        before = b._status_kib(pid, "VmRSS") / 1024
        b.PEAK.reset([pid])
        t0 = time.perf_counter()
        b.http_upload(http_port, hosts["bulk"], size, 600)
        up_s = time.perf_counter() - t0
        peak_up = b.PEAK.read([pid])
        b.PEAK.reset([pid])
        t0 = time.perf_counter()
        b.http_download(http_port, hosts["bulk"], size, 600)
        down_s = time.perf_counter() - t0
        peak_down = b.PEAK.read([pid])
        print(f"\n{args.size_mib} MiB through an inspected tunnel (the capture keeps the first MiB "
              "of each body):")
        print(f"  agent RSS before {before:.0f} MiB; peak during upload {peak_up:.0f} MiB "
              f"({size / up_s / 1e6:.0f} MB/s), during download {peak_down:.0f} MiB "
              f"({size / down_s / 1e6:.0f} MB/s)")
        if not b.PEAK.can_reset:
            print("  (could not reset VmHWM: peaks are since the agent started)")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

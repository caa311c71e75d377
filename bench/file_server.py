"""Download throughput of ``tunneld http file://…`` against nginx serving the same file directly.

    python bench/file_server.py                   # 1 GiB file, 3 rounds
    python bench/file_server.py --size-mib 256 --rounds 5

Everything runs as separate processes on 127.0.0.1 in a throwaway directory (never a system
service): a private nginx (own config, 1 worker, ``sendfile on`` as Debian ships it), a dev-mode
``tunneld edge``, one ``tunneld http file:///…/share`` agent and, for reference, one
``tunneld http`` agent relaying to that nginx (the tunnel's cost without the file server).  The
client is curl writing to /dev/null.  Rounds rotate the three paths after one warm-up read each,
so all read the file from the page cache.  Reported: median MB/s, ratios to nginx, and CPU
seconds the edge and the agent used per download (from /proc).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

MiB = 1 << 20
HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
#: Children run the tunneld of this checkout, whatever the installed copy points at.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes],
             timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what}: process exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"{what}: not ready after {timeout:.0f}s")


def connectable(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def printed(path: Path, text: bytes) -> bool:
    return text in path.read_bytes()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def make_file(path: Path, size: int) -> None:
    """``size`` bytes of incompressible data, written 16 MiB at a time (never held whole)."""
    block = random.Random(1).randbytes(16 * MiB)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def start_nginx(tmp: Path, www: Path) -> tuple[subprocess.Popen[bytes], int]:
    d = tmp / "nginx"
    d.mkdir()
    port = free_port()
    user = "user root root;" if os.geteuid() == 0 else ""  # workers must read the temp dir
    (d / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
{user}
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    server {{
        listen {HOST}:{port};
        root {www};
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", "stderr"],
                            stdout=subprocess.DEVNULL)
    wait_for(lambda: connectable(port), "nginx", proc)
    return proc, port


def start_tunnel(tmp: Path, share: Path, nginx_port: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    """Edge, file agent and relay agent; returns the processes and the edge's public HTTP port."""
    tunneld = [sys.executable, "-m", "tunneld"]
    data = tmp / "edge"
    http_port, https_port, agent_port = free_port(), free_port(), free_port()
    tcp_low = random.randrange(30000, 40000)
    edge = subprocess.Popen(tunneld + [
        "edge", "--dev", "--data-dir", str(data), "--domain", "bench.localhost",
        "--http-addr", f"{HOST}:{http_port}", "--https-addr", f"{HOST}:{https_port}",
        "--agent-addr", f"{HOST}:{agent_port}", "--tcp-ports", f"{HOST}:{tcp_low}-{tcp_low + 1}",
        "--log", "false"], env=CHILD_ENV, stdout=subprocess.DEVNULL)
    wait_for(lambda: (data / "dev-authtoken").exists() and connectable(agent_port), "edge", edge)
    token = (data / "dev-authtoken").read_text().strip()
    procs = [edge]
    for name, addr in (("files", share.as_uri()), ("relay", f"{HOST}:{nginx_port}")):
        out = tmp / f"agent-{name}.out"
        with out.open("wb") as sink:
            agent = subprocess.Popen(tunneld + [
                "http", addr, "--subdomain", name, "--scheme", "http",
                "--server-addr", f"{HOST}:{agent_port}", "--authtoken", token,
                "--root-cas", str(data / "ca.pem"), "--web-addr", "false", "--log", "false"],
                env=CHILD_ENV, stdout=sink)
        procs.append(agent)
        wait_for(partial(printed, out, b"Forwarding"), f"agent {name}", agent)
    return procs, http_port


def download(port: int, host: str, size: int) -> float:
    """Seconds curl took to fetch big.bin (checked to be complete)."""
    result = subprocess.run(["curl", "-s", "-S", "-o", "/dev/null", "-H", f"Host: {host}", "-w",
                             "%{http_code} %{size_download} %{time_total}", f"http://{HOST}:{port}/big.bin"],
                            capture_output=True, text=True, check=True)
    status, got, seconds = result.stdout.split()
    if status != "200" or int(got) != size:
        raise SystemExit(f"bad download from port {port}: {result.stdout}")
    return float(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="file size in MiB [1024]")
    ap.add_argument("--rounds", type=int, default=3, help="downloads per server after the warm-up [3]")
    args = ap.parse_args()
    for tool in ("nginx", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install -y {tool})")
    size = args.size_mib * MiB
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-file-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        tmp.chmod(0o755)
        share = tmp / "share"
        share.mkdir()
        make_file(share / "big.bin", size)
        nginx, nginx_port = start_nginx(tmp, share)
        procs.append(nginx)
        tunnel, tunnel_port = start_tunnel(tmp, share, nginx_port)
        procs += tunnel
        edge_pid = tunnel[0].pid
        paths = {  # name -> (port, Host, agent pid)
            "nginx direct (sendfile)": (nginx_port, "localhost", None),
            "tunneld http file://": (tunnel_port, "files.bench.localhost", tunnel[1].pid),
            "tunneld http -> nginx": (tunnel_port, "relay.bench.localhost", tunnel[2].pid),
        }
        rates: dict[str, list[float]] = {name: [] for name in paths}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for port, host, _ in paths.values():  # warm-ups: page cache, first connections
            download(port, host, size)
        names = list(paths)
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                port, host, agent_pid = paths[name]
                e0 = cpu_seconds(edge_pid)
                a0 = cpu_seconds(agent_pid) if agent_pid else 0.0
                rates[name].append(size / download(port, host, size) / 1e6)
                if agent_pid:
                    cpu[name].append((cpu_seconds(edge_pid) - e0, cpu_seconds(agent_pid) - a0))
        direct = statistics.median(rates[names[0]])
        print(f"file: {args.size_mib} MiB, median of {args.rounds} rounds, {os.cpu_count()} CPUs, "
              f"curl -> /dev/null")
        for name in names:
            mbs = statistics.median(rates[name])
            runs = ", ".join(f"{x:.0f}" for x in rates[name])
            line = f"{name:<26}{mbs:7.0f} MB/s  x{mbs / direct:5.3f} of nginx  (runs: {runs})"
            if cpu[name]:
                edge_s = statistics.median(e for e, _ in cpu[name])
                agent_s = statistics.median(a for _, a in cpu[name])
                line += f"  CPU s/download: edge {edge_s:.2f}, agent {agent_s:.2f}"
            print(line)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

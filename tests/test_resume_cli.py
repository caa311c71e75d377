"""An edge SIGKILLed mid-traffic and restarted on the same data dir: agents come back, same URLs."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .test_cli import (  # noqa: F401 - fixtures are used by name
    DOMAIN,
    STARTED_TUNNEL,
    Proc,
    curl,
    echo_upstream,
    free_port,
    free_range,
    http_upstream,
    logfmt,
    spawn,
    started_urls,
    tcp_roundtrip,
)


def _edge_args(data_dir: Path, ports: dict[str, int], tcp: tuple[int, int]) -> list[str]:
    return ["edge", "--dev", "--data-dir", str(data_dir), "--domain", DOMAIN,
            "--http-addr", f"127.0.0.1:{ports['http']}", "--https-addr", f"127.0.0.1:{ports['https']}",
            "--agent-addr", f"127.0.0.1:{ports['agent']}", "--tcp-ports", f"127.0.0.1:{tcp[0]}-{tcp[1]}",
            "--grace-period", "1"]


def _serves(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` first passes (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except (AssertionError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"not serving again within {timeout}s")


def test_sigkill_edge_restart_same_urls(tmp_path: Path, spawn: Callable[..., Proc], http_upstream: int,
                                        echo_upstream: int) -> None:
    data_dir = tmp_path / "edge"
    ports = {"http": free_port(), "https": free_port(), "agent": free_port()}
    tcp = free_range(10)
    edge = spawn(*_edge_args(data_dir, ports, tcp))
    edge.wait_line(lambda line: "--server-addr" in line, timeout=15)
    token = (data_dir / "dev-authtoken").read_text().strip()
    flags = ["--authtoken", token, "--server-addr", f"127.0.0.1:{ports['agent']}", "--root-cas",
             str(data_dir / "ca.pem"), "--log", "stdout", "--log-format", "logfmt", "--web-addr", "false"]
    web = spawn("http", str(http_upstream), "--scheme", "http", *flags)
    raw = spawn("tcp", str(echo_upstream), *flags)
    web_url = next(iter(started_urls(web, 1).values()))
    tcp_url = next(iter(started_urls(raw, 1).values()))
    tcp_port = int(tcp_url.rsplit(":", 1)[1])
    assert "hello from upstream /" in curl(web_url + "/")
    assert tcp_roundtrip(tcp_port, b"x" * 1000) == b"x" * 1000

    # Traffic in flight when the edge dies: it must fail (not hang), and must not be silent data loss.
    inflight = socket.create_connection(("127.0.0.1", tcp_port), timeout=10)
    inflight.sendall(b"abc")
    assert inflight.recv(3) == b"abc"
    outcome: list[object] = []

    def read_until_closed() -> None:
        try:
            outcome.append(inflight.recv(10))
        except OSError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read_until_closed, daemon=True)
    reader.start()

    edge.popen.send_signal(signal.SIGKILL)
    edge.popen.wait(5)
    reader.join(5)
    assert outcome and outcome[0] in (b"",) or isinstance(outcome[0], OSError), outcome
    inflight.close()

    edge2 = spawn(*_edge_args(data_dir, ports, tcp))
    edge2.wait_line(lambda line: "--server-addr" in line, timeout=15)
    took_http = _serves(lambda: "hello from upstream /again" in curl(web_url + "/again"), 10)
    took_tcp = _serves(lambda: tcp_roundtrip(tcp_port, b"y" * 1000) == b"y" * 1000, 10)
    print(f"serving again {took_http:.2f}s (http) and {took_tcp:.2f}s (tcp) after the edge was back")
    assert max(took_http, took_tcp) < 5, (took_http, took_tcp)
    # Each agent announced its tunnel again, at the same URL.
    for agent, url in ((web, web_url), (raw, tcp_url)):
        urls = [logfmt(line)["url"] for line in agent.lines["out"] if STARTED_TUNNEL in line]
        assert urls == [url, url], agent.describe()

"""Memory given back after a crowd of public connections (issue 17; ``tunneld/core/_giveback.py``).

A real edge and a real agent (its local API on), 2,000 keep-alive public connections open at
once through one HTTP tunnel, then all closed: both processes must fall back most of the way to
where they were.  Without the give-back both stayed at their peak (``bench/many_conns.py --after
60``: +82 MiB each after 10,000).  And the crowd-watch rule on its own.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from tunneld.core import _giveback
from tunneld.core._giveback import CrowdWatch

from .conftest import rss_kib
from .test_cli import DOMAIN, STARTED_TUNNEL, Proc, free_port, spawn  # noqa: F401 - fixtures are used by name

CONNS = 2000
HOST = f"crowd.{DOMAIN}"

#: A keep-alive upstream that answers every request with ``ok`` (threads would not hold 2,000
#: connections; this is one process with one task per connection).
UPSTREAM = Path(__file__).resolve().parents[1] / "bench" / "ok_upstream.py"


def rss_mib(pid: int) -> float:
    return rss_kib(pid) / 1024


async def _get(port: int, source: str) -> trio.SocketStream:
    """A connection that has had one answer, left open."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    buf = b""
    while not buf.endswith(b"\r\n\r\nok"):
        data = await stream.receive_some(65536)
        assert data, f"connection closed after {buf!r}"
        buf += data
    assert buf.startswith(b"HTTP/1.1 200"), buf
    return stream


async def _crowd(port: int, n: int) -> list[trio.SocketStream]:
    streams: list[trio.SocketStream] = []

    async def one(i: int) -> None:
        # Sources spread over 127.0.3.x: one address would do, but ports stay plentiful.
        streams.append(await _get(port, f"127.0.3.{1 + i % 50}"))

    limit = trio.CapacityLimiter(200)

    async def limited(i: int) -> None:
        async with limit:
            await one(i)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(limited, i)
    return streams


@pytest.fixture
def descriptors() -> Iterator[None]:
    """Room for the crowd: this process, the edge, the agent and the upstream each hold one
    descriptor per connection (the children inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = CONNS + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _start_upstream() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, str(UPSTREAM)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
async def test_memory_goes_back_after_a_crowd_of_connections(tmp_path: Path, spawn: Callable[..., Proc],
                                                             descriptors: None) -> None:
    upstream, up_port = _start_upstream()
    try:
        data_dir = tmp_path / "edge"
        http_port, agent_port, tcp_port = free_port(), free_port(), free_port()
        edge = spawn("edge", "--dev", "--data-dir", str(data_dir), "--domain", DOMAIN,
                     "--http-addr", f"127.0.0.1:{http_port}", "--https-addr", "false",
                     "--agent-addr", f"127.0.0.1:{agent_port}",
                     "--tcp-ports", f"127.0.0.1:{tcp_port}-{tcp_port}", "--log", str(tmp_path / "access.log"))
        edge.wait_line(lambda line: "--server-addr" in line, timeout=15)
        token = (data_dir / "dev-authtoken").read_text().strip()
        agent = spawn("http", f"127.0.0.1:{up_port}", "--subdomain", "crowd", "--scheme", "http",
                      "--authtoken", token, "--server-addr", f"127.0.0.1:{agent_port}",
                      "--root-cas", str(data_dir / "ca.pem"), "--web-addr", f"127.0.0.1:{free_port()}",
                      # The inspector keeps what it captured (up to 50 MB): memory in use, not
                      # given back.  The local API is on.
                      "--no-inspect",
                      "--log", "stdout", "--log-format", "logfmt")
        agent.wait_line(lambda line: STARTED_TUNNEL in line, timeout=15)
        pids = {"edge": edge.popen.pid, "agent": agent.popen.pid}

        for stream in await _crowd(http_port, 100):  # warm-up: caches, the allocators' first arenas
            await stream.aclose()
        await trio.sleep(1)
        before = {name: rss_mib(pid) for name, pid in pids.items()}
        with trio.fail_after(60):
            streams = await _crowd(http_port, CONNS)
        peak = {name: rss_mib(pid) for name, pid in pids.items()}
        for stream in streams:
            await stream.aclose()
        del streams
        for name in pids:
            # Enough growth for the fall to mean something (~8 KiB a connection on each side).
            assert peak[name] - before[name] > 8, (name, before, peak)

        def given_back() -> bool:
            # Most of it: the first page of every released pool stays, and some pools are
            # still partly used (see _giveback).  Without the give-back both stay at the peak.
            return all(rss_mib(pid) - before[name] < 0.4 * (peak[name] - before[name])
                       for name, pid in pids.items())

        # The edge and the agent look every 10 s.
        deadline = time.monotonic() + 40
        while not given_back() and time.monotonic() < deadline:
            await trio.sleep(0.5)
        now = {name: rss_mib(pid) for name, pid in pids.items()}
        assert given_back(), f"RSS MiB before {before}, with the crowd {peak}, after it left {now}"
    finally:
        upstream.kill()
        upstream.wait()


def test_a_crowd_is_gone_once_most_of_its_peak_has_left() -> None:
    watch = CrowdWatch()
    for _ in range(_giveback.MIN_CROWD * 2):
        watch.opened()
    assert watch.peak == _giveback.MIN_CROWD * 2
    # A steady load, however high, is no crowd gone.
    assert not watch.gone(now=1000.0)
    for _ in range(_giveback.MIN_CROWD):
        watch.closed()
    # Half the peak left: not yet.
    assert not watch.gone(now=1000.0)
    for _ in range(_giveback.MIN_CROWD // 2):
        watch.closed()
    assert watch.live * 4 == watch.peak
    assert watch.gone(now=1000.0)
    # Once: the peak starts again from what is still open.
    assert watch.peak == watch.live == _giveback.MIN_CROWD // 2
    assert not watch.gone(now=1000.0)


def test_crowds_too_small_or_too_close_together_wait() -> None:
    watch = CrowdWatch()
    # A churn of connections that never pile up is no crowd.
    for _ in range(5000):
        watch.opened()
        watch.closed()
    assert watch.peak == 1 and not watch.gone(now=0.0)
    # Fewer than MIN_CROWD closed since the peak: no crowd, however small what is left.
    for _ in range(_giveback.MIN_CROWD - 1):
        watch.opened()
    for _ in range(_giveback.MIN_CROWD - 1):
        watch.closed()
    assert not watch.gone(now=0.0)

    def crowd() -> None:
        for _ in range(_giveback.MIN_CROWD):
            watch.opened()
        for _ in range(_giveback.MIN_CROWD):
            watch.closed()

    crowd()
    assert watch.gone(now=100.0)
    crowd()
    # Within MIN_SPACING of the last one it waits, and is seen at a later check.
    assert not watch.gone(now=100.0 + _giveback.MIN_SPACING - 1)
    assert watch.gone(now=100.0 + _giveback.MIN_SPACING)

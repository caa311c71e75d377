"""Chaos matrix (issue 11, item 5): kill one side in mid-response, the public client must notice.

For each response framing (Content-Length, chunked, close-delimited, upgraded) and each side
killed while the body streams (the agent, the upstream, the edge), the public client must see
a failure it can detect: a TCP reset here, since HTTP cannot tell a close-delimited or upgraded
stream cut short from a whole one.  The one exception is what HTTP itself cannot tell: an
upstream that *closes cleanly* in the middle of a close-delimited response ends it as it would
have ended without a tunnel.

The agent is a real process killed with SIGKILL; the edge runs in-process and is "killed" by
cancelling it (a SIGKILLed edge's sockets are closed by the kernel, with a plain FIN that no
code can turn into a reset).  Upstreams are in-process servers that stream until told to die:
with a TCP reset, or with a clean close.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tunneld.core import Agent, Edge, TunnelConfig
from tunneld.core._store import Store

from .conftest import make_edge_config, start_hello_upstream

FRAMINGS = ["length", "chunked", "close", "upgraded"]
HEADS = {
    "length": b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "close": b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n",
    "upgraded": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
}
BLOCK = b"x" * 65536
#: Body bytes the client reads before the kill: the response is well under way.
BEFORE_KILL = 512 * 1024


def _rst_close(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@attrs.define(eq=False)
class Streamer:
    """An upstream that answers any request head with ``framing`` and streams until killed."""

    framing: str
    port: int = 0
    die: trio.Event = attrs.field(factory=trio.Event)
    #: How it dies: "rst" (TCP reset) or "fin" (a clean close).
    how: str = "rst"

    async def start(self, nursery: trio.Nursery) -> Streamer:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = int(listeners[0].socket.getsockname()[1])
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            await stream.send_all(HEADS[self.framing])
            piece = b"10000\r\n" + BLOCK + b"\r\n" if self.framing == "chunked" else BLOCK

            async def pump() -> None:
                try:
                    while True:
                        await stream.send_all(piece)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.die.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                await self.die.wait()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            if self.how == "rst":
                _rst_close(stream.socket)
            await trio.aclose_forcefully(stream)


def _request(framing: str, host: str) -> bytes:
    if framing == "upgraded":
        return (f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    version = "1.0" if framing == "close" else "1.1"
    return f"GET /big HTTP/{version}\r\nHost: {host}\r\n\r\n".encode()


async def _download(stream: trio.abc.Stream, framing: str, host: str, killed: trio.Event) -> str:
    """Request a body, let the kill happen once BEFORE_KILL bytes came, read on to the end.

    Returns "reset" when the connection failed, "eof" when it ended as cleanly as TCP (and TLS)
    allow.
    """
    await stream.send_all(_request(framing, host))
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        assert data, buf
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == (b"101" if framing == "upgraded" else b"200"), head
    got = len(body)
    try:
        while got < BEFORE_KILL:
            data = await stream.receive_some(65536)
            assert data, "ended before the kill"
            got += len(data)
        killed.set()
        with trio.fail_after(10):
            while await stream.receive_some(256 * 1024):
                pass
    except (trio.BrokenResourceError, ConnectionError):
        return "reset"
    return "eof"


@attrs.define(eq=False)
class ChaosEdge:
    """An in-process edge that can be cancelled (the "killed edge"), with its dev token and CA."""

    edge: Edge
    scope: trio.CancelScope
    token: str
    ca: Path
    http_port: int
    https_port: int
    agent_port: int
    nursery: trio.Nursery

    async def agent(self, port: int, name: str) -> tuple[Agent, str]:
        """An in-process agent for an HTTP tunnel to ``port``; returns it and the public host."""
        agent = Agent(_agent_config(self), [TunnelConfig(name=name, proto="http", addr=f"127.0.0.1:{port}")])
        await self.nursery.start(agent.run)
        url = agent.tunnels[0].public_url
        return agent, url.split("://", 1)[1].split(":", 1)[0]


def _agent_config(env: ChaosEdge) -> Any:
    from tunneld.core import AgentConfig

    return AgentConfig(authtoken=env.token, server_addr=f"127.0.0.1:{env.agent_port}", root_cas=str(env.ca),
                       web_addr=None)


@pytest.fixture
async def chaos_edge(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ChaosEdge]:
    config = make_edge_config(tmp_path)
    store = Store.open(tmp_path)
    _rec, token = store.create_token("chaos")
    edge = Edge(config, store)
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await edge.serve(task_status=task_status)

    async with trio.open_nursery() as edge_nursery:
        info = await edge_nursery.start(run)
        yield ChaosEdge(edge, scope, token, tmp_path / "ca.pem", info.ports["http"], info.ports["https"],
                        info.ports["agent"], nursery)
        scope.cancel()
    store.close()


async def _agent_process(env: ChaosEdge, port: int) -> tuple[trio.Process, str]:
    """A real ``tunneld http`` agent process; returns it and its tunnel's public host."""
    args = [sys.executable, "-m", "tunneld", "http", f"127.0.0.1:{port}", "--server-addr",
            f"127.0.0.1:{env.agent_port}", "--root-cas", str(env.ca), "--authtoken", env.token,
            "--log", "stdout", "--log-format", "logfmt", "--web-addr", "false"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    home = env.ca.parent / "agent-home"
    environ.update(XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"),
                   PYTHONUNBUFFERED="1")
    proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            stdin=subprocess.DEVNULL, env=environ)
    assert proc.stdout is not None
    out = b""
    # Both endpoints bound (the https one is announced first): wait for the http one's line.
    with trio.fail_after(20):
        while b"url=http://" not in out or not out.split(b"url=http://", 1)[1].count(b"\n"):
            data = await proc.stdout.receive_some(65536)
            assert data, out
            out += data
    line = next(line for line in out.decode().splitlines() if "url=http://" in line)
    url = line.split("url=", 1)[1].split()[0].strip('"')
    return proc, url.split("://", 1)[1].split(":", 1)[0]


async def _bystander_ok(env: ChaosEdge, host: str) -> None:
    """The edge still serves another tunnel."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", env.http_port)
        await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while not data.endswith(b"hello " + host.encode()):
            chunk = await stream.receive_some(65536)
            assert chunk, data
            data += chunk
        await stream.aclose()


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("victim", ["agent", "upstream", "edge"])
async def test_kill_mid_response_is_a_failure(chaos_edge: ChaosEdge, nursery: trio.Nursery,
                                             framing: str, victim: str) -> None:
    env = chaos_edge
    upstream = await Streamer(framing).start(nursery)
    _, bystander = await env.agent(await start_hello_upstream(nursery), "bystander")
    proc: trio.Process | None = None
    if victim == "agent":
        proc, host = await _agent_process(env, upstream.port)
    else:
        _, host = await env.agent(upstream.port, "victim")
    killed = trio.Event()

    async def kill() -> None:
        await killed.wait()
        if victim == "agent":
            assert proc is not None
            proc.send_signal(signal.SIGKILL)
        elif victim == "upstream":
            upstream.die.set()
        else:
            env.scope.cancel()

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(kill)
                stream = await trio.open_tcp_stream("127.0.0.1", env.http_port)
                outcome = await _download(stream, framing, host, killed)
                await trio.aclose_forcefully(stream)
            assert outcome == "reset"
            if victim != "edge":
                await _bystander_ok(env, bystander)
    finally:
        if proc is not None:
            proc.kill()
            await proc.wait()


async def test_upstream_clean_close_ends_close_delimited_cleanly(chaos_edge: ChaosEdge,
                                                                nursery: trio.Nursery) -> None:
    """The one case HTTP cannot tell: it ends as it would without the tunnel."""
    upstream = await Streamer("close", how="fin").start(nursery)
    _, host = await chaos_edge.agent(upstream.port, "victim")
    killed = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(lambda: _set_after(killed, upstream.die))
            stream = await trio.open_tcp_stream("127.0.0.1", chaos_edge.http_port)
            assert await _download(stream, "close", host, killed) == "eof"
            await stream.aclose()


async def _set_after(first: trio.Event, then: trio.Event) -> None:
    await first.wait()
    then.set()


@pytest.mark.parametrize("framing", ["close", "length"])
async def test_upstream_clean_close_of_framed_or_https(chaos_edge: ChaosEdge, nursery: trio.Nursery,
                                                     framing: str) -> None:
    """A Content-Length body cut by a clean upstream close is still a failure (reset); over
    HTTPS, an agent killed mid close-delimited body gives no clean close_notify either."""
    if framing == "length":
        upstream = await Streamer("length", how="fin").start(nursery)
        _, host = await chaos_edge.agent(upstream.port, "victim")
        killed = trio.Event()
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(lambda: _set_after(killed, upstream.die))
                stream = await trio.open_tcp_stream("127.0.0.1", chaos_edge.http_port)
                assert await _download(stream, "length", host, killed) == "reset"
                await trio.aclose_forcefully(stream)
        return
    upstream = await Streamer("close").start(nursery)
    proc, host = await _agent_process(chaos_edge, upstream.port)
    killed = trio.Event()
    ctx = ssl.create_default_context(cafile=str(chaos_edge.ca))
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as n:

                async def kill() -> None:
                    await killed.wait()
                    proc.send_signal(signal.SIGKILL)

                n.start_soon(kill)
                tcp = await trio.open_tcp_stream("127.0.0.1", chaos_edge.https_port)
                tls = trio.SSLStream(tcp, ctx, server_hostname=host)
                outcome = await _download(tls, "close", host, killed)
                await trio.aclose_forcefully(tls)
            assert outcome == "reset"
    finally:
        proc.kill()
        await proc.wait()


async def test_curl_sees_agent_sigkill_in_close_delimited_body(chaos_edge: ChaosEdge,
                                                              nursery: trio.Nursery) -> None:
    """The review's reproduction: curl used to exit 0 with 200 and a fraction of the body."""
    upstream = await Streamer("close").start(nursery)
    proc, host = await _agent_process(chaos_edge, upstream.port)
    try:
        with trio.fail_after(30):
            curl = await trio.lowlevel.open_process(
                ["curl", "-sS", "--http1.0", "-o", "/dev/null", "--max-time", "20", "-H", f"Host: {host}",
                 f"http://127.0.0.1:{chaos_edge.http_port}/big"], stderr=subprocess.PIPE)
            # Let the body flow for a moment, then kill the agent under it.
            await trio.sleep(0.5)
            assert curl.poll() is None
            proc.send_signal(signal.SIGKILL)
            code = await curl.wait()
            assert curl.stderr is not None
            err = await curl.stderr.receive_some(4096)
            assert code != 0, err
            assert code in (18, 56), (code, err)  # partial file / failure receiving (reset)
    finally:
        proc.kill()
        await proc.wait()

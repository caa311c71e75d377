"""TCP tunnels end to end: bulk data both ways, half-close, port lifecycle, failures."""

from __future__ import annotations

import errno
import hashlib
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from tunneld.core import Agent, MuxSession, TunnelConfig, TunnelRejected, proto
from tunneld.core._rpc import call
from tunneld.core._store import DEFAULT_ACCOUNT
from tunneld.core._tls import client_context, open_tls_client

from ..conftest import DOMAIN, EdgeEnv, start_echo_server

# The end-to-end tests run over both agent carriers: muxado over TLS, and over a WebSocket.
pytestmark = pytest.mark.carriers

MiB = 1024 * 1024
BULK = 256 * MiB
CHUNK = 256 * 1024


# ---- helpers ---------------------------------------------------------------------------------


def public_port(url: str) -> int:
    assert url.startswith(f"tcp://{DOMAIN}:"), url
    return int(url.rsplit(":", 1)[1])


async def serve(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def connect_refused(port: int) -> bool:
    """True if a TCP connect to 127.0.0.1:port is refused (nothing listens)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        return True
    finally:
        sock.close()
    return False


async def wait_refused(port: int, within: float) -> None:
    with trio.fail_after(within):
        while not await connect_refused(port):
            await trio.sleep(0.01)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_cancellable_agent(env: EdgeEnv, nursery: trio.Nursery,
                                  *tunnels: TunnelConfig) -> tuple[Agent, trio.CancelScope]:
    """Start an agent in a cancel scope of its own, so a test can make it vanish."""
    agent = Agent(env.agent_config(), list(tunnels))
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await agent.run(task_status=task_status)

    await nursery.start(run)
    return agent, scope


class Pattern:
    """Deterministic pseudo-random bytes, sliced so chunk boundaries never line up with its period."""

    def __init__(self, seed: int) -> None:
        import random

        self.buf = random.Random(seed).randbytes(4 * MiB + 4099)
        self.view = memoryview(self.buf + self.buf[:CHUNK])

    def chunks(self, total: int):  # type: ignore[no-untyped-def]
        pos = 0
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            yield self.view[pos:pos + n]
            sent += n
            pos = (pos + n) % len(self.buf)


async def send_pattern(stream: trio.abc.HalfCloseableStream, seed: int, total: int) -> str:
    digest = hashlib.sha256()
    for chunk in Pattern(seed).chunks(total):
        digest.update(chunk)
        await stream.send_all(chunk)
    await stream.send_eof()
    return digest.hexdigest()


async def receive_all(stream: trio.abc.ReceiveStream) -> tuple[int, str]:
    digest = hashlib.sha256()
    n = 0
    while data := await stream.receive_some(CHUNK):
        digest.update(data)
        n += len(data)
    return n, digest.hexdigest()


# ---- bulk ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_bulk_both_ways_at_once(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    results: dict[str, object] = {}
    upstream_done = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as n:
            async def tx() -> None:
                results["down_sent"] = await send_pattern(stream, 2, BULK)

            async def rx() -> None:
                results["up_received"] = await receive_all(stream)

            n.start_soon(tx)
            n.start_soon(rx)
        await stream.aclose()
        upstream_done.set()

    port = await serve(nursery, upstream)
    agent = await edge_env.start_agent(TunnelConfig(name="bulk", proto="tcp", addr=str(port)))
    pport = public_port(agent.tunnels[0].public_url)

    with trio.fail_after(120):
        client = await trio.open_tcp_stream("127.0.0.1", pport)
        async with trio.open_nursery() as n:
            async def tx() -> None:
                results["up_sent"] = await send_pattern(client, 1, BULK)

            async def rx() -> None:
                results["down_received"] = await receive_all(client)

            n.start_soon(tx)
            n.start_soon(rx)
        await client.aclose()
        await upstream_done.wait()

    assert results["up_received"] == (BULK, results["up_sent"])
    assert results["down_received"] == (BULK, results["down_sent"])
    assert agent.tunnels[0].metrics.conns_count == 1


# ---- half-close ------------------------------------------------------------------------------


async def test_half_close_is_honoured(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    upstream_saw_eof = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        got = b""
        async for chunk in stream:
            got += chunk
        upstream_saw_eof.set()
        # The client's direction is closed; ours is still open.
        await trio.sleep(0.05)
        await stream.send_all(b"after eof: " + got)
        await stream.send_eof()
        await stream.aclose()

    port = await serve(nursery, upstream)
    agent = await edge_env.start_agent(TunnelConfig(name="hc", proto="tcp", addr=str(port)))
    with trio.fail_after(10):
        client = await trio.open_tcp_stream("127.0.0.1", public_port(agent.tunnels[0].public_url))
        await client.send_all(b"ping")
        await client.send_eof()
        await upstream_saw_eof.wait()
        got = b""
        async for chunk in client:
            got += chunk
        assert got == b"after eof: ping"
        # EOF reached the client (the loop above ended) and the connection then closes cleanly.
        assert await client.receive_some() == b""
        await client.aclose()


# ---- the public port's lifetime ------------------------------------------------------------


async def test_port_released_when_agent_leaves(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    port = await start_echo_server(nursery)
    agent, scope = await start_cancellable_agent(edge_env, nursery,
                                                 TunnelConfig(name="t", proto="tcp", addr=str(port)))
    pport = public_port(agent.tunnels[0].public_url)
    assert not await connect_refused(pport)
    scope.cancel()
    await wait_refused(pport, within=1.0)
    assert pport not in edge_env.edge.routes.ports


async def _raw_session(env: EdgeEnv, nursery: trio.Nursery) -> MuxSession:
    tls = await open_tls_client("127.0.0.1", env.info.ports["agent"], client_context(env.ca))
    mux = MuxSession(tls, client=True)
    await nursery.start(mux.run)
    auth = proto.Auth(version=["3", "2"], extra=proto.AuthExtra(authtoken=env.token, client_type="test"))
    resp = await call(mux, proto.StreamType.AUTH, auth, proto.AuthResp)
    assert not resp.error, resp.error
    return mux


async def test_port_released_after_unbind(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mux = await _raw_session(edge_env, nursery)
        bind = proto.Bind(proto="tcp", opts={"Addr": ""})
        bound = await call(mux, proto.StreamType.BIND, bind, proto.BindResp)
        assert not bound.error, bound.error
        pport = public_port(bound.url)
        assert not await connect_refused(pport)
        resp = await call(mux, proto.StreamType.UNBIND, proto.Unbind(id=bound.id), proto.UnbindResp)
        assert not resp.error, resp.error
        await wait_refused(pport, within=0.5)
        # The session itself lives on: the same port can be bound again (asked for by address,
        # which the account must have reserved).
        edge_env.edge.store.create_reserved_addr(DEFAULT_ACCOUNT, f"{DOMAIN}:{pport}")
        bind = proto.Bind(proto="tcp", opts={"Addr": f"{DOMAIN}:{pport}"})
        again = await call(mux, proto.StreamType.BIND, bind, proto.BindResp)
        assert not again.error, again.error
        assert public_port(again.url) == pport
        await mux.aclose()


# ---- --remote-addr ---------------------------------------------------------------------------


def _free_port_in(low: int, high: int) -> int:
    for port in range(low, high + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in the test range")


async def test_remote_addr_in_range_is_granted(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    low, high = edge_env.edge.config.tcp_ports
    wanted = _free_port_in(low + 50, high)
    edge_env.edge.store.create_reserved_addr(DEFAULT_ACCOUNT, f"{DOMAIN}:{wanted}")
    port = await start_echo_server(nursery)
    agent = await edge_env.start_agent(TunnelConfig(name="r", proto="tcp", addr=str(port),
                                                    remote_addr=f"{DOMAIN}:{wanted}"))
    assert agent.tunnels[0].public_url == f"tcp://{DOMAIN}:{wanted}"
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", wanted)
        await stream.send_all(b"x")
        assert await stream.receive_some() == b"x"
        await stream.aclose()


async def test_remote_addr_outside_range_is_refused(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    low, _high = edge_env.edge.config.tcp_ports
    port = await start_echo_server(nursery)
    with trio.fail_after(10), pytest.RaisesGroup(TunnelRejected, flatten_subgroups=True) as caught:
        await edge_env.start_agent(TunnelConfig(name="r", proto="tcp", addr=str(port),
                                                remote_addr=f"{DOMAIN}:{low - 1}"))
    err = caught.value.exceptions[0]
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    assert isinstance(err, TunnelRejected)
    assert "outside" in err.reason
    assert int(err.code) == 338


# ---- failures --------------------------------------------------------------------------------


async def test_inflight_connection_closed_when_agent_vanishes(edge_env: EdgeEnv,
                                                              nursery: trio.Nursery) -> None:
    port = await start_echo_server(nursery)
    agent, scope = await start_cancellable_agent(edge_env, nursery,
                                                 TunnelConfig(name="t", proto="tcp", addr=str(port)))
    pport = public_port(agent.tunnels[0].public_url)
    with trio.fail_after(10):
        client = await trio.open_tcp_stream("127.0.0.1", pport)
        await client.send_all(b"hello")
        assert await client.receive_some() == b"hello"
    scope.cancel()
    with trio.fail_after(2):
        try:
            assert await client.receive_some() == b""
        except trio.BrokenResourceError:
            pass  # a reset is as good as a FIN: the point is that it does not hang
    await client.aclose()


async def test_upstream_down_closes_public_connection(edge_env: EdgeEnv) -> None:
    agent = await edge_env.start_agent(TunnelConfig(name="t", proto="tcp", addr=str(closed_port())))
    pport = public_port(agent.tunnels[0].public_url)
    with trio.fail_after(3):
        client = await trio.open_tcp_stream("127.0.0.1", pport)
        try:
            data = await client.receive_some()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            assert isinstance(cause, OSError) and cause.errno in (errno.ECONNRESET, errno.EPIPE)
        else:
            assert data == b""
        await client.aclose()
    # The edge and the agent are unharmed: the tunnel is still there.
    assert not await connect_refused(pport)


async def test_shutdown_lets_inflight_connections_finish(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """SIGTERM semantics: no new connections, in-flight ones keep working for the grace period."""
    from ..conftest import start_echo_server

    port = await start_echo_server(nursery)
    agent = await edge_env.start_agent(TunnelConfig(name="t", proto="tcp", addr=str(port)))
    public_port = int(agent.tunnels[0].public_url.rsplit(":", 1)[1])
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", public_port)
        await stream.send_all(b"before")
        assert await stream.receive_some(100) == b"before"
        edge_env.edge.shutdown()
        await trio.sleep(0.3)
        # Still served during the grace period (1 s in the fixture).
        await stream.send_all(b"during")
        assert await stream.receive_some(100) == b"during"
        # New agents are no longer accepted.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", edge_env.info.ports["agent"])
        # After the grace period the connection is closed, not left hanging.
        with trio.fail_after(5):
            while True:
                try:
                    if await stream.receive_some(100) == b"":
                        break
                except trio.BrokenResourceError:
                    break
        await edge_env.edge.stopped.wait()

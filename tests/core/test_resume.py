"""Reconnect and resume: same URLs after a broken link or an edge restart; names held for owners."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from tunneld.core import (
    Agent,
    AgentConfig,
    AuthFailed,
    Edge,
    EdgeConfig,
    MuxSession,
    TunnelConfig,
    TunnelRejected,
    proto,
)
from tunneld.core._names import NameClaims, Signer, load_secret
from tunneld.core._rpc import call
from tunneld.core._store import Store
from tunneld.core._tls import client_context, open_tls_client

from ..conftest import EdgeEnv, make_edge_config, start_echo_server, start_hello_upstream
from ..linkproxy import LinkProxy
from ..test_cli import free_range

FAST_HEARTBEAT = {"heartbeat_interval": 0.3, "heartbeat_tolerance": 0.7}


# ---- helpers ---------------------------------------------------------------------------------


async def tcp_echo(port: int, payload: bytes = b"ping") -> bytes:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            got = b""
            while data := await stream.receive_some():
                got += data
            return got


async def http_get(port: int, host: str, path: str = "/") -> bytes:
    """The raw response to ``GET path`` on 127.0.0.1:``port`` with ``Host: host``."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            got = b""
            while data := await stream.receive_some():
                got += data
            return got


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def host_of(url: str) -> str:
    return url.split("://", 1)[1].rsplit(":", 1)[0]


async def wait_for(pred, timeout: float, step: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(step)


# ---- a silently dead link --------------------------------------------------------------------


async def test_frozen_link_reconnects_to_same_urls(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """No FIN, no RST: heartbeats notice, the agent reconnects, the edge replaces the old session."""
    proxy = await LinkProxy(edge_env.info.ports["agent"]).start(nursery)
    echo = await start_echo_server(nursery)
    web = await start_hello_upstream(nursery)
    agent = await edge_env.start_agent(
        TunnelConfig("t", "tcp", str(echo)), TunnelConfig("w", "http", str(web), schemes=["http"]),
        TunnelConfig("s", "tls", str(echo)), server_addr=f"127.0.0.1:{proxy.port}", **FAST_HEARTBEAT)
    urls = {t.name: t.public_url for t in agent.tunnels}
    client_id = agent.client_id
    tcp_port = port_of(urls["t"])
    assert await tcp_echo(tcp_port) == b"ping"

    # A public connection in flight when the link dies must end, not hang.
    inflight = await trio.open_tcp_stream("127.0.0.1", tcp_port)
    await inflight.send_all(b"a")
    assert await inflight.receive_some() == b"a"

    online = agent.online
    proxy.freeze()
    frozen_at = time.monotonic()
    with trio.fail_after(10):
        await online.wait()  # the Event of the old connection is already set; wait for the next
        while not agent.online.is_set() or agent.online is online:
            await trio.sleep(0.02)
    took = time.monotonic() - frozen_at
    assert took < 5, f"reconnect took {took:.1f}s with a 1s heartbeat budget"
    assert proxy.connections == 2
    assert agent.client_id == client_id
    assert {t.name: t.public_url for t in agent.tunnels} == urls
    assert await tcp_echo(tcp_port) == b"ping"
    assert b"\r\n\r\nhello " in await http_get(edge_env.http_port, host_of(urls["w"]))

    with trio.fail_after(5):
        try:
            data = await inflight.receive_some()
        except trio.BrokenResourceError:
            data = b""
    assert data == b"", "the dead session's public connection should have been closed"
    await inflight.aclose()
    # The edge keeps exactly one session for this agent.
    assert [s.client_id for s in edge_env.edge.sessions] == [client_id]


# ---- an edge restart -------------------------------------------------------------------------


@attrs.define
class RestartableEdge:
    tmp: Path
    store: Store
    ports: dict[str, int]
    hold: float = 60.0
    edge: Edge | None = None
    scope: trio.CancelScope | None = None

    def config(self) -> EdgeConfig:
        return make_edge_config(self.tmp, agent_addr=("127.0.0.1", self.ports["agent"]),
                                http_addr=("127.0.0.1", self.ports["http"]),
                                https_addr=("127.0.0.1", self.ports["https"]),
                                tcp_ports=(self.ports["tcp"], self.ports["tcp"] + 1), hold_period=self.hold)

    async def start(self, nursery: trio.Nursery) -> None:
        async def run(task_status: trio.TaskStatus[None]) -> None:
            with trio.CancelScope() as scope:
                self.scope = scope
                self.edge = Edge(self.config(), Store.open(self.tmp))
                await self.edge.serve(task_status=task_status)

        await nursery.start(run)

    def kill(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


@pytest.fixture
async def restartable(tmp_path: Path) -> AsyncIterator[RestartableEdge]:
    store = Store.open(tmp_path)
    # Outside the ephemeral range: the ports must still be free when the edge restarts.
    tcp, _ = free_range(2)
    ports = {name: free_range(1)[0] for name in ("agent", "http", "https")}
    yield RestartableEdge(tmp_path, store, {**ports, "tcp": tcp})
    store.close()


def _token(store: Store) -> str:
    return store.create_token("t")[1]


async def test_edge_restart_gives_back_same_urls(restartable: RestartableEdge, nursery: trio.Nursery) -> None:
    token = _token(restartable.store)
    await restartable.start(nursery)
    echo = await start_echo_server(nursery)
    web = await start_hello_upstream(nursery)
    cfg = AgentConfig(authtoken=token, server_addr=f"127.0.0.1:{restartable.ports['agent']}",
                      root_cas=str(restartable.tmp / "ca.pem"), web_addr=None)
    agent = Agent(cfg, [TunnelConfig("t", "tcp", str(echo)),
                        TunnelConfig("w", "http", str(web), schemes=["http"])])
    await nursery.start(agent.run)
    urls = {t.name: t.public_url for t in agent.tunnels}
    await trio.sleep(2.1)  # online long enough to reset the agent's backoff

    online = agent.online
    restartable.kill()
    await trio.sleep(0.3)
    await restartable.start(nursery)
    back = time.monotonic()
    with trio.fail_after(5):
        while agent.online is online or not agent.online.is_set():
            await trio.sleep(0.02)
    assert {t.name: t.public_url for t in agent.tunnels} == urls
    assert await tcp_echo(port_of(urls["t"])) == b"ping"
    assert b"\r\n\r\nhello " in await http_get(restartable.ports["http"], host_of(urls["w"]))
    assert time.monotonic() - back < 5


async def test_names_held_across_restart_for_owner_only(restartable: RestartableEdge,
                                                        nursery: trio.Nursery) -> None:
    """Another account cannot take a name or port while it is held; it can after the hold."""
    restartable.hold = 1.5
    owner, other = _token(restartable.store), _token(restartable.store)
    await restartable.start(nursery)
    echo = await start_echo_server(nursery)
    base = dict(server_addr=f"127.0.0.1:{restartable.ports['agent']}",
                root_cas=str(restartable.tmp / "ca.pem"), web_addr=None)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            agent = Agent(AgentConfig(authtoken=owner, **base),
                          [TunnelConfig("w", "http", str(echo), subdomain="mine", schemes=["http"]),
                           TunnelConfig("t", "tcp", str(echo))])
            await inner.start(agent.run)
            port = port_of(agent.tunnels[1].public_url)
            restartable.kill()
            await trio.sleep(0.1)
            scope.cancel()
    await restartable.start(nursery)  # a new edge process would read the same store

    thief = Agent(AgentConfig(authtoken=other, **base),
                  [TunnelConfig("w", "http", str(echo), subdomain="mine", schemes=["http"])])
    with pytest.RaisesGroup(pytest.RaisesExc(TunnelRejected, match="held for its previous owner"),
                            flatten_subgroups=True):
        async with trio.open_nursery() as inner:
            await inner.start(thief.run)
    # The other port of the two-port range is free; the held one is not given out.
    thief_tcp = Agent(AgentConfig(authtoken=other, **base), [TunnelConfig("t", "tcp", str(echo))])
    await nursery.start(thief_tcp.run)
    assert port_of(thief_tcp.tunnels[0].public_url) != port
    with pytest.RaisesGroup(pytest.RaisesExc(TunnelRejected, match="held for its previous owner"),
                            flatten_subgroups=True):
        async with trio.open_nursery() as inner:
            await inner.start(Agent(AgentConfig(authtoken=other, **base),
                                    [TunnelConfig("t", "tcp", str(echo),
                                                  remote_addr=f"127.0.0.1:{port}")]).run)

    await trio.sleep(1.6)  # the hold ends
    late = Agent(AgentConfig(authtoken=other, **base),
                 [TunnelConfig("w", "http", str(echo), subdomain="mine", schemes=["http"])])
    await nursery.start(late.run)
    assert host_of(late.tunnels[0].public_url) == "mine.tunneld.test"


async def test_owner_gets_held_subdomain_back_at_once(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    echo = await start_echo_server(nursery)
    tc = TunnelConfig("w", "http", str(echo), subdomain="again", schemes=["http"])
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(Agent(edge_env.agent_config(), [tc]).run)
            scope.cancel()
    agent = await edge_env.start_agent(tc)
    assert host_of(agent.tunnels[0].public_url) == "again.tunneld.test"


# ---- the resume credentials ------------------------------------------------------------------


async def _raw_session(env: EdgeEnv, nursery: trio.Nursery,
                       auth: proto.Auth) -> tuple[MuxSession, proto.AuthResp]:
    tls = await open_tls_client("127.0.0.1", env.info.ports["agent"], client_context(env.ca))
    mux = MuxSession(tls, client=True)
    await nursery.start(mux.run)
    return mux, await call(mux, proto.StreamType.AUTH, auth, proto.AuthResp)


async def test_client_id_without_cookie_is_not_taken_over(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    echo = await start_echo_server(nursery)
    agent = await edge_env.start_agent(TunnelConfig("t", "tcp", str(echo)))
    victim = agent.client_id
    forged = proto.Auth(version=["2"], client_id=victim,
                        extra=proto.AuthExtra(authtoken=edge_env.token, cookie="bogus.cookie"))
    mux, resp = await _raw_session(edge_env, nursery, forged)
    assert not resp.error and resp.client_id != victim
    assert resp.extra.cookie
    # The victim's session is untouched.
    assert await tcp_echo(port_of(agent.tunnels[0].public_url)) == b"ping"
    assert victim in {s.client_id for s in edge_env.edge.sessions}
    # A cookie for one token does not resume with another.
    other = edge_env.store.create_token("other")[1]
    stolen = proto.Auth(version=["2"], client_id=victim,
                        extra=proto.AuthExtra(authtoken=other, cookie=agent._cookie))
    _mux2, resp2 = await _raw_session(edge_env, nursery, stolen)
    assert resp2.client_id != victim
    await mux.aclose()


async def test_bind_token_of_another_owner_is_ignored(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    echo = await start_echo_server(nursery)
    agent = await edge_env.start_agent(TunnelConfig("w", "http", str(echo), schemes=["http"]))
    token = agent.tunnels[0].token
    assert token
    other = edge_env.store.create_token("other")[1]
    mux, resp = await _raw_session(edge_env, nursery, proto.Auth(
        version=["2"], extra=proto.AuthExtra(authtoken=other)))
    bind = proto.Bind(proto="http", opts={}, extra=proto.BindExtra(token=token))
    got = await call(mux, proto.StreamType.BIND, bind, proto.BindResp)
    assert not got.error
    assert got.url != agent.tunnels[0].public_url
    await mux.aclose()


async def test_unbind_lets_go_without_hold(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    mux, _ = await _raw_session(edge_env, nursery, proto.Auth(
        version=["2"], extra=proto.AuthExtra(authtoken=edge_env.token)))
    bind = proto.Bind(proto="http", opts={"Subdomain": "letgo"})
    got = await call(mux, proto.StreamType.BIND, bind, proto.BindResp)
    assert not got.error
    unbound = await call(mux, proto.StreamType.UNBIND, proto.Unbind(id=got.id), proto.UnbindResp)
    assert not unbound.error
    assert edge_env.edge.routes.names.owner_of("host", "letgo.tunneld.test") is None
    await mux.aclose()


# ---- units -----------------------------------------------------------------------------------


def test_signer_rejects_tampering(tmp_path: Path) -> None:
    signer = Signer(load_secret(tmp_path))
    token = signer.sign("bind", "host", "a.example", "tok1")
    assert signer.verify("bind", token) == ["host", "a.example", "tok1"]
    assert signer.verify("session", token) is None
    body, mac = token.split(".")
    assert signer.verify("bind", body[:-2] + "xx." + mac) is None
    assert signer.verify("bind", token + "x") is None
    assert signer.verify("bind", "") is None
    assert Signer(b"k" * 32).verify("bind", token) is None
    # The key persists: a restarted edge accepts its old tokens.
    assert Signer(load_secret(tmp_path)).verify("bind", token) == ["host", "a.example", "tok1"]
    assert (tmp_path / "edge-secret").stat().st_mode & 0o777 == 0o600


def test_name_claims_persist_and_expire(tmp_path: Path) -> None:
    now = [1000.0]
    store = Store.open(tmp_path)
    claims = NameClaims(store, hold_period=60, clock=lambda: now[0])
    holder = object()
    claims.acquire("host", "a.x", "alice", holder)
    with pytest.raises(TunnelRejected, match="in use"):
        claims.acquire("host", "a.x", "bob", object())
    claims.flush()
    # The edge dies with the name live: the next edge holds it for a fresh period.
    now[0] = 5000.0
    again = NameClaims(store, hold_period=60, clock=lambda: now[0])
    again.load()
    assert again.owner_of("host", "a.x") == "alice"
    with pytest.raises(TunnelRejected, match="held for its previous owner for 60 more seconds"):
        again.acquire("host", "a.x", "bob", object())
    assert again.available("host", "a.x", "alice")
    now[0] += 61
    assert again.available("host", "a.x", "bob")
    again.flush()
    assert store.all_names() == []
    # Releasing starts the hold; a live name never expires.
    claims = NameClaims(store, hold_period=10, clock=lambda: now[0])
    claims.acquire("port", "20001", "alice", holder)
    now[0] += 100
    assert claims.owner_of("port", "20001") == "alice"
    claims.release("port", "20001", holder)
    assert not claims.available("port", "20001", "bob")
    now[0] += 11
    assert claims.available("port", "20001", "bob")
    store.close()


async def test_revoking_a_token_ends_its_connected_agent(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    """`tunneld edge token revoke` writes the store only: the edge notices, closes the session,
    and the agent's reconnect is refused, so it stops instead of serving on."""
    echo = await start_echo_server(nursery)
    agent = Agent(edge_env.agent_config(), [TunnelConfig("t", "tcp", str(echo))])
    started = time.monotonic()
    with pytest.RaisesGroup(pytest.RaisesExc(AuthFailed, match="revoked"), flatten_subgroups=True):
        with trio.fail_after(15):
            async with trio.open_nursery() as inner:
                await inner.start(agent.run)
                port = port_of(agent.tunnels[0].public_url)
                assert await tcp_echo(port) == b"ping"
                assert edge_env.store.revoke_token(edge_env.token.split("_")[1])
    assert time.monotonic() - started < 10
    with trio.fail_after(3):  # the refused reconnect's session ends a moment after its answer
        while edge_env.edge.sessions:
            await trio.sleep(0.02)
    assert port not in edge_env.edge.routes.ports

"""ACLs and reservations enforced at the edge on real Binds (our agent over loopback), and the
``/metrics`` counters they move."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from tunneld.core import Agent, Code, TunnelConfig, TunnelRejected, proto
from tunneld.core._mux import MuxSession
from tunneld.core._rpc import call
from tunneld.core._store import DEFAULT_ACCOUNT
from tunneld.core._tls import client_context, open_tls_client

from .conftest import DOMAIN, EdgeEnv, start_echo_server, start_hello_upstream


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def refused_code(env: EdgeEnv, tunnel: TunnelConfig, token: str) -> Code:
    with trio.fail_after(10), pytest.RaisesGroup(TunnelRejected, flatten_subgroups=True) as caught:
        await env.start_agent(tunnel, authtoken=token)
    err = _leaf(caught.value)
    assert isinstance(err, TunnelRejected)
    return err.code


async def raw_session(env: EdgeEnv, token: str) -> MuxSession:
    tls = await open_tls_client("127.0.0.1", env.info.ports["agent"], client_context(env.ca))
    mux = MuxSession(tls, client=True)
    await env.nursery.start(mux.run)
    auth = proto.Auth(version=["3", "2"], extra=proto.AuthExtra(authtoken=token, client_type="test"))
    resp = await call(mux, proto.StreamType.AUTH, auth, proto.AuthResp)
    assert not resp.error, resp.error
    return mux


async def bind(mux: MuxSession, proto_name: str, **opts: str) -> proto.BindResp:
    with trio.fail_after(10):
        return await call(mux, proto.StreamType.BIND, proto.Bind(proto=proto_name, opts=opts), proto.BindResp)


def code_of(resp: proto.BindResp) -> str:
    return resp.error.strip().splitlines()[-2] if resp.error else ""


async def get(port: int, host: str) -> bytes:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        async for chunk in stream:
            out += chunk
        return out


@pytest.fixture
def accounts(edge_env: EdgeEnv) -> dict[str, str]:
    """alice (restricted to names under *.alice.DOMAIN), bob (unrestricted): account ids and tokens."""
    store = edge_env.store
    alice = store.ensure_account("alice").id
    bob = store.ensure_account("bob").id
    _, alice_token = store.create_token("alice laptop", account_id=alice, acl=[f"bind:*.alice.{DOMAIN}"])
    _, bob_token = store.create_token("bob", account_id=bob)
    return {"alice": alice, "bob": bob, "alice_token": alice_token, "bob_token": bob_token}


async def test_hostname_acl_and_reservations(edge_env: EdgeEnv, accounts: dict[str, str]) -> None:
    store = edge_env.store
    up = await start_hello_upstream(edge_env.nursery)
    alice = accounts["alice_token"]
    # A name under the edge's domain that the ACL does not cover.
    assert await refused_code(edge_env, TunnelConfig("t", "http", str(up), subdomain="app"), alice) \
        == Code.BIND_NAME_FORBIDDEN
    # Covered by the ACL, but a nested name: the account must reserve it first.
    assert await refused_code(edge_env, TunnelConfig("t", "http", str(up), hostname=f"app.alice.{DOMAIN}"),
                              alice) == Code.ADDRESS_NOT_ALLOWED
    # No rule covers a random name under the edge's domain, and no reserved wildcard either.
    assert await refused_code(edge_env, TunnelConfig("t", "http", str(up)), alice) == Code.BIND_NAME_FORBIDDEN
    store.create_reserved_domain(accounts["alice"], f"*.alice.{DOMAIN}")
    # (Plain HTTP: this edge is not in dev mode, and has no certificate for nested names.)
    agent = await edge_env.start_agent(TunnelConfig("t", "http", str(up), hostname=f"App.Alice.{DOMAIN}.",
                                                    schemes=["http"]), authtoken=alice)
    assert {t.public_url.split("://")[1].split(":")[0] for t in agent.tunnels} == {f"app.alice.{DOMAIN}"}
    assert b"hello app.alice." in await get(edge_env.http_port, f"app.alice.{DOMAIN}")
    # A random name now comes from under the reserved wildcard the ACL allows.
    rand = await edge_env.start_agent(TunnelConfig("r", "http", str(up), schemes=["http"]), authtoken=alice)
    host = rand.tunnels[0].public_url.split("://")[1].split(":")[0]
    assert host.endswith(f".alice.{DOMAIN}") and host.count(".") == 3
    # bob (unrestricted ACL) cannot take names alice reserved, however he asks.
    for opts in ({"hostname": f"x.alice.{DOMAIN}"}, {"hostname": f"X.ALICE.{DOMAIN}."}):
        code = await refused_code(edge_env, TunnelConfig("b", "http", str(up), **opts), accounts["bob_token"])
        assert code in (Code.DOMAIN_RESERVED, Code.ADDRESS_NOT_ALLOWED)
    mux = await raw_session(edge_env, accounts["bob_token"])
    resp = await bind(mux, "https", Hostname=f"x.alice.{DOMAIN}")
    assert "ERR_TUNNELD_" in resp.error and not resp.url
    # A one-label name alice reserved under the edge's domain is hers alone, even by --subdomain.
    store.create_reserved_domain(accounts["alice"], f"shop.{DOMAIN}")
    assert code_of(await bind(mux, "https", Subdomain="shop")) == "ERR_TUNNELD_320"
    await mux.aclose()
    assert edge_env.edge.metrics.refused_binds.get("ERR_TUNNELD_316", 0) >= 2
    assert edge_env.edge.metrics.refused_binds.get("ERR_TUNNELD_320", 0) >= 1


async def test_acl_change_applies_to_the_next_bind(edge_env: EdgeEnv, accounts: dict[str, str]) -> None:
    store = edge_env.store
    rec = store.verify_token(accounts["alice_token"])
    assert rec is not None
    mux = await raw_session(edge_env, accounts["alice_token"])
    assert code_of(await bind(mux, "https", Subdomain="one")) == "ERR_TUNNELD_316"
    store.update_credential(rec.account_id, rec.id, acl=[f"bind:one.{DOMAIN}"])
    resp = await bind(mux, "https", Subdomain="one")
    assert not resp.error and resp.url.startswith(f"https://one.{DOMAIN}")
    assert code_of(await bind(mux, "https", Subdomain="two")) == "ERR_TUNNELD_316"
    await mux.aclose()


def _free_ports(low: int, high: int, n: int) -> list[int]:
    found = []
    for port in range(low, high + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    raise RuntimeError("no free ports in the test range")


async def test_tcp_reservations(edge_env: EdgeEnv, accounts: dict[str, str]) -> None:
    store = edge_env.store
    low, high = edge_env.edge.config.tcp_ports
    mine, theirs, free = _free_ports(low + 100, high, 3)
    store.create_reserved_addr(accounts["alice"], f"{DOMAIN}:{mine}")
    store.create_reserved_addr(accounts["bob"], f"{DOMAIN}:{theirs}")
    store.update_credential(accounts["alice"], store.verify_token(accounts["alice_token"]).id,  # type: ignore[union-attr]
                            acl=[f"bind:{DOMAIN}:{mine}", f"bind:{DOMAIN}:{theirs}", f"bind:{DOMAIN}:{free}"])
    mux = await raw_session(edge_env, accounts["alice_token"])
    assert code_of(await bind(mux, "tcp", Addr="")) == "ERR_TUNNELD_356"
    assert code_of(await bind(mux, "tcp", Addr=f"{DOMAIN}:{theirs}")) == "ERR_TUNNELD_309"
    assert code_of(await bind(mux, "tcp", Addr=f"{DOMAIN}:{free}")) == "ERR_TUNNELD_307"
    resp = await bind(mux, "tcp", Addr=f"{DOMAIN}:{mine}")
    assert not resp.error and resp.url == f"tcp://{DOMAIN}:{mine}"
    await mux.aclose()
    # An unrestricted account's random ports never land on a reserved one.
    bob = await raw_session(edge_env, accounts["bob_token"])
    for _ in range(8):
        resp = await bind(bob, "tcp", Addr="")
        assert not resp.error, resp.error
        assert int(resp.url.rsplit(":", 1)[1]) not in (mine, theirs)
    await bob.aclose()


async def test_random_tcp_skips_reserved_ports_when_few_are_left(tmp_path: Path,
                                                                 nursery: trio.Nursery) -> None:
    from tunneld.core import Edge
    from tunneld.core._store import Store

    from .conftest import make_edge_config

    low = _free_ports(40000, 40100, 1)[0]
    ports = _free_ports(low, low + 60, 3)
    config = make_edge_config(tmp_path, tcp_ports=(ports[0], ports[0]))
    store = Store.open(tmp_path)
    _, token = store.create_token("t")
    store.create_reserved_addr(DEFAULT_ACCOUNT, f"{DOMAIN}:{ports[0]}")
    edge = Edge(config, store)
    async with trio.open_nursery() as inner:
        info = await inner.start(edge.serve)
        env = EdgeEnv(edge, info, store, token, tmp_path / "ca.pem", tmp_path, nursery)
        mux = await raw_session(env, token)
        # The range's one port is reserved: a random pick finds nothing, a request by address binds.
        assert code_of(await bind(mux, "tcp", Addr="")) == "ERR_TUNNELD_337"
        resp = await bind(mux, "tcp", Addr=f"{DOMAIN}:{ports[0]}")
        assert not resp.error, resp.error
        await mux.aclose()
        inner.cancel_scope.cancel()
    store.close()


async def test_tcp_traffic_and_requests_are_counted(edge_env: EdgeEnv) -> None:
    echo = await start_echo_server(edge_env.nursery)
    up = await start_hello_upstream(edge_env.nursery)
    agent: Agent = await edge_env.start_agent(TunnelConfig("e", "tcp", str(echo)),
                                              TunnelConfig("w", "http", str(up), subdomain="counted"))
    tcp = next(t for t in agent.tunnels if t.proto == "tcp")
    port = int(tcp.public_url.rsplit(":", 1)[1])
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += await stream.receive_some()
        await stream.aclose()
    for _ in range(3):
        assert b"hello" in await get(edge_env.http_port, f"counted.{DOMAIN}")
    await get(edge_env.http_port, f"nobody.{DOMAIN}")
    metrics = edge_env.edge.metrics
    with trio.fail_after(5):
        while metrics.tunnel_bytes.get((tcp.tunnel_id, "in"), 0) < 1000:
            await trio.sleep(0.02)
    assert metrics.tunnel_bytes[(tcp.tunnel_id, "out")] == 1000
    assert metrics.tunnel_connections[(tcp.tunnel_id, "tcp")] == 1
    assert metrics.http["2xx"].count == 3 and metrics.http["4xx"].count == 1
    http_ids = {t.tunnel_id for t in agent.tunnels if t.proto.startswith("http")}
    assert sum(metrics.tunnel_requests.get(t, 0) for t in http_ids) == 3
    # Series of tunnels that are gone are dropped.
    metrics.prune(set())
    assert not metrics.tunnel_bytes and not metrics.tunnel_requests

"""Tunnels started and stopped on a running agent (``Agent.start_tunnel`` / ``stop_tunnel``)."""

from __future__ import annotations

import pytest
import trio

from tunneld.core import TunnelConfig, TunnelRejected

from .conftest import EdgeEnv, start_echo_server, start_hello_upstream
from .core.test_resume import FAST_HEARTBEAT, host_of, http_get, port_of, tcp_echo, wait_for
from .linkproxy import LinkProxy


async def refused(port: int) -> bool:
    """True when a public TCP port no longer forwards (refused, or closed without an answer)."""
    try:
        return await tcp_echo(port) == b""
    except OSError:
        return True


async def test_start_and_stop_tcp(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    echo = await start_echo_server(nursery)
    agent = await edge_env.start_agent()
    assert agent.tunnels == []
    with trio.fail_after(10):
        tunnels = await agent.start_tunnel(TunnelConfig("t", "tcp", str(echo)))
    assert [t.name for t in tunnels] == ["t"]
    assert agent.tunnels == tunnels
    url = tunnels[0].public_url
    assert url.startswith("tcp://") and tunnels[0].tunnel_id
    assert await tcp_echo(port_of(url)) == b"ping"

    with trio.fail_after(10):
        await agent.stop_tunnel("t")
    assert agent.tunnels == []
    assert await refused(port_of(url))
    with pytest.raises(KeyError):
        await agent.stop_tunnel("t")


async def test_start_http_gives_both_schemes(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    web = await start_hello_upstream(nursery)
    agent = await edge_env.start_agent()
    with trio.fail_after(10):
        tunnels = await agent.start_tunnel(TunnelConfig("w", "http", str(web)))
    assert [(t.name, t.proto) for t in tunnels] == [("w", "https"), ("w (http)", "http")]
    https, http = tunnels
    assert https.public_url.startswith("https://") and http.public_url.startswith("http://")
    assert host_of(https.public_url) == host_of(http.public_url)
    host = host_of(http.public_url)
    assert b"\r\n\r\nhello " in await http_get(edge_env.http_port, host)

    # One endpoint by its API name: the other stays.
    with trio.fail_after(10):
        await agent.stop_tunnel("w (http)")
    assert agent.tunnels == [https]
    assert b" 404 " in (await http_get(edge_env.http_port, host)).split(b"\r\n", 1)[0] + b" "
    with trio.fail_after(10):
        await agent.stop_tunnel("w")
    assert agent.tunnels == []


async def test_runtime_tunnel_beside_configured_ones(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    echo = await start_echo_server(nursery)
    agent = await edge_env.start_agent(TunnelConfig("first", "tcp", str(echo)))
    with trio.fail_after(10):
        [second] = await agent.start_tunnel(TunnelConfig("second", "tcp", str(echo)))
        await agent.stop_tunnel("first")
    assert agent.tunnels == [second]
    assert await tcp_echo(port_of(second.public_url), b"still") == b"still"


async def test_bad_definitions_are_value_errors(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    echo = await start_echo_server(nursery)
    agent = await edge_env.start_agent(TunnelConfig("t", "tcp", str(echo)))
    before = list(agent.tunnels)
    with pytest.raises(ValueError, match="already exists"):
        await agent.start_tunnel(TunnelConfig("t", "tcp", str(echo)))
    with pytest.raises(ValueError, match="unknown tunnel type"):
        await agent.start_tunnel(TunnelConfig("x", "gopher", "70"))
    with pytest.raises(ValueError):
        await agent.start_tunnel(TunnelConfig("x", "tcp", "not a port"))
    with pytest.raises(ValueError, match="name"):
        await agent.start_tunnel(TunnelConfig("", "tcp", str(echo)))
    with pytest.raises(ValueError, match="labels?"):
        await agent.start_tunnel(TunnelConfig("x", "labeled", str(echo)))
    assert agent.tunnels == before


async def test_refused_bind_leaves_nothing(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    web = await start_hello_upstream(nursery)
    # Another agent holds the http side of sub.tunneld.test: our https Bind succeeds, the http one
    # is refused, and the https endpoint must not be left behind.
    other = await edge_env.start_agent(TunnelConfig("o", "http", str(web), schemes=["http"], subdomain="sub"))
    agent = await edge_env.start_agent()
    with trio.fail_after(10), pytest.raises(TunnelRejected) as info:
        await agent.start_tunnel(TunnelConfig("w", "http", str(web), subdomain="sub"))
    assert info.value.code is not None
    assert agent.tunnels == []
    assert agent._by_id == {}
    # The name is free again on https, and the other agent still serves http.
    assert b"\r\n\r\nhello " in await http_get(edge_env.http_port, host_of(other.tunnels[0].public_url))
    with trio.fail_after(10):
        [https] = await agent.start_tunnel(TunnelConfig("w2", "http", str(web), subdomain="sub",
                                                        schemes=["https"]))
    assert https.public_url.startswith("https://sub.")


async def test_offline_start_binds_on_reconnect(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    proxy = await LinkProxy(edge_env.info.ports["agent"]).start(nursery)
    echo = await start_echo_server(nursery)
    agent = await edge_env.start_agent(server_addr=f"127.0.0.1:{proxy.port}", **FAST_HEARTBEAT)
    online = agent.online
    proxy.cut()
    with trio.fail_after(5):
        while agent.online is online:
            await trio.sleep(0.01)
    # Between connections: the tunnel is listed unbound, then bound by the next connection.
    [tunnel] = await agent.start_tunnel(TunnelConfig("t", "tcp", str(echo)))
    assert tunnel.public_url == "" or agent.online.is_set()
    await wait_for(lambda: agent.online.is_set() and tunnel.public_url != "", 15)
    assert await tcp_echo(port_of(tunnel.public_url)) == b"ping"


async def test_stop_offline_is_not_rebound(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    proxy = await LinkProxy(edge_env.info.ports["agent"]).start(nursery)
    echo = await start_echo_server(nursery)
    agent = await edge_env.start_agent(TunnelConfig("t", "tcp", str(echo)),
                                       TunnelConfig("u", "tcp", str(echo)),
                                       server_addr=f"127.0.0.1:{proxy.port}", **FAST_HEARTBEAT)
    url = agent.tunnels[0].public_url
    online = agent.online
    proxy.cut()
    with trio.fail_after(5):
        while agent.online is online:
            await trio.sleep(0.01)
    await agent.stop_tunnel("t")
    await wait_for(agent.online.is_set, 15)
    assert [t.name for t in agent.tunnels] == ["u"]
    # The edge let go of the old session's tunnels, and this one was not bound again.
    assert await refused(port_of(url))

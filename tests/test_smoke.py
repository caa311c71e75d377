"""End-to-end smoke: HTTP and TCP through an in-process edge and agent."""

from __future__ import annotations

import trio

from tunneld.core import TunnelConfig

from .conftest import EdgeEnv, start_echo_server


async def test_tcp_echo(edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    port = await start_echo_server(nursery)
    agent = await edge_env.start_agent(TunnelConfig(name="t", proto="tcp", addr=str(port)))
    url = agent.tunnels[0].public_url
    assert url.startswith("tcp://tunneld.test:")
    public_port = int(url.rsplit(":", 1)[1])
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", public_port)
        await stream.send_all(b"hello")
        await stream.send_eof()
        got = b""
        async for chunk in stream:
            got += chunk
    assert got == b"hello"
